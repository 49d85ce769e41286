"""Config sections -> the components' frozen dataclasses: the task family, and each algorithm's settings.

The one place where the pydantic config meets the science: every stage receives the values built here,
and the plan hashes exactly these values into the cache keys (a converter that changes a value changes
the key). `FAMILIES` is the registry of task families by `family.kind`.
"""
from __future__ import annotations

from dataclasses import dataclass

from components.baselines import BaselineConfig
from components.conv4 import Conv4Model
from components.families import TaskFamily
from components.families.image_folder import ImageFolderData, ImageFolderTasks
from components.families.omniglot import OmniglotData, OmniglotTasks
from components.families.sinusoid import SinusoidData, SinusoidTasks
from components.families.text import TextData, TextSource, TextTasks, TopModel
from components.metalearners import MAML_PP, VARIANTS, MetaLearnerConfig
from components.tasksets import SinusoidFamily
from components.training import TrainConfig
from flows.config import EpisodeSection, StudyConfig


def _baselines(cfg: StudyConfig) -> BaselineConfig:
    return BaselineConfig(**cfg.baselines.model_dump())


def _sinusoid(cfg: StudyConfig) -> SinusoidTasks:
    f = cfg.family
    tasks = SinusoidFamily(amplitude=f.amplitude, phase=f.phase, x_range=f.x_range, k_shot=f.k_shot, n_query=f.n_query)
    return SinusoidTasks(SinusoidData(tasks, dict(f.n_tasks)), tuple(cfg.model.sizes), _baselines(cfg))


def _conv4(cfg: StudyConfig) -> Conv4Model:
    m = cfg.model
    return Conv4Model(hidden=m.hidden, adapted=m.adapted, lora_rank=m.lora_r, lora_alpha=m.lora_alpha)


def _episodes(section: EpisodeSection) -> dict:
    """The episode settings every classification family shares (n_way, k_shot, ..., conflicting_labels)."""
    return {name: getattr(section, name) for name in EpisodeSection.model_fields}


def _omniglot(cfg: StudyConfig) -> OmniglotTasks:
    f = cfg.family
    data = OmniglotData(path=f.path, split=f.split, random_fractions=tuple(f.random_fractions),
                        image_size=f.image_size, test_episodes=f.test_episodes, **_episodes(f))
    return OmniglotTasks(data, _conv4(cfg), _baselines(cfg))


def _image_folder(cfg: StudyConfig) -> ImageFolderTasks:
    f = cfg.family
    data = ImageFolderData(path=f.path, channels=f.channels, image_size=f.image_size, split=f.split,
                           fractions=tuple(f.fractions), test_episodes=f.test_episodes, **_episodes(f))
    return ImageFolderTasks(data, _conv4(cfg), _baselines(cfg))


def _text(cfg: StudyConfig) -> TextTasks:
    f, m = cfg.family, cfg.model
    source = TextSource(dataset=f.dataset, path=f.path, text_col=f.text_col, label_col=f.label_col,
                        domain_col=f.domain_col, max_length=f.max_length)
    if f.split == "files" and f.split_dir is None:
        raise ValueError(f"family.split_dir: the study runs over folds {list(cfg.folds or ())}: `metapeft run` "
                         "runs them all (each fold's pipeline gets its split_dir), `stages` and `run --dry-run` list "
                         "them all; one fold alone: --set family.split_dir=<its folder>")
    data = TextData(source=source, split_by=f.split_by, fractions=tuple(f.fractions), split=f.split,
                    split_dir=f.split_dir, train_pool=f.train_pool, **_episodes(f))
    model = TopModel(top_layers=m.top_layers, adapted=m.adapted, lora_r=m.lora_r, lora_alpha=m.lora_alpha,
                     lora_b_std=m.lora_b_std, target_modules=tuple(m.target_modules))
    return TextTasks(data, model, _baselines(cfg))


FAMILIES = {"sinusoid": _sinusoid, "omniglot": _omniglot, "image_folder": _image_folder, "text": _text}


def family_for(cfg: StudyConfig) -> TaskFamily:
    """The task family of cfg.family.kind, with its data, model and baseline settings."""
    return FAMILIES[cfg.family.kind](cfg)


def fold_family(cfg: StudyConfig) -> TaskFamily:
    """The family of a fold study's first fold (its folder as family.split_dir): what every fold shares, its metric
    and reference method, for the study's own tables; a fold's pipeline plans with its own config."""
    from flows.config import fold_dirs

    first = next(iter(fold_dirs(cfg).values()))
    return family_for(cfg.model_copy(update={"family": cfg.family.model_copy(update={"split_dir": first})}))


@dataclass(frozen=True)
class AlgorithmSettings:
    """One (algorithm, seed) unit's meta-training: what its cache key hashes, budget aside."""

    learner: MetaLearnerConfig
    train: TrainConfig
    zero_head: bool = False


def algorithm_settings(cfg: StudyConfig, algorithm: str, seed: int) -> AlgorithmSettings:
    """The algorithm's section (with its overrides) as component configs; seed drives init and episodes."""
    s = cfg.meta_train.for_algorithm(algorithm)
    learner = MetaLearnerConfig(algorithm=algorithm, inner_steps=s["inner_steps"], fast_lr=s["fast_lr"],
                                lr_range=tuple(s["metasgd_lr_range"]) if VARIANTS[algorithm].learn_rates
                                else MetaLearnerConfig.lr_range, vectorize=s["vectorize"],  # only Meta-SGD reads it
                                task_batched=s["task_batched"], task_chunk=s["task_chunk"],
                                query_chunk=s["query_chunk"], **{k: s[k] for k in MAML_PP})
    budget, cosine = s["budget_minutes"], s["meta_lr_schedule"] == "cosine"
    train = TrainConfig(meta_lr=s["meta_lr"], iterations=s["iterations"], meta_batch_size=s["meta_batch_size"],
                        val_every=s["val_every"], patience=s["patience"], checkpoint_every=s["checkpoint_every"],
                        seed=seed, budget_seconds=None if budget is None else 60 * budget,
                        cosine_iterations=s["iterations"] if cosine else 0,  # the horizon enters the checkpoint's key
                        min_meta_lr=s["min_meta_lr"] if cosine else 0.0)
    return AlgorithmSettings(learner, train, bool(s.get("zero_head", False)))
