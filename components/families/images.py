"""Image classification families (Omniglot, users' image folders) share conv4, its features and baselines, and
meta-test episodes read from a fixed episode file (`data.test_episodes`, `components.episode_files`).

With a fixed episode file, its episodes are the meta-test episodes, in its order: every method and baseline is
scored on them, and the paired statistics pair them. Its images are read with the family's own transform
(Omniglot: grayscale, strokes 1, resized; an image folder: upright, grayscale or RGB, resized), whatever their
size, then turned by the file's `rotation` (degrees counter-clockwise, `omniglot.rotate`: as Omniglot turns its
rot090 etc. classes), and stored once per (image, rotation) in the `test_images` table, which the
`episodes_meta_test` rows index. The family's own meta-test classes are then not used. An image identical, upright,
to an image of a meta-train or meta-val class is an error naming the classes: the file is the test protocol, and its
classes must be unseen before the test.
"""
from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.baselines import finetune, pretrain_classifier, scratch
from components.conv4 import Conv4, adapted_names
from components.episode_files import episode_rows, read_episode_file, shown
from components.episodes import EpisodeBatch, class_members, pixel_keys
from components.families import ClassificationTasks, Tables, head_swap
from components.features import episode_features
from components.image_folder import images_to_array
from components.omniglot import rotate

FIXED_IMAGES = "test_images"  # a fixed episode file's images: image, rotation, pixels, channels, size


def _check_pictures(test: pd.DataFrame, upright: pd.Series, rows: pd.DataFrame, file: str) -> None:
    """Every fixed image shows something, and no two of an episode are the same picture. test: FIXED_IMAGES;
    upright: `pixel_keys` of its images before turning (F,); rows: the episode rows with `row` (their image's
    position in test). Raises naming the file, the images and the episode: a blank image (every pixel one value
    after the family's transform: a white or transparent file) would be scored as if it were a drawing; one
    picture at one rotation under two names (a copy, './a.png' beside 'a.png') in one episode answers its query
    by memory. (One drawing at two rotations is two images, as the GX suite counts examples.)"""
    blank = [i for i, p in enumerate(test["pixels"]) if np.ptp(np.frombuffer(p, np.uint8)) == 0]
    if blank:
        i = blank[0]
        episode = rows["source_episode"][rows["row"] == i].iloc[0]
        raise ValueError(f"{file}: column 'image': {shown(test['image'][i], int(test['rotation'][i]))!r} (episode "
                         f"{episode!r}) is blank after the family's transform (every pixel "
                         f"{np.frombuffer(test['pixels'][i], np.uint8)[0]}); {len(blank)} blank images in all")
    keys = upright.to_numpy().astype(object) + "@" + test["rotation"].astype(str).to_numpy()
    keyed = rows.assign(key=keys[rows["row"].to_numpy()])
    twice = keyed.duplicated(["episode", "key"], keep=False)
    if twice.any():
        first = keyed[twice].iloc[0]
        same = keyed[twice & (keyed["episode"] == first["episode"]) & (keyed["key"] == first["key"])]
        names = [shown(i, int(d)) for i, d in zip(same["image"], same["rotation"])]
        raise ValueError(f"{file}: column 'image': {names} in episode {first['source_episode']!r} are the same "
                         f"picture after the family's transform; an episode's images must be distinct")


class ImageTasks(ClassificationTasks):
    """Image classification with conv4 (the MAML paper's network, channels from the data): its adapted set,
    dataset-statistics features, and the two image baselines: scratch and pretrain_finetune (a conv4
    classifier over every meta-train class, a class then one of its images drawn uniformly; its body with
    a zero N-way head, fine-tuned per episode). Subclasses give `channels` and data.image_size."""

    channels: ClassVar[int] = 1
    group: ClassVar[str] = "class_id"  # the images table's column naming what a class is drawn from
    expected: ClassVar[str] = "need a file, absolute or relative to the episode file's folder"  # what `locate` reads
    test_tables: ClassVar[tuple[str, ...]] = ("episodes_meta_test", FIXED_IMAGES)

    def training_data(self) -> dict:
        """Without the fixed episode file: its images may not be in a meta-train or meta-val class (`fixed_tables`
        refuses them), so it changes no table meta-training reads."""
        return {k: v for k, v in super().training_data().items() if k != "test_episodes"}

    @abstractmethod
    def data_files(self) -> tuple[Path, ...]:
        """The files the family's images and class split are read from (not the fixed episode file's)."""

    def input_files(self) -> tuple[Path, ...]:
        """`data_files` and `fixed_files`."""
        return (*self.data_files(), *self.fixed_files())

    def training_files(self) -> tuple[Path, ...]:
        """`data_files`: a fixed episode file, and the images it names, are read for the meta-test only (an image of
        the data it names stays in the training key as data, whichever episodes name it)."""
        return self.data_files()

    def model(self, tables: Tables | None = None, seed: int = 0, n_out: int | None = None) -> nn.Module:
        return Conv4(self.model_settings.config(n_out or self.data.n_way, self.channels, self.data.image_size))

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        return adapted_names(model, self.model_settings.adapted)

    # ---- examples, and fixed meta-test episodes

    @abstractmethod
    def class_examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """The split's images of its classes: labels (R,), images (R, C, s, s) float32 in [0, 1] on device."""

    def examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """`class_examples`; for meta-test with a fixed episode file, its images (labels: their names in the file,
        'name @90' when rotated, since an image may carry a different label in each episode; the episode rows hold
        the labels)."""
        if split == "meta_test" and FIXED_IMAGES in tables:
            test = tables[FIXED_IMAGES]
            names = np.array([shown(i, d) for i, d in zip(test["image"], test["rotation"])], dtype=object)
            return names, torch.from_numpy(images_to_array(test)).to(device)
        return self.class_examples(tables, split, device)

    def seen(self, images: pd.DataFrame, classes: list[str]) -> pd.Series:
        """True for the images table's rows of one of classes (a split's classes)."""
        return images[self.group].isin(classes)

    @abstractmethod
    def locate(self, names: pd.Series, folder: Path) -> pd.Series:
        """Where each image a fixed episode file names is (folder: the file's): its Path, a name the family reads
        itself (an Omniglot archive member), or None when neither exists."""

    @abstractmethod
    def decode(self, sources: pd.Series) -> list[bytes]:
        """The pixels of each located image (sources: `locate`'s answers), as the images table holds them."""

    def fixed_episodes(self) -> tuple[pd.DataFrame, pd.Series] | None:
        """data.test_episodes as checked episode rows (`episode_files.episode_rows`) and where each distinct image is
        ((image, rotation) -> `locate`'s answer for the image, in first-use order); None without a file. Reads no
        image; raises naming the file, the column and the episode."""
        if self.data.test_episodes is None:
            return None
        path = Path(self.data.test_episodes)
        rows = episode_rows(read_episode_file(path), self.data.n_way, self.data.k_shot, str(path))
        keys = pd.MultiIndex.from_frame(rows[["image", "rotation"]]).drop_duplicates()
        names = keys.get_level_values("image").unique()
        located = self.locate(pd.Series(names), path.parent).set_axis(names)
        sources = pd.Series(located.reindex(keys.get_level_values("image")).to_numpy(), index=keys, dtype=object)
        if (missing := sources.isna()).any():
            image, degrees = sources.index[missing][0]
            episode = rows["source_episode"][(rows["image"] == image) & (rows["rotation"] == degrees)].iloc[0]
            raise FileNotFoundError(f"{path}: column 'image': {shown(image, degrees)!r} (episode {episode!r}) not "
                                    f"found: {self.expected} ({int(missing.sum())} images not found; "
                                    f"family.test_episodes)")
        return rows, sources

    def fixed_files(self) -> tuple[Path, ...]:
        """The fixed episode file and the image files it names, each once (what the task sets' key hashes of it)."""
        if (fixed := self.fixed_episodes()) is None:
            return ()
        return (Path(self.data.test_episodes), *dict.fromkeys(s for s in fixed[1] if isinstance(s, Path)))

    def fixed_tables(self, images: pd.DataFrame, split: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
        """FIXED_IMAGES (one row per (image, rotation), its pixels turned) and the meta-test episodes (`episode_table`
        rows + image, rotation, source_episode) of data.test_episodes. images: the family's images table; split:
        split -> its classes. Raises when a fixed image, upright, is one of a meta-train or meta-val class's images
        (by content), naming the classes and an image."""
        rows, sources = self.fixed_episodes()
        distinct = list(dict.fromkeys(sources))  # a file at two rotations is decoded once
        decoded = dict(zip(distinct, self.decode(pd.Series(distinct, dtype=object))))
        upright = pd.Series([decoded[s] for s in sources])
        names = [shown(image, degrees) for image, degrees in sources.index]
        c, size, file = self.channels, self.data.image_size, self.data.test_episodes
        pixels = [turned(p, d, c, size, f"{file}: column 'image': {n!r}")
                  for p, d, n in zip(upright, sources.index.get_level_values("rotation"), names)]
        test = pd.DataFrame({"image": sources.index.get_level_values("image"),
                             "rotation": sources.index.get_level_values("rotation").astype(np.int64),
                             "pixels": pixels, "channels": c, "size": size})
        self._check_unseen(images, split, pixel_keys(upright), names)
        position = pd.Series(np.arange(len(test)), index=sources.index)
        at = position.reindex(pd.MultiIndex.from_frame(rows[["image", "rotation"]])).to_numpy()
        _check_pictures(test, pixel_keys(upright), rows.assign(row=at), str(file))
        return {FIXED_IMAGES: test, "episodes_meta_test": rows.assign(row=at)}

    def _check_unseen(self, images: pd.DataFrame, split: dict[str, list[str]], keys: pd.Series,
                      names: list[str]) -> None:
        """Raises naming the classes and a fixed image when one of keys (the fixed images' upright `pixel_keys`, (F,);
        names (F,): as `shown`) is an image of a meta-train or meta-val class."""
        for s in ("meta_train", "meta_val"):
            own = images[self.seen(images, split[s])]
            own_keys = pixel_keys(own["pixels"])
            shared = own_keys.isin(set(keys)).to_numpy()
            if shared.any():
                classes = sorted(own.loc[shared, self.group].unique())
                leaked = [n for n, k in zip(names, keys.isin(set(own_keys[shared]))) if k]
                raise ValueError(f"{self.data.test_episodes}: {len(leaked)} images of the fixed episodes (e.g. "
                                 f"{leaked[0]!r}) are images of {s} classes ({self.group} {classes[:5]}); the fixed "
                                 f"episodes are the test protocol: choose a class split (family.split) that keeps "
                                 f"their classes out of meta-training and meta-validation")

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


def turned(pixels: bytes, degrees: int, channels: int, size: int, name: str) -> bytes:
    """An image's pixels (channels x size x size uint8 bytes, row-major) turned counter-clockwise by degrees (one of
    `omniglot.ROTATIONS`) with `omniglot.rotate`, as Omniglot's rot090 etc. classes turn their drawings. Raises
    ValueError naming the image (name) when its pixels are not a square channels x size x size image."""
    if len(pixels) != channels * size * size:
        raise ValueError(f"{name}: {len(pixels)} bytes of pixels, not a square {channels} x {size} x {size} image: "
                         f"a fixed episode image must be square to be rotated")
    if degrees == 0:
        return pixels
    array = np.frombuffer(pixels, dtype=np.uint8).reshape(channels, size, size)
    return np.ascontiguousarray(rotate(array, degrees)).tobytes()
