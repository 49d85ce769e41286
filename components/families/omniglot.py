"""Omniglot (Lake et al. 2015): N-way K-shot character classification with conv4, the MAML paper's setting.

Classes are (character, rotation) pairs; the class split is Vinyals et al.'s (1028 / 172 / 423 characters
x 4 rotations) or a seeded random one over whole characters. Identical drawings within a character are kept
once (the archive holds one such pair), so a character has up to 20 drawings. Episode rows index a split's
drawings class by class (`omniglot.class_rows`).

A fixed episode file (`data.test_episodes`, `families.images`) names each image by a file (absolute or
relative to its folder) or an archive member as the loader names it (``images_evaluation/<Alphabet>/
<characterNN>/<id>_<rr>.png``), turned by the file's optional ``rotation`` (degrees counter-clockwise; 0 without
it). Every image gets the archive's transform (`omniglot.decode_drawing`): grayscale, strokes 1, resized to
image_size; one drawn light on dark paper is not inverted, so either polarity gives the training images' form; then
its rotation, turned as a class ``<character>/rot090`` etc. turns its drawings (`omniglot.class_rows`), so episodes
of the Vinyals test classes written out with their rotations give the sampled episodes' pixels exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
    test_episodes: str | None = None  # a fixed episode file (CSV / Parquet): the meta-test episodes


@dataclass(frozen=True)
class OmniglotTasks(ImageTasks):
    data: OmniglotData = OmniglotData()
    model_settings: Conv4Model = Conv4Model()
    baselines: BaselineConfig = BaselineConfig()
    path_fields = ("path", "test_episodes")
    group: ClassVar[str] = "character"  # a class is a character at a rotation
    expected: ClassVar[str] = ("need a file (absolute or relative to the episode file's folder) or a member of the "
                               "Omniglot archives, e.g. 'images_evaluation/<Alphabet>/<characterNN>/<id>_<rr>.png'")

    @staticmethod
    def row_index(images: pd.DataFrame, class_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A split's rows: positions in images (R,), rotation in degrees (R,), label (R,)
        (`omniglot.class_row_index`)."""
        return omniglot.class_row_index(images, class_ids)

    def data_files(self) -> tuple[Path, ...]:
        root = Path(self.data.path)
        files = [omniglot.find_source(root, stem) for stem in omniglot.PARTS]
        if self.data.split == "vinyals":
            files += [root / "splits_vinyals" / f"{name}.txt" for name in VINYALS_FILES.values()]
        files = [f for path in files for f in ([path] if path.is_file() else sorted(path.rglob("*.png")))]
        return tuple(files)

    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """images (resized once), classes (split, class_id) and the fixed meta-val / meta-test episode tables."""
        d = self.data
        images = omniglot.load_omniglot(Path(d.path), d.image_size)
        images, cleaning = clean_examples(images, pixel_keys(images["pixels"]), "character", d.conflicting_labels,
                                          f"{d.path}: identical drawings: ")
        split = self._class_split(images, seed)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])
        labels = {s: self.row_index(images, split[s])[2] for s in SPLITS}
        fixed = self.fixed_tables(images, split) if d.test_episodes else {}
        return {"images": images, "classes": classes, "cleaning": cleaning,
                **self.episode_tables(labels, split, seed, given=["meta_test"] if fixed else []), **fixed}

    def _class_split(self, images: pd.DataFrame, seed: int) -> dict[str, list[str]]:
        if self.data.split == "vinyals":
            files = omniglot.read_vinyals_split(Path(self.data.path) / "splits_vinyals")
            return {split: files[name] for split, name in VINYALS_FILES.items()}
        characters = sorted(images["character"].unique())
        return omniglot.random_class_split(characters, dict(zip(SPLITS, self.data.random_fractions)), seed)

    def class_examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """The split's drawings, class by class (a character at a rotation): labels (R,), images (R, 1, s, s)."""
        labels, images = omniglot.class_rows(tables["images"], self.classes(tables, split))
        return labels, images.to(device)

    # ---- fixed episode files

    def seen(self, images: pd.DataFrame, classes: list[str]) -> pd.Series:
        return images["character"].isin({omniglot.parse_class_id(c)[0] for c in classes})

    def locate(self, names: pd.Series, folder: Path) -> pd.Series:
        members = omniglot.archive_members(Path(self.data.path))
        return names.map(lambda n: file if (file := folder / n).is_file() else (n if n in members else None))

    def decode(self, sources: pd.Series) -> list[bytes]:
        members = omniglot.archive_members(Path(self.data.path))
        data = omniglot.read_members({s: members[s] for s in sources if not isinstance(s, Path)})
        size = self.data.image_size
        return [omniglot.decode_drawing(s.read_bytes() if isinstance(s, Path) else data[s], size, str(s))
                for s in sources]
