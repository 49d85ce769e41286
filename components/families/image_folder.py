"""A user's own images, ``<root>/<class>/<image>``: N-way K-shot classification with conv4.

Images are read once (``components.image_folder``: any format Pillow reads, resized to a square, grayscale
or RGB) into the task sets' ``images`` table. The class split is seeded by fractions (split "random") or
read from the class lists ``classes.train.txt``, ``classes.val.txt``, ``classes.test.txt`` in root itself,
beside the class folders (split "files"; a class in no list is not used). Classes may hold different numbers
of images. A split's examples are its classes' rows of the images table, in table order; episode rows are
positions among them (only the splits a stage opens are converted to float tensors).

A fixed episode file (``data.test_episodes``, `families.images`) names each image by a file, absolute or relative
to its folder (inside root or not); every image is read as the folder's images are (``image_folder.decode_image``,
stretched to a square), then turned by the file's optional ``rotation`` column (degrees counter-clockwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components import image_folder
from components.baselines import BaselineConfig
from components.conv4 import Conv4Model
from components.episodes import SPLITS, clean_examples, pixel_keys
from components.families import EpisodeSettings, Tables
from components.families.images import ImageTasks


@dataclass(frozen=True, kw_only=True)
class ImageFolderData(EpisodeSettings):
    path: str  # <path>/<class>/<image>; split "files" reads its class lists from here too
    channels: int = 1  # 1: grayscale, 3: RGB (the conv4 input's channels)
    image_size: int = 28  # every image is resized (stretched) to image_size x image_size
    split: str = "random"  # or "files": image_folder.CLASS_LIST_FILES in path
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # random: meta_train, meta_val, meta_test classes
    test_episodes: str | None = None  # a fixed episode file (CSV / Parquet): the meta-test episodes


@dataclass(frozen=True)
class ImageFolderTasks(ImageTasks):
    data: ImageFolderData  # no default: the images are the user's
    model_settings: Conv4Model = Conv4Model()
    baselines: BaselineConfig = BaselineConfig()
    path_fields = ("path", "test_episodes")

    # ---- data

    def data_files(self) -> tuple[Path, ...]:
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
        images, cleaning = clean_examples(images, pixel_keys(images["pixels"]), "class_id", d.conflicting_labels,
                                          f"{d.path}: identical images: ")
        split = self._class_split(images, seed)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])
        labels = {s: images["class_id"][split_rows(images, split[s])].to_numpy() for s in SPLITS}
        where = f"{d.path} (fractions {list(d.fractions)}): " if d.split == "random" else f"{d.path}: "
        fixed = self.fixed_tables(images, split) if d.test_episodes else {}
        return {"images": images, "classes": classes, "cleaning": cleaning,
                **self.episode_tables(labels, split, seed, where, given=["meta_test"] if fixed else []), **fixed}

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

    def class_examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """The split's images in table order: labels (R_s,), images (R_s, C, s, s) float32 in [0, 1]."""
        images = tables["images"]
        rows = images[split_rows(images, self.classes(tables, split))]
        return rows["class_id"].to_numpy(), torch.from_numpy(image_folder.images_to_array(rows)).to(device)

    def locate(self, names: pd.Series, folder: Path) -> pd.Series:
        return names.map(lambda n: file if (file := folder / n).is_file() else None)

    def decode(self, sources: pd.Series) -> list[bytes]:
        return [image_folder.decode_image(s, self.data.image_size, self.data.channels) for s in sources]

    @property
    def channels(self) -> int:
        return self.data.channels


def split_rows(images: pd.DataFrame, classes: list[str]) -> pd.Series:
    """True for the images table's rows of one of classes: a split's examples, kept in table order."""
    return images["class_id"].isin(classes)
