"""Omniglot (Lake et al. 2015): N-way K-shot character classification with conv4, the MAML paper's setting.

Classes are (character, rotation) pairs; the class split is Vinyals et al.'s (1028 / 172 / 423 characters
x 4 rotations) or a seeded random one over whole characters. Episode rows index a split's class x drawing
grid: row = class position * drawings + drawing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from components import omniglot
from components.baselines import BaselineConfig, finetune, pretrain_classifier, scratch
from components.conv4 import Conv4, Conv4Model, adapted_names
from components.episodes import SPLITS, EpisodeBatch
from components.families import ClassificationTasks, EpisodeSettings, Tables, head_swap
from components.features import episode_features

VINYALS_FILES = {"meta_train": "train", "meta_val": "val", "meta_test": "test"}
DRAWINGS = 20  # per character


@dataclass(frozen=True)
class OmniglotData(EpisodeSettings):
    path: str = "../shared/data/omniglot"  # images_background.zip, images_evaluation.zip, splits_vinyals/
    split: str = "vinyals"  # or "random": seeded over whole characters by random_fractions
    random_fractions: tuple[float, float, float] = (0.64, 0.10, 0.26)
    image_size: int = 28


@dataclass(frozen=True)
class OmniglotTasks(ClassificationTasks):
    data: OmniglotData = OmniglotData()
    model_settings: Conv4Model = Conv4Model()
    baselines: BaselineConfig = BaselineConfig()

    def input_files(self) -> tuple[Path, ...]:
        root = Path(self.data.path)
        files = [omniglot.find_source(root, stem) for stem in omniglot.PARTS]
        if self.data.split == "vinyals":
            files += [root / "splits_vinyals" / f"{name}.txt" for name in VINYALS_FILES.values()]
        return tuple(f for path in files for f in ([path] if path.is_file() else sorted(path.rglob("*.png"))))

    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """images (resized once), classes (split, class_id) and the fixed meta-val / meta-test episode tables."""
        images = omniglot.load_omniglot(Path(self.data.path), self.data.image_size)
        split = self._class_split(images, seed)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])
        labels = {s: np.repeat(split[s], DRAWINGS) for s in SPLITS}  # the class x drawing grid of each split
        return {"images": images, "classes": classes, **self.episode_tables(labels, split, seed)}

    def _class_split(self, images: pd.DataFrame, seed: int) -> dict[str, list[str]]:
        if self.data.split == "vinyals":
            files = omniglot.read_vinyals_split(Path(self.data.path) / "splits_vinyals")
            return {split: files[name] for split, name in VINYALS_FILES.items()}
        characters = sorted(images["character"].unique())
        return omniglot.random_class_split(characters, dict(zip(SPLITS, self.data.random_fractions)), seed)

    def examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """The split's drawings, one row per (class, drawing): labels (C * 20,), images (C * 20, 1, s, s)."""
        classes = self.classes(tables, split)
        pool = omniglot.build_class_pool(tables["images"], classes)
        return np.repeat(classes, DRAWINGS), pool.images.flatten(0, 1).to(device)

    def model(self, tables: Tables | None = None, seed: int = 0, n_out: int | None = None) -> nn.Module:
        return Conv4(self.model_settings.config(n_out or self.data.n_way, 1, self.data.image_size))

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        return adapted_names(model, self.model_settings.adapted)

    def features(self, tables: Tables) -> pd.DataFrame:
        test = self.open(tables, torch.device("cpu"), ["meta_test"]).test
        return episode_features(test.x_spt, test.y_spt).assign(split="meta_test").rename_axis("task_id")

    def baseline_runs(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                      score_steps: list[int], chunk: int, seed: int) -> dict[str, Callable[[], np.ndarray]]:
        """scratch, and pretrain_finetune: a conv4 classifier over every meta-train class, its body with a
        zero N-way head, fine-tuned per episode."""
        b, dev = self.baselines, next(model.parameters()).device
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)

        def pretrain_finetune() -> np.ndarray:
            images = self.examples(tables, "meta_train", dev)[1]
            images = images.view(-1, DRAWINGS, *images.shape[1:])  # (C, 20, 1, s, s)
            wide = self.model(n_out=images.shape[0]).to(dev)
            trained = pretrain_classifier(wide, images, b.pretrain_iterations, b.pretrain_batch_size, b.pretrain_lr,
                                          seed, self.loss_fn)
            return finetune(model, head_swap(dict(model.named_parameters()), trained), test, steps, b.finetune_lr,
                            **kw)

        return {"scratch": lambda: scratch(self.model, test, steps, b.scratch_lr, seed, **kw),
                "pretrain_finetune": pretrain_finetune}
