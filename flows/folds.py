"""The Prefect flow `fold_study`: one study over several class splits (folds), each fold its own cached pipeline.

    fold 01 ──► meta_pipeline (family.split_dir = <split_root>/01, its own keys) ──┐
    fold 02 ──► meta_pipeline ─────────────────────────────────────────────────────┼──► fold_summary: each fold's
    ...                                                                            │    means, the mean over folds
    fold 05 ──► meta_pipeline ─────────────────────────────────────────────────────┘    (t-interval over the fold
                                                                                         means), paired tests on
                                                                                         the pooled episodes

A config with top-level `folds` (and `family.split_root`) is a fold study. Each fold runs `meta_pipeline` as a
subflow on the same config file with the overrides `config.fold_overrides` gives it (`family.split_dir` set),
so a fold's entries are cached under keys of their own and a rerun takes every finished fold from the cache;
the folds of a dataset share one prefix entry where the plan keys it by the dataset's files
(`TextTasks.prefix_files`). The summary is a cache entry too (stage "folds"), keyed by the folds' evaluate and
baselines keys, and goes to an MLflow run of its own, under which the folds' runs are nested.
"""
from __future__ import annotations

import json
from pathlib import Path

from flows.environment import configure

configure()

import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from components.significance import compare_folds, verdict_p  # noqa: E402
from flows.answer import study_answer  # noqa: E402
from flows.cache import DIVERGED, RESULTS, SUMMARY_TEXT, StageCache, content_key, write_table  # noqa: E402
from flows.config import StudyConfig, check_fold_dirs, fold_overrides, load_config  # noqa: E402
from flows.environment import project_root  # noqa: E402
from flows.pipeline import config_hash, meta_pipeline  # noqa: E402
from flows.plan import Plan, make_plan  # noqa: E402
from flows.report import over_replicates, unfinished_lines, unfinished_tag, unfinished_training  # noqa: E402
from flows.report_page import fold_study_report  # noqa: E402
from flows.tracking import PARENT_TAG, Tracker  # noqa: E402
from flows.versions import code_version  # noqa: E402

# the "folds" entry's tables, beside SUMMARY_TEXT
TABLES = ("fold_means", "summary", "comparisons", "fold_pairs", "diverged")


def fold_plans(cfg: StudyConfig, config_path: str, overrides: dict | None, root: Path) -> dict[str, Plan]:
    """fold -> its pipeline's plan; planning reads every fold's input files, so a missing one is named before any
    fold runs."""
    memo = root / cfg.runtime.data_dir / "inputs.json"
    check_fold_dirs(cfg)
    return {fold: make_plan(load_config(config_path, o), memo) for fold, o in fold_overrides(cfg, overrides).items()}


def summary_key(cfg: StudyConfig, plans: dict[str, Plan]) -> str:
    """The "folds" entry's key: the folds' evaluate and baselines keys, the significance settings, the code."""
    family = next(iter(plans.values())).family
    return content_key({"folds": {f: [p.keys["evaluate"], p.keys["baselines"]] for f, p in plans.items()},
                        "confidence": cfg.significance.confidence, "alpha": cfg.significance.alpha,
                        "metric": family.metric, "lower_is_better": family.lower_is_better,
                        "code": code_version(["components.significance", __name__])})  # folds_text: here


def summary_reads(plans: dict[str, Plan]) -> list[tuple[str, str]]:
    """The entries the "folds" summary is computed from: each fold's evaluate and baselines."""
    return [(stage, plan.keys[stage]) for plan in plans.values() for stage in ("evaluate", "baselines")]


@task(name="fold_summary", cache_policy=NO_CACHE)
def summarize(cfg: StudyConfig, cache: StageCache, plans: dict[str, Plan], run_id: str | None = None,
              force: bool = False) -> Path:
    """The folds' results compared (`components.significance.compare_folds`), cached as the "folds" entry (run_id:
    the study's MLflow run, recorded in the entry's manifest); force (--force significance) recomputes it."""
    key, family, sig = summary_key(cfg, plans), next(iter(plans.values())).family, cfg.significance
    reads = summary_reads(plans)
    with cache.lock("folds", key):
        if not force and cache.status("folds", key, reads) == "cached":  # a fold's results rewritten: stale
            get_run_logger().info("folds [%s]: cache hit", key)
            return cache.path("folds", key)
        tables = {t: {f: pd.concat([cache.read_table(s, p.keys[s], t) for s in ("evaluate", "baselines")],
                                   ignore_index=True) for f, p in plans.items()} for t in (RESULTS, DIVERGED)}
        out_tables = compare_folds(tables[RESULTS], tables[DIVERGED], family.metric, family.lower_is_better,
                                   sig.confidence, sig.alpha)
        with cache.writing("folds", key, {"folds": list(plans), "mlflow_run_id": run_id}, reads=reads) as out:
            for name, table in out_tables.items():
                write_table(table, out, name)
            (out / SUMMARY_TEXT).write_text(folds_text(out_tables, family.metric, family.reference, sig.confidence,
                                                        sig.alpha) + "\n")
    return cache.path("folds", key)


FEW_FOLDS = 5  # below this many folds, say the interval over fold means is wide (the published protocol has 5)


def folds_text(tables: dict[str, pd.DataFrame], metric: str, reference: str, confidence: float, alpha: float) -> str:
    """Each method's mean over folds +- the CI half-width, its fold means, the pooled-episode paired tests (Holm)
    against the reference (`*`: significant at alpha, `verdict_p`: both tests below it), and the same pair over the
    folds: in how many folds the method was the better, and the paired t-test p over the fold means."""
    means = tables["fold_means"].pivot(index="method", columns="fold", values="mean")
    folds = list(dict.fromkeys(tables["fold_means"]["fold"]))
    pairs, over = tables["comparisons"], tables.get("fold_pairs")
    lines = [f"{'method':<16} {f'{metric} over folds ({confidence:.0%} CI)':>30}  "
             + " ".join(f"{f:>{max(7, len(f))}}" for f in folds) + f"  {'p_holm t / Wilcoxon vs ' + reference:>30}"
             + ("  better in folds, p over folds" if over is not None else "")]
    for row in tables["summary"].to_dict("records"):
        m = row["method"]
        pair = pairs[((pairs.method_a == m) & (pairs.method_b == reference))
                     | ((pairs.method_a == reference) & (pairs.method_b == m))]
        p = "-" if pair.empty else (f"{pair['p_ttest_holm'].iloc[0]:.1e} / {pair['p_wilcoxon_holm'].iloc[0]:.1e}"
                                    + ("*" if verdict_p(pair).iloc[0] < alpha else ""))
        half = f"{row['ci_half']:<7.4f}" if len(folds) > 1 else "n/a    "  # one fold: no interval over folds
        lines.append(f"{m:<16} {row['mean']:>20.4f} +- {half}  "
                     + " ".join(f"{means.loc[m, f]:>{max(7, len(f))}.4f}" for f in folds) + f"  {p:>30}"
                     + (f"  {over_replicates(over, m, reference, 'fold')}" if over is not None else ""))
    for row in tables["diverged"].to_dict("records"):
        lines.append(f"{row['method']:<16} DIVERGED in fold {row['fold']}: left out")
    if len(folds) == 1:
        lines.append("one fold: no interval over folds (the pooled-episode tests are that fold's own)")
    elif len(folds) < FEW_FOLDS:
        lines.append(f"only {len(folds)} folds: the interval over the fold means has {len(folds) - 1} degree(s) of "
                     f"freedom and may pass the metric's range")
    if over is not None and len(over):
        lines.append("the pooled-episode tests count every fold's episodes as independent; 'better in folds' and "
                     "the t-test over the fold means say whether a difference holds from one class split to another")
    return "\n".join(lines)


def fold_run_name() -> str:
    """`<study>-folds-<config hash>`, from the flow run's parameters."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    cfg = load_config(p["config_path"], p.get("overrides"))
    return f"{cfg.name}-folds-{config_hash(cfg)}"


@flow(name="fold_study", flow_run_name=fold_run_name)
def fold_study(config_path: str, overrides: dict | None = None, force: list[str] | None = None,
               prebuilt: list[str] | None = None) -> dict:
    """Run every fold of the config's `folds` as its own cached pipeline (a `meta_pipeline` subflow), then the
    summary over folds. overrides ({section: {key: value}}) apply to every fold; force: stages every fold
    recomputes; prebuilt: stages the caller has just computed into the cache for every fold (`meta_pipeline`).
    Returns the summary's MLflow run, each fold's pipeline result and the summary text."""
    cfg, root = load_config(config_path, overrides), project_root()
    if cfg.folds is None:
        raise ValueError(f"{config_path}: no folds; run it with meta_pipeline")
    plans = fold_plans(cfg, config_path, overrides, root)  # every fold's files read before any work
    tracker = Tracker(root, cfg.runtime.experiment)
    parent = tracker.start_run(cfg.name, tags={"metapeft.kind": "fold_study", "metapeft.config": str(config_path),
                                               "metapeft.folds": ",".join(cfg.folds),
                                               "metapeft.config_hash": config_hash(cfg),
                                               "metapeft.key.folds": summary_key(cfg, plans),
                                               **({"metapeft.overrides": json.dumps(overrides)} if overrides else {})})
    status, outs = "FAILED", {}
    try:
        tracker.log_config(parent, cfg.model_dump(mode="json"))
        for fold, changes in fold_overrides(cfg, overrides).items():
            outs[fold] = meta_pipeline(config_path=config_path, overrides=changes, force=force, prebuilt=prebuilt)
            if outs[fold]["keys"] != plans[fold].keys:
                raise RuntimeError(f"fold {fold}: the pipeline ran under other keys than planned (a file changed "
                                   "while the study ran?); run it again")
            tracker.set_tags(outs[fold]["run_id"], {PARENT_TAG: parent, "metapeft.fold": fold})
        cache = StageCache(root / cfg.runtime.data_dir)
        path = summarize(cfg, cache, plans, parent, force="significance" in (force or ()))
        unfinished = fold_unfinished(cfg, config_path, overrides, cache, plans)
        text = summary_text(path, unfinished)
        if unfinished:  # the means over folds include training a time budget stopped short: say where
            tracker.set_tags(parent, {"metapeft.unfinished": unfinished_tag(unfinished)})
        _log_summary(tracker, parent, path, cfg, plans[cfg.folds[0]].family.metric)
        page = fold_study_report(cfg, plans[cfg.folds[0]].family, path,
                                 {f: root / "reports" / o["run_id"] / "report.html" for f, o in outs.items()},
                                 root / "reports" / parent / "report.html", parent, unfinished)
        tracker.log_artifact(parent, page)
        summary = pd.read_parquet(path / "summary.parquet").set_index("method")
        answer = study_answer(summary, pd.read_parquet(path / "comparisons.parquet"),
                              plans[cfg.folds[0]].family.metric, set(cfg.meta_train.algorithms),
                              cfg.significance.confidence, cfg.significance.alpha,
                              pd.read_parquet(path / "fold_pairs.parquet"), unit="fold")
        if answer is not None:  # `metapeft runs` shows the study's answer: means over folds, pooled-episode tests
            tracker.log_metrics(parent, answer.metrics())
            tracker.set_tags(parent, answer.tags())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        tracker.set_tags(parent, {"metapeft.error": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        tracker.end_run(parent, status)
    get_run_logger().info("%s over folds %s: summary in MLflow run %s", cfg.name, ", ".join(cfg.folds), parent)
    return {"run_id": parent, "folds": outs, "results": text, "key": summary_key(cfg, plans)}


def fold_unfinished(cfg: StudyConfig, config_path: str, overrides: dict | None, cache: StageCache,
                    plans: dict[str, Plan]) -> dict[str, str]:
    """{"fold <fold> <unit>": note} for each fold's meta-training its budget stopped short or that kept its initial
    state (`flows.report.unfinished_training`)."""
    return {f"fold {fold} {label}": note for fold, changes in fold_overrides(cfg, overrides).items()
            for label, note in unfinished_training(cache, load_config(config_path, changes),
                                                   plans[fold].algorithm_keys).items()}


def summary_text(path: Path, unfinished: dict[str, str]) -> str:
    """The folds entry's table (path: the entry) and below it the unfinished notes: what a study prints, computed
    or cached."""
    return "\n".join([(path / SUMMARY_TEXT).read_text().rstrip("\n"), *unfinished_lines(unfinished)])


def _log_summary(tracker: Tracker, parent: str, path: Path, cfg: StudyConfig, metric: str) -> None:
    """Per method its mean over folds and CI half-width as metrics (`<method>.meta_test_<metric>`, `..._ci95`),
    each fold's mean (`..._fold_<fold>`), and the entry's tables and text as artifacts."""
    summary, means = (pd.read_parquet(path / f"{t}.parquet") for t in ("summary", "fold_means"))
    name, level = f"meta_test_{metric}", f"ci{cfg.significance.confidence * 100:g}"
    metrics = {}
    for row in summary.to_dict("records"):
        metrics[f"{row['method']}.{name}"] = row["mean"]
        metrics[f"{row['method']}.{name}_{level}"] = row["ci_half"]
    metrics |= {f"{r['method']}.{name}_fold_{r['fold']}": r["mean"] for r in means.to_dict("records")}
    tracker.log_metrics(parent, metrics)
    for name in (*(f"{t}.parquet" for t in TABLES), SUMMARY_TEXT):
        tracker.log_artifact(parent, path / name, "folds")
