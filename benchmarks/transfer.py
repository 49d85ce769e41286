"""The transfer studies (`configs/transfer-omniglot.yaml`, `configs/transfer-clinc150.yaml`): does task-embedding
distance predict how well meta-learning on one group transfers to another? Each study runs through the real CLI
(`metapeft run --config ...`, a subprocess) in its own project folder, then once more (all cache hits); the JSON
holds what the README's transfer tables show, read from the study's cache entries: Spearman's rho per embedding
and metric, the nearest-task comparison, the mean gains, each entry's compute seconds and the two wall times.

    .venv/bin/python benchmarks/transfer.py                          # both studies (about 20 + 25 min here)
    .venv/bin/python benchmarks/transfer.py --configs transfer-omniglot
    .venv/bin/python benchmarks/transfer.py --smoke                  # Omniglot, 3 alphabets, a few iterations

A study already in the project's cache is not recomputed: the JSON then says how many of its entries the first
run computed (`computed` of `entries`), so a partly cached first run is never reported as a cold one.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_state, machine_info, metapeft, write_json_atomic  # noqa: E402

CONFIGS = ("transfer-omniglot", "transfer-clinc150")
# --smoke: the Omniglot study shrunk to check the tooling in a few minutes (not a result)
SMOKE = {"name": "transfer-omniglot-smoke",
         "transfer": {"groups": ["Latin", "Greek", "Braille"], "iterations": 3, "pooled_iterations": 4,
                      "val_episodes": 2, "test_episodes": 4, "embed_episodes": 3, "task2vec_samples": 2,
                      "encoder_steps": 5, "n_boot": 200}}


def study_config(name: str, project: Path, smoke: bool) -> Path:
    """The config file of study `name`: configs/<name>.yaml, or with --smoke a shrunk copy in the project (its
    data path made absolute: the copy lives elsewhere)."""
    path = ROOT / "configs" / f"{name}.yaml"
    if not smoke:
        return path
    raw = yaml.safe_load(path.read_text())
    raw["family"]["path"] = str((ROOT / raw["family"]["path"]).resolve())
    raw["name"], raw["transfer"] = SMOKE["name"], {**raw["transfer"], **SMOKE["transfer"]}
    out = project / f"{SMOKE['name']}.yaml"
    project.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def study_record(config: Path, project: Path, computed_before: set[tuple[str, str]]) -> dict:
    """What the study's cache entries hold (they are all cached by now): rho, the nearest-task comparison, the
    mean gains, the compute seconds of what the first run computed; computed_before: the entries it found cached
    (`already_cached`)."""
    import pandas as pd

    from flows.cache import StageCache
    from flows.config import load_config
    from flows.transfer_stages import entries, make_transfer_plan, read_gains, start_notes

    cfg = load_config(config)
    plan, cache = make_transfer_plan(cfg), StageCache(project / cfg.runtime.data_dir)
    listed = entries(plan)

    def read(stage: str, name: str) -> pd.DataFrame:
        return pd.read_parquet(cache.path(stage, plan.keys[stage]) / f"{name}.parquet")

    gains = read_gains(cache.path("transfer_matrix", plan.keys["transfer_matrix"]))
    off = [gains.loc[s, t] for s in gains.index for t in gains.columns if s != t]
    seconds: dict[str, float] = {}  # compute seconds of the entries the first run computed
    for stage, key, _ in listed:
        if (stage, key) not in computed_before:
            seconds[stage] = seconds.get(stage, 0.0) + float(cache.manifest(stage, key)["meta"].get("seconds", 0.0))
    return {"name": cfg.name, "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
            "family": cfg.family.kind, "groups": list(gains.index), "transfer": cfg.transfer.model_dump(mode="json"),
            "confidence": cfg.transfer.confidence,
            "entries": {"total": len(listed), "computed": sum((s, k) not in computed_before for s, k, _ in listed)},
            "rho": read("transfer_correlation", "rho").to_dict("records"),
            "nearest": {"summary": read("nearest_task", "summary").to_dict("records"),
                        "comparisons": read("nearest_task", "comparisons").to_dict("records")},
            "gain_mean_off_diagonal": float(sum(off) / len(off)),
            "gain_mean_diagonal": float(sum(gains.loc[g, g] for g in gains.index) / len(gains)),
            "stage_seconds": seconds,
            "start_notes": start_notes(cfg, cache, plan.source_keys)}  # starts not trained as their name says


def already_cached(cfg, cache) -> set[tuple[str, str]]:
    """The study's entries a run would take from the cache: cached, not stale, no source training its budget stopped
    (a run goes on with it)."""
    from flows.transfer_stages import entries, make_transfer_plan, unfinished_sources

    plan = make_transfer_plan(cfg)
    unfinished = {plan.source_keys[name.removeprefix("source ")] for name in unfinished_sources(cfg, cache,
                                                                                                plan.source_keys)}
    return {(s, k) for s, k, read in entries(plan) if cache.status(s, k, read) == "cached" and k not in unfinished}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names under configs/")
    p.add_argument("--project", type=Path, default=ROOT / "data" / "transfer-bench",
                   help="the project folder (METAPEFT_HOME) the studies run and cache in")
    p.add_argument("--smoke", action="store_true", help="the Omniglot study shrunk: a check of the tooling")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    project = args.project.resolve()
    os.environ["METAPEFT_HOME"] = str(project)  # before flows is imported: the cache and stores are the project's
    from flows.cache import StageCache
    from flows.config import load_config

    names = ["transfer-omniglot"] if args.smoke else args.configs.split(",")
    if unknown := [n for n in names if not (ROOT / "configs" / f"{n}.yaml").is_file()]:
        p.error(f"--configs: no configs/<name>.yaml for {unknown}")
    command = shlex.join(["python", "benchmarks/transfer.py", *(argv if argv is not None else sys.argv[1:])])
    for name in names:
        config = study_config(name, project, args.smoke)
        cfg = load_config(config)
        cache = StageCache(project / cfg.runtime.data_dir)
        before = already_cached(cfg, cache)
        machine = machine_info(cfg.runtime.threads)
        log = project / "logs" / f"{cfg.name}.log"
        first, run_id = metapeft(["--config", str(config)], project, log)
        again, _ = metapeft(["--config", str(config)], project, log.with_suffix(".rerun.log"))
        record = study_record(config, project, before)
        out = args.out_dir / f"{cfg.name}.json"
        write_json_atomic({**record, "smoke": args.smoke, "command": command, "git": git_state(),
                           "machine": {**machine, "loadavg_end": os.getloadavg()}, "mlflow_run_id": run_id,
                           "first_run_seconds": first, "cached_rerun_seconds": again}, out)
        print(f"{cfg.name}: {record['entries']['computed']} of {record['entries']['total']} entries computed, "
              f"{first:.0f} s; cached rerun {again:.1f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
