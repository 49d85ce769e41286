"""Image classification families (Omniglot, users' image folders) share conv4, its features and baselines."""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.baselines import finetune, pretrain_classifier, scratch
from components.conv4 import Conv4, adapted_names
from components.episodes import EpisodeBatch, class_members
from components.families import ClassificationTasks, Tables, head_swap
from components.features import episode_features


class ImageTasks(ClassificationTasks):
    """Image classification with conv4 (the MAML paper's network, channels from the data): its adapted set,
    dataset-statistics features, and the two image baselines: scratch and pretrain_finetune (a conv4
    classifier over every meta-train class, a class then one of its images drawn uniformly; its body with
    a zero N-way head, fine-tuned per episode). Subclasses give `channels` and data.image_size."""

    channels: ClassVar[int] = 1

    def model(self, tables: Tables | None = None, seed: int = 0, n_out: int | None = None) -> nn.Module:
        return Conv4(self.model_settings.config(n_out or self.data.n_way, self.channels, self.data.image_size))

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        return adapted_names(model, self.model_settings.adapted)

    def features(self, tables: Tables) -> pd.DataFrame:
        test = self.open(tables, torch.device("cpu"), ["meta_test"]).test
        return episode_features(test.x_spt, test.y_spt).assign(split="meta_test").rename_axis("task_id")

    def baseline_runs(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                      score_steps: list[int], chunk: int, seed: int) -> dict[str, Callable[[], np.ndarray]]:
        b, dev = self.baselines, next(model.parameters()).device
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)

        def pretrain_finetune() -> np.ndarray:
            labels, images = self.examples(tables, "meta_train", dev)
            train = self.classes(tables, "meta_train")
            members = torch.from_numpy(class_members(labels, train))  # (C, M) rows of images, -1 padded
            wide = self.model(n_out=len(train)).to(dev)
            trained = pretrain_classifier(wide, images, b.pretrain_iterations, b.pretrain_batch_size, b.pretrain_lr,
                                          seed, self.loss_fn, members=members)
            return finetune(model, head_swap(dict(model.named_parameters()), trained), test, steps, b.finetune_lr,
                            **kw)

        return {"scratch": lambda: scratch(self.model, test, steps, b.scratch_lr, seed, **kw),
                "pretrain_finetune": pretrain_finetune}
