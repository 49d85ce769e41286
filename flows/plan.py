"""Stage graph and cache keys, computed from the config alone (no Prefect, no MLflow).

A stage's key hashes its config section, its upstream stages' keys and its code version (the
source of the component modules it runs), so editing one section recomputes that stage and what
follows it, nothing before.
"""
from __future__ import annotations

from dataclasses import dataclass

from components import (baselines, evaluation, features, metalearners, models, omniglot, significance, tasksets,
                        text, training)
from flows import families, report, validation
from flows.cache import content_key, source_version
from flows.config import StudyConfig

STAGES = ("task_sets", "embeddings", "meta_train", "evaluate", "baselines", "significance")
# Text families also cache a "prefix" entry (the frozen lower encoder layers' hidden states per utterance),
# computed by the embeddings stage and read by meta_train, evaluate and baselines: for them the embeddings
# stage is upstream too, but only the prefix key enters their keys (similarity settings do not retrain).
TEXT_UPSTREAM = ("meta_train", "evaluate", "baselines")
UPSTREAM = {
    "task_sets": (),
    "embeddings": ("task_sets",),
    "meta_train": ("task_sets",),
    "evaluate": ("task_sets", "meta_train"),
    "baselines": ("task_sets",),
    "significance": ("evaluate", "baselines"),
}
CODE = {
    "task_sets": (tasksets, omniglot, validation, families),
    "prefix": (text,),  # families.build_prefix only writes what text.encode_utterances returns
    "embeddings": (features, report, families),
    "meta_train": (metalearners, training, models, text, families),
    "evaluate": (evaluation, metalearners, models, text, families),
    "baselines": (baselines, evaluation, models, text, families),
    "significance": (significance, report),
}


@dataclass(frozen=True)
class Plan:
    keys: dict[str, str]  # stage -> cache key (meta_train: a hash of its algorithms' keys)
    algorithm_keys: dict[str, str]  # unit label -> key of its meta_train entry
    units: dict[str, tuple[str, int]]  # unit label ("maml", or "maml/seed1" with seeds) -> (algorithm, seed)


def unit_label(algorithm: str, seed: int, cfg: StudyConfig) -> str:
    """The algorithm's name alone without `seeds` (keys and run names as before seeds existed)."""
    return algorithm if cfg.seeds is None else f"{algorithm}/seed{seed}"


def make_plan(cfg: StudyConfig) -> Plan:
    def key(stage: str, section: object, *upstream: str) -> str:
        return content_key({"stage": stage, "config": section, "upstream": [keys[u] for u in upstream],
                            "code": source_version(*CODE[stage])})

    keys: dict[str, str] = {}
    keys["task_sets"] = key("task_sets", {"family": cfg.family.model_dump(), "seed": cfg.seed})
    data = ("task_sets",)
    if cfg.family.kind == "text":
        source = cfg.family.model_dump(include={"dataset", "path", "text_col", "label_col", "domain_col", "max_length"})
        keys["prefix"] = key("prefix", {**source, "top_layers": cfg.model.top_layers})  # not k_shot etc.
        data = ("task_sets", "prefix")
    keys["embeddings"] = key("embeddings", cfg.embedding.model_dump(), *data)
    units = {unit_label(alg, seed, cfg): (alg, seed) for alg in cfg.meta_train.algorithms for seed in cfg.train_seeds}
    algorithm_keys = {
        label: key("meta_train", {"train": cfg.meta_train.for_algorithm(alg), "model": cfg.model.model_dump(),
                                  "seed": seed}, *data)
        for label, (alg, seed) in units.items()}
    keys["meta_train"] = content_key(algorithm_keys)
    keys["evaluate"] = key("evaluate", cfg.evaluate.model_dump(), *data, "meta_train")
    keys["baselines"] = key("baselines", {"baselines": cfg.baselines.model_dump(), "model": cfg.model.model_dump(),
                                          "evaluate": cfg.evaluate.model_dump(), "seed": cfg.seed}, *data)
    keys["significance"] = key("significance", cfg.significance.model_dump(), "evaluate", "baselines")
    return Plan(keys, algorithm_keys, units)


def upstream(stage: str, cfg: StudyConfig | None = None) -> tuple[str, ...]:
    """The stages whose output `stage` reads (text families: the embeddings stage's prefix, too)."""
    extra = ("embeddings",) if cfg is not None and cfg.family.kind == "text" and stage in TEXT_UPSTREAM else ()
    return UPSTREAM[stage] + extra


def needed_stages(only: set[str] | None, cfg: StudyConfig | None = None) -> list[str]:
    """The requested stages and everything upstream of them, in pipeline order (all when only is empty)."""
    if not only:
        return list(STAGES)
    unknown = sorted(only - set(STAGES))
    if unknown:
        raise ValueError(f"--stage: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    needed, todo = set(), list(only)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo.extend(upstream(stage, cfg))
    return [s for s in STAGES if s in needed]
