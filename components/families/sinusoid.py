"""Sinusoid regression (Finn et al. 2017, section 5.1): y = A sin(x + phi), an MLP, MSE."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from components.baselines import BaselineConfig, finetune, pretrain, scratch
from components.episodes import SPLITS, EpisodeBatch
from components.families import TaskData, TaskFamily, Tables
from components.features import TaskFeatureExtractor
from components.models import MLP
from components.tasksets import SinusoidFamily, sample_sinusoid_tasks, task_ids, to_batch


@dataclass(frozen=True)
class SinusoidData:
    tasks: SinusoidFamily = SinusoidFamily()
    n_tasks: dict = field(default_factory=lambda: {"meta_train": 5000, "meta_val": 100, "meta_test": 600})


@dataclass(frozen=True)
class SinusoidTasks(TaskFamily):
    data: SinusoidData = SinusoidData()
    model_settings: tuple[int, ...] = (1, 40, 40, 1)  # MLP layer widths
    baselines: BaselineConfig = BaselineConfig()

    metric, lower_is_better = "mse", True
    loss_fn = staticmethod(F.mse_loss)
    score_fn = staticmethod(F.mse_loss)
    test_tables: ClassVar[tuple[str, ...]] = ("meta_test",)  # one generator draws meta-train, meta-val, then meta-test

    def training_data(self) -> dict:
        data = super().training_data()
        return {**data, "n_tasks": {s: n for s, n in data["n_tasks"].items() if s != "meta_test"}}

    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """The three disjoint task sets, one table each (task_id, split, role, point, x, y, amplitude, phase)."""
        points = sample_sinusoid_tasks(self.data.tasks, self.data.n_tasks, seed)
        return {split: points[points["split"] == split] for split in SPLITS}

    def open(self, tables: Tables, device: torch.device, splits: Sequence[str] = SPLITS,
             meta_batch_size: int = 1, seed: int = 0) -> TaskData:
        """The splits' task pools (meta-batches are drawn from the train pool by the training loop)."""
        batches = {s: (to_batch(tables[s]).to(device), task_ids(tables[s])) for s in splits}
        get = lambda s: batches.get(s, (None, None))  # noqa: E731
        return TaskData(get("meta_train")[0], get("meta_val")[0], *get("meta_test"))

    def features(self, tables: Tables) -> pd.DataFrame:
        points = pd.concat([tables[s] for s in SPLITS])
        features = TaskFeatureExtractor().transform(points)
        split_of = points.groupby("task_id")["split"].first()
        return features.assign(split=split_of.reindex(features.index).to_numpy())

    def model(self, tables: Tables | None = None, seed: int = 0) -> nn.Module:
        return MLP(self.model_settings)

    def head(self, model: nn.Module) -> tuple[str, ...]:
        raise ValueError("zero_head: the sinusoid family is regression; it has no classification head")

    def baseline_runs(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                      score_steps: list[int], chunk: int, seed: int) -> dict[str, Callable[[], np.ndarray]]:
        """scratch (a fresh init per task) and pretrain_finetune (one MLP on every meta-train point pooled)."""
        b, dev = self.baselines, next(model.parameters()).device
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)

        def pretrain_finetune() -> np.ndarray:
            train = self.open(tables, dev, ["meta_train"]).train
            pretrained = pretrain(model, train, b.pretrain_iterations, b.pretrain_batch_size, b.pretrain_lr, seed,
                                  self.loss_fn)
            return finetune(model, pretrained, test, steps, b.finetune_lr, **kw)

        return {"scratch": lambda: scratch(self.model, test, steps, b.scratch_lr, seed, **kw),
                "pretrain_finetune": pretrain_finetune}
