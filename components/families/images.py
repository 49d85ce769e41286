"""Image classification families (Omniglot, users' image folders) share conv4, its features and baselines, and
meta-test episodes read from a fixed episode file (`data.test_episodes`, `components.episode_files`).

With a fixed episode file, its episodes are the meta-test episodes, in its order: every method and baseline is
scored on them, and the paired statistics pair them. Its images are read with the family's own transform
(Omniglot: grayscale, strokes 1, resized; an image folder: upright, grayscale or RGB, resized), whatever their
size, and stored once each in the `test_images` table, which the `episodes_meta_test` rows index. The family's
own meta-test classes are then not used. An image identical to an image of a meta-train or meta-val class is an
error naming the classes: the file is the test protocol, and its classes must be unseen before the test.
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
from components.episode_files import episode_rows, read_episode_file
from components.episodes import EpisodeBatch, class_members, pixel_keys
from components.families import ClassificationTasks, Tables, head_swap
from components.features import episode_features
from components.image_folder import images_to_array

FIXED_IMAGES = "test_images"  # the task-set table of a fixed episode file's images: image, pixels, channels, size


class ImageTasks(ClassificationTasks):
    """Image classification with conv4 (the MAML paper's network, channels from the data): its adapted set,
    dataset-statistics features, and the two image baselines: scratch and pretrain_finetune (a conv4
    classifier over every meta-train class, a class then one of its images drawn uniformly; its body with
    a zero N-way head, fine-tuned per episode). Subclasses give `channels` and data.image_size."""

    channels: ClassVar[int] = 1
    group: ClassVar[str] = "class_id"  # the images table's column naming what a class is drawn from
    expected: ClassVar[str] = "need a file, absolute or relative to the episode file's folder"  # what `locate` reads

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
        since an image may carry a different label in each episode; the episode rows hold the labels)."""
        if split == "meta_test" and FIXED_IMAGES in tables:
            test = tables[FIXED_IMAGES]
            return test["image"].to_numpy(), torch.from_numpy(images_to_array(test)).to(device)
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
        (image name -> `locate`'s answer, in first-use order); None without a file. Reads no image; raises naming
        the file, the column and the episode."""
        if self.data.test_episodes is None:
            return None
        path = Path(self.data.test_episodes)
        rows = episode_rows(read_episode_file(path), self.data.n_way, self.data.k_shot, str(path))
        names = rows["image"].drop_duplicates()
        sources = self.locate(names.reset_index(drop=True), path.parent).set_axis(names.to_numpy())
        if (missing := sources.isna()).any():
            name = sources.index[missing][0]
            episode = rows["source_episode"][rows["image"] == name].iloc[0]
            raise FileNotFoundError(f"{path}: column 'image': {name!r} (episode {episode!r}) not found: {self.expected}"
                                    f" ({int(missing.sum())} images not found)")
        return rows, sources

    def fixed_files(self) -> tuple[Path, ...]:
        """The fixed episode file and the image files it names (what the task sets' key hashes of it)."""
        if (fixed := self.fixed_episodes()) is None:
            return ()
        return (Path(self.data.test_episodes), *(s for s in fixed[1] if isinstance(s, Path)))

    def fixed_tables(self, images: pd.DataFrame, split: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
        """FIXED_IMAGES and the meta-test episodes (`episode_table` rows + image, source_episode) of data.test_episodes.
        images: the family's images table; split: split -> its classes. Raises when a fixed image is one of a
        meta-train or meta-val class's images (by content), naming the classes."""
        rows, sources = self.fixed_episodes()
        test = pd.DataFrame({"image": sources.index, "pixels": self.decode(sources), "channels": self.channels,
                             "size": self.data.image_size})
        keys = set(pixel_keys(test["pixels"]))
        for s in ("meta_train", "meta_val"):
            own = images[self.seen(images, split[s])]
            shared = pixel_keys(own["pixels"]).isin(keys).to_numpy()
            if shared.any():
                classes = sorted(own.loc[shared, self.group].unique())
                raise ValueError(f"{self.data.test_episodes}: {int(shared.sum())} images of the fixed episodes are "
                                 f"images of {s} classes ({self.group} {classes[:5]}); the fixed episodes are the "
                                 f"test protocol: choose a class split (family.split) that keeps their classes out of "
                                 f"meta-training and meta-validation")
        position = pd.Series(np.arange(len(test)), index=test["image"])
        return {FIXED_IMAGES: test, "episodes_meta_test": rows.assign(row=rows["image"].map(position).to_numpy())}

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
