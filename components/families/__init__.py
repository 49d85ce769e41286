"""What a task family provides to the pipeline, as one interface (`TaskFamily`).

A family is a frozen dataclass of plain settings, in three parts that cache keys hash separately: `data`
(what its task sets depend on), `model` (its network and adapted set) and `baselines`. It never sees the
study config or the cache's paths: the pipeline hands it its tables as a mapping name -> DataFrame (read
lazily from the cache entries of its task sets and, for text, the frozen encoder's prefix) and writes
back the tables it builds. Validation (Great Expectations) and caching stay in `flows/`.

Adding a family: one module here with one `TaskFamily` subclass, one config section and converter in
`flows/config.py` / `flows/families.py`, and one GX suite in `flows/validation.py` (README: "Adding a task family").
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from components.episodes import (SPLITS, EpisodeBatch, class_members, derive_seed, episode_table, episodes_from_rows,
                                 gather, sample_rows, table_rows)
from components.metalearners import MetaLearner, MetaLearnerConfig

Tables = Mapping[str, pd.DataFrame]  # a cache entry's tables by name (lazily read Parquet)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TaskData:
    """A family's opened task sets: meta-training as a pool or a sampler, fixed meta-val / meta-test episodes."""

    train: EpisodeBatch | Callable[[int], EpisodeBatch] | None  # a pool, or iteration -> meta-batch
    val: EpisodeBatch | None
    test: EpisodeBatch | None
    test_ids: np.ndarray | None  # (T_test,) episode ids, in the order of `test`


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct argmax predictions: logits (..., B, N), y (..., B) -> scalar, float64: k/B in float32
    (2/3 -> 0.6666667) differs from the same fraction computed in float64 by ~1e-8, which paired tests between
    methods of equal counts would read as a difference."""
    return (logits.argmax(-1) == y).double().mean()


class TaskFamily(ABC):
    """The interface every family implements; see the module docstring for the division of labour."""

    metric: ClassVar[str]  # the score's name ("mse", "accuracy")
    lower_is_better: ClassVar[bool]
    reference: ClassVar[str] = "scratch"  # the baseline the report compares every method with
    loss_fn: ClassVar[LossFn]  # the inner/outer loss, (prediction, target) -> scalar
    score_fn: ClassVar[LossFn]  # the reported per-task score
    data: Any  # frozen dataclass: everything the task sets depend on
    model_settings: Any  # frozen dataclass: the network and its adapted set
    baselines: Any  # frozen dataclass: the baselines' settings

    # ---- data

    # The tables of `build` that only the meta-test episodes read. Meta-training reads the others, cached as their
    # own entry keyed by `training_data` and `training_files`: a new test protocol keeps the meta-training.
    test_tables: ClassVar[tuple[str, ...]] = ()
    # The `data` fields (dotted: "source.path") that name input files or folders. Cache keys hash the files'
    # content (`input_files`), not these names: a path written relative or absolute, or from another folder, is the
    # same data.
    path_fields: ClassVar[tuple[str, ...]] = ()

    def input_files(self) -> tuple[Path, ...]:
        """Every file the family's `build` reads; their content enters the task sets' cache key."""
        return ()

    def training_data(self) -> dict:
        """`data` as a dict, without the settings that change only `test_tables` (the number of meta-test
        episodes, a fixed episode file): what the tables meta-training reads are keyed by."""
        return asdict(self.data)

    def training_files(self) -> tuple[Path, ...]:
        """The input files the tables outside `test_tables` are built from (all of `input_files` by default)."""
        return self.input_files()

    @abstractmethod
    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """The task-set tables (name -> table): items, class split and fixed meta-val / meta-test episodes.

        Deterministic in (data settings, input files, seed). Raises ValueError naming the file or field
        on bad input. The pipeline validates them (flows.validation) and caches them."""

    @abstractmethod
    def open(self, tables: Tables, device: torch.device, splits: Sequence[str] = SPLITS,
             meta_batch_size: int = 1, seed: int = 0) -> TaskData:
        """The splits' episodes as tensors on device; meta-training batches are drawn from `seed`'s stream."""

    def features(self, tables: Tables) -> pd.DataFrame:
        """Task features of the meta-test episodes (index task_id, one column per feature, plus `split`)."""
        raise NotImplementedError(f"{type(self).__name__} has no task features")

    # ---- model

    @abstractmethod
    def model(self, tables: Tables, seed: int = 0) -> nn.Module:
        """A freshly initialised network; `learner` seeds torch's global RNG with seed before calling."""

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        """Names of the weights the inner loop adapts; None = all."""
        return None

    def frozen(self, model: nn.Module) -> tuple[str, ...]:
        """Names of the weights held constant (a pretrained backbone)."""
        return ()

    def head(self, model: nn.Module) -> tuple[str, ...]:
        """The classification head's weights (`zero_head` starts them at zero on every task)."""
        names = tuple(k for k, _ in model.named_parameters() if k.split(".")[-2:-1] == ["head"])
        if not names:
            raise ValueError(f"zero_head: the {type(self).__name__} model has no head")
        return names

    def norms(self, model: nn.Module) -> tuple[str, ...]:
        """The batch-norm weights and biases (`per_step_bn` gives them one value per inner step)."""
        names = tuple(k for k, _ in model.named_parameters() if k.split(".")[-2:-1] == ["norm"])
        if not names:
            raise ValueError(f"per_step_bn: the {type(self).__name__} model has no batch norm")
        return names

    def learner(self, tables: Tables, cfg: MetaLearnerConfig, device: torch.device, seed: int,
                zero_head: bool = False) -> MetaLearner:
        """The algorithm's learner over a fresh network initialised from seed (every algorithm of a seed
        starts from the same weights); zero_head starts the head at zero on every task (Kao et al. 2022).
        ANIL and the prototype variants are told the head; per_step_bn, the batch-norm weights."""
        torch.manual_seed(seed)
        model = self.model(tables, seed).to(device)
        head = self.head(model) if zero_head or cfg.variant.needs_head else ()
        per_step = self.norms(model) if cfg.per_step_bn else ()
        return MetaLearner(model, cfg, self.loss_fn, adapted=self.adapted(model), frozen=self.frozen(model),
                           zero_init=head if zero_head else (), head=head, per_step=per_step)

    # ---- baselines

    @abstractmethod
    def baseline_runs(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                      score_steps: list[int], chunk: int, seed: int) -> dict[str, Callable[[], np.ndarray]]:
        """The family's baselines, each a call giving its query score on the test episodes after `score_steps`
        of 0..steps SGD steps, (len(score_steps), T); one that diverges raises Diverged and the others still
        run. model: a fresh network of this family (seeded by the caller)."""


@dataclass(frozen=True)
class EpisodeSettings:
    """N-way K-shot episodes with Q queries per class; how many fixed meta-val / meta-test episodes."""

    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15  # per class
    n_val_episodes: int = 100
    n_test_episodes: int = 600
    conflicting_labels: str = "error"  # an example under two labels: "error" names it, "drop" drops every copy


class ClassificationTasks(TaskFamily):
    """A family of N-way K-shot classification episodes over rows of an example table (an image, an
    utterance): labels per row, a class split, fixed meta-val / meta-test episodes, a sampler per seed.

    Subclasses give `examples` (the rows' labels and inputs of a split) and a `data` with EpisodeSettings'
    fields; episode rows are positions in what `examples` returns for that split."""

    metric, lower_is_better = "accuracy", False
    loss_fn = staticmethod(F.cross_entropy)
    score_fn = staticmethod(accuracy)
    class_column: ClassVar[str] = "class_id"  # the classes table's column naming a class (beside `split`)
    test_tables: ClassVar[tuple[str, ...]] = ("episodes_meta_test",)  # sampled from their own seed stream

    def training_data(self) -> dict:
        return {k: v for k, v in super().training_data().items() if k != "n_test_episodes"}

    def classes(self, tables: Tables, split: str) -> list[str]:
        classes = tables["classes"]
        return classes.loc[classes["split"] == split, self.class_column].tolist()

    @abstractmethod
    def examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor | None]:
        """(labels (R,) of the split's example rows, their model inputs (R, ...) on device or None when the
        row ids themselves are the inputs)."""

    def episode_tables(self, labels: dict[str, np.ndarray], split: dict[str, list[str]], seed: int,
                       where: str = "", given: Sequence[str] = ()) -> dict[str, pd.DataFrame]:
        """The fixed meta-val / meta-test episodes (`episode_table` rows); meta-train's classes are checked for
        K + Q examples too. labels: split -> labels of its rows; split: split -> its classes; given: splits whose
        episodes come from elsewhere (a fixed episode file), neither sampled nor checked. Errors name where."""
        d, tables, errors = self.data, {}, []
        counts = {"meta_train": 0, "meta_val": d.n_val_episodes, "meta_test": d.n_test_episodes}
        for stream, s in enumerate(SPLITS):  # streams 1, 2: meta-val, meta-test (0 draws meta-training batches)
            if s in given:
                continue
            try:
                rows, ways = sample_rows(class_members(labels[s], split[s]), d.n_way, d.k_shot, d.n_query, counts[s],
                                         derive_seed(seed, 0, stream), split[s])
            except ValueError as e:
                errors.append(f"{s} split: {e}")  # every short split named at once, not the first alone
                continue
            if counts[s]:
                tables[f"episodes_{s}"] = episode_table(rows, ways, split[s], s)
        if errors:
            raise ValueError(where + "; ".join(errors))
        return tables

    def open(self, tables: Tables, device: torch.device, splits: Sequence[str] = SPLITS,
             meta_batch_size: int = 4, seed: int = 0) -> TaskData:
        """Fixed meta-val / meta-test episodes, and a sampler iteration -> meta-batch over meta-train classes
        drawn from seed's stream (a function of (seed, iteration) only, so a resumed run replays it)."""
        d, examples = self.data, {s: self.examples(tables, s, device) for s in splits}

        def inputs(split: str, rows) -> EpisodeBatch:
            ids = episodes_from_rows(rows, d.k_shot).to(device)
            items = examples[split][1]
            return ids if items is None else gather(ids, items)

        fixed = {s: inputs(s, table_rows(tables[f"episodes_{s}"], d.n_way)) for s in ("meta_val", "meta_test")
                 if s in splits}
        test = fixed.get("meta_test")
        sample = None
        if "meta_train" in splits:
            train = self.classes(tables, "meta_train")
            members = class_members(examples["meta_train"][0], train)
            sample = lambda it: inputs("meta_train", sample_rows(  # noqa: E731
                members, d.n_way, d.k_shot, d.n_query, meta_batch_size, derive_seed(seed, it), train)[0])
        return TaskData(sample, fixed.get("meta_val"), test, None if test is None else np.arange(len(test)))


def head_swap(init: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pretrained classifier's weights as an N-way start: every tensor whose shape matches is copied,
    the others (the wide head) start at zero. init, trained: name -> tensor; returns detached tensors."""
    return {k: (trained[k] if trained[k].shape == v.shape else torch.zeros_like(v)).detach()
            for k, v in init.items()}
