"""Omniglot (Lake et al. 2015): N-way K-shot character classification with conv4, the MAML paper's setting.

Classes are (character, rotation) pairs; the class split is Vinyals et al.'s (1028 / 172 / 423 characters
x 4 rotations) or a seeded random one over whole characters. Identical drawings within a character are kept
once (the archive holds one such pair), so a character has up to 20 drawings. Episode rows index a split's
drawings class by class (`omniglot.class_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components import omniglot
from components.baselines import BaselineConfig
from components.conv4 import Conv4Model
from components.episodes import SPLITS, clean_examples, pixel_keys
from components.families import EpisodeSettings, Tables
from components.families.images import ImageTasks

VINYALS_FILES = {"meta_train": "train", "meta_val": "val", "meta_test": "test"}


@dataclass(frozen=True)
class OmniglotData(EpisodeSettings):
    path: str = "../shared/data/omniglot"  # images_background.zip, images_evaluation.zip, splits_vinyals/
    split: str = "vinyals"  # or "random": seeded over whole characters by random_fractions
    random_fractions: tuple[float, float, float] = (0.64, 0.10, 0.26)
    image_size: int = 28


@dataclass(frozen=True)
class OmniglotTasks(ImageTasks):
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
        d = self.data
        images = omniglot.load_omniglot(Path(d.path), d.image_size)
        images, cleaning = clean_examples(images, pixel_keys(images["pixels"]), "character", d.conflicting_labels,
                                          f"{d.path}: identical drawings: ")
        split = self._class_split(images, seed)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])
        labels = {s: omniglot.class_row_index(images, split[s])[2] for s in SPLITS}
        return {"images": images, "classes": classes, "cleaning": cleaning, **self.episode_tables(labels, split, seed)}

    def _class_split(self, images: pd.DataFrame, seed: int) -> dict[str, list[str]]:
        if self.data.split == "vinyals":
            files = omniglot.read_vinyals_split(Path(self.data.path) / "splits_vinyals")
            return {split: files[name] for split, name in VINYALS_FILES.items()}
        characters = sorted(images["character"].unique())
        return omniglot.random_class_split(characters, dict(zip(SPLITS, self.data.random_fractions)), seed)

    def examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """The split's drawings, class by class (a character at a rotation): labels (R,), images (R, 1, s, s)."""
        labels, images = omniglot.class_rows(tables["images"], self.classes(tables, split))
        return labels, images.to(device)
