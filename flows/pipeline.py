"""The Prefect flow `meta_pipeline`: task sets -> embeddings -> meta-training -> evaluation -> baselines -> significance.

Thin wiring: each task checks the stage cache, runs `flows.stages` on a miss, and logs to MLflow
(one parent run per pipeline run, one nested run per algorithm and baseline). Tasks pass keys,
never tensors: Prefect's hash of a tensor differs in every process and would never hit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flows.environment import configure

configure()

import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from components.significance import mean_ci  # noqa: E402
from flows import report, stages  # noqa: E402
from flows import stages as stages_module  # noqa: E402
from flows.cache import StageCache  # noqa: E402
from flows.config import StudyConfig, load_config  # noqa: E402
from flows.environment import project_root  # noqa: E402
from flows.families import family_for  # noqa: E402
from flows.plan import Plan, make_plan, needed_stages  # noqa: E402
from flows.tracking import Tracker, flatten  # noqa: E402
from flows.validation import ValidationFailed  # noqa: E402

DEFAULT_CONFIG = "configs/quick.yaml"


class MissingUpstream(RuntimeError):
    """A stage run alone whose input stage was never computed for this config."""


@dataclass
class Run:
    """Everything the stages of one pipeline run share; passed to tasks by reference, never hashed."""

    cfg: StudyConfig
    root: Path
    plan: Plan
    tracker: Tracker
    parent_id: str
    only: frozenset[str] = frozenset()
    force: frozenset[str] = frozenset()
    method_runs: dict[str, str] = field(default_factory=dict)
    hits: dict[str, bool] = field(default_factory=dict)

    @property
    def cache(self) -> StageCache:
        return StageCache(self.root / self.cfg.runtime.data_dir)

    def method_run(self, method: str, kind: str) -> str:
        """The nested MLflow run of an algorithm or baseline, created on first use."""
        if method not in self.method_runs:
            self.method_runs[method] = self.tracker.start_run(method, self.parent_id, {"metapeft.kind": kind})
        return self.method_runs[method]

    def stage(self, stage: str, key: str, compute: Callable[[Path], dict | None]) -> tuple[Path, dict]:
        """The cached entry of (stage, key), computing it on a miss or when forced; returns (path, meta)."""
        cache, logger = self.cache, get_run_logger()
        forced = stage in self.force or stage in self.only
        if not forced and cache.is_complete(stage, key):
            logger.info("%s [%s]: cache hit", stage, key)
            self.hits[f"{stage}/{key}"] = True
            return cache.path(stage, key), cache.manifest(stage, key)["meta"]
        logger.info("%s [%s]: computing", stage, key)
        start, meta = time.perf_counter(), {}
        with cache.writing(stage, key, meta) as out:
            result = compute(out)
            meta.update(result if isinstance(result, dict) else {})
            meta["seconds"] = round(time.perf_counter() - start, 3)
        self.hits[f"{stage}/{key}"] = False
        return cache.path(stage, key), meta


@task(name="prepare_task_sets", cache_policy=NO_CACHE)
def prepare_task_sets(run: Run) -> str:
    key = run.plan.keys["task_sets"]
    try:
        path, meta = run.stage("task_sets", key, lambda out: stages.build_task_sets(run.cfg, out))
    except ValidationFailed as e:
        failed = run.root / "mlruns" / "validation_failed.json"
        failed.write_text(pd.Series(e.report).to_json())
        run.tracker.log_artifact(run.parent_id, failed, "task_sets")
        raise
    run.tracker.log_artifact(run.parent_id, path / "validation.json", "task_sets")
    run.tracker.log_metrics(run.parent_id, meta)
    return key


@task(name="compute_embeddings", cache_policy=NO_CACHE)
def compute_embeddings(run: Run) -> str:
    if "prefix" in run.plan.keys:  # text: the frozen layers' hidden states, which later stages read
        _, meta = run.stage("prefix", run.plan.keys["prefix"], lambda out: stages.build_prefix(run.cfg, out))
        run.tracker.log_metrics(run.parent_id, {f"prefix_{k}": v for k, v in meta.items() if k != "seconds"}
                                | {"prefix_seconds": meta["seconds"]})
    key = run.plan.keys["embeddings"]
    path, _ = run.stage("embeddings", key, lambda out: stages.build_embeddings(
        run.cfg, run.cache, run.plan.keys, out))
    for png in sorted(path.glob("*.png")):
        run.tracker.log_artifact(run.parent_id, png, "embeddings")
    return key


@task(name="meta_train", task_run_name="meta_train[{algorithm}]", cache_policy=NO_CACHE)
def meta_train_algorithm(run: Run, algorithm: str) -> str:
    key, logger = run.plan.algorithm_keys[algorithm], get_run_logger()
    checkpoint = run.cache.root / "checkpoints" / key / "checkpoint.pt"
    if "meta_train" in run.force | run.only:
        checkpoint.unlink(missing_ok=True)
    section = run.cfg.meta_train.for_algorithm(algorithm)

    def progress(iteration: int, metrics: dict[str, float]) -> None:
        if "val_loss" in metrics:
            logger.info("%s: iteration %d/%d %s", algorithm, iteration, section["iterations"],
                        " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def compute(out: Path) -> dict:
        result = stages.train_algorithm(run.cfg, algorithm, run.cache, run.plan.keys, out, checkpoint, progress)
        return {"iterations_run": result.iterations_run, "iterations_total": result.iterations_total,
                "stop_reason": result.stop_reason, "best_iteration": result.best_iteration}

    path, meta = run.stage("meta_train", key, compute)
    child = run.method_run(algorithm, "meta_learner")
    run.tracker.log_params(child, {**section, **{f"model.{k}": v for k, v in run.cfg.model.model_dump().items()},
                                   "seed": run.cfg.seed})
    run.tracker.set_tags(child, {"metapeft.meta_train_key": key, "metapeft.stop_reason": meta["stop_reason"]})
    history = pd.read_parquet(path / "history.parquet")
    run.tracker.log_curves(child, zip(history["metric"], history["iteration"], history["value"]))
    run.tracker.log_metrics(child, {"meta_train_iterations": meta["iterations_total"],
                                    "meta_train_iterations_this_run": 0 if run.hits[f"meta_train/{key}"]
                                    else meta["iterations_run"],
                                    "best_iteration": meta["best_iteration"]})
    run.tracker.log_artifact(child, path / "state.pt", "meta_train")
    return key


def _log_results(run: Run, results: pd.DataFrame, kind: str) -> None:
    """meta_test_<metric> (+ _ci95 half-width) at the last step and the curve over steps, per method."""
    last, name = results["steps"].max(), f"meta_test_{family_for(run.cfg).metric}"
    for method, rows in results.groupby("method"):
        child = run.method_run(method, kind)
        mean, half = mean_ci(rows.loc[rows["steps"] == last, "value"], run.cfg.significance.confidence)
        curve = rows.groupby("steps")["value"].mean()
        run.tracker.log_metrics(child, {name: mean, f"{name}_ci95": half})
        run.tracker.log_curves(child, ((f"{name}_by_step", s, v) for s, v in curve.items()))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(run: Run) -> str:
    key = run.plan.keys["evaluate"]
    path, _ = run.stage("evaluate", key, lambda out: stages.evaluate_algorithms(
        run.cfg, run.cache, run.plan.keys, run.plan.algorithm_keys, out))
    _log_results(run, pd.read_parquet(path / "results.parquet"), "meta_learner")
    return key


@task(name="compare_baselines", cache_policy=NO_CACHE)
def compare_baselines(run: Run) -> str:
    key = run.plan.keys["baselines"]
    path, _ = run.stage("baselines", key, lambda out: stages.run_baselines(run.cfg, run.cache, run.plan.keys, out))
    _log_results(run, pd.read_parquet(path / "results.parquet"), "baseline")
    return key


@task(name="significance", cache_policy=NO_CACHE)
def significance(run: Run) -> str:
    key, cache = run.plan.keys["significance"], run.cache

    def compute(out: Path) -> None:
        results = pd.concat([cache.read_table("evaluate", run.plan.keys["evaluate"], "results"),
                             cache.read_table("baselines", run.plan.keys["baselines"], "results")])
        stages.compare(run.cfg, results, out)

    path, _ = run.stage("significance", key, compute)
    summary = pd.read_parquet(path / "summary.parquet").set_index("method")
    comparisons = pd.read_parquet(path / "comparisons.parquet")
    family = family_for(run.cfg)
    text = report.results_text(summary, comparisons, family.metric, family.reference, run.cfg.significance.alpha)
    (run.root / "mlruns" / "results.txt").write_text(text + "\n")
    for name in ("comparisons.parquet", "summary.parquet", "summary.png", "curves.png"):
        run.tracker.log_artifact(run.parent_id, path / name, "significance")
    run.tracker.log_artifact(run.parent_id, run.root / "mlruns" / "results.txt", "significance")
    return text


def _require_cached(run: Run, stage: str) -> None:
    keys = [(stage, run.plan.keys[stage])]
    if stage == "meta_train":
        keys = [(stage, k) for k in run.plan.algorithm_keys.values()]
    if stage == "embeddings" and "prefix" in run.plan.keys:
        keys.append(("prefix", run.plan.keys["prefix"]))
    for entry, key in keys:
        if not run.cache.is_complete(entry, key):
            raise MissingUpstream(f"stage {stage!r} has no cached output for this config ({entry} key {key}); "
                                  f"run it first: metapeft run --stage {stage}")


@flow(name="meta_pipeline")
def meta_pipeline(config_path: str = DEFAULT_CONFIG, stages: list[str] | None = None,
                  force: list[str] | None = None, overrides: dict | None = None) -> dict:
    """Run the study of `config_path`; `stages` runs only those (inputs from the cache), `force` recomputes.

    overrides ({section: {key: value}}) change the config file's values, e.g. a wall-clock budget.
    """
    cfg, root = load_config(config_path, overrides), project_root()
    only = frozenset(stages or ())
    todo = needed_stages(set(only), cfg)
    stages_module.set_threads(cfg)
    tracker = Tracker(root, cfg.runtime.experiment)
    plan = make_plan(cfg)
    parent = tracker.start_run(cfg.name, tags={"metapeft.config": str(config_path),
                                               **{f"metapeft.key.{s}": k for s, k in plan.keys.items()}})
    run = Run(cfg, root, plan, tracker, parent, only, frozenset(force or ()))
    status, text = "FAILED", ""
    try:
        tracker.log_params(parent, flatten(cfg.model_dump()))
        for stage in todo:
            if only and stage not in only:
                _require_cached(run, stage)
        run_stage = {
            "task_sets": lambda: prepare_task_sets(run),
            "embeddings": lambda: compute_embeddings(run),
            "meta_train": lambda: [meta_train_algorithm(run, a) for a in cfg.meta_train.algorithms],
            "evaluate": lambda: evaluate(run),
            "baselines": lambda: compare_baselines(run),
            "significance": lambda: significance(run),
        }
        for stage in todo:
            if not only or stage in only:
                outcome = run_stage[stage]()
                text = outcome if stage == "significance" else text
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.set_tags(parent, {"metapeft.cache_hits": sum(run.hits.values()),
                                  "metapeft.cache_misses": len(run.hits) - sum(run.hits.values())})
        for child in run.method_runs.values():
            tracker.end_run(child, status)
        tracker.end_run(parent, status)
    return {"run_id": parent, "keys": plan.keys, "hits": run.hits, "results": text}
