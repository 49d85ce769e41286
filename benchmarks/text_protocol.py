"""Few-shot intent detection at ProtAugment's published protocol (issue 13): BANKING77 and OOS (CLINC150's 150
intents), 5-way 1-shot and 5-shot, 5 queries per class, 600 meta-test episodes per fold, the five published class
splits, meta-training on the 10 labelled utterances per training intent.

    grid  (per dataset and shot, fold 01)   each algorithm's inner steps and rates: one `metapeft run --stage
          meta_train` per candidate, the same iterations for all; the lowest meta-val loss wins
    test  (per dataset and shot)            `metapeft run --config configs/<dataset>-protaugment-<K>shot.yaml`
          with the chosen values: a fold study (flows/folds.py); --reduced: fold 01 with every method, then
          every fold with the best meta-learner (the baselines run in every study)
    goal  (per dataset and shot)            from the fold study's "folds" cache entry: 1-shot, the best
          meta-learner beats the prototype baseline by >= 2 points, Holm-adjusted paired t and Wilcoxon p < 0.01
          on the pooled episodes; 5-shot, no baseline is better than it with both p < 0.01

Every study runs through the real CLI (`metapeft run` subprocesses) in the project folder --project
($METAPEFT_HOME), so finished grid candidates and fold studies are taken from the cache on a rerun (a study whose
"folds" entry is complete starts no process at all). The JSON is rewritten after every study.

    .venv/bin/python benchmarks/text_protocol.py --smoke                  # the tooling, in a few minutes
    .venv/bin/python benchmarks/text_protocol.py --reduced                # what the issue allows if all does not fit
    .venv/bin/python benchmarks/text_protocol.py                          # every fold, every method
    .venv/bin/python benchmarks/text_protocol.py --datasets banking77 --shots 1 --folds 01,02
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import FOREIGN, machine_info, metapeft, write_json_atomic  # noqa: E402

DATASETS = {"banking77": "BANKING77", "oos": "OOS (CLINC150)"}  # config prefix -> name in the tables
SHOTS = (1, 5)
FOLDS = ("01", "02", "03", "04", "05")
EPISODES = 600
META_LEARNERS = ("maml", "fomaml", "protomaml", "anil_maml", "protonet", "metasgd")
BASELINES = ("prototypes", "linear_head", "lora_finetune")  # every study runs all three (one stage)
REFERENCE = "prototypes"  # the frozen prototype baseline of the 1-shot goal
MARGIN, ALPHA = 0.02, 0.01  # the goal: 2 accuracy points; both tests below 0.01

# Each algorithm's grid, chosen on fold 01's meta-val loss (the same iterations for every candidate). Four
# candidates for every algorithm with an inner loop; ProtoNet has none, so nothing to choose (its config values).
INNER = {"inner_steps": (1, 3), "fast_lr": (0.1, 0.5)}
# First-order methods whose head the zeroing trick (Kao et al., ICLR 2022: every task's head starts at zero) may
# help: after the grid, the chosen values are trained once more with zero_head flipped from the config's, and the
# lower meta-val loss decides (recorded in the JSON): the choice is measured, not assumed.
ZEROING = ("fomaml",)
GRIDS = {"maml": INNER, "fomaml": INNER, "protomaml": INNER, "metasgd": INNER,  # metasgd: the rates' start
         "anil_maml": {"inner_steps": (1, 3), "fast_lr": (0.5, 1.0)},  # the head alone adapts: larger steps
         "protonet": {}}

# ProtAugment (Dopierre, Gravier, Logerais, ACL 2021) and its prototypical-network baseline, 5-way, "10 samples",
# on these splits. Not found: the stored copies of the paper reachable here give its first page only, and the
# authors' repository (tdopierre/ProtAugment) has no results table. Fill `numbers` ({dataset: {shot: {"ProtAugment":
# acc %, "Proto": acc %}}}) and `source` (the paper's table) from the paper itself; never from memory.
PUBLISHED = {
    "found": False,
    "source": None,
    "numbers": {},
    "searched": [
        "search pages: 'ProtAugment Dopierre ACL 2021 BANKING77 OOS 5-way 1-shot accuracy table' and three "
        "rephrasings: the paper's pages (arXiv 2105.12995 as markdown, ACL Anthology 2021.acl-long.191) come back "
        "with their first page only, no results table",
        "search docs: the paper's Hugging Face pages and the authors' models (tdopierre/ProtAugment-LM-*): no numbers",
        "search code and issues: later papers' repositories on the same splits (IAE, Ma et al. NAACL 2022): no table",
        "find_files / read_file tdopierre/ProtAugment: README.md (commit 0f37b205205599141d856fbdddb71aca91b9145d) "
        "has no results; utils/scripts/protaugment/run_protaugment.sh gives the training protocol only",
        "find_string 'ProtAugment', '| ProtAugment', 'ProtAugment &': run scripts only",
    ],
}


# ---------------------------------------------------------------- the science of the protocol (tested)

def grid_candidates(algorithm: str) -> list[dict]:
    """The algorithm's candidates, each {field: value} of meta_train.overrides.<algorithm>; [{}] without a grid."""
    grid = GRIDS[algorithm]
    candidates = [{}]
    for name, values in grid.items():
        candidates = [{**c, name: v} for c in candidates for v in values]
    return candidates


def choose_candidate(candidates: list[dict]) -> dict:
    """The candidate ({"values", "val_loss"}) with the lowest meta-val loss; ties go to fewer inner steps, then the
    smaller rate (the cheaper, more cautious one). A diverged candidate (val_loss None) is never chosen."""
    finite = [c for c in candidates if c["val_loss"] is not None and math.isfinite(c["val_loss"])]
    if not finite:
        raise RuntimeError(f"every grid candidate diverged: {[c['values'] for c in candidates]}")
    return min(finite, key=lambda c: (round(c["val_loss"], 9), c["values"].get("inner_steps", 0),
                                      c["values"].get("fast_lr", 0.0)))


def zero_head_choice(chosen: dict, flipped: dict) -> dict:
    """The grid's chosen candidate and the same values with zero_head flipped ({"values", "val_loss"} each): the
    one with the lower meta-val loss (a tie keeps the grid's); the record says both losses and the choice."""
    kept = choose_candidate([chosen, flipped]) if flipped["val_loss"] is not None else chosen
    if kept is not chosen and kept["val_loss"] == chosen["val_loss"]:
        kept = chosen
    return {"values": kept["values"], "zero_head": bool(kept["values"]["zero_head"]),
            "val_loss": {str(bool(c["values"]["zero_head"])).lower(): c["val_loss"] for c in (chosen, flipped)}}


def best_meta_learner(summary: list[dict], methods: list[str]) -> str:
    """The meta-learner (of methods) with the highest mean; ties by name, as components.significance ranks."""
    rows = [r for r in summary if r["method"] in methods]
    if not rows:
        raise ValueError(f"no meta-learner of {methods} in the summary ({[r['method'] for r in summary]})")
    return min(rows, key=lambda r: (-r["mean"], r["method"]))["method"]


def studies(methods: list[str], folds: list[str], reduced: bool, best: str | None = None) -> list[dict]:
    """The fold studies of one dataset and shot. Full: every method on every fold. Reduced (what the issue allows):
    the first fold with every method, then, once that names the best meta-learner, every fold with it alone (the
    baselines run in every study)."""
    if not reduced:
        return [{"name": "all-folds", "folds": list(folds), "algorithms": list(methods)}]
    first = [{"name": f"fold-{folds[0]}", "folds": [folds[0]], "algorithms": list(methods)}]
    return first if best is None else first + [{"name": "all-folds", "folds": list(folds), "algorithms": [best]}]


def pair(comparisons: list[dict], a: str, b: str) -> dict | None:
    """a - b from the study's comparisons (each pair once, method_a the better mean): the difference, its CI and
    the raw and Holm-adjusted p of both tests; None when the pair is absent (a method diverged)."""
    for row in comparisons:
        if {row["method_a"], row["method_b"]} == {a, b}:
            sign = 1 if row["method_a"] == a else -1
            low, high = sorted((sign * row["ci_low"], sign * row["ci_high"]))
            return {"diff": sign * row["mean_diff"], "ci_low": low, "ci_high": high, "n": row["n"],
                    **{k: row[k] for k in ("p_ttest", "p_wilcoxon", "p_ttest_holm", "p_wilcoxon_holm")}}
    return None


def goal(shot: int, best: str, comparisons: list[dict], baselines=BASELINES) -> dict:
    """Whether the issue's goal is met, from the pooled-episode comparisons of the study holding the best
    meta-learner on every fold. 1-shot: best - prototypes >= MARGIN with both Holm-adjusted p < ALPHA. 5-shot:
    no baseline beats it (mean above it with both Holm-adjusted p < ALPHA)."""
    significant = lambda p: max(p["p_ttest_holm"], p["p_wilcoxon_holm"]) < ALPHA  # noqa: E731 (nan: False)
    if shot == 1:
        p = pair(comparisons, best, REFERENCE)
        met = p is not None and p["diff"] >= MARGIN and significant(p)
        return {"rule": f"{best} - {REFERENCE} >= {MARGIN * 100:g} points, Holm-adjusted paired t and Wilcoxon "
                        f"p < {ALPHA:g} on the pooled episodes", "met": bool(met), "vs": {REFERENCE: p}}
    vs = {b: pair(comparisons, best, b) for b in baselines}
    worse = [b for b, p in vs.items() if p is not None and p["diff"] < 0 and significant(p)]
    return {"rule": f"no baseline above {best} with Holm-adjusted paired t and Wilcoxon p < {ALPHA:g} on the "
                    f"pooled episodes", "met": not worse and all(p is not None for p in vs.values()),
            "worse_than": worse, "vs": vs}


def method_rows(records: list[dict]) -> list[dict]:
    """Per method its row from the study that ran it on the most folds (reduced: the best meta-learner and the
    baselines from every fold, the other meta-learners from fold 01), best mean first."""
    rows: dict[str, dict] = {}
    for record in records:
        for row in record["summary"]:
            if row["method"] not in rows or row["n_folds"] > rows[row["method"]]["n_folds"]:
                rows[row["method"]] = {**row, "folds": record["folds"], "study": record["name"]}
    return sorted(rows.values(), key=lambda r: (-r["mean"], r["method"]))


def protocol_scale(smoke: bool, reduced: bool, datasets, shots, folds, episodes: int) -> str:
    """smoke; full or reduced when every dataset, shot and fold ran at 600 episodes; else partial."""
    if smoke:
        return "smoke"
    complete = (set(datasets) == set(DATASETS) and set(shots) == set(SHOTS) and set(folds) == set(FOLDS)
                and episodes == EPISODES)
    return ("reduced" if reduced else "full") if complete else "partial"


# ---------------------------------------------------------------- running studies through the CLI

@dataclass(frozen=True)
class Setting:
    dataset: str
    shot: int

    @property
    def config(self) -> str:
        return f"configs/{self.dataset}-protaugment-{self.shot}shot.yaml"


def set_args(sets: dict[str, object]) -> list[str]:
    return [a for k, v in sets.items() for a in ("--set", f"{k}={yaml_value(v)}")]


def yaml_value(value) -> str:
    """value as the YAML text of a --set item; fold names stay strings ("01", not the number 1)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(yaml_value, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) and value.isdigit() else str(value)


def overrides_of(sets: dict[str, object]) -> dict:
    """The load_config overrides the CLI makes of these --set items (its own parser: the same keys)."""
    from flows.cli import parse_sets

    return parse_sets(tuple(f"{k}={yaml_value(v)}" for k, v in sets.items()))


class Ledger:
    """Wall seconds of what was computed, by cache key, kept in the project: a cached rerun still reports them."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def record(self, key: str, seconds: float) -> None:
        self.data[key] = round(seconds, 1)
        write_json_atomic(self.data, self.path)


def run_grid(setting: Setting, methods: list[str], fold: str, common: dict, project: Path, ledger: Ledger,
             limit: int | None) -> dict:
    """Each algorithm's candidates meta-trained on one fold (`--stage meta_train`, or `--until meta_train` while
    the task sets and prefix are not cached); returns {algorithm: {candidates, chosen, rule}}."""
    from flows.cache import StageCache
    from flows.config import fold_dirs, load_config
    from flows.plan import make_plan, unready_upstream

    fold_set = {"family.split_dir": fold_dirs(load_config(setting.config, overrides_of(common)))[fold]}

    def trained(algorithm: str, values: dict) -> dict:
        """One candidate meta-trained (or found in the cache): its values, key, meta-val loss and costs."""
        sets = common | fold_set | {"meta_train.algorithms": [algorithm]} \
            | {f"meta_train.overrides.{algorithm}.{k}": v for k, v in values.items()}
        cfg = load_config(setting.config, overrides_of(sets))
        data = project / cfg.runtime.data_dir
        plan, cache = make_plan(cfg, data / "inputs.json"), StageCache(data)
        key, seconds = plan.algorithm_keys[algorithm], None
        meta = (cache.manifest("meta_train", key) or {}).get("meta", {})
        cached = cache.is_complete("meta_train", key) and meta.get("stop_reason") != "budget"
        if not cached:
            stage = ["--until" if unready_upstream(plan, cache, {"meta_train"}, cfg) else "--stage", "meta_train"]
            seconds, _ = metapeft(["--config", setting.config, *set_args(sets), *stage], project,
                                  project / "logs" / f"grid-{setting.dataset}-{setting.shot}-{key}.log")
            ledger.record(f"meta_train/{key}", seconds)
            meta = cache.manifest("meta_train", key)["meta"]
        return {"values": values, "meta_train_key": key, "val_loss": val_loss(cache, key, meta),
                "best_iteration": meta.get("best_iteration"), "stop_reason": meta.get("stop_reason"),
                "iterations": meta.get("iterations_total"), "train_seconds": meta.get("seconds"),
                "wall_seconds": seconds, "cached": cached,
                "wall_seconds_when_computed": ledger.data.get(f"meta_train/{key}"),
                "zero_head": bool(cfg.meta_train.for_algorithm(algorithm).get("zero_head", False))}

    out = {}
    for algorithm in methods:
        candidates = [trained(algorithm, values) for values in grid_candidates(algorithm)[:limit]]
        chosen = choose_candidate(candidates)
        out[algorithm] = {"candidates": candidates, "chosen": chosen["values"],
                          "rule": "lowest meta-val loss of the kept state; ties: fewer inner steps, then smaller rate"}
        if algorithm in ZEROING:  # the zeroing trick, measured at the chosen values
            flipped = trained(algorithm, {**chosen["values"], "zero_head": not chosen["zero_head"]})
            choice = zero_head_choice({**chosen, "values": {**chosen["values"], "zero_head": chosen["zero_head"]}},
                                      flipped)
            out[algorithm] |= {"chosen": choice["values"], "zero_head": choice, "candidates": [*candidates, flipped]}
        print(f"  grid {setting.dataset} {setting.shot}-shot {algorithm}: "
              + ", ".join(f"{c['values'] or 'config values'} -> {c['val_loss'] or 'diverged'}"
                          for c in out[algorithm]["candidates"])
              + f"; chosen {out[algorithm]['chosen'] or 'config values'}", flush=True)
    return out


def val_loss(cache, key: str, meta: dict) -> float | None:
    """The meta-val loss of the state meta-training kept (its best validation); None when it diverged."""
    from flows.cache import HISTORY

    if meta.get("stop_reason") == "diverged":
        return None
    history = cache.read_table("meta_train", key, HISTORY)
    val = history[(history["metric"] == "val_loss") & (history["iteration"] == meta["best_iteration"])]
    return float(val["value"].iloc[-1])


def run_study(setting: Setting, study: dict, sets: dict, project: Path, ledger: Ledger) -> dict:
    """One fold study (`metapeft run --config ...`), unless its "folds" entry is cached; its tables from that entry."""
    import pandas as pd

    from flows.cache import StageCache
    from flows.config import load_config
    from flows.folds import TABLES, fold_plans, summary_key

    sets = sets | {"folds": study["folds"], "meta_train.algorithms": study["algorithms"]}
    overrides = overrides_of(sets)
    cfg = load_config(setting.config, overrides)
    plans = fold_plans(cfg, setting.config, overrides, project)
    key, cache = summary_key(cfg, plans), StageCache(project / cfg.runtime.data_dir)
    load_start, seconds, run_id = os.getloadavg(), None, ""
    cached = cache.is_complete("folds", key)
    if not cached:
        log = project / "logs" / f"study-{setting.dataset}-{setting.shot}-{study['name']}-{key}.log"
        seconds, run_id = metapeft(["--config", setting.config, *set_args(sets)], project, log)
        ledger.record(f"folds/{key}", seconds)
    tables = {t: pd.read_parquet(cache.path("folds", key) / f"{t}.parquet") for t in TABLES}
    return {**study, "folds_key": key, "mlflow_run": run_id, "cached": cached, "wall_seconds": seconds,
            "wall_seconds_when_computed": ledger.data.get(f"folds/{key}"), "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "command": shlex.join(["metapeft", "run", "--config", setting.config, *set_args(sets)]),
            **{t: records(tables[t]) for t in TABLES}, "timings": timings(cache, plans)}


def records(frame) -> list[dict]:
    """A table as JSON records, nan as None."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in frame.to_dict("records")]


def timings(cache, plans: dict) -> dict:
    """Per fold, what its cache entries recorded of their own computation: each unit's meta-training seconds and
    iterations, the baselines' seconds (600 episodes x 3 baselines at full scale)."""
    out = {}
    for fold, plan in plans.items():
        units = {}
        for label, key in plan.algorithm_keys.items():
            meta = cache.manifest("meta_train", key)["meta"]
            units[label] = {k: meta.get(k) for k in ("seconds", "iterations_run", "iterations_total", "stop_reason")}
        baselines = cache.manifest("baselines", plan.keys["baselines"])["meta"]
        out[fold] = {"meta_train": units, "baselines_seconds": baselines.get("seconds")}
    return out


def settings_sets(args) -> dict:
    """The --set items every grid candidate and study of a run shares (so fold 01's chosen candidate is a cache hit
    in the fold study: the same task sets, the same unit keys)."""
    sets: dict[str, object] = {"family.n_test_episodes": args.episodes}
    if args.iterations:
        sets["meta_train.iterations"] = args.iterations
    if args.threads:
        sets["runtime.threads"] = args.threads
    if args.smoke:
        sets |= {"meta_train.val_every": 1, "meta_train.checkpoint_every": args.iterations,
                 "family.n_val_episodes": 4, "embedding.n_similarity_tasks": 2}
    return sets


def run_setting(setting: Setting, args, project: Path, ledger: Ledger, report) -> dict:
    """The grid (if asked), the fold studies and the goal of one dataset and shot; report(partial) after each study."""
    from flows.config import load_config

    common = settings_sets(args)
    cfg = load_config(setting.config, overrides_of(common))
    grid = run_grid(setting, args.methods, args.folds[0], common, project, ledger, args.grid_limit) \
        if args.grid else {}
    chosen = {f"meta_train.overrides.{a}.{k}": v for a, g in grid.items() for k, v in g["chosen"].items()}
    out = {"dataset": setting.dataset, "shot": setting.shot, "config": setting.config, "grid": grid,
           "chosen": {a: g["chosen"] for a, g in grid.items()}, "iterations": cfg.meta_train.iterations,
           "episodes": cfg.family.n_test_episodes, "studies": []}
    plan = studies(args.methods, args.folds, args.reduced)
    while plan:
        study = plan.pop(0)
        print(f"{setting.dataset} {setting.shot}-shot: study {study['name']} (folds {', '.join(study['folds'])}; "
              f"{', '.join(study['algorithms'])} + baselines)", flush=True)
        out["studies"].append(run_study(setting, study, common | chosen, project, ledger))
        report(out)
        if args.reduced and study["name"] != "all-folds":
            best = best_meta_learner(out["studies"][-1]["summary"], args.methods)
            plan = studies(args.methods, args.folds, True, best)[1:]
    final = out["studies"][-1]
    best = best_meta_learner(final["summary"], args.methods)
    out |= {"best_meta_learner": best, "rows": method_rows(out["studies"]),
            "goal": goal(setting.shot, best, final["comparisons"]) | {
                "study": final["name"], "n_folds": len(final["folds"]), "episodes_per_fold": args.episodes,
                "at_published_scale": len(final["folds"]) == len(FOLDS) and args.episodes == EPISODES}}
    return out


# ---------------------------------------------------------------- timing estimate, provenance, main

def estimate(results: list[dict], iterations: int | None = None, n_folds: int = len(FOLDS),
             episodes: int = EPISODES) -> dict:
    """Hours for the full and the reduced protocol on this machine (grid included), from what this run measured:
    seconds per meta-iteration per algorithm (a unit's seconds / iterations: at a handful of iterations the model
    load and the validations are in it, so an upper bound; an algorithm not run is taken at the slowest rate
    measured) and seconds per baselines episode (3 baselines; a LoRA meta-learner's evaluation is taken at one
    per-episode LoRA fine-tuning, a third of that). iterations: per unit (default: the ones that ran)."""
    per_iter: dict[str, list[float]] = {}
    per_episode = []
    for setting in results:
        for study in setting["studies"]:
            for fold in study["timings"].values():
                for label, unit in fold["meta_train"].items():
                    if unit["seconds"] and unit["iterations_run"]:
                        per_iter.setdefault(label, []).append(unit["seconds"] / unit["iterations_run"])
                per_episode.append(fold["baselines_seconds"] / setting["episodes"])
    if not per_iter or not per_episode:
        return {}
    measured = {a: statistics.median(v) for a, v in per_iter.items()}
    rate = {a: measured.get(a, max(measured.values())) for a in META_LEARNERS}
    episode = statistics.median(per_episode)
    iters = iterations or max(r["iterations"] for r in results)
    grid = sum((len(grid_candidates(a)) + (a in ZEROING)) * rate[a] for a in META_LEARNERS) * iters
    fold_all = sum(rate.values()) * iters + episodes * episode * (1 + len(META_LEARNERS) / 3)
    fold_best = max(rate.values()) * iters + episodes * episode * (1 + 1 / 3)
    settings = len(DATASETS) * len(SHOTS)
    full = settings * (grid + n_folds * fold_all)
    reduced = settings * (grid + fold_all + (n_folds - 1) * fold_best)  # fold 01's chosen units: grid entries
    return {"seconds_per_iteration_measured": measured, "seconds_per_baselines_episode": episode,
            "iterations": iters, "episodes": episodes, "full_hours": round(full / 3600, 1),
            "reduced_hours": round(reduced / 3600, 1), "grid_hours": round(settings * grid / 3600, 1),
            "note": "upper bound where units ran only a few iterations (fixed costs counted per iteration); "
                    "algorithms not run taken at the slowest measured rate; process starts (Prefect server, "
                    "imports, MiniLM load) and the embeddings stage not included"}


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed)}


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="banking77,oos", help="comma-separated: banking77, oos")
    p.add_argument("--shots", default="1,5", help="comma-separated: 1, 5")
    p.add_argument("--folds", default=",".join(FOLDS), help="comma-separated fold folders; the first is fold 01 "
                                                                  "of --reduced and of the grid")
    p.add_argument("--methods", default=",".join(META_LEARNERS), help="meta-learners (the baselines always run)")
    p.add_argument("--reduced", action="store_true", help="fold 01 for every method, every fold for the best "
                                                          "meta-learner (and the baselines)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="choose inner steps and rates on fold 01's meta-val loss first")
    p.add_argument("--grid-limit", type=int, default=None, help="only the first N candidates per algorithm")
    p.add_argument("--iterations", type=int, default=None, help="meta-iterations per unit  [default: the configs']")
    p.add_argument("--episodes", type=int, default=EPISODES, help="meta-test episodes per fold")
    p.add_argument("--threads", type=int, default=None, help="runtime.threads  [default: the configs']")
    p.add_argument("--smoke", action="store_true", help="BANKING77 1-shot, fold 01, fomaml (its zero_head check "
                                                        "too) + protonet, 2 grid candidates, 2 iterations, 10 "
                                                        "episodes, 1 thread")
    p.add_argument("--project", type=Path, default=None, help="METAPEFT_HOME  [default: data/text-protocol, "
                                                              "data/text-protocol-smoke with --smoke]")
    p.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/text-protocol.json, "
                                                          "text-protocol-smoke.json with --smoke]")
    args = p.parse_args(argv)
    if args.smoke:
        args.datasets, args.shots, args.folds, args.methods = "banking77", "1", "01", "fomaml,protonet"
        args.iterations, args.episodes, args.threads = args.iterations or 2, 10, args.threads or 1
        args.grid_limit, args.reduced = args.grid_limit or 2, True
    args.datasets, args.folds, args.methods = (v.split(",") for v in (args.datasets, args.folds, args.methods))
    args.shots = [int(s) for s in args.shots.split(",")]
    for name, values, allowed in (("--datasets", args.datasets, DATASETS), ("--shots", args.shots, SHOTS),
                                  ("--methods", args.methods, META_LEARNERS)):
        if wrong := [v for v in values if v not in allowed]:
            p.error(f"{name}: {wrong} not among {list(allowed)}")
    suffix = "-smoke" if args.smoke else ""
    args.project = (args.project or ROOT / "data" / f"text-protocol{suffix}").resolve()
    args.out = args.out or ROOT / "benchmarks" / "results" / f"text-protocol{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)  # the configs' data paths are relative to the repository root
    for name in FOREIGN:
        os.environ.pop(name, None)
    os.environ["METAPEFT_HOME"] = str(args.project)  # before flows is imported: its Prefect home is the project's
    args.project.mkdir(parents=True, exist_ok=True)
    from flows.config import load_config

    ledger, start = Ledger(args.project / "text-protocol-times.json"), time.perf_counter()
    data = {"command": shlex.join(["python", "benchmarks/text_protocol.py", *(sys.argv[1:] if argv is None
                                                                                else argv)]),
            "git": git_state(), "machine": machine_info(args.threads), "loadavg_start": os.getloadavg(),
            "scale": protocol_scale(args.smoke, args.reduced, args.datasets, args.shots, args.folds, args.episodes),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "published": PUBLISHED, "goal_rule": {"margin": MARGIN, "alpha": ALPHA, "reference": REFERENCE,
                                                  "p_values": "Holm over every pair of the study's methods"},
            "finished": False, "results": []}

    def report(partial: dict | None = None) -> None:  # a setting under way: its studies so far, apart
        data["seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic({**data, "in_progress": partial}, args.out)

    for dataset in args.datasets:
        for shot in args.shots:
            setting = Setting(dataset, shot)
            print(f"== {DATASETS[dataset]} 5-way {shot}-shot ({setting.config})", flush=True)
            result = run_setting(setting, args, args.project, ledger, report)
            data["results"].append(result)
            g = result["goal"]
            print(f"   best meta-learner {result['best_meta_learner']}; goal {'met' if g['met'] else 'not met'} "
                  f"({g['rule']})", flush=True)
            report()
    protocol = load_config(Setting(args.datasets[0], args.shots[0]).config).meta_train.iterations
    data |= {"finished": True, "loadavg_end": os.getloadavg(),
             "estimate": estimate(data["results"], iterations=protocol if args.smoke else None)}
    report()
    print(f"wrote {args.out} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
