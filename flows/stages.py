"""What each stage computes: read upstream entries, call components, write Parquet into `out`.

No Prefect and no MLflow here: `flows/pipeline.py` wraps these in tasks, caching and tracking.
What differs between task families (data, model, loss, metric) comes from `flows.families`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from components.baselines import finetune, scratch
from components.evaluation import evaluate_init, results_table
from components.features import pairwise_similarity
from components.metalearners import MetaLearner, MetaLearnerConfig
from components.significance import compare_methods, summarize
from components.training import TrainConfig, TrainResult, meta_train
from flows import report
from flows.cache import StageCache, write_table
from flows.config import StudyConfig
from flows.families import family_for

BASELINES = ("scratch", "pretrain_finetune")


def set_threads(cfg: StudyConfig) -> None:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)


def device(cfg: StudyConfig) -> torch.device:
    if cfg.runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.runtime.device)


def build_task_sets(cfg: StudyConfig, out: Path) -> dict:
    """The family's task sets, validated by Great Expectations (a failure raises ValidationFailed)."""
    return family_for(cfg).build(out)


def build_embeddings(cfg: StudyConfig, cache: StageCache, tasksets_key: str, out: Path) -> dict:
    """Dataset-statistics features of every task, and similarity matrices over a few meta-test tasks."""
    features = family_for(cfg).features(cache.path("task_sets", tasksets_key))
    write_table(features.reset_index(), out, "features")
    test = features[features["split"] == "meta_test"].drop(columns="split").head(cfg.embedding.n_similarity_tasks)
    for metric in cfg.embedding.metrics:
        matrix = pairwise_similarity(test, metric)
        write_table(matrix.rename(columns=str).reset_index(names="task_id"), out, f"similarity_{metric}")
        report.plot_heatmap(matrix, f"meta-test tasks: {metric}", out / f"similarity_{metric}.png")
    return {"n_features": features.shape[1] - 1, "n_tasks": features.shape[0]}


def make_learner(cfg: StudyConfig, algorithm: str, dev: torch.device) -> MetaLearner:
    """The algorithm's learner; every algorithm starts from the same seeded initialisation."""
    family, section = family_for(cfg), cfg.meta_train.for_algorithm(algorithm)
    torch.manual_seed(cfg.seed)
    model = family.model().to(dev)
    learner_cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=section["inner_steps"],
                                    fast_lr=section["fast_lr"], lr_range=section["metasgd_lr_range"],
                                    vectorize=section["vectorize"])
    return MetaLearner(model, learner_cfg, family.loss_fn, adapted=family.adapted(model))


def train_algorithm(cfg: StudyConfig, algorithm: str, cache: StageCache, tasksets_key: str, out: Path,
                    checkpoint: Path, log: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Meta-train one algorithm (resuming from `checkpoint` when present); write state.pt and history."""
    dev, section = device(cfg), cfg.meta_train.for_algorithm(algorithm)
    data = _open(cfg, cache, tasksets_key, dev, ("meta_train", "meta_val"), section["meta_batch_size"])
    budget = section["budget_minutes"]
    train_cfg = TrainConfig(meta_lr=section["meta_lr"], iterations=section["iterations"],
                            meta_batch_size=section["meta_batch_size"], val_every=section["val_every"],
                            patience=section["patience"], checkpoint_every=section["checkpoint_every"],
                            seed=cfg.seed, budget_seconds=None if budget is None else 60 * budget)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    learner = make_learner(cfg, algorithm, dev)
    result = meta_train(learner, data.train, data.val, train_cfg, checkpoint, log)
    torch.save(result.state, out / "state.pt")
    write_table(result.history, out, "history")
    return result


def _open(cfg, cache, tasksets_key, dev, splits, meta_batch_size: int = 1):
    return family_for(cfg).open(cache.path("task_sets", tasksets_key), dev, splits, meta_batch_size)


def evaluate_algorithms(cfg: StudyConfig, cache: StageCache, tasksets_key: str,
                        algorithm_keys: dict[str, str], out: Path) -> pd.DataFrame:
    """Per-task query score after 0..steps test-time steps for every algorithm, on the same meta-test tasks."""
    dev, family = device(cfg), family_for(cfg)
    data = _open(cfg, cache, tasksets_key, dev, ("meta_test",))
    tables = []
    for algorithm, key in algorithm_keys.items():
        learner = make_learner(cfg, algorithm, dev)
        learner.load_state_dict(torch.load(cache.path("meta_train", key) / "state.pt", weights_only=True,
                                           map_location=dev))
        scores = evaluate_init(learner, data.test, cfg.evaluate.steps, cfg.evaluate.chunk, family.score_fn)
        tables.append(results_table(scores, data.test_ids, algorithm, family.metric))
    results = pd.concat(tables, ignore_index=True)
    write_table(results, out, "results")
    return results


def run_baselines(cfg: StudyConfig, cache: StageCache, tasksets_key: str, out: Path) -> pd.DataFrame:
    """Scratch and pretrain+finetune on the same meta-test tasks with the same test-time step budget."""
    dev, family, b, steps = device(cfg), family_for(cfg), cfg.baselines, cfg.evaluate.steps
    data = _open(cfg, cache, tasksets_key, dev, ("meta_test",))
    torch.manual_seed(cfg.seed)
    model = family.model().to(dev)
    pretrained = family.pretrained_init(cache.path("task_sets", tasksets_key), model)
    kw = dict(loss_fn=family.loss_fn, chunk=cfg.evaluate.chunk, score_fn=family.score_fn)
    curves = {
        "scratch": scratch(family.model, data.test, steps, b.scratch_lr, cfg.seed, **kw),
        "pretrain_finetune": finetune(model, pretrained, data.test, steps, b.finetune_lr, **kw),
    }
    results = pd.concat([results_table(c, data.test_ids, m, family.metric) for m, c in curves.items()],
                        ignore_index=True)
    write_table(results, out, "results")
    return results


def compare(cfg: StudyConfig, results: pd.DataFrame, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired tests between all methods at the final test-time step; tables and figures into out."""
    family, conf = family_for(cfg), cfg.significance.confidence
    final = results[results["steps"] == results["steps"].max()]
    comparisons = compare_methods(final, family.metric, lower_is_better=family.lower_is_better, confidence=conf)
    summary = summarize(final, family.metric, conf, lower_is_better=family.lower_is_better)
    write_table(comparisons, out, "comparisons")
    write_table(summary.reset_index(), out, "summary")
    report.plot_summary(summary, family.metric, out / "summary.png")
    report.plot_curves(results, family.metric, out / "curves.png", log_scale=family.lower_is_better)
    return summary, comparisons
