"""What each stage computes: read upstream entries, call components, write Parquet into `out`.

No Prefect and no MLflow here: `flows/pipeline.py` wraps these in tasks, caching and tracking.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from components.baselines import finetune, pretrain, scratch
from components.evaluation import evaluate_init, results_table
from components.features import TaskFeatureExtractor, pairwise_similarity
from components.metalearners import MetaLearner, MetaLearnerConfig
from components.models import MLP
from components.significance import compare_methods, summarize
from components.tasksets import SPLITS, SinusoidFamily, sample_sinusoid_tasks, task_ids, to_batch
from components.training import TrainConfig, TrainResult, meta_train
from flows import report
from flows.cache import StageCache, write_table
from flows.config import StudyConfig
from flows.validation import validate_tasksets

METRIC = "mse"
BASELINES = ("scratch", "pretrain_finetune")


def set_threads(cfg: StudyConfig) -> None:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)


def device(cfg: StudyConfig) -> torch.device:
    if cfg.runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.runtime.device)


def build_task_sets(cfg: StudyConfig, out: Path) -> dict:
    """Sample the three disjoint task sets, validate them (raises ValidationFailed), write one table each."""
    family = SinusoidFamily(**cfg.family.model_dump(exclude={"kind", "n_tasks"}))
    points = sample_sinusoid_tasks(family, cfg.family.n_tasks, cfg.seed)
    report_json = validate_tasksets(points, cfg.family)
    (out / "validation.json").write_text(json.dumps(report_json, default=str))
    for split in SPLITS:
        write_table(points[points["split"] == split], out, split)
    return {f"n_tasks_{s}": int(n) for s, n in points.groupby("split")["task_id"].nunique().items()}


def load_split(cache: StageCache, key: str, split: str, dev: torch.device):
    """(TaskBatch on dev, task ids) of one split of a cached task_sets entry."""
    points = cache.read_table("task_sets", key, split)
    return to_batch(points).to(dev), task_ids(points)


def build_embeddings(cfg: StudyConfig, cache: StageCache, tasksets_key: str, out: Path) -> dict:
    """Dataset-statistics features of every task, and similarity matrices over a few meta-test tasks."""
    points = pd.concat([cache.read_table("task_sets", tasksets_key, s) for s in SPLITS])
    features = TaskFeatureExtractor().transform(points)
    split_of = points.groupby("task_id")["split"].first()
    write_table(features.assign(split=split_of.reindex(features.index).to_numpy()).reset_index(), out, "features")
    test_ids = split_of[split_of == "meta_test"].index[: cfg.embedding.n_similarity_tasks]
    for metric in cfg.embedding.metrics:
        matrix = pairwise_similarity(features.loc[test_ids], metric)
        write_table(matrix.rename(columns=str).reset_index(names="task_id"), out, f"similarity_{metric}")
        report.plot_heatmap(matrix, f"meta-test tasks: {metric}", out / f"similarity_{metric}.png")
    return {"n_features": features.shape[1], "n_tasks": features.shape[0]}


def make_learner(cfg: StudyConfig, algorithm: str, dev: torch.device) -> MetaLearner:
    """The algorithm's learner; every algorithm starts from the same seeded initialisation."""
    section = cfg.meta_train.for_algorithm(algorithm)
    torch.manual_seed(cfg.seed)
    model = MLP(cfg.model.sizes).to(dev)
    learner_cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=section["inner_steps"],
                                    fast_lr=section["fast_lr"], lr_range=section["metasgd_lr_range"],
                                    vectorize=section["vectorize"])
    return MetaLearner(model, learner_cfg, F.mse_loss)


def train_algorithm(cfg: StudyConfig, algorithm: str, cache: StageCache, tasksets_key: str, out: Path,
                    checkpoint: Path, log: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Meta-train one algorithm (resuming from `checkpoint` when present); write state.pt and history."""
    dev = device(cfg)
    train, _ = load_split(cache, tasksets_key, "meta_train", dev)
    val, _ = load_split(cache, tasksets_key, "meta_val", dev)
    section = cfg.meta_train.for_algorithm(algorithm)
    budget = section["budget_minutes"]
    train_cfg = TrainConfig(meta_lr=section["meta_lr"], iterations=section["iterations"],
                            meta_batch_size=section["meta_batch_size"], val_every=section["val_every"],
                            patience=section["patience"], checkpoint_every=section["checkpoint_every"],
                            seed=cfg.seed, budget_seconds=None if budget is None else 60 * budget)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    result = meta_train(make_learner(cfg, algorithm, dev), train, val, train_cfg, checkpoint, log)
    torch.save(result.state, out / "state.pt")
    write_table(result.history, out, "history")
    return result


def evaluate_algorithms(cfg: StudyConfig, cache: StageCache, tasksets_key: str,
                        algorithm_keys: dict[str, str], out: Path) -> pd.DataFrame:
    """Per-task query MSE after 0..steps test-time steps for every algorithm, on the same meta-test tasks."""
    dev = device(cfg)
    test, ids = load_split(cache, tasksets_key, "meta_test", dev)
    tables = []
    for algorithm, key in algorithm_keys.items():
        learner = make_learner(cfg, algorithm, dev)
        learner.load_state_dict(torch.load(cache.path("meta_train", key) / "state.pt", weights_only=True,
                                           map_location=dev))
        losses = evaluate_init(learner, test, cfg.evaluate.steps, cfg.evaluate.chunk)
        tables.append(results_table(losses, ids, algorithm, METRIC))
    results = pd.concat(tables, ignore_index=True)
    write_table(results, out, "results")
    return results


def run_baselines(cfg: StudyConfig, cache: StageCache, tasksets_key: str, out: Path) -> pd.DataFrame:
    """Scratch and pretrain+finetune on the same meta-test tasks with the same test-time step budget."""
    dev = device(cfg)
    test, ids = load_split(cache, tasksets_key, "meta_test", dev)
    train, _ = load_split(cache, tasksets_key, "meta_train", dev)
    b, steps = cfg.baselines, cfg.evaluate.steps
    factory = lambda: MLP(cfg.model.sizes)  # noqa: E731
    torch.manual_seed(cfg.seed)
    model = factory().to(dev)
    pretrained = pretrain(model, train, b.pretrain_iterations, b.pretrain_batch_size, b.pretrain_lr, cfg.seed,
                          F.mse_loss)
    curves = {
        "scratch": scratch(factory, test, steps, b.scratch_lr, cfg.seed, F.mse_loss, cfg.evaluate.chunk),
        "pretrain_finetune": finetune(model, pretrained, test, steps, b.finetune_lr, F.mse_loss, cfg.evaluate.chunk),
    }
    results = pd.concat([results_table(c, ids, m, METRIC) for m, c in curves.items()], ignore_index=True)
    write_table(results, out, "results")
    return results


def compare(cfg: StudyConfig, results: pd.DataFrame, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired tests between all methods at the final test-time step; tables and figures into out."""
    final = results[results["steps"] == results["steps"].max()]
    conf = cfg.significance.confidence
    comparisons = compare_methods(final, METRIC, lower_is_better=True, confidence=conf)
    summary = summarize(final, METRIC, conf, lower_is_better=True)
    write_table(comparisons, out, "comparisons")
    write_table(summary.reset_index(), out, "summary")
    report.plot_summary(summary, METRIC, out / "summary.png")
    report.plot_curves(results, METRIC, out / "curves.png")
    return summary, comparisons
