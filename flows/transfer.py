"""The Prefect flow `transfer_study`: does task-embedding distance predict transfer?

    groups ──► meta-training per source group (+ pooled) ──► source x target transfer matrix ──┐
       └────► embeddings (Task2Vec, features) ──► learned task encoder ──► rho per embedding x metric
                                                                      └──► nearest-task initialisation

`metapeft run --config configs/transfer-omniglot.yaml` runs it (a config with a `transfer:` section). Each
task checks the stage cache (keys from `flows.transfer_stages.make_transfer_plan`), computes on a miss, and
logs to one MLflow parent run (one nested run per source group's meta-training). Tasks pass keys, not tensors.
"""
from __future__ import annotations

from pathlib import Path

from flows.environment import configure

configure()

import pandas as pd  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from components.transfer import transfer_pairs  # noqa: E402
from flows.families import family_for  # noqa: E402
from flows.stages.prefix import build_prefix  # noqa: E402
from flows import transfer_stages as ts  # noqa: E402
from flows.config import StudyConfig, load_config  # noqa: E402
from flows.environment import project_root  # noqa: E402
from flows.pipeline import Run, ending, flow_run_name, set_threads, unfinished, warn_tracking  # noqa: E402
from flows.report import unfinished_lines, unfinished_tag  # noqa: E402
from flows.tracking import Tracker, flatten  # noqa: E402


def _path(run: Run, stage: str) -> Path:
    return run.cache.path(stage, run.plan.keys[stage])


def _reads(run: Run, stage: str) -> list[tuple[str, str]]:
    return ts.reads(run.plan, stage)


@task(name="transfer_sets", cache_policy=NO_CACHE)
def transfer_sets(run: Run) -> str:
    """The groups' classes and fixed episodes; for text also the pipeline's cached MiniLM prefix."""
    if "prefix" in run.plan.keys:
        run.stage("prefix", run.plan.keys["prefix"], lambda out: build_prefix(family_for(run.cfg), out))
    _, meta = run.stage("transfer_sets", run.plan.keys["transfer_sets"], lambda out: ts.build_sets(run.cfg, out),
                        _reads(run, "transfer_sets"))
    run.tracker.log_metrics(run.parent_id, {f"transfer_{k}": v for k, v in meta.items()})
    return run.plan.keys["transfer_sets"]


@task(name="transfer_train", task_run_name="transfer_train[{source}]", cache_policy=NO_CACHE)
def train_source(run: Run, source: str) -> str:
    """Meta-train one source (a group, or pooled) from the shared initialisation; a nested MLflow run. As the
    pipeline's meta_train: an entry its budget stopped is continued from its checkpoint, and --force
    transfer_train starts again from the shared initialisation."""
    set_threads(run.cfg)
    key, logger = run.plan.source_keys[source], get_run_logger()
    checkpoint = run.cache.checkpoint(key)
    if "transfer_train" in run.force:
        checkpoint.unlink(missing_ok=True)

    def progress(iteration: int, metrics: dict[str, float]) -> None:
        if "val_loss" in metrics:
            logger.info("%s: iteration %d val_loss=%.4f", source, iteration, metrics["val_loss"])

    path, meta = run.stage("transfer_train", key, lambda out: ts.train_source(
        run.cfg, run.cache, run.plan.keys, source, out, checkpoint, progress), _reads(run, "transfer_train"),
        redo=unfinished)
    child = run.method_run(f"transfer/{source}", "transfer_source")
    run.tracker.set_tags(child, {"metapeft.transfer_train_key": key, "metapeft.groups": meta["groups"],
                                 "metapeft.stop_reason": meta["stop_reason"]})
    history = pd.read_parquet(path / "history.parquet")
    run.tracker.log_curves(child, zip(history["metric"], history["iteration"], history["value"]))
    run.tracker.log_metrics(child, {"meta_train_iterations": meta["iterations_total"]})
    return key


@task(name="transfer_matrix", cache_policy=NO_CACHE)
def transfer_matrix(run: Run) -> str:
    path, _ = run.stage("transfer_matrix", run.plan.keys["transfer_matrix"], lambda out: ts.score_matrix(
        run.cfg, run.cache, run.plan.keys, run.plan.source_keys, out),
        _reads(run, "transfer_matrix"))
    gains = ts.read_gains(path)
    run.tracker.log_metrics(run.parent_id, {"transfer_gain_mean_off_diagonal": transfer_pairs(
        gains)["gain"].mean(), "transfer_gain_mean_diagonal": float(pd.Series(
            [gains.loc[g, g] for g in gains.index]).mean())})
    for name in ("scores.parquet", "gains.parquet"):
        run.tracker.log_artifact(run.parent_id, path / name, "transfer")
    return run.plan.keys["transfer_matrix"]


@task(name="task_embeddings", cache_policy=NO_CACHE)
def task_embeddings(run: Run) -> str:
    key = run.plan.keys["transfer_embeddings"]
    _, meta = run.stage("transfer_embeddings", key, lambda out: ts.embed_episodes(
        run.cfg, run.cache, run.plan.keys, run.plan.source_keys[ts.POOLED], out),
        _reads(run, "transfer_embeddings"))
    run.tracker.log_metrics(run.parent_id, {"task2vec_dim": meta["task2vec_dim"],
                                            "task2vec_seconds": meta["seconds"]})
    return key


@task(name="task_encoder", cache_policy=NO_CACHE)
def task_encoder(run: Run) -> str:
    """The TaskEmbeddingNetwork in its own cached step: encoder.pt is its checkpoint."""
    key = run.plan.keys["transfer_encoder"]
    path, meta = run.stage("transfer_encoder", key, lambda out: ts.train_encoder(
        run.cfg, _path(run, "transfer_embeddings"), out), _reads(run, "transfer_encoder"))
    history = pd.read_parquet(path / "history.parquet")
    run.tracker.log_curves(run.parent_id, (("encoder_loss", s, v) for s, v in zip(history["step"], history["loss"])))
    run.tracker.log_artifact(run.parent_id, path / "encoder.pt", "transfer")
    return key


@task(name="transfer_correlation", cache_policy=NO_CACHE)
def correlation(run: Run) -> str:
    """Spearman's rho between distance and gain per embedding x metric, with its bootstrap CI; the figures."""
    path, _ = run.stage("transfer_correlation", run.plan.keys["transfer_correlation"], lambda out: ts.correlate(
        run.cfg, _path(run, "transfer_matrix"), _path(run, "transfer_embeddings"), _path(run, "transfer_encoder"),
        out), _reads(run, "transfer_correlation"))
    rho = pd.read_parquet(path / "rho.parquet")
    run.tracker.log_metrics(run.parent_id, {f"rho_{r.embedding}_{r.metric}{suffix}": getattr(r, field)
                                            for r in rho.itertuples()
                                            for suffix, field in (("", "rho"), ("_ci_low", "ci_low"),
                                                                  ("_ci_high", "ci_high"))})
    for file in [path / "rho.parquet", path / "distances.parquet", *sorted(path.glob("*.png"))]:
        run.tracker.log_artifact(run.parent_id, file, "transfer")
    return run.plan.keys["transfer_correlation"]


@task(name="nearest_task", cache_policy=NO_CACHE)
def nearest_task(run: Run) -> str:
    """Nearest-task initialisation against the meta-learned start and scratch, paired tests with Holm."""
    def compute(out: Path) -> dict:
        ts.nearest_task(run.cfg, _path(run, "transfer_matrix"), _path(run, "transfer_embeddings"),
                        _path(run, "transfer_encoder"), out)
        return {"mlflow_run_id": run.parent_id}  # named by a fully cached rerun (flows.cli), which starts no run

    path, _ = run.stage("nearest_task", run.plan.keys["nearest_task"], compute, _reads(run, "nearest_task"))
    summary = pd.read_parquet(path / "summary.parquet").set_index("method")
    run.tracker.log_metrics(run.parent_id, {f"nearest_{m}_accuracy": v for m, v in summary["mean"].items()})
    for name in ("nearest.parquet", "comparisons.parquet", "summary.parquet"):
        run.tracker.log_artifact(run.parent_id, path / name, "transfer")
    return run.plan.keys["nearest_task"]


def check_transfer(cfg: StudyConfig) -> None:
    """Raise what the transfer study would fail on later, from the config and its data alone (no Prefect, no
    MLflow, no cache): ValueError for an unknown group, n_groups above the groups available, a test_fraction
    leaving a group too few training classes, a damaged data file; FileNotFoundError for a missing one. Each
    message is one line naming the config field or the file."""
    if cfg.transfer is None:
        raise ValueError("transfer: the config has no transfer section")
    ts.check_sets(cfg)


@flow(name="transfer_study", flow_run_name=flow_run_name)
def transfer_study(config_path: str, force: list[str] | None = None) -> dict:
    """Run the transfer study of `config_path` (which must have a `transfer:` section); `force` recomputes
    those stages (names of flows.transfer_stages.STAGES). Returns run_id, keys, hits and the printed text."""
    cfg, root = load_config(config_path), project_root()
    if cfg.transfer is None:
        raise ValueError(f"{config_path}: no transfer section; run it with meta_pipeline")
    set_threads(cfg)
    tracker, plan = Tracker(root, cfg.runtime.experiment), ts.make_transfer_plan(cfg)
    warn_tracking(tracker)  # e.g. an earlier run killed by SIGKILL: marked KILLED
    parent = tracker.start_run(f"{cfg.name}", tags={"metapeft.kind": "transfer", "metapeft.config": str(config_path),
                                                    **{f"metapeft.key.{s}": k for s, k in plan.keys.items()}})
    run = Run(cfg, root, plan, tracker, parent, force=frozenset(force or ()))
    with ending(run):
        tracker.log_params(parent, flatten(cfg.model_dump()))
        transfer_sets(run)
        for source in plan.source_keys:
            train_source(run, source)
        transfer_matrix(run)
        task_embeddings(run)
        task_encoder(run)
        correlation(run)
        nearest_task(run)
        text = ts.results_text(cfg, run.cache, plan)
        if notes := ts.start_notes(cfg, run.cache, plan.source_keys):  # uneven or untrained starts: say so
            text = "\n".join([text, *unfinished_lines(notes)])
            tracker.set_tags(parent, {"metapeft.unfinished": unfinished_tag(notes)})
        (root / "mlruns").mkdir(exist_ok=True)
        (root / "mlruns" / "transfer.txt").write_text(text + "\n")
        tracker.log_artifact(parent, root / "mlruns" / "transfer.txt", "transfer")
    return {"run_id": parent, "keys": plan.keys, "source_keys": plan.source_keys, "hits": run.hits, "results": text}
