"""A user's own images, ``<root>/<class>/<image>``: N-way K-shot classification with conv4.

Images are read once (``components.image_folder``: any format Pillow reads, resized to a square, grayscale
or RGB) into the task sets' ``images`` table. The class split is seeded by fractions (split "random") or
read from the class lists ``classes.train.txt``, ``classes.val.txt``, ``classes.test.txt`` in root itself,
beside the class folders (split "files"; a class in no list is not used). Classes may hold different numbers
of images. A split's examples are its classes' rows of the images table, in table order; episode rows are
positions among them (only the splits a stage opens are converted to float tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from components import image_folder
from components.baselines import BaselineConfig, finetune, pretrain_classifier, scratch
from components.conv4 import Conv4, Conv4Model, adapted_names
from components.episodes import SPLITS, EpisodeBatch, class_members
from components.families import ClassificationTasks, EpisodeSettings, Tables, head_swap
from components.features import episode_features


@dataclass(frozen=True, kw_only=True)
class ImageFolderData(EpisodeSettings):
    path: str  # <path>/<class>/<image>; split "files" reads its class lists from here too
    channels: int = 1  # 1: grayscale, 3: RGB (the conv4 input's channels)
    image_size: int = 28  # every image is resized (stretched) to image_size x image_size
    split: str = "random"  # or "files": image_folder.CLASS_LIST_FILES in path
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # random: meta_train, meta_val, meta_test classes


@dataclass(frozen=True)
class ImageFolderTasks(ClassificationTasks):
    data: ImageFolderData  # no default: the images are the user's
    model_settings: Conv4Model = Conv4Model()
    baselines: BaselineConfig = BaselineConfig()

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
        meta-test episode tables."""
        d = self.data
        images = image_folder.load_image_folder(Path(d.path), d.image_size, d.channels)
        split = self._class_split(images, seed)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])
        labels = {s: images["class_id"][split_rows(images, split[s])].to_numpy() for s in SPLITS}
        where = f"{d.path} (fractions {list(d.fractions)}): " if d.split == "random" else f"{d.path}: "
        return {"images": images, "classes": classes, **self.episode_tables(labels, split, seed, where)}

    def _class_split(self, images: pd.DataFrame, seed: int) -> dict[str, list[str]]:
        d, root = self.data, Path(self.data.path)
        if d.split == "random":
            return image_folder.split_classes(images, dict(zip(SPLITS, d.fractions)), seed)
        lists = image_folder.read_class_lists(root)
        image_folder.check_class_lists(lists, images["class_id"], root)
        for s, listed in lists.items():
            if len(listed) < d.n_way:
                raise ValueError(f"{root / image_folder.CLASS_LIST_FILES[s]}: lists {len(listed)} classes, "
                                 f"fewer than n_way {d.n_way}")
        return lists

    def examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """The split's images in table order: labels (R_s,), images (R_s, C, s, s) float32 in [0, 1]."""
        images = tables["images"]
        rows = images[split_rows(images, self.classes(tables, split))]
        return rows["class_id"].to_numpy(), torch.from_numpy(image_folder.images_to_array(rows)).to(device)

    def features(self, tables: Tables) -> pd.DataFrame:
        test = self.open(tables, torch.device("cpu"), ["meta_test"]).test
        return episode_features(test.x_spt, test.y_spt).assign(split="meta_test").rename_axis("task_id")

    # ---- model and baselines

    def model(self, tables: Tables | None = None, seed: int = 0, n_out: int | None = None) -> nn.Module:
        d = self.data
        return Conv4(self.model_settings.config(n_out or d.n_way, d.channels, d.image_size))

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        return adapted_names(model, self.model_settings.adapted)

    def baseline_runs(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                      score_steps: list[int], chunk: int, seed: int) -> dict[str, Callable[[], np.ndarray]]:
        """scratch, and pretrain_finetune: a conv4 classifier over every meta-train class (a class, then one of
        its images, uniformly), its body with a zero N-way head, fine-tuned per episode."""
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


def split_rows(images: pd.DataFrame, classes: list[str]) -> pd.Series:
    """True for the images table's rows of one of classes: a split's examples, kept in table order."""
    return images["class_id"].isin(classes)
