"""The Prefect flow `meta_pipeline`: task sets -> embeddings -> meta-training -> evaluation -> baselines -> significance.

Thin wiring: each task checks the stage cache, runs `flows.stages` on a miss, and logs to MLflow
(one parent run per pipeline run, one nested run per algorithm and baseline). Tasks pass keys,
never tensors: Prefect's hash of a tensor differs in every process and would never hit.
Meta-training and evaluation run one task per (algorithm, seed) unit, in this process or, with
`runtime.runner: dask`, on Dask workers that get a pickled copy of the Run: whatever they create
must be handed back by value (cache hits) or exist before the fan-out (nested MLflow runs).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flows.environment import configure

configure()

import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

import torch  # noqa: E402

from components.significance import across_seeds, mean_ci  # noqa: E402
from flows import report, report_page  # noqa: E402
from flows.cache import (CHECKPOINT, DIVERGED, HISTORY, RESULTS, STATE, VALIDATION, StageCache,  # noqa: E402
                         write_table)
from flows.config import StudyConfig, load_config  # noqa: E402
from flows.environment import project_root  # noqa: E402
from flows.plan import Plan, make_plan, needed_stages, unit_label  # noqa: E402
from flows.stages.baselines import run_baselines  # noqa: E402
from flows.stages.embeddings import build_embeddings  # noqa: E402
from flows.stages.evaluate import evaluate_unit as score_unit  # noqa: E402
from flows.stages.meta_train import train_unit  # noqa: E402
from flows.stages.prefix import build_prefix  # noqa: E402
from flows.stages.significance import compare  # noqa: E402
from flows.stages.task_sets import build_task_sets  # noqa: E402
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

    def __getstate__(self) -> dict:
        """To a Dask worker: the Tracker (an MLflow client) travels as its URI and is rebuilt there."""
        return {**self.__dict__, "tracker": self.tracker.uri}

    def __setstate__(self, state: dict) -> None:
        state["tracker"] = _tracker(state["root"], state["cfg"].runtime.experiment, state["tracker"])
        self.__dict__.update(state)

    @property
    def cache(self) -> StageCache:
        return StageCache(self.root / self.cfg.runtime.data_dir)

    @property
    def family(self):
        return self.plan.family

    def tables(self):
        """The family's tables: its task sets and (text) the cached prefix."""
        return self.cache.tables(*self.plan.data)

    def device(self) -> torch.device:
        if self.cfg.runtime.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.cfg.runtime.device)

    def method_run(self, method: str, kind: str) -> str:
        """The nested MLflow run of an algorithm or baseline, created on first use."""
        if method not in self.method_runs:
            self.method_runs[method] = self.tracker.start_run(method, self.parent_id, {"metapeft.kind": kind})
        return self.method_runs[method]

    def stage(self, stage: str, key: str, compute: Callable[[Path], dict | None], reads=(),
              redo: Callable[[dict], bool] | None = None) -> tuple[Path, dict]:
        """The cached entry of (stage, key), computing it on a miss, when stale (an entry it reads has changed
        since), when forced, or when redo(meta) says so (an unfinished meta-training); returns (path, meta).

        The entry's lock makes a concurrent run computing the same entry wait, then take it as a hit.
        """
        cache, logger = self.cache, get_run_logger()
        forced = stage in self.force or stage in self.only
        with cache.lock(stage, key):
            status = cache.status(stage, key, reads)
            meta = cache.manifest(stage, key)["meta"] if status != "missing" else {}
            if not forced and status == "cached" and not (redo and redo(meta)):
                logger.info("%s [%s]: cache hit", stage, key)
                self.hits[f"{stage}/{key}"] = True
                return cache.path(stage, key), meta
            logger.info("%s [%s]: computing%s", stage, key, " (its inputs changed)" if status == "stale" else "")
            start, meta = time.perf_counter(), {}
            with cache.writing(stage, key, meta, reads) as out:
                result = compute(out)
                meta.update(result if isinstance(result, dict) else {})
                meta["seconds"] = round(time.perf_counter() - start, 3)
        self.hits[f"{stage}/{key}"] = False
        return cache.path(stage, key), meta


@task(name="prepare_task_sets", cache_policy=NO_CACHE)
def prepare_task_sets(run: Run) -> str:
    key = run.plan.keys["task_sets"]
    try:
        path, meta = run.stage("task_sets", key, lambda out: build_task_sets(run.family, run.cfg.seed, out)
                               | provenance(run, "task_sets"))
    except ValidationFailed as e:
        failed = run.root / "mlruns" / "validation_failed.json"
        failed.write_text(pd.Series(e.report).to_json())
        run.tracker.log_artifact(run.parent_id, failed, "task_sets")
        raise
    run.tracker.log_artifact(run.parent_id, path / VALIDATION, "task_sets")
    run.tracker.log_metrics(run.parent_id, numeric(meta))
    return key


def provenance(run: Run, stage: str) -> dict:
    """What a data entry records of its making: its settings' key and its input files' digests
    (`metapeft stages` names the files that changed since)."""
    return {"settings": run.plan.settings_key(stage), "inputs": run.plan.inputs}


def numeric(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@task(name="compute_embeddings", cache_policy=NO_CACHE)
def compute_embeddings(run: Run) -> str:
    if "prefix" in run.plan.keys:  # text: the frozen layers' hidden states, which later stages read
        _, meta = run.stage("prefix", run.plan.keys["prefix"], lambda out: build_prefix(run.family, out)
                            | provenance(run, "prefix"))
        run.tracker.log_metrics(run.parent_id, {f"prefix_{k}": v for k, v in numeric(meta).items()})
    key, e = run.plan.keys["embeddings"], run.cfg.embedding
    path, _ = run.stage("embeddings", key, lambda out: build_embeddings(
        run.family, run.tables(), tuple(e.metrics), e.n_similarity_tasks, out), run.plan.reads("embeddings"))
    for png in sorted(path.glob("*.png")):
        run.tracker.log_artifact(run.parent_id, png, "embeddings")
    return key


@functools.lru_cache(maxsize=4)
def _tracker(root: Path, experiment: str, uri: str) -> Tracker:
    return Tracker(root, experiment, uri)


def checkpoint_path(run: Run, label: str) -> Path:
    """The unit's checkpoint: keyed by its trajectory (not iterations or budget), so a rerun goes on from it."""
    return run.cache.root / "checkpoints" / run.plan.checkpoint_keys[label] / CHECKPOINT


def unfinished(meta: dict) -> bool:
    """A meta-training entry stopped by its wall-clock budget: the next run continues it from the checkpoint."""
    return meta.get("stop_reason") == "budget"


@task(name="meta_train", task_run_name="meta_train[{label}]", cache_policy=NO_CACHE)
def meta_train_algorithm(run: Run, label: str) -> dict[str, bool]:
    """Meta-train one (algorithm, seed) unit, log it to its nested run; returns its cache hit record.

    May run on a Dask worker, on a copy of run: the nested run exists already, the hit goes back by value.
    """
    set_threads(run.cfg)
    key, logger, settings = run.plan.algorithm_keys[label], get_run_logger(), run.plan.settings[label]
    checkpoint = checkpoint_path(run, label)
    if "meta_train" in run.force:  # from scratch; `--stage meta_train` goes on from the checkpoint
        checkpoint.unlink(missing_ok=True)
    section = run.cfg.meta_train.for_algorithm(run.plan.units[label][0])

    def progress(iteration: int, metrics: dict[str, float]) -> None:
        if "val_loss" in metrics:
            logger.info("%s: iteration %d/%d %s", label, iteration, settings.train.iterations,
                        " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def compute(out: Path) -> dict:
        return train_unit(run.family, run.tables(), settings, run.device(), out, checkpoint, progress)

    path, meta = run.stage("meta_train", key, compute, run.plan.reads("meta_train", label), redo=unfinished)
    child = run.method_run(label, "meta_learner")
    run.tracker.log_params(child, {**section, **{f"model.{k}": v for k, v in run.cfg.model.model_dump().items()},
                                   "seed": run.plan.units[label][1]})
    run.tracker.set_tags(child, {"metapeft.meta_train_key": key, "metapeft.stop_reason": meta["stop_reason"],
                                 "metapeft.kept_state": meta.get("kept_state", ""),
                                 **({"metapeft.diverged": meta["diverged"]} if "diverged" in meta else {})})
    if "diverged" in meta:
        logger.warning("%s diverged: %s", label, meta["diverged"])
    else:
        history = pd.read_parquet(path / f"{HISTORY}.parquet")
        run.tracker.log_curves(child, zip(history["metric"], history["iteration"], history["value"]))
        run.tracker.log_artifact(child, path / STATE, "meta_train")
    run.tracker.log_metrics(child, {"meta_train_iterations": meta["iterations_total"],
                                    "meta_train_iterations_this_run": 0 if run.hits[f"meta_train/{key}"]
                                    else meta["iterations_run"],
                                    "best_iteration": meta["best_iteration"]})
    return {f"meta_train/{key}": run.hits[f"meta_train/{key}"]}


def set_threads(cfg: StudyConfig) -> None:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)


def _log_results(run: Run, entry: Path, kind: str) -> None:
    """meta_test_<metric> (+ _ci<level> half-width, e.g. _ci95) at the last step and the curve over steps, per method;
    a diverged method's run gets the tag metapeft.diverged (where, why, the rates) and no score.

    With several seeds each (method, seed) run gets its own mean, the method's run the across-seed figures.
    """
    results, diverged = (pd.read_parquet(entry / f"{t}.parquet") for t in (RESULTS, DIVERGED))
    for row in diverged.to_dict("records"):
        label = unit_label(row["method"], int(row["seed"]), run.cfg) if "seed" in row and pd.notna(row.get("seed")) \
            else row["method"]
        run.tracker.set_tags(run.method_run(label, kind), {"metapeft.diverged": row["reason"],
                                                          "metapeft.stop_reason": "diverged"})
    if results.empty:
        return
    last, name = results["steps"].max(), f"meta_test_{run.family.metric}"
    if run.cfg.seeds is not None and "seed" in results.columns:
        for (method, seed), rows in results[results["steps"] == last].groupby(["method", "seed"]):
            run.tracker.log_metrics(run.method_run(unit_label(method, int(seed), run.cfg), kind),
                                    {name: rows["value"].mean()})
    results = across_seeds(results)
    for method, rows in results.groupby("method"):
        child = run.method_run(method, kind)
        mean, half = mean_ci(rows.loc[rows["steps"] == last, "value"], run.cfg.significance.confidence)
        curve = rows.groupby("steps")["value"].mean()
        run.tracker.log_metrics(child, {name: mean, f"{name}_ci{run.cfg.significance.confidence * 100:g}": half})
        run.tracker.log_curves(child, ((f"{name}_by_step", s, v) for s, v in curve.items()))


@task(name="evaluate_unit", task_run_name="evaluate[{label}]", cache_policy=NO_CACHE)
def evaluate_unit(run: Run, label: str) -> str:
    """Score one (algorithm, seed) unit on the meta-test tasks into its part entry; returns the part's key."""
    set_threads(run.cfg)
    key, cache, ev = run.plan.part_key(label), run.cache, run.cfg.evaluate
    reads = run.plan.reads("evaluate_parts", label)
    trained = cache.path("meta_train", run.plan.algorithm_keys[label])
    with cache.lock("evaluate_parts", key):
        if "evaluate" in run.force | run.only or cache.status("evaluate_parts", key, reads) != "cached":
            with cache.writing("evaluate_parts", key, reads=reads) as out:
                score_unit(run.family, run.tables(), run.plan.settings[label], trained, ev.steps, ev.score_every,
                           ev.chunk, run.plan.units[label][0], run.device(), out)
    return key


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(run: Run) -> str:
    """The units' parts (computed by evaluate_unit) joined into one results table, in plan order."""
    key = run.plan.keys["evaluate"]

    def compute(out: Path) -> None:
        for table in (RESULTS, DIVERGED):
            parts = [run.cache.read_table("evaluate_parts", run.plan.part_key(label), table) for label in run.plan.units]
            write_table(pd.concat(parts, ignore_index=True), out, table)

    path, _ = run.stage("evaluate", key, compute, run.plan.reads("evaluate"))
    _log_results(run, path, "meta_learner")
    return key


@task(name="compare_baselines", cache_policy=NO_CACHE)
def compare_baselines(run: Run) -> str:
    key, ev = run.plan.keys["baselines"], run.cfg.evaluate
    path, _ = run.stage("baselines", key, lambda out: run_baselines(
        run.family, run.tables(), ev.steps, ev.score_every, ev.chunk, run.cfg.seed, run.device(), out),
        run.plan.reads("baselines"))
    _log_results(run, path, "baseline")
    return key


@task(name="significance", cache_policy=NO_CACHE)
def significance(run: Run) -> str:
    key, cache, family = run.plan.keys["significance"], run.cache, run.family

    def compute(out: Path) -> None:
        tables = {t: pd.concat([cache.read_table(s, run.plan.keys[s], t) for s in ("evaluate", "baselines")],
                               ignore_index=True) for t in (RESULTS, DIVERGED)}
        sig = run.cfg.significance
        compare(tables[RESULTS], tables[DIVERGED], family.metric, family.lower_is_better, sig.confidence, sig.alpha,
                out)

    path, _ = run.stage("significance", key, compute, run.plan.reads("significance"))
    summary = pd.read_parquet(path / "summary.parquet").set_index("method")
    comparisons = pd.read_parquet(path / "comparisons.parquet")
    text = report.results_text(summary, comparisons, family.metric, family.reference, run.cfg.significance.alpha,
                               run.cfg.significance.confidence, pd.read_parquet(path / f"{DIVERGED}.parquet"))
    (run.root / "mlruns" / "results.txt").write_text(text + "\n")
    for name in ("comparisons.parquet", "summary.parquet", "summary.png", "curves.png", "seeds.parquet",
                 f"{DIVERGED}.parquet"):
        if (path / name).exists():  # seeds.parquet: only from evaluate tables with a seed column
            run.tracker.log_artifact(run.parent_id, path / name, "significance")
    run.tracker.log_artifact(run.parent_id, run.root / "mlruns" / "results.txt", "significance")
    page = report_page.study_report(run.cfg, cache, run.plan.keys, run.plan.algorithm_keys,
                                    run.root / "reports" / run.parent_id / "report.html", run.parent_id)
    run.tracker.log_artifact(run.parent_id, page)
    return text


def _meta_train(run: Run, runner) -> None:
    for label in run.plan.units:  # created here: a Dask worker's copy of run could not hand the id back
        run.method_run(label, "meta_learner")
    for hits in fan_out(runner, meta_train_algorithm, run, list(run.plan.units)):
        run.hits.update(hits)


def _evaluate(run: Run, runner) -> str:
    key = run.plan.keys["evaluate"]
    if "evaluate" in run.force | run.only or run.plan.status(run.cache, "evaluate", key) != "cached":
        fan_out(runner, evaluate_unit, run, list(run.plan.units))
    return evaluate(run)


def fan_out(runner, unit_task, run: Run, labels: list[str]) -> list:
    """unit_task(run, label) per label: here, one after another (runner None), or at once on the Dask workers."""
    if runner is None:
        return [unit_task(run, label) for label in labels]
    futures = [runner.submit(unit_task, {"run": run, "label": label}) for label in labels]
    return [future.result() for future in futures]


@contextlib.contextmanager
def task_runner(cfg: StudyConfig, root: Path):
    """None for `runner: sequential`; for `runner: dask` a started DaskTaskRunner, on the cluster at
    `dask_address` or on a LocalCluster of `dask_workers` single-threaded processes bound to 127.0.0.1.

    The workers get this process's Prefect API URL through the serialised settings, so with the temporary
    server they report to it instead of each starting its own (a remote cluster needs a real server).
    """
    if cfg.runtime.runner != "dask":
        yield None
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    rt = cfg.runtime
    runner = DaskTaskRunner(address=rt.dask_address) if rt.dask_address else DaskTaskRunner(cluster_kwargs={
        "n_workers": rt.dask_workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0", "env": {"METAPEFT_HOME": str(root)}})  # None still binds :8787
    with temporary_settings(updates={PREFECT_API_URL: str(get_client(sync_client=True).api_url)}), runner:
        yield runner


@contextlib.contextmanager
def ending(run: Run):
    """End the run's parent and nested MLflow runs: FINISHED, KILLED on Ctrl-C, else FAILED with the reason."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:  # the reason, beside the FAILED status (GX failures also log their report)
        run.tracker.set_tags(run.parent_id, {"metapeft.error": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        hits = sum(run.hits.values())
        run.tracker.set_tags(run.parent_id, {"metapeft.cache_hits": hits,
                                             "metapeft.cache_misses": len(run.hits) - hits})
        for child in run.method_runs.values():
            run.tracker.end_run(child, status)
        run.tracker.end_run(run.parent_id, status)


def _require_cached(run: Run, stage: str) -> None:
    keys = [(stage, run.plan.keys[stage])]
    if stage == "meta_train":
        keys = [(stage, k) for k in run.plan.algorithm_keys.values()]
    if stage == "embeddings" and "prefix" in run.plan.keys:
        keys.append(("prefix", run.plan.keys["prefix"]))
    for entry, key in keys:
        status = run.plan.status(run.cache, entry, key)
        if status != "cached":
            why = "its inputs changed since it was computed" if status == "stale" else "no cached output"
            raise MissingUpstream(f"stage {stage!r}: {why} for this config ({entry} key {key}); "
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
    set_threads(cfg)
    tracker = Tracker(root, cfg.runtime.experiment)
    if tracker.restored:
        get_run_logger().warning(tracker.restored)
    for stale in tracker.end_stale_runs():  # left RUNNING by a process that was killed (SIGKILL)
        get_run_logger().warning("MLflow run %s: its process is gone; marked KILLED", stale)
    plan = make_plan(cfg, root / cfg.runtime.data_dir / "inputs.json")
    parent = tracker.start_run(cfg.name, tags={"metapeft.config": str(config_path),
                                               **{f"metapeft.key.{s}": k for s, k in plan.keys.items()}})
    run = Run(cfg, root, plan, tracker, parent, only, frozenset(force or ()))
    text = ""
    with ending(run):
        tracker.log_params(parent, flatten(cfg.model_dump()))
        for stage in todo:
            if only and stage not in only:
                _require_cached(run, stage)
        with task_runner(cfg, root) as runner:
            run_stage = {
                "task_sets": lambda: prepare_task_sets(run),
                "embeddings": lambda: compute_embeddings(run),
                "meta_train": lambda: _meta_train(run, runner),
                "evaluate": lambda: _evaluate(run, runner),
                "baselines": lambda: compare_baselines(run),
                "significance": lambda: significance(run),
            }
            for stage in todo:
                if not only or stage in only:
                    outcome = run_stage[stage]()
                    text = outcome if stage == "significance" else text
    return {"run_id": parent, "keys": plan.keys, "hits": run.hits, "results": text}
