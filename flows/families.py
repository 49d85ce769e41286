"""Task families as the pipeline sees them: how to build, validate and open their task sets, which
model, loss and metric they use, and their pre-training baseline.

`family_for(cfg)` picks one from `cfg.family.kind`. Each stage calls only these methods, so a new
family is one class here plus its components.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from components import omniglot
from components.baselines import pretrain, pretrain_classifier
from components.features import TaskFeatureExtractor, episode_features
from components.metalearners import Params
from components.models import MLP
from components.tasksets import SPLITS, SinusoidFamily, TaskBatch, sample_sinusoid_tasks, task_ids, to_batch
from flows.cache import write_table
from flows.config import StudyConfig
from flows.validation import validate_omniglot, validate_tasksets


@dataclass
class TaskData:
    train: TaskBatch | Callable[[int], TaskBatch]  # a pool, or iteration -> meta-batch
    val: TaskBatch
    test: TaskBatch
    test_ids: np.ndarray  # (T_test,) episode ids, in the order of `test`


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean()


def iteration_seed(seed: int, iteration: int, stream: int = 0) -> int:
    """An independent seed per (seed, stream, iteration); stream 0 is meta-training, others fixed episode sets."""
    return int(np.random.SeedSequence([seed, stream, iteration]).generate_state(1)[0])


class SinusoidTasks:
    metric, lower_is_better = "mse", True
    loss_fn = staticmethod(F.mse_loss)
    score_fn = staticmethod(F.mse_loss)

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg

    def build(self, out: Path) -> dict:
        """Sample the three disjoint task sets, validate them (raises ValidationFailed), one table each."""
        family = SinusoidFamily(**self.cfg.family.model_dump(exclude={"kind", "n_tasks"}))
        points = sample_sinusoid_tasks(family, self.cfg.family.n_tasks, self.cfg.seed)
        (out / "validation.json").write_text(json.dumps(validate_tasksets(points, self.cfg.family), default=str))
        for split in SPLITS:
            write_table(points[points["split"] == split], out, split)
        return {f"n_tasks_{s}": int(n) for s, n in points.groupby("split")["task_id"].nunique().items()}

    def open(self, entry: Path, dev: torch.device, splits=SPLITS, meta_batch_size: int = 1) -> TaskData:
        """The splits' task pools (meta-batches are drawn from the train pool by the training loop)."""
        batches = {}
        for split in splits:
            points = pd.read_parquet(entry / f"{split}.parquet")
            batches[split] = (to_batch(points).to(dev), task_ids(points))
        get = lambda s: batches.get(s, (None, None))  # noqa: E731
        return TaskData(get("meta_train")[0], get("meta_val")[0], *get("meta_test"))

    def model(self) -> nn.Module:
        return MLP(self.cfg.model.sizes)

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        return None  # the whole (small) net

    def features(self, entry: Path) -> pd.DataFrame:
        points = pd.concat([pd.read_parquet(entry / f"{s}.parquet") for s in SPLITS])
        features = TaskFeatureExtractor().transform(points)
        split_of = points.groupby("task_id")["split"].first()
        return features.assign(split=split_of.reindex(features.index).to_numpy())

    def pretrained_init(self, entry: Path, model: nn.Module) -> Params:
        """One model trained on every meta-train point pooled; fine-tuned per task from there."""
        b, dev = self.cfg.baselines, next(model.parameters()).device
        train = self.open(entry, dev, ["meta_train"]).train
        return pretrain(model, train, b.pretrain_iterations, b.pretrain_batch_size, b.pretrain_lr,
                        self.cfg.seed, self.loss_fn)


class OmniglotTasks:
    metric, lower_is_better = "accuracy", False
    loss_fn = staticmethod(F.cross_entropy)
    score_fn = staticmethod(accuracy)
    SPLIT_FILES = {"meta_train": "train", "meta_val": "val", "meta_test": "test"}

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.family = cfg, cfg.family

    def _class_split(self, images: pd.DataFrame) -> dict[str, list[str]]:
        if self.family.split == "vinyals":
            files = omniglot.read_vinyals_split(Path(self.family.path) / "splits_vinyals")
            return {split: files[name] for split, name in self.SPLIT_FILES.items()}
        characters = sorted(images["character"].unique())
        return omniglot.random_class_split(characters, dict(zip(SPLITS, self.family.random_fractions)), self.cfg.seed)

    def build(self, out: Path) -> dict:
        """Images resized once, the class split, and the fixed meta-val / meta-test episodes, validated."""
        f = self.family
        images = omniglot.load_omniglot(Path(f.path), f.image_size)
        split = self._class_split(images)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "class_id"])
        episodes, tables = {}, []
        for offset, s in enumerate(("meta_val", "meta_test"), start=1):
            n = f.n_val_episodes if s == "meta_val" else f.n_test_episodes
            cls, drawings = omniglot.sample_episode_indices(len(split[s]), 20, f.n_way, f.k_shot, f.n_query, n,
                                                            iteration_seed(self.cfg.seed, 0, stream=offset))
            episodes[s] = pd.DataFrame({"episode": np.repeat(np.arange(n), f.n_way), "way": np.tile(np.arange(f.n_way), n),
                                        "class_index": cls.ravel(), "drawings": list(drawings.reshape(n * f.n_way, -1))})
            tables.append(_episode_rows(episodes[s], s, f.k_shot))
        report = validate_omniglot(images, classes, pd.concat(tables), f)
        (out / "validation.json").write_text(json.dumps(report, default=str))
        write_table(images, out, "images")
        write_table(classes, out, "classes")
        for s, table in episodes.items():
            write_table(table, out, f"episodes_{s}")
        return {f"n_classes_{s}": len(split[s]) for s in SPLITS}

    def pools(self, entry: Path, splits=SPLITS) -> dict[str, omniglot.ClassPool]:
        images = pd.read_parquet(entry / "images.parquet")
        classes = pd.read_parquet(entry / "classes.parquet")
        return {s: omniglot.build_class_pool(images, classes.loc[classes["split"] == s, "class_id"].tolist())
                for s in splits}

    def _episodes(self, entry: Path, pool: omniglot.ClassPool, split: str) -> TaskBatch:
        table = pd.read_parquet(entry / f"episodes_{split}.parquet")
        n, n_way = table["episode"].nunique(), self.family.n_way
        cls = table["class_index"].to_numpy().reshape(n, n_way)
        drawings = np.stack(table["drawings"].to_numpy()).reshape(n, n_way, -1)
        return omniglot.episodes_from_indices(pool, cls, drawings, self.family.k_shot)

    def open(self, entry: Path, dev: torch.device, splits=SPLITS, meta_batch_size: int = 32) -> TaskData:
        f, pools = self.family, self.pools(entry, splits)

        def sample(iteration: int) -> TaskBatch:
            batch, _ = omniglot.sample_episodes(pools["meta_train"], f.n_way, f.k_shot, f.n_query, meta_batch_size,
                                                iteration_seed(self.cfg.seed, iteration))
            return batch.to(dev)

        val = self._episodes(entry, pools["meta_val"], "meta_val").to(dev) if "meta_val" in pools else None
        test = self._episodes(entry, pools["meta_test"], "meta_test").to(dev) if "meta_test" in pools else None
        return TaskData(sample if "meta_train" in pools else None, val, test,
                        None if test is None else np.arange(len(test)))

    def model(self, n_out: int | None = None) -> nn.Module:
        from components.conv4 import Conv4, Conv4Config

        m = self.cfg.model
        return Conv4(Conv4Config(n_way=n_out or self.family.n_way, hidden=m.hidden, image_size=self.family.image_size,
                                 lora_rank=m.lora_r if m.adapted == "lora" else 0, lora_alpha=m.lora_alpha))

    def adapted(self, model: nn.Module) -> tuple[str, ...] | None:
        from components.conv4 import adapted_names

        return adapted_names(model, self.cfg.model.adapted)

    def features(self, entry: Path) -> pd.DataFrame:
        test = self._episodes(entry, self.pools(entry, ["meta_test"])["meta_test"], "meta_test")
        return episode_features(test.x_spt, test.y_spt).assign(split="meta_test").rename_axis("task_id")

    def pretrained_init(self, entry: Path, model: nn.Module) -> Params:
        """A conv4 classifier over every meta-train class; its body with a zero N-way head."""
        b, dev = self.cfg.baselines, next(model.parameters()).device
        images = self.pools(entry, ["meta_train"])["meta_train"].images.to(dev)
        wide = self.model(n_out=images.shape[0]).to(dev)
        trained = pretrain_classifier(wide, images, b.pretrain_iterations, b.pretrain_batch_size, b.pretrain_lr,
                                      self.cfg.seed, self.loss_fn)
        init = dict(model.named_parameters())
        return {k: (trained[k] if trained[k].shape == v.shape else torch.zeros_like(v)).detach()
                for k, v in init.items()}


def _episode_rows(episodes: pd.DataFrame, split: str, k_shot: int) -> pd.DataFrame:
    """Rows (split, episode, way, role, count) for the GX episode checks."""
    n_drawings = episodes["drawings"].map(len)
    support = episodes.assign(role="support", count=np.minimum(n_drawings, k_shot))
    query = episodes.assign(role="query", count=n_drawings - k_shot)
    return pd.concat([support, query])[["episode", "way", "role", "count"]].assign(split=split)


def family_for(cfg: StudyConfig):
    return {"sinusoid": SinusoidTasks, "omniglot": OmniglotTasks}[cfg.family.kind](cfg)
