"""What each stage computes: read upstream entries, call components, write Parquet into `out`.

No Prefect and no MLflow here: `flows/pipeline.py` wraps these in tasks, caching and tracking.
What differs between task families (data, model, loss, metric) comes from `flows.families`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from components.evaluation import evaluate_init, results_table, score_steps_every
from components.features import pairwise_similarity
from components.metalearners import MetaLearner, MetaLearnerConfig
from components.significance import compare_methods, summarize
from components.training import TrainConfig, TrainResult, meta_train
from flows import report
from flows.cache import StageCache, write_table
from flows.config import StudyConfig
from flows.families import family_for


def set_threads(cfg: StudyConfig) -> None:
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)


def device(cfg: StudyConfig) -> torch.device:
    if cfg.runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.runtime.device)


DATA_STAGES = ("task_sets", "prefix")  # the entries a family reads (prefix: text families only)


def family(cfg: StudyConfig, cache: StageCache | None = None, keys: dict[str, str] | None = None):
    """The config's task family, reading the cached entries of its data stages named in keys."""
    entries = {s: cache.path(s, keys[s]) for s in DATA_STAGES if keys and s in keys} if cache else {}
    return family_for(cfg, entries)


def build_task_sets(cfg: StudyConfig, out: Path) -> dict:
    """The family's task sets, validated by Great Expectations (a failure raises ValidationFailed)."""
    return family_for(cfg).build(out)


def build_prefix(cfg: StudyConfig, out: Path) -> dict:
    """Text families: the frozen encoder's hidden states below the adapted layers, once per utterance."""
    return family_for(cfg).build_prefix(out)


def build_embeddings(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], out: Path) -> dict:
    """Dataset-statistics features of every task, and similarity matrices over a few meta-test tasks."""
    features = family(cfg, cache, keys).features(cache.path("task_sets", keys["task_sets"]))
    write_table(features.reset_index(), out, "features")
    test = features[features["split"] == "meta_test"].drop(columns="split").head(cfg.embedding.n_similarity_tasks)
    for metric in cfg.embedding.metrics:
        matrix = pairwise_similarity(test, metric)
        write_table(matrix.rename(columns=str).reset_index(names="task_id"), out, f"similarity_{metric}")
        report.plot_heatmap(matrix, f"meta-test tasks: {metric}", out / f"similarity_{metric}.png")
    return {"n_features": features.shape[1] - 1, "n_tasks": features.shape[0]}


def make_learner(cfg: StudyConfig, algorithm: str, dev: torch.device, tasks=None,
                 seed: int | None = None) -> MetaLearner:
    """The algorithm's learner; every algorithm starts from the same initialisation of `seed` (default cfg.seed)."""
    tasks, section = tasks or family_for(cfg), cfg.meta_train.for_algorithm(algorithm)
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = tasks.model().to(dev)
    learner_cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=section["inner_steps"],
                                    fast_lr=section["fast_lr"], lr_range=section["metasgd_lr_range"],
                                    vectorize=section["vectorize"], task_batched=section["task_batched"],
                                    task_chunk=section["task_chunk"], query_chunk=section["query_chunk"])
    zero_init = tasks.head(model) if section.get("zero_head") else ()
    return MetaLearner(model, learner_cfg, tasks.loss_fn, adapted=tasks.adapted(model), frozen=tasks.frozen(model),
                       zero_init=zero_init)


def train_algorithm(cfg: StudyConfig, algorithm: str, cache: StageCache, keys: dict[str, str], out: Path,
                    checkpoint: Path, log: Callable[[int, dict[str, float]], None] | None = None,
                    seed: int | None = None) -> TrainResult:
    """Meta-train one algorithm (resuming from `checkpoint` when present); write state.pt and history.

    seed (default cfg.seed) fixes the initialisation and the meta-batches; the task sets stay cfg.seed's.
    """
    seed = cfg.seed if seed is None else seed
    dev, section, tasks = device(cfg), cfg.meta_train.for_algorithm(algorithm), family(cfg, cache, keys)
    data = tasks.open(tasks.entries["task_sets"], dev, ("meta_train", "meta_val"), section["meta_batch_size"])
    budget = section["budget_minutes"]
    train_cfg = TrainConfig(meta_lr=section["meta_lr"], iterations=section["iterations"],
                            meta_batch_size=section["meta_batch_size"], val_every=section["val_every"],
                            patience=section["patience"], checkpoint_every=section["checkpoint_every"],
                            seed=seed, budget_seconds=None if budget is None else 60 * budget)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    learner = make_learner(cfg, algorithm, dev, tasks, seed)
    result = meta_train(learner, data.train, data.val, train_cfg, checkpoint, log)
    torch.save(result.state, out / "state.pt")
    write_table(result.history, out, "history")
    return result


def evaluate_unit(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], algorithm: str, seed: int,
                  train_key: str, out: Path) -> pd.DataFrame:
    """Per-task query score after 0..steps test-time steps of one meta-trained (algorithm, seed), into out.

    Every unit is scored on the same meta-test tasks (cfg.seed's); columns as results_table plus seed.
    """
    dev, tasks = device(cfg), family(cfg, cache, keys)
    data, scored = tasks.open(tasks.entries["task_sets"], dev, ("meta_test",)), score_steps_every(
        cfg.evaluate.steps, cfg.evaluate.score_every)
    learner = make_learner(cfg, algorithm, dev, tasks)
    learner.load_state_dict(torch.load(cache.path("meta_train", train_key) / "state.pt", weights_only=True,
                                       map_location=dev))
    scores = evaluate_init(learner, data.test, cfg.evaluate.steps, cfg.evaluate.chunk, tasks.score_fn, scored)
    results = results_table(scores, data.test_ids, algorithm, tasks.metric, scored).assign(seed=seed)
    write_table(results, out, "results")
    return results


def run_baselines(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], out: Path) -> pd.DataFrame:
    """The family's baselines on the same meta-test tasks with the same test-time step budget."""
    dev, tasks = device(cfg), family(cfg, cache, keys)
    data = tasks.open(tasks.entries["task_sets"], dev, ("meta_test",))
    torch.manual_seed(cfg.seed)
    model = tasks.model().to(dev)
    scored = score_steps_every(cfg.evaluate.steps, cfg.evaluate.score_every)
    curves = tasks.baseline_curves(data.test, model, cfg.evaluate.steps, scored)
    results = pd.concat([results_table(c, data.test_ids, m, tasks.metric, scored) for m, c in curves.items()],
                        ignore_index=True)
    write_table(results, out, "results")
    return results


def compare(cfg: StudyConfig, results: pd.DataFrame, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Paired tests between all methods at the final test-time step; tables and figures into out."""
    family, conf = family_for(cfg), cfg.significance.confidence
    if "seed" in results.columns:
        write_table(seed_spread(results), out, "seeds")
    results = across_seeds(results)
    final = results[results["steps"] == results["steps"].max()]
    comparisons = compare_methods(final, family.metric, lower_is_better=family.lower_is_better, confidence=conf)
    summary = summarize(final, family.metric, conf, lower_is_better=family.lower_is_better)
    write_table(comparisons, out, "comparisons")
    write_table(summary.reset_index(), out, "summary")
    report.plot_summary(summary, family.metric, out / "summary.png")
    report.plot_curves(results, family.metric, out / "curves.png", log_scale=family.lower_is_better)
    return summary, comparisons


def across_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """Each method's score per (episode, steps) averaged over its meta-training seeds (one seed: unchanged)."""
    if "seed" not in results.columns:
        return results
    return results.groupby(["episode", "method", "steps", "metric"], as_index=False, sort=False)["value"].mean()


def seed_spread(results: pd.DataFrame) -> pd.DataFrame:
    """Per method and seed, the mean score over episodes at the last step: (method, seed, metric, value)."""
    final = results[(results["steps"] == results["steps"].max()) & results["seed"].notna()]
    return final.groupby(["method", "seed", "metric"], as_index=False)["value"].mean()
