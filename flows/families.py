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

from components import omniglot, text
from components.baselines import finetune, pretrain, pretrain_classifier, scratch
from components.features import TaskFeatureExtractor, episode_features
from components.metalearners import Params
from components.models import MLP
from components.tasksets import SPLITS, SinusoidFamily, TaskBatch, sample_sinusoid_tasks, task_ids, to_batch
from flows.cache import write_table
from flows.config import StudyConfig
from flows.validation import validate_omniglot, validate_tasksets, validate_text


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


class Family:
    """What every family shares: the entries it reads, frozen weights (none), and the two standard baselines."""

    metric: str
    lower_is_better: bool
    loss_fn: Callable
    score_fn: Callable
    reference = "scratch"  # the baseline the report compares every method with

    def __init__(self, cfg: StudyConfig, entries: dict[str, Path] | None = None):
        self.cfg, self.family, self.entries = cfg, cfg.family, entries or {}

    def frozen(self, model: nn.Module) -> tuple[str, ...]:
        return ()

    def head(self, model: nn.Module) -> tuple[str, ...]:
        """The classification head's weights (`meta_train.zero_head` starts them at zero on every task)."""
        names = tuple(k for k, _ in model.named_parameters() if k.split(".")[-2:-1] == ["head"])
        if not names:
            raise ValueError(f"meta_train.zero_head: the {self.family.kind} family's model has no head")
        return names

    def baseline_curves(self, test: TaskBatch, model: nn.Module, steps: int,
                        score_steps: list[int]) -> dict[str, np.ndarray]:
        """scratch (a fresh init per task) and pretrain_finetune, scored after score_steps of 0..steps SGD steps."""
        b, chunk = self.cfg.baselines, self.cfg.evaluate.chunk
        pretrained = self.pretrained_init(self.entries["task_sets"], model)
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)
        return {"scratch": scratch(self.model, test, steps, b.scratch_lr, self.cfg.seed, **kw),
                "pretrain_finetune": finetune(model, pretrained, test, steps, b.finetune_lr, **kw)}


class SinusoidTasks(Family):
    metric, lower_is_better = "mse", True
    loss_fn = staticmethod(F.mse_loss)
    score_fn = staticmethod(F.mse_loss)

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


class OmniglotTasks(Family):
    metric, lower_is_better = "accuracy", False
    loss_fn = staticmethod(F.cross_entropy)
    score_fn = staticmethod(accuracy)
    SPLIT_FILES = {"meta_train": "train", "meta_val": "val", "meta_test": "test"}

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


class TextTasks(Family):
    """Few-shot intent classification on a frozen MiniLM: LoRA on its top layers plus a head are adapted.

    Episodes hold utterance ids (rows of the task set's utterance table); the model looks their cached
    prefix (the hidden states below the top layers, the "prefix" entry) up, so only the top layers run.
    """

    metric, lower_is_better = "accuracy", False
    loss_fn = staticmethod(F.cross_entropy)
    score_fn = staticmethod(accuracy)
    reference = "prototypes"

    def utterances(self) -> pd.DataFrame:
        f = self.family
        if f.dataset == "clinc150":
            return text.load_clinc150(Path(f.path))
        if f.dataset == "banking77":
            return text.load_banking77(Path(f.path))
        return text.load_text_csv(Path(f.path), f.text_col, f.label_col, f.domain_col)

    def build(self, out: Path) -> dict:
        """Utterances, the class-disjoint split (whole domains if asked) and the fixed meta-val/test episodes."""
        f = self.family
        utterances = self.utterances()
        if f.split_by == "domain" and "domain" not in utterances:
            raise ValueError(f"family.split_by: 'domain', but {f.path} gives no domains")
        groups = utterances["domain"] if f.split_by == "domain" else None
        split = text.class_split(utterances["label"], dict(zip(SPLITS, f.fractions)), self.cfg.seed, groups)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "label"])
        tables = {s: self._sample_table(utterances, split[s], s, offset)
                  for offset, s in enumerate(("meta_val", "meta_test"), start=1)}
        report = validate_text(utterances, classes, pd.concat(tables.values()), f)
        (out / "validation.json").write_text(json.dumps(report, default=str))
        write_table(utterances, out, "utterances")
        write_table(classes, out, "classes")
        for s, table in tables.items():
            write_table(table, out, f"episodes_{s}")
        return {f"n_classes_{s}": len(split[s]) for s in SPLITS} | {"n_utterances": len(utterances)}

    def _sample_table(self, utterances: pd.DataFrame, classes: list[str], split: str, stream: int) -> pd.DataFrame:
        """The split's fixed episodes, long: split, episode, way, slot (< K support, else query), label, row."""
        f = self.family
        n = f.n_val_episodes if split == "meta_val" else f.n_test_episodes
        rows, ways = text.sample_text_episodes(utterances["label"], classes, f.n_way, f.k_shot, f.n_query, n,
                                               iteration_seed(self.cfg.seed, 0, stream))
        t, w, k = np.meshgrid(np.arange(n), np.arange(f.n_way), np.arange(rows.shape[2]), indexing="ij")
        label = np.asarray(classes, dtype=object)[ways.numpy()][..., None].repeat(rows.shape[2], -1)
        return pd.DataFrame({"split": split, "episode": t.ravel(), "way": w.ravel(), "slot": k.ravel(),
                             "label": label.ravel(), "row": rows.numpy().ravel()})

    def _episodes(self, entry: Path, split: str) -> TaskBatch:
        table = pd.read_parquet(entry / f"episodes_{split}.parquet").sort_values(["episode", "way", "slot"])
        f = self.family
        rows = table["row"].to_numpy().reshape(table["episode"].nunique(), f.n_way, f.k_shot + f.n_query)
        return text.episodes_from_rows(torch.tensor(rows), f.k_shot)

    def open(self, entry: Path, dev: torch.device, splits=SPLITS, meta_batch_size: int = 4) -> TaskData:
        f = self.family
        labels = pd.read_parquet(entry / "utterances.parquet", columns=["label"])["label"].to_numpy()
        classes = pd.read_parquet(entry / "classes.parquet")
        train_classes = classes.loc[classes["split"] == "meta_train", "label"].tolist()

        def sample(iteration: int) -> TaskBatch:
            rows, _ = text.sample_text_episodes(labels, train_classes, f.n_way, f.k_shot, f.n_query,
                                                meta_batch_size, iteration_seed(self.cfg.seed, iteration))
            return text.episodes_from_rows(rows, f.k_shot).to(dev)

        val = self._episodes(entry, "meta_val").to(dev) if "meta_val" in splits else None
        test = self._episodes(entry, "meta_test").to(dev) if "meta_test" in splits else None
        return TaskData(sample if "meta_train" in splits else None, val, test,
                        None if test is None else np.arange(len(test)))

    # ---- the prefix entry (computed by the embeddings stage)

    def build_prefix(self, out: Path) -> dict:
        """Hidden states entering the first adapted layer for every utterance, and the sentence embeddings."""
        utterances = self.utterances()
        prefix, sentences, meta = text.encode_utterances(utterances["text"].tolist(), self.cfg.model.top_layers,
                                                         self.family.max_length)
        write_table(prefix, out, "prefix")
        write_table(pd.DataFrame({"text": utterances["text"]}), out, "texts")
        write_table(sentences, out, "sentences")
        return meta

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _load_prefix(self.entries["prefix"], self.entries["task_sets"])

    def sentences(self) -> torch.Tensor:
        table = pd.read_parquet(self.entries["prefix"] / "sentences.parquet")
        return torch.tensor(table.to_numpy(np.float32))

    # ---- model and baselines

    def top_config(self, lora_b_std: float | None = None) -> text.TopEncoderConfig:
        m = self.cfg.model
        return text.TopEncoderConfig(n_layers=m.top_layers, n_way=self.family.n_way,
                                     lora_r=m.lora_r if m.adapted == "lora" else 0, lora_alpha=m.lora_alpha,
                                     lora_b_std=m.lora_b_std if lora_b_std is None else lora_b_std,
                                     target_modules=m.target_modules, seed=self.cfg.seed)

    def model(self, lora_b_std: float | None = None) -> nn.Module:
        hidden, mask = self.prefix()
        backbone, _ = text.load_minilm()
        return text.CachedTopEncoder(text.TopEncoder(backbone, self.top_config(lora_b_std)), hidden, mask)

    def adapted(self, model: nn.Module) -> tuple[str, ...]:
        return text.adapted_names(model)

    def frozen(self, model: nn.Module) -> tuple[str, ...]:
        return text.frozen_names(model)

    def features(self, entry: Path) -> pd.DataFrame:
        test = self._episodes(entry, "meta_test")
        emb = self.sentences()
        return episode_features(emb[test.x_spt], test.y_spt).assign(split="meta_test").rename_axis("task_id")

    def baseline_curves(self, test: TaskBatch, model: nn.Module, steps: int,
                        score_steps: list[int]) -> dict[str, np.ndarray]:
        """prototypes (nearest class mean of the frozen sentence embeddings, no steps: a flat curve), a linear
        head on them from zeros, and LoRA + head fine-tuned per episode from peft's usual init (B = 0)."""
        b, chunk, n_way = self.cfg.baselines, self.cfg.evaluate.chunk, self.family.n_way
        emb = self.sentences().to(test.x_spt.device)
        scores = text.prototype_predict(emb[test.x_spt], test.y_spt, emb[test.x_qry], n_way)
        correct = (scores.argmax(-1) == test.y_qry).double().mean(-1).cpu().numpy()
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)
        head = text.CachedEmbeddingHead(emb, n_way).to(emb.device)
        usual = self.model(lora_b_std=0.0).to(emb.device)
        return {"prototypes": np.tile(correct, (len(score_steps), 1)),
                "linear_head": finetune(head, dict(head.named_parameters()), test, steps, b.head_lr, **kw),
                "lora_finetune": finetune(usual, dict(usual.named_parameters()), test, steps, b.finetune_lr,
                                          adapted=self.adapted(usual), **kw)}


_PREFIX_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _load_prefix(prefix: Path, task_sets: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense prefix (hidden float16, mask), checked against the task set's utterances; kept per process."""
    key = (str(prefix), str(task_sets))
    if key not in _PREFIX_CACHE:
        texts = pd.read_parquet(prefix / "texts.parquet")["text"]
        expected = pd.read_parquet(task_sets / "utterances.parquet", columns=["text"])["text"]
        if not texts.reset_index(drop=True).equals(expected.reset_index(drop=True)):
            raise ValueError(f"{prefix}: the cached prefix was computed from other utterances than {task_sets}")
        _PREFIX_CACHE.clear()  # one dataset's prefix at a time: it is hundreds of MB
        _PREFIX_CACHE[key] = text.prefix_from_table(pd.read_parquet(prefix / "prefix.parquet"), len(texts))
    return _PREFIX_CACHE[key]


FAMILIES = {"sinusoid": SinusoidTasks, "omniglot": OmniglotTasks, "text": TextTasks}


def family_for(cfg: StudyConfig, entries: dict[str, Path] | None = None) -> Family:
    """The family of cfg; entries (stage -> cache entry path) are the inputs its methods read."""
    return FAMILIES[cfg.family.kind](cfg, entries)
