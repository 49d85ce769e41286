"""Omniglot (Lake et al. 2015): N-way K-shot character classification with conv4, the MAML paper's setting.

Classes are (character, rotation) pairs; the class split is Vinyals et al.'s (1028 / 172 / 423 characters
x 4 rotations) or a seeded random one over whole characters. Episode rows index a split's class x drawing
grid: row = class position * drawings + drawing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from components import omniglot
from components.baselines import BaselineConfig, finetune, pretrain_classifier, scratch
from components.conv4 import Conv4, Conv4Model, adapted_names
from components.episodes import SPLITS, EpisodeBatch, derive_seed, episode_table, episodes_from_rows, gather, \
    sample_rows, table_rows
from components.families import TaskData, TaskFamily, Tables, accuracy, head_swap
from components.features import episode_features

VINYALS_FILES = {"meta_train": "train", "meta_val": "val", "meta_test": "test"}
DRAWINGS = 20  # per character


@dataclass(frozen=True)
class OmniglotData:
    path: str = "../shared/data/omniglot"  # images_background.zip, images_evaluation.zip, splits_vinyals/
    split: str = "vinyals"  # or "random": seeded over whole characters by random_fractions
    random_fractions: tuple[float, float, float] = (0.64, 0.10, 0.26)
    image_size: int = 28
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15  # per class
    n_val_episodes: int = 100
    n_test_episodes: int = 600


@dataclass(frozen=True)
class OmniglotTasks(TaskFamily):
    data: OmniglotData = OmniglotData()
    model_settings: Conv4Model = Conv4Model()
    baselines: BaselineConfig = BaselineConfig()

    metric, lower_is_better = "accuracy", False
    loss_fn = staticmethod(F.cross_entropy)
    score_fn = staticmethod(accuracy)

    def input_files(self) -> tuple[Path, ...]:
        root = Path(self.data.path)
        files = [omniglot.find_source(root, stem) for stem in omniglot.PARTS]
        if self.data.split == "vinyals":
            files += [root / "splits_vinyals" / f"{name}.txt" for name in VINYALS_FILES.values()]
        return tuple(f for path in files for f in ([path] if path.is_file() else sorted(path.rglob("*.png"))))

    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """images (resized once), classes (split, class_id) and the fixed meta-val / meta-test episode tables."""
        d = self.data
        images = omniglot.load_omniglot(Path(d.path), d.image_size)
        split = self._class_split(images, seed)
        tables = {"images": images,
                  "classes": pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])}
        for stream, s in enumerate(("meta_val", "meta_test"), start=1):
            n = d.n_val_episodes if s == "meta_val" else d.n_test_episodes
            rows, ways = sample_rows(_grid(len(split[s])), d.n_way, d.k_shot, d.n_query, n,
                                     derive_seed(seed, 0, stream), split[s])
            tables[f"episodes_{s}"] = episode_table(rows, ways, split[s], s)
        return tables

    def _class_split(self, images: pd.DataFrame, seed: int) -> dict[str, list[str]]:
        if self.data.split == "vinyals":
            files = omniglot.read_vinyals_split(Path(self.data.path) / "splits_vinyals")
            return {split: files[name] for split, name in VINYALS_FILES.items()}
        characters = sorted(images["character"].unique())
        return omniglot.random_class_split(characters, dict(zip(SPLITS, self.data.random_fractions)), seed)

    def items(self, tables: Tables, split: str) -> torch.Tensor:
        """The split's images, one row per (class, drawing): (C * 20, 1, s, s) float32."""
        classes = tables["classes"]
        pool = omniglot.build_class_pool(tables["images"], classes.loc[classes["split"] == split, "class_id"].tolist())
        return pool.images.flatten(0, 1)

    def open(self, tables: Tables, device: torch.device, splits: Sequence[str] = SPLITS,
             meta_batch_size: int = 32, seed: int = 0) -> TaskData:
        d, items = self.data, {s: self.items(tables, s).to(device) for s in splits}

        def sample(iteration: int) -> EpisodeBatch:
            n_classes = len(items["meta_train"]) // DRAWINGS
            rows, _ = sample_rows(_grid(n_classes), d.n_way, d.k_shot, d.n_query, meta_batch_size,
                                  derive_seed(seed, iteration))
            return gather(episodes_from_rows(torch.from_numpy(rows).to(device), d.k_shot), items["meta_train"])

        fixed = {s: gather(episodes_from_rows(table_rows(tables[f"episodes_{s}"], d.n_way), d.k_shot).to(device),
                           items[s]) for s in ("meta_val", "meta_test") if s in splits}
        test = fixed.get("meta_test")
        return TaskData(sample if "meta_train" in splits else None, fixed.get("meta_val"), test,
                        None if test is None else np.arange(len(test)))

    def model(self, tables: Tables | None = None, seed: int = 0, n_out: int | None = None) -> nn.Module:
        return Conv4(self.model_settings.config(n_out or self.data.n_way, 1, self.data.image_size))

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        return adapted_names(model, self.model_settings.adapted)

    def features(self, tables: Tables) -> pd.DataFrame:
        test = self.open(tables, torch.device("cpu"), ["meta_test"]).test
        return episode_features(test.x_spt, test.y_spt).assign(split="meta_test").rename_axis("task_id")

    def baseline_curves(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                        score_steps: list[int], chunk: int, seed: int) -> dict[str, np.ndarray]:
        """scratch, and pretrain_finetune: a conv4 classifier over every meta-train class, its body with a
        zero N-way head, fine-tuned per episode."""
        b, dev = self.baselines, next(model.parameters()).device
        images = self.items(tables, "meta_train").to(dev)
        images = images.view(-1, DRAWINGS, *images.shape[1:])  # (C, 20, 1, s, s)
        wide = self.model(n_out=images.shape[0]).to(dev)
        trained = pretrain_classifier(wide, images, b.pretrain_iterations, b.pretrain_batch_size, b.pretrain_lr,
                                      seed, self.loss_fn)
        pretrained = head_swap(dict(model.named_parameters()), trained)
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)
        return {"scratch": scratch(self.model, test, steps, b.scratch_lr, seed, **kw),
                "pretrain_finetune": finetune(model, pretrained, test, steps, b.finetune_lr, **kw)}


def _grid(n_classes: int) -> np.ndarray:
    """(C, 20) rows of a split's class x drawing grid."""
    return np.arange(n_classes * DRAWINGS, dtype=np.int64).reshape(n_classes, DRAWINGS)
