"""The Prefect flow `meta_pipeline`: task sets -> embeddings -> meta-training -> evaluation -> baselines -> significance.

Thin wiring: each task checks the stage cache, runs `flows.stages` on a miss, and logs to MLflow: one
parent run per pipeline run, and one nested run per algorithm and baseline whose work is computed in it,
opened when that work starts and ended when it is done. A cache hit opens no nested run: the parent's
tags point to the runs that computed the results (`metapeft.run.<method>`, `metapeft.trained_in.<unit>`),
which the cache entries record. A task whose entries were all cache hits ends in a COMPLETED state named
"Cached". Tasks pass keys, never tensors: Prefect's hash of a tensor differs in every process.
Meta-training and evaluation run one task per (algorithm, seed) unit, in this process or, with
`runtime.runner: dask`, on Dask workers that get a pickled copy of the Run: whatever they create
(cache hit records, nested MLflow runs) is handed back by value.
"""
from __future__ import annotations

import contextlib
import functools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flows.environment import configure

configure()

import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed, State  # noqa: E402

import torch  # noqa: E402

from components.metalearners import Diverged  # noqa: E402
from components.significance import across_seeds, mean_ci  # noqa: E402
from flows import report, report_page  # noqa: E402
from flows.answer import study_answer  # noqa: E402
from flows.artifacts import publish_results  # noqa: E402
from flows.cache import (DIVERGED, RESULTS, STATE, VALIDATION, StageCache, content_key,  # noqa: E402
                         write_table)
from flows.config import ConfigError, StudyConfig, load_config  # noqa: E402
from flows.environment import project_root  # noqa: E402
from flows.plan import (STAGES, Plan, make_plan, needed_stages, unit_label, unready_message,  # noqa: E402
                        unready_upstream)
from flows.stages.baselines import run_baselines  # noqa: E402
from flows.stages.embeddings import build_embeddings  # noqa: E402
from flows.stages.evaluate import evaluate_unit as score_unit  # noqa: E402
from flows.stages.meta_train import resume_note, train_unit  # noqa: E402
from flows.stages.prefix import build_prefix  # noqa: E402
from flows.stages.significance import compare  # noqa: E402
from flows.stages.task_sets import build_task_sets, write_train_sets  # noqa: E402
from flows.terminal import Progress  # noqa: E402  (the artifact, and a bar on a terminal)
from flows.tracking import CurveLog, Tracker, baseline_params, study_params, task_set_inputs, unit_params  # noqa: E402
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
    prebuilt: frozenset[str] = frozenset()  # computed by the caller just before (the CLI's task sets)
    method_runs: dict[str, str] = field(default_factory=dict)  # method or unit -> its nested run opened here
    hits: dict[str, bool] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # parent tag -> the run that computed what it names

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

    def tables(self, training: bool = False):
        """The family's tables: its task sets and (text) the cached prefix; training: the tables meta-training
        reads (the train_sets entry in place of the task sets)."""
        return self.cache.tables(*(self.plan.train_data if training else self.plan.data))

    def device(self) -> torch.device:
        if self.cfg.runtime.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.cfg.runtime.device)

    def method_run(self, method: str, kind: str) -> str:
        """The nested MLflow run of an algorithm, a unit or a baseline in this pipeline run, opened on first use
        (when its work starts) with the params that apply to it and the task sets as its input datasets."""
        if method not in self.method_runs:
            child = self.tracker.start_run(method, self.parent_id, {"metapeft.kind": kind})
            self.tracker.log_params(child, self._params(method, kind))
            self.tracker.log_inputs(child, self.dataset_inputs())
            self.method_runs[method] = child
        return self.method_runs[method]

    def _params(self, method: str, kind: str) -> dict:
        if kind == "baseline":
            return baseline_params(self.cfg, method)
        if kind != "meta_learner":  # e.g. a transfer study's source: its parent has the settings
            return {}
        if method in self.plan.units:
            return unit_params(self.cfg, *self.plan.units[method])
        return {k: v for k, v in unit_params(self.cfg, method, self.cfg.seed).items() if k != "seed"}  # across seeds

    def dataset_inputs(self) -> tuple:
        """The task-set tables as MLflow dataset inputs (digest: the entry's content digest); none before the
        entry exists. A transfer study's data entry is its transfer sets."""
        stage = next(s for s in ("task_sets", "transfer_sets") if s in self.plan.keys)
        key = self.plan.keys[stage]
        if not self.cache.is_complete(stage, key):
            return ()
        return task_set_inputs(self.cache.path(stage, key), self.cache.digest(stage, key), self.root)

    def record_source(self, tag: str, meta: dict, find: dict[str, str] | None = None) -> str | None:
        """On a cache hit: the run that computed the entry (meta's mlflow_run_id, else the oldest finished run
        with the tags `find`, for entries cached before runs were recorded), kept for the parent's tag."""
        source = meta.get("mlflow_run_id") or (self.tracker.find_run(find) if find else None)
        if source:
            self.sources[tag] = source
        return source

    def stage(self, stage: str, key: str, compute: Callable[[Path], dict | None], reads=(),
              redo: Callable[[dict], bool] | None = None) -> tuple[Path, dict]:
        """The cached entry of (stage, key), computing it on a miss, when stale (an entry it reads has changed
        since), when forced, or when redo(meta) says so (an unfinished meta-training); returns (path, meta).

        The entry's lock makes a concurrent run computing the same entry wait, then take it as a hit.
        """
        cache, logger = self.cache, get_run_logger()
        forced = (stage in self.force or stage in self.only) and stage not in self.prebuilt
        with cache.lock(stage, key):
            status = cache.status(stage, key, reads)
            meta = cache.manifest(stage, key)["meta"] if status != "missing" else {}
            if not forced and status == "cached" and not (redo and redo(meta)):
                logger.info("%s [%s]: %s", stage, key,
                            "built just before the flow" if stage in self.prebuilt else "cache hit")
                self.hits[f"{stage}/{key}"] = stage not in self.prebuilt  # built by the caller just before: computed
                return cache.path(stage, key), meta
            why = {"stale": " (its inputs changed)", "cached": " (continuing: stopped by its budget last time)"}
            logger.info("%s [%s]: computing%s", stage, key, "" if forced else why.get(status, ""))
            start, meta = time.perf_counter(), {}
            with cache.writing(stage, key, meta, reads) as out:
                result = compute(out)
                meta.update(result if isinstance(result, dict) else {})
                meta["seconds"] = round(time.perf_counter() - start, 3)
        self.hits[f"{stage}/{key}"] = False
        return cache.path(stage, key), meta


def cached(value, hits: dict[str, bool]):
    """A task's return: as a COMPLETED state named "Cached" (what Prefect's UI shows for its own cache hits)
    when every cache entry the task asked for was a hit. Callers take the value with `value_of`."""
    if hits and all(hits.values()):
        return Completed(data=value, name="Cached", message=f"cache hit: {', '.join(hits)}")
    return value


def value_of(returned):
    """What a task returned: the data of a state (`cached`) or the value itself. A future's result needs none."""
    return returned.result() if isinstance(returned, State) else returned


def new_hits(run: Run, before: set[str]) -> dict[str, bool]:
    return {entry: hit for entry, hit in run.hits.items() if entry not in before}


@task(name="prepare_task_sets", cache_policy=NO_CACHE)
def prepare_task_sets(run: Run) -> str:
    key, before = run.plan.keys["task_sets"], set(run.hits)
    try:
        path, meta = run.stage("task_sets", key, lambda out: build_task_sets(run.family, run.cfg.seed, out)
                               | provenance(run, "task_sets"))
    except ValidationFailed as e:
        failed = run.root / "mlruns" / "validation_failed.json"
        failed.write_text(pd.Series(e.report).to_json())
        run.tracker.log_artifact(run.parent_id, failed, "task_sets")
        raise
    rebuilt = "task_sets" in run.force | run.only and "task_sets" not in run.prebuilt  # (else the caller rebuilt it)
    written = write_train_sets(run.cache, run.plan, rebuild=rebuilt)
    run.hits[f"train_sets/{run.plan.keys['train_sets']}"] = not written and "train_sets" not in run.prebuilt
    run.tracker.log_artifact(run.parent_id, path / VALIDATION, "task_sets")
    if (split := report.class_split(run.family, path)) is not None:  # which classes each meta-split holds, in MLflow
        with tempfile.TemporaryDirectory() as tmp:
            split.to_csv(Path(tmp) / "classes.csv", index=False)
            run.tracker.log_artifact(run.parent_id, Path(tmp) / "classes.csv", "task_sets")
    run.tracker.log_metrics(run.parent_id, numeric(meta))
    return cached(key, new_hits(run, before))



def provenance(run: Run, stage: str) -> dict:
    """What a data entry records of its making: its settings' key and its input files' digests
    (`metapeft stages` names the files that changed since)."""
    return {"settings": run.plan.settings_key(stage), "inputs": run.plan.inputs}


def numeric(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@task(name="compute_embeddings", cache_policy=NO_CACHE)
def compute_embeddings(run: Run) -> str:
    before = set(run.hits)
    if "prefix" in run.plan.keys:  # text: the frozen layers' hidden states, which later stages read
        _, meta = run.stage("prefix", run.plan.keys["prefix"], lambda out: encode_prefix(run, out))
        run.tracker.log_metrics(run.parent_id, {f"prefix_{k}": v for k, v in numeric(meta).items()})
    key, e = run.plan.keys["embeddings"], run.cfg.embedding
    path, _ = run.stage("embeddings", key, lambda out: build_embeddings(
        run.family, run.tables(), tuple(e.metrics), e.n_similarity_tasks, out), run.plan.reads("embeddings"))
    for png in sorted(path.glob("*.png")):
        run.tracker.log_artifact(run.parent_id, png, "embeddings")
    return cached(key, new_hits(run, before))


def encode_prefix(run: Run, out: Path) -> dict:
    """The text prefix, with a progress artifact (one unit: MiniLM gives no progress of its own)."""
    progress = Progress("encoding utterances with the frozen MiniLM layers (prefix)", 1)
    meta = build_prefix(run.family, out) | provenance(run, "prefix")
    progress.finish()
    return meta


@functools.lru_cache(maxsize=4)
def _tracker(root: Path, experiment: str, uri: str) -> Tracker:
    return Tracker(root, experiment, uri)


def checkpoint_path(run: Run, label: str) -> Path:
    """The unit's checkpoint: keyed by its trajectory (not iterations or budget), so a rerun goes on from it."""
    return run.cache.checkpoint(run.plan.checkpoint_keys[label])


def unfinished(meta: dict) -> bool:
    """A meta-training entry stopped by its wall-clock budget: the next run continues it from the checkpoint."""
    return meta.get("stop_reason") == "budget"


@task(name="meta_train", task_run_name="meta_train[{label}]", cache_policy=NO_CACHE)
def meta_train_algorithm(run: Run, label: str) -> dict[str, dict]:
    """Meta-train one (algorithm, seed) unit. Its nested run opens when training starts and ends when it is
    done: params, input datasets, system metrics, train_loss / val_loss as they are measured, and the kept
    state as a registered model. A cache hit opens none: the parent points to the run that trained it.

    May run on a Dask worker, on a copy of run: returns by value what the flow's run must learn
    ({"hits", "method_runs", "sources"}).
    """
    set_threads(run.cfg)
    key, logger, settings = run.plan.algorithm_keys[label], get_run_logger(), run.plan.settings[label]
    checkpoint = checkpoint_path(run, label)
    if "meta_train" in run.force:  # from scratch; `--stage meta_train` goes on from the checkpoint
        checkpoint.unlink(missing_ok=True)

    def compute(out: Path) -> dict:
        child = run.method_run(label, "meta_learner")
        curve, progress = CurveLog(run.tracker, child), Progress(f"meta-training {label}", settings.train.iterations)

        def log(iteration: int, metrics: dict[str, float]) -> None:
            curve.add(iteration, metrics)  # sent every 10 s (a batch per validation cost 4 ms of CPU each)
            progress.update(iteration)
            if "val_loss" in metrics:
                logger.info("%s: iteration %d/%d %s", label, iteration, settings.train.iterations,
                            " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

        if note := resume_note(checkpoint, settings.train.iterations):
            logger.info("%s: %s", label, note)
        with run.tracker.system_metrics(child):
            try:
                meta = train_unit(run.family, run.tables(training=True), settings, run.device(), out, checkpoint, log)
            finally:
                curve.flush()
        progress.finish()
        return meta | {"mlflow_run_id": child}

    path, meta = run.stage("meta_train", key, compute, run.plan.reads("meta_train", label), redo=unfinished)
    hit = run.hits[f"meta_train/{key}"]
    if hit:
        run.record_source(f"metapeft.trained_in.{label}", meta, {"metapeft.meta_train_key": key})
    else:
        _log_training(run, label, key, path, meta)
    back = {"hits": {f"meta_train/{key}": hit}, "method_runs": {k: v for k, v in run.method_runs.items() if k == label},
            "sources": {k: v for k, v in run.sources.items() if k.endswith(f".{label}")}}
    return cached(back, back["hits"])


def _log_training(run: Run, label: str, key: str, path: Path, meta: dict) -> None:
    """The freshly trained unit's tags and metrics, the end of its run (its duration: the training), its model."""
    from flows.model import CODE, STATE as MODEL_STATE, STUDY, signature, study_spec

    child, (algorithm, seed) = run.method_runs[label], run.plan.units[label]
    run.sources[f"metapeft.trained_in.{label}"] = child
    run.tracker.set_tags(child, {"metapeft.meta_train_key": key, "metapeft.stop_reason": meta["stop_reason"],
                                 "metapeft.kept_state": meta.get("kept_state", ""),
                                 **({"metapeft.diverged": meta["diverged"]} if "diverged" in meta else {})})
    run.tracker.log_metrics(child, {"meta_train_iterations": meta["iterations_total"],
                                    "meta_train_iterations_this_run": meta["iterations_run"],
                                    "meta_train_seconds": meta["seconds"], "best_iteration": meta["best_iteration"],
                                    **({"meta_train_seconds_total": meta["train_seconds_total"]}
                                       if "train_seconds_total" in meta else {})})
    run.tracker.end_run(child)
    if "diverged" in meta:
        get_run_logger().warning("%s diverged: %s", label, meta["diverged"])
    else:
        name, weights = registered_model(run.cfg, algorithm), run.cache.manifest("meta_train", key)["files"][STATE]
        # the same weights under the same key (--force meta_train, deterministic): the version already registered
        version = run.tracker.model_version(name, {"metapeft.meta_train_key": key, "metapeft.weights_sha256": weights})
        if version is None:
            with tempfile.TemporaryDirectory() as tmp:
                spec = Path(tmp) / "study.json"
                spec.write_text(json.dumps(study_spec(run.cfg, algorithm, seed)))
                version = run.tracker.log_model(child, CODE, {MODEL_STATE: path / STATE, STUDY: spec}, name,
                                                signature(run.cfg.evaluate.steps),
                                                {"metapeft.meta_train_key": key, "seed": seed,
                                                 "metapeft.stop_reason": meta["stop_reason"],
                                                 "metapeft.iterations": meta["iterations_total"],
                                                 "metapeft.weights_sha256": weights})
        else:
            get_run_logger().info("%s: the same weights as models:/%s/%s, not registered again", label, name, version)
        run.tracker.set_tags(child, {"metapeft.model_version": version})


def registered_model(cfg: StudyConfig, algorithm: str) -> str:
    """The registered model of a study's algorithm (its seeds are versions of it); a fold study's fold has its own
    (`<study>-fold<NN>-<algorithm>`, NN its split folder's name): the folds are different class splits."""
    return f"{cfg.name}{f'-fold{Path(cfg.fold).name}' if cfg.fold else ''}-{algorithm}"


def set_threads(cfg: StudyConfig) -> None:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)


def _log_results(run: Run, entry: Path, kind: str) -> dict[str, str]:
    """meta_test_<metric> (+ _ci<level> half-width, e.g. _ci95) at the last step and the curve over steps, per method;
    a diverged method's run gets the tag metapeft.diverged (where, why, the rates) and no score. Called while
    the entry is computed (entry: its folder); returns {method: run} of the runs the results went to.

    With several seeds each (method, seed) run gets its own mean, the method's run the across-seed figures.
    """
    results, diverged = (pd.read_parquet(entry / f"{t}.parquet") for t in (RESULTS, DIVERGED))
    runs = {}
    for row in diverged.to_dict("records"):
        label = unit_label(row["method"], int(row["seed"]), run.cfg) if "seed" in row and pd.notna(row.get("seed")) \
            else row["method"]
        runs[label] = run.method_run(label, kind)
        run.tracker.set_tags(runs[label], {"metapeft.diverged": row["reason"], "metapeft.stop_reason": "diverged"})
    if results.empty:
        return runs
    last, name = results["steps"].max(), f"meta_test_{run.family.metric}"
    if run.cfg.seeds is not None and "seed" in results.columns:
        for (method, seed), rows in results[results["steps"] == last].groupby(["method", "seed"]):
            label = unit_label(method, int(seed), run.cfg)
            runs[label] = run.method_run(label, kind)
            run.tracker.log_metrics(runs[label], {name: rows["value"].mean()})
    results = across_seeds(results)
    for method, rows in results.groupby("method"):
        runs[method] = child = run.method_run(method, kind)
        mean, half = mean_ci(rows.loc[rows["steps"] == last, "value"], run.cfg.significance.confidence)
        curve = rows.groupby("steps")["value"].mean()
        run.tracker.log_metrics(child, {name: mean, f"{name}_ci{run.cfg.significance.confidence * 100:g}": half})
        run.tracker.log_curves(child, ((f"{name}_by_step", s, v) for s, v in curve.items()))
    return runs


def results_stage(run: Run, stage: str, kind: str, compute: Callable[[Path], object]) -> tuple[Path, dict]:
    """A stage whose entry holds meta-test results (evaluate, baselines): computed, they are logged to the
    methods' nested runs, which the entry records; a hit logs nothing and the parent points to those runs."""
    def compute_and_log(out: Path) -> dict:
        compute(out)
        runs = _log_results(run, out, kind)
        for child in set(runs.values()):
            if run.tracker.is_running(child):  # opened just for these results (e.g. the across-seed runs)
                run.tracker.end_run(child)
        return {"mlflow_runs": runs}

    path, meta = run.stage(stage, run.plan.keys[stage], compute_and_log, run.plan.reads(stage))
    run.sources.update({f"metapeft.run.{m}": r for m, r in meta.get("mlflow_runs", {}).items()})
    return path, meta


@task(name="evaluate_unit", task_run_name="evaluate[{label}]", cache_policy=NO_CACHE)
def evaluate_unit(run: Run, label: str) -> dict[str, str]:
    """Score one (algorithm, seed) unit on the meta-test tasks into its part entry. When its training was a
    cache hit, the scoring gets a nested run of its own (tagged with the training's run); returns
    {label: run} of a run opened here (a Dask worker's copy of run hands it back)."""
    set_threads(run.cfg)
    key, cache, ev = run.plan.part_key(label), run.cache, run.cfg.evaluate
    reads = run.plan.reads("evaluate_parts", label)
    trained = cache.path("meta_train", run.plan.algorithm_keys[label])
    opened = {}
    with cache.lock("evaluate_parts", key):
        if "evaluate" in run.force | run.only or cache.status("evaluate_parts", key, reads) != "cached":
            if label not in run.method_runs:
                opened[label] = run.method_run(label, "meta_learner")
                run.tracker.set_tags(opened[label], {"metapeft.trained_in": trained_in(run, label) or "unknown"})
            with cache.writing("evaluate_parts", key, reads=reads) as out:
                score_unit(run.family, run.tables(), run.plan.settings[label], trained, ev.steps, ev.score_every,
                           ev.chunk, run.plan.units[label][0], run.device(), out)
            for child in opened.values():
                run.tracker.end_run(child)
            return opened
    return cached(opened, {f"evaluate_parts/{key}": True})


def trained_in(run: Run, label: str) -> str | None:
    """The run that meta-trained the unit's cached state (known from this pipeline run, or from its entry)."""
    tag, key = f"metapeft.trained_in.{label}", run.plan.algorithm_keys[label]
    meta = (run.cache.manifest("meta_train", key) or {}).get("meta", {})
    return run.sources.get(tag) or run.record_source(tag, meta, {"metapeft.meta_train_key": key})


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(run: Run) -> str:
    """The units' parts (computed by evaluate_unit) joined into one results table, in plan order."""
    key, before = run.plan.keys["evaluate"], set(run.hits)

    def compute(out: Path) -> None:
        for table in (RESULTS, DIVERGED):
            parts = [run.cache.read_table("evaluate_parts", run.plan.part_key(label), table) for label in run.plan.units]
            write_table(pd.concat(parts, ignore_index=True), out, table)

    results_stage(run, "evaluate", "meta_learner", compute)
    return cached(key, new_hits(run, before))


@task(name="compare_baselines", cache_policy=NO_CACHE)
def compare_baselines(run: Run) -> str:
    """The family's baselines; each gets a nested run from its start to its end, with the settings it reads."""
    key, ev, before = run.plan.keys["baselines"], run.cfg.evaluate, set(run.hits)
    path, _ = results_stage(run, "baselines", "baseline", lambda out: run_baselines(
        TrackedBaselines(run), run.tables(), ev.steps, ev.score_every, ev.chunk, run.cfg.seed, run.device(), out))
    methods = {m for t in (RESULTS, DIVERGED) for m in pd.read_parquet(path / f"{t}.parquet").get("method", ())}
    run.tracker.log_params(run.parent_id, {k: v for m in sorted(methods) for k, v in baseline_params(run.cfg, m).items()
                                           if k.startswith("baselines.")})
    return cached(key, new_hits(run, before))


class TrackedBaselines:
    """The run's family for `run_baselines`, each baseline call wrapped in its nested run and a progress step.

    Wiring, not science: the stage and the family stay as they are (their code is in the baselines' key)."""

    def __init__(self, run: Run):
        self.run = run

    def __getattr__(self, name: str):
        return getattr(self.run.family, name)

    def baseline_runs(self, *args, **kwargs) -> dict[str, Callable]:
        calls = self.run.family.baseline_runs(*args, **kwargs)
        progress = Progress(f"baselines: {', '.join(calls)}", len(calls), every=0)
        return {method: functools.partial(self._tracked, method, call, progress, i)
                for i, (method, call) in enumerate(calls.items())}

    def _tracked(self, method: str, call: Callable, progress: Progress, done: int):
        child, status = self.run.method_run(method, "baseline"), "FAILED"
        try:
            out, status = call(), "FINISHED"
            return out
        except Diverged:  # a result, which the stage records: the run ends FINISHED, tagged by _log_results
            status = "FINISHED"
            raise
        finally:
            self.run.tracker.end_run(child, status)
            progress.update(done + 1)


@task(name="significance", cache_policy=NO_CACHE)
def significance(run: Run) -> str:
    """Paired tests; the parent gets the answer (best method, its score and CI) as metrics and tags, the
    flow run the results table and the verdict as Prefect artifacts."""
    key, cache, family, before = run.plan.keys["significance"], run.cache, run.family, set(run.hits)

    def compute(out: Path) -> dict:
        tables = {t: pd.concat([cache.read_table(s, run.plan.keys[s], t) for s in ("evaluate", "baselines")],
                               ignore_index=True) for t in (RESULTS, DIVERGED)}
        sig = run.cfg.significance
        compare(tables[RESULTS], tables[DIVERGED], family.metric, family.lower_is_better, sig.confidence, sig.alpha,
                out)
        return {"mlflow_run_id": run.parent_id}

    path, meta = run.stage("significance", key, compute, run.plan.reads("significance"))
    if run.hits[f"significance/{key}"]:
        run.record_source("metapeft.results_parent", meta)
    summary = pd.read_parquet(path / "summary.parquet").set_index("method")
    comparisons = pd.read_parquet(path / "comparisons.parquet")
    unfinished = report.unfinished_training(cache, run.cfg, run.plan.algorithm_keys)
    text = report.cached_results_text(path, family.metric, family.reference, run.cfg.significance.alpha,
                                      run.cfg.significance.confidence, unfinished)
    if unfinished:  # `metapeft runs` shows it under the verdict
        run.tracker.set_tags(run.parent_id, {"metapeft.unfinished": report.unfinished_tag(unfinished)})
    (run.root / "mlruns" / "results.txt").write_text(text + "\n")
    for name in ("comparisons.parquet", "summary.parquet", "summary.png", "curves.png", "seeds.parquet",
                 f"{report.SEED_PAIRS}.parquet", f"{DIVERGED}.parquet"):
        if (path / name).exists():  # seeds.parquet: only from evaluate tables with a seed column
            run.tracker.log_artifact(run.parent_id, path / name, "significance")
    run.tracker.log_artifact(run.parent_id, run.root / "mlruns" / "results.txt", "significance")
    page = report_page.study_report(run.cfg, cache, run.plan.keys, run.plan.algorithm_keys,
                                    run.root / "reports" / run.parent_id / "report.html", run.parent_id)
    run.tracker.log_artifact(run.parent_id, page)
    sig = run.cfg.significance
    seeds = path / f"{report.SEED_PAIRS}.parquet"
    answer = study_answer(summary, comparisons, family.metric, set(run.cfg.meta_train.algorithms), sig.confidence,
                          sig.alpha, pd.read_parquet(seeds) if seeds.exists() else None)
    if answer is not None:
        run.tracker.log_metrics(run.parent_id, answer.metrics())
        run.tracker.set_tags(run.parent_id, answer.tags())
    publish_results(run.cfg.name, summary, answer, text, run.parent_id)
    return cached(text, new_hits(run, before))


def _meta_train(run: Run, runner) -> None:
    """Meta-train every unit; merge what the units (maybe on Dask workers) hand back into the flow's run."""
    for back in fan_out(runner, meta_train_algorithm, run, list(run.plan.units)):
        run.hits.update(back["hits"])
        run.method_runs.update(back["method_runs"])
        run.sources.update(back["sources"])


def _evaluate(run: Run, runner) -> str:
    key = run.plan.keys["evaluate"]
    if "evaluate" in run.force | run.only or run.plan.status(run.cache, "evaluate", key) != "cached":
        progress = Progress(f"evaluation of {len(run.plan.units)} meta-learned starts", len(run.plan.units), every=0)
        for done, opened in enumerate(fan_out(runner, evaluate_unit, run, list(run.plan.units)), 1):
            run.method_runs.update(opened)
            progress.update(done)
    return value_of(evaluate(run))


def fan_out(runner, unit_task, run: Run, labels: list[str]):
    """unit_task(run, label) per label, yielding each one's value in label order: here, one after another
    (runner None), or at once on the Dask workers."""
    if runner is None:
        for label in labels:
            yield value_of(unit_task(run, label))
        return
    futures = [runner.submit(unit_task, {"run": run, "label": label}) for label in labels]
    for future in futures:
        yield future.result()


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
    if cfg.runtime.dask_address:  # before any stage: the runner itself would find out at its first submit
        check_scheduler(cfg.runtime.dask_address)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    rt = cfg.runtime
    runner = DaskTaskRunner(address=rt.dask_address) if rt.dask_address else DaskTaskRunner(cluster_kwargs={
        "n_workers": rt.dask_workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0", "env": {"METAPEFT_HOME": str(root)}})  # None still binds :8787
    with temporary_settings(updates={PREFECT_API_URL: str(get_client(sync_client=True).api_url)}), runner:
        yield runner


def check_scheduler(address: str, timeout: float = 5) -> None:
    """Raise (ValueError naming `runtime.dask_address`) unless a TCP connection to the Dask scheduler at address
    (tcp:// or tls://, port 8786 by default) opens within timeout seconds; other schemes are not checked.
    Without it, DaskTaskRunner finds out at its first submit, after a 30 s wait, in a long traceback."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    host, port = parse_host_port(location, 8786)
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError as e:
        raise ValueError(f"runtime.dask_address: no Dask scheduler answers at {address} ({e}); start one "
                         f"(`dask scheduler`), or leave dask_address out for a LocalCluster") from e


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
        run.tracker.set_tags(run.parent_id, {"metapeft.cache_hits": hits, "metapeft.cache_misses": len(run.hits) - hits,
                                             "metapeft.nested_runs": len(run.method_runs), **run.sources})
        for child in run.tracker.running_children(run.parent_id):  # those whose work was cut short
            run.tracker.end_run(child, status)
        run.tracker.end_run(run.parent_id, status)


def _require_cached(run: Run, config_path: str) -> None:
    """A partial run reads its upstream entries from the cache: every one missing or stale is named at once
    (`metapeft run` checks the same before Prefect starts)."""
    write_train_sets(run.cache, run.plan)  # from cached task sets of a project older than the train_sets entry
    if unready := unready_upstream(run.plan, run.cache, set(run.only), run.cfg):
        raise MissingUpstream(unready_message(unready, f"metapeft run --config {config_path}"))


def config_hash(cfg: StudyConfig) -> str:
    """8 hex digits of the validated config (defaults filled in): equal hashes, equal settings."""
    return content_key(cfg.model_dump(mode="json"))[:8]


def flow_run_name() -> str:
    """`<study>-<config hash>` (`[stages]` appended for a partial run), from the flow run's parameters."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    try:
        cfg = load_config(p.get("config_path", DEFAULT_CONFIG), p.get("overrides"))
    except ConfigError:  # the flow itself reports it
        return f"{Path(p.get('config_path', DEFAULT_CONFIG)).stem}-invalid-config"
    stages = p.get("stages")
    return f"{cfg.name}-{config_hash(cfg)}" + (f"[{','.join(stages)}]" if stages else "")


@flow(name="meta_pipeline", flow_run_name=flow_run_name)
def meta_pipeline(config_path: str = DEFAULT_CONFIG, stages: list[str] | None = None,
                  force: list[str] | None = None, overrides: dict | None = None,
                  prebuilt: list[str] | None = None) -> dict:
    """Run the study of `config_path`; `stages` runs only those (inputs from the cache), `force` recomputes.

    overrides ({section: {key: value}}) change the config file's values, e.g. a wall-clock budget. prebuilt:
    stages the caller has just computed into the cache (the CLI builds the task sets before Prefect starts):
    taken from the cache even when named in `stages` or `force`.
    """
    cfg, root = load_config(config_path, overrides), project_root()
    only = frozenset(stages or ())
    todo = needed_stages(set(only), cfg)
    set_threads(cfg)
    tracker = Tracker(root, cfg.runtime.experiment)
    warn_tracking(tracker)
    plan = make_plan(cfg, root / cfg.runtime.data_dir / "inputs.json")
    ran = ",".join(s for s in STAGES if s in only)  # --stage, --from, --until: `metapeft runs` says so
    parent = tracker.start_run(cfg.name, tags={"metapeft.config": str(config_path),
                                               **({"metapeft.overrides": json.dumps(overrides)} if overrides else {}),
                                               "metapeft.config_hash": config_hash(cfg),
                                               **({"metapeft.stages": ran} if only else {}),
                                               **{f"metapeft.key.{s}": k for s, k in plan.keys.items()}})
    run = Run(cfg, root, plan, tracker, parent, only, frozenset(force or ()), prebuilt=frozenset(prebuilt or ()))
    text = ""
    with ending(run):
        tracker.log_params(parent, study_params(cfg))
        tracker.log_config(parent, cfg.model_dump(mode="json"))
        _require_cached(run, config_path)
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
                    outcome = value_of(run_stage[stage]())
                    text = outcome if stage == "significance" else text
                if stage == "task_sets":  # computed or found cached: the parent's input datasets
                    tracker.log_inputs(parent, run.dataset_inputs())
                if stage == "meta_train":
                    tag_models(run)
    return {"run_id": parent, "keys": plan.keys, "hits": run.hits, "results": text}


def tag_models(run: Run) -> None:
    """Tag the parent run with the registered model version behind each unit's results (`metapeft.model.<label>`:
    models:/<name>/<version>, the newest version of its meta_train key): `latest` is the newest training of a
    study's algorithm, which a rerun from the cache (another config, then this one again) does not register."""
    tags = {}
    for label, key in run.plan.algorithm_keys.items():
        name = registered_model(run.cfg, run.plan.units[label][0])
        # the version of these weights (a budget-stopped retraining under the same key registers other weights);
        # a version registered before versions recorded their weights: the newest of the key; none: diverged
        weights = run.cache.manifest("meta_train", key)["files"].get(STATE) if \
            run.cache.is_complete("meta_train", key) else None
        version = run.tracker.model_version(name, {"metapeft.meta_train_key": key, "metapeft.weights_sha256": weights}) \
            if weights else None
        version = version or run.tracker.model_version(name, {"metapeft.meta_train_key": key,
                                                              "metapeft.weights_sha256": None})
        if version is not None:
            tags[f"metapeft.model.{label}"] = f"models:/{name}/{version}"
    if tags:
        run.tracker.set_tags(run.parent_id, tags)


def warn_tracking(tracker: Tracker) -> None:
    """Say what the Tracker repaired on opening: a restored experiment, a moved project, runs of dead processes."""
    logger = get_run_logger()
    if tracker.restored:
        logger.warning(tracker.restored)
    if tracker.moved:
        logger.warning("the project moved: MLflow artifact locations %s now point to %s", tracker.moved,
                       tracker.artifact_location)
    for stale in tracker.end_stale_runs():  # left RUNNING by a process that was killed (SIGKILL)
        logger.warning("MLflow run %s: its process is gone; marked KILLED", stale)
