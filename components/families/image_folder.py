"""A user's own images, ``<root>/<class>/<image>``: N-way K-shot classification with conv4.

Images are read once (``components.image_folder``: any format Pillow reads, resized to a square, grayscale
or RGB) into the task sets' ``images`` table. Classes may hold different numbers of images: episode rows
are rows of that table, sampled per class by ``episodes.class_members``. The class split is seeded by
fractions (split "random") or read from the class lists ``classes.train.txt``, ``classes.val.txt``,
``classes.test.txt`` in root itself, beside the class folders (split "files"; unlisted classes are unused).
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

from components import image_folder
from components.baselines import BaselineConfig, finetune, pretrain_classifier, scratch
from components.conv4 import Conv4, Conv4Model, adapted_names
from components.episodes import SPLITS, EpisodeBatch, class_members, derive_seed, episode_table, \
    episodes_from_rows, gather, sample_rows, table_rows
from components.families import TaskData, TaskFamily, Tables, accuracy, head_swap
from components.features import episode_features


@dataclass(frozen=True)
class ImageFolderData:
    path: str  # <path>/<class>/<image>; split "files" reads its class lists from here too
    channels: int = 1  # 1: grayscale, 3: RGB (the conv4 input's channels)
    image_size: int = 28  # every image is resized (stretched) to image_size x image_size
    split: str = "random"  # or "files": image_folder.CLASS_LIST_FILES in path
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # random: meta_train, meta_val, meta_test classes
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15  # per class
    n_val_episodes: int = 100
    n_test_episodes: int = 600


@dataclass(frozen=True)
class ImageFolderTasks(TaskFamily):
    data: ImageFolderData  # no default: the images are the user's
    model_settings: Conv4Model = Conv4Model()
    baselines: BaselineConfig = BaselineConfig()

    metric, lower_is_better = "accuracy", False
    loss_fn = staticmethod(F.cross_entropy)
    score_fn = staticmethod(accuracy)

    # ---- data

    def input_files(self) -> tuple[Path, ...]:
        """Every image (Pillow-readable, so a broken file fails here, at plan time) and the class lists."""
        root = Path(self.data.path)
        files = [root / f for f in image_folder.scan_image_folder(root)["file"]]
        if self.data.split == "files":
            files += [root / name for name in image_folder.CLASS_LIST_FILES.values()]
        return tuple(files)

    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """images (class_id, file, pixels, channels, size), classes (split, class_id) and the fixed meta-val /
        meta-test episode tables (rows: rows of images)."""
        d = self.data
        images = image_folder.load_image_folder(Path(d.path), d.image_size, d.channels)
        split = self._class_split(images, seed)
        tables = {"images": images,
                  "classes": pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])}
        for stream, s in enumerate(SPLITS):  # meta_train: no episodes, only sample_rows's checks of its classes
            n = {"meta_train": 0, "meta_val": d.n_val_episodes, "meta_test": d.n_test_episodes}[s]
            try:
                rows, ways = sample_rows(class_members(images["class_id"], split[s]), d.n_way, d.k_shot, d.n_query,
                                         n, derive_seed(seed, 0, stream), split[s])
            except ValueError as e:
                raise ValueError(f"{d.path}: {s} ({self._split_source(s)}): {e}") from None
            if s != "meta_train":
                tables[f"episodes_{s}"] = episode_table(rows, ways, split[s], s)
        return tables

    def _class_split(self, images: pd.DataFrame, seed: int) -> dict[str, list[str]]:
        if self.data.split == "random":
            return image_folder.split_classes(images, dict(zip(SPLITS, self.data.fractions)), seed)
        root = Path(self.data.path)
        lists = image_folder.read_class_lists(root)
        image_folder.check_class_lists(lists, images["class_id"], root)
        return lists

    def _split_source(self, split: str) -> str:
        if self.data.split == "random":
            return f"fractions {list(self.data.fractions)}"
        return str(Path(self.data.path) / image_folder.CLASS_LIST_FILES[split])

    def items(self, tables: Tables) -> torch.Tensor:
        """Every image of the table, in row order: (R, C, s, s) float32 in [0, 1]."""
        return torch.from_numpy(image_folder.images_to_array(tables["images"]))

    def classes(self, tables: Tables, split: str) -> list[str]:
        classes = tables["classes"]
        return classes.loc[classes["split"] == split, "class_id"].tolist()

    def open(self, tables: Tables, device: torch.device, splits: Sequence[str] = SPLITS,
             meta_batch_size: int = 32, seed: int = 0) -> TaskData:
        d, items = self.data, self.items(tables).to(device)
        train = self.classes(tables, "meta_train")
        members = class_members(tables["images"]["class_id"].to_numpy(), train) if "meta_train" in splits else None

        def sample(iteration: int) -> EpisodeBatch:
            rows, _ = sample_rows(members, d.n_way, d.k_shot, d.n_query, meta_batch_size,
                                  derive_seed(seed, iteration), train)
            return gather(episodes_from_rows(torch.from_numpy(rows).to(device), d.k_shot), items)

        fixed = {s: gather(episodes_from_rows(table_rows(tables[f"episodes_{s}"], d.n_way), d.k_shot).to(device),
                           items) for s in ("meta_val", "meta_test") if s in splits}
        test = fixed.get("meta_test")
        return TaskData(sample if "meta_train" in splits else None, fixed.get("meta_val"), test,
                        None if test is None else np.arange(len(test)))

    def features(self, tables: Tables) -> pd.DataFrame:
        test = self.open(tables, torch.device("cpu"), ["meta_test"]).test
        return episode_features(test.x_spt, test.y_spt).assign(split="meta_test").rename_axis("task_id")

    # ---- model and baselines

    def model(self, tables: Tables | None = None, seed: int = 0, n_out: int | None = None) -> nn.Module:
        d = self.data
        return Conv4(self.model_settings.config(n_out or d.n_way, d.channels, d.image_size))

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        return adapted_names(model, self.model_settings.adapted)

    def baseline_curves(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                        score_steps: list[int], chunk: int, seed: int) -> dict[str, np.ndarray]:
        """scratch, and pretrain_finetune: a conv4 classifier over every meta-train class (a class, then one of
        its images, uniformly), its body with a zero N-way head, fine-tuned per episode."""
        b, dev = self.baselines, next(model.parameters()).device
        train = self.classes(tables, "meta_train")
        members = torch.from_numpy(class_members(tables["images"]["class_id"].to_numpy(), train))  # (C, M)
        wide = self.model(n_out=len(train)).to(dev)
        trained = pretrain_classifier(wide, self.items(tables).to(dev), b.pretrain_iterations, b.pretrain_batch_size,
                                      b.pretrain_lr, seed, self.loss_fn, members=members)
        pretrained = head_swap(dict(model.named_parameters()), trained)
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)
        return {"scratch": scratch(self.model, test, steps, b.scratch_lr, seed, **kw),
                "pretrain_finetune": finetune(model, pretrained, test, steps, b.finetune_lr, **kw)}
