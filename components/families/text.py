"""Few-shot intent classification on a frozen MiniLM: LoRA on its top layers plus a head are adapted.

Episodes hold utterance ids (rows of the task set's utterance table); the model looks their cached prefix
(the hidden states below the top layers, from `build_prefix`) up, so only the top layers run per episode.

Intents are split with a seed (`split: random`, by fractions, or whole domains) or read from a fold's folder
(`split: files`, `text.SPLIT_FILES`, the layout of ProtAugment's five class splits): then every intent of the
data is listed once, and meta-training may draw only from a labelled pool of the training intents
(`train_pool`, e.g. "10samples": `train.10samples.jsonl`). With split files the utterance table keeps every
utterance (the prefix is the same for every fold of a dataset), and its column `usable` says which ones the
episodes of their intent's split may draw: pool members only, for meta-training with a pool, and no copy of a
text filed under another intent of the same split (or pool) when `conflicting_labels: drop`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from components import text
from components.baselines import BaselineConfig, finetune
from components.episodes import (SPLITS, EpisodeBatch, class_split, clean_examples, conflicting, normalized_text,
                                 numbered_lines)
from components.families import ClassificationTasks, EpisodeSettings, Tables, TaskData
from components.features import embedding_features

DATASETS = ("clinc150", "banking77", "csv")


@dataclass(frozen=True)
class TextSource:
    """Where the utterances come from: what the task sets and the cached prefix both read."""

    dataset: str = "clinc150"  # one of DATASETS
    path: str = "../shared/data/clinc150"
    text_col: str = "text"  # csv / jsonl only
    label_col: str = "label"
    domain_col: str | None = None
    max_length: int = 32  # tokens per utterance (longer ones are truncated)


@dataclass(frozen=True)
class TextData(EpisodeSettings):
    source: TextSource = TextSource()
    split_by: str = "class"  # or "domain": whole domains per split (split "random")
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # split "random"
    split: str = "random"  # or "files": the intent lists text.SPLIT_FILES in split_dir
    split_dir: str | None = None  # split "files": one fold's folder
    train_pool: str = "full"  # split "files": meta-training draws from every utterance of the training intents,
    # or only from the pool train.<train_pool>.jsonl in split_dir ("10samples": ProtAugment's main setting)


@dataclass(frozen=True)
class TopModel:
    top_layers: int = 2  # top MiniLM layers run per episode (LoRA there); those below are the cached prefix
    adapted: str = "lora"  # or "head"
    lora_r: int = 4
    lora_alpha: float = 8.0
    lora_b_std: float = 1e-3  # lora_B ~ N(0, std), not peft's zeros (dL/dA would start at 0)
    target_modules: tuple[str, ...] = ("query", "value")


@dataclass(frozen=True)
class TextTasks(ClassificationTasks):
    data: TextData = TextData()
    model_settings: TopModel = TopModel()
    baselines: BaselineConfig = BaselineConfig()

    reference = "prototypes"
    class_column = "label"
    path_fields = ("source.path", "split_dir")

    # ---- data

    def input_files(self) -> tuple[Path, ...]:
        """The dataset's files and, with split files, the fold's intent lists and its pool."""
        d = self.data
        if d.split != "files":
            return self.prefix_files()
        folder = Path(d.split_dir)
        pool = (text.pool_file(folder, d.train_pool),) if d.train_pool != "full" else ()
        return (*self.prefix_files(), *(folder / name for name in text.SPLIT_FILES.values()), *pool)

    def prefix_files(self) -> tuple[Path, ...]:
        """The files the cached prefix reads: the dataset's only (every fold of a dataset shares its prefix)."""
        s, root = self.data.source, Path(self.data.source.path)
        if s.dataset == "clinc150":
            file = root / "data_full.json" if root.is_dir() or not root.suffix else root
            return tuple(f for f in (file, file.parent / "domains.json") if f.name == file.name or f.exists())
        if s.dataset == "banking77":
            return (root / "train.csv", root / "test.csv")
        return (root,)

    def utterances(self) -> pd.DataFrame:
        """The dataset's utterances as read (text, label, split, source, maybe domain)."""
        s = self.data.source
        if s.dataset == "clinc150":
            return text.load_clinc150(Path(s.path))
        if s.dataset == "banking77":
            return text.load_banking77(Path(s.path))
        if not s.path or Path(s.path).is_dir():
            raise ValueError(f"family.path: dataset 'csv' needs a .csv, .jsonl or .json file, got {s.path!r}")
        return text.load_text_csv(Path(s.path), s.text_col, s.label_col, s.domain_col)

    def clean_utterances(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The utterances every stage uses: labels stripped, an utterance repeated within its intent once (the
        same text after case and whitespace normalisation), one under two intents an error or dropped
        (data.conflicting_labels); and what was changed (episodes.clean_examples' report)."""
        utterances = self.utterances()
        key = normalized_text(utterances["text"])
        if self.data.split == "files":  # an utterance under two intents matters only where one episode can draw
            key = key + "\x1f" + utterances["label"].astype(str).str.strip()  # both: `build` settles it per split
        return clean_examples(utterances, key, "label", self.data.conflicting_labels, f"{self.data.source.path}: ")

    def prefix_settings(self) -> dict:
        """What the cached prefix depends on: not k_shot, the fold etc., so 1-shot, 5-shot and every fold share it."""
        conflicts = "per split" if self.data.split == "files" else self.data.conflicting_labels
        return {"source": asdict(self.data.source), "conflicting_labels": conflicts,
                "top_layers": self.model_settings.top_layers}

    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """utterances, classes (split, label) and the fixed meta-val / meta-test episode tables."""
        d = self.data
        utterances, cleaning = self.clean_utterances()
        if d.split == "files":
            split, utterances, cleaning = self._split_from_files(utterances, cleaning)
        else:
            if d.split_by == "domain" and "domain" not in utterances:
                raise ValueError(f"family.split_by: 'domain', but {d.source.path} gives no domains")
            groups = utterances["domain"] if d.split_by == "domain" else None
            split = class_split(utterances["label"], dict(zip(SPLITS, d.fractions)), seed, groups)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "label"])
        labels = dict.fromkeys(SPLITS, drawable_labels(utterances))
        where = f"{d.split_dir}: " if d.split == "files" else f"{d.source.path}: "
        return {"utterances": utterances, "classes": classes, "cleaning": cleaning,
                **self.episode_tables(labels, split, seed, where)}

    def _split_from_files(self, utterances: pd.DataFrame, cleaning: pd.DataFrame
                          ) -> tuple[dict[str, list[str]], pd.DataFrame, pd.DataFrame]:
        """The intent lists of split_dir; the utterances with the column `usable`; the cleaning report with the
        conflicting copies dropped. Raises naming file and line (module docstring) before any episode is drawn."""
        d, folder = self.data, Path(self.data.split_dir)
        split = text.read_split_files(folder, utterances)
        for s, intents in split.items():
            if len(intents) < d.n_way:
                raise ValueError(f"{folder / text.SPLIT_FILES[s]}: n_way: {d.n_way} exceeds the {len(intents)} "
                                 f"intents listed")
        split_of = pd.Series({c: s for s, cs in split.items() for c in cs})
        scope = utterances["label"].map(split_of).to_numpy()
        drawable = np.ones(len(utterances), dtype=bool)
        if d.train_pool != "full":  # pool: (R,) the pool line naming each utterance, or None
            pool = text.pool_rows(text.pool_file(folder, d.train_pool), utterances, split["meta_train"],
                                  d.source.text_col, d.source.label_col)
            drawable = (scope != "meta_train") | pd.notna(pool)
        copies = self._conflicting_copies(utterances, drawable, scope, folder)
        utterances = utterances.assign(usable=drawable & ~copies)
        if d.train_pool != "full":
            self._check_pool(utterances, pool, split["meta_train"], folder)
        dropped = utterances["source"][copies].tolist()
        cleaning = cleaning.copy()
        at = cleaning.index[cleaning["what"] == "conflicts_dropped"][0]
        cleaning.at[at, "count"], cleaning.at[at, "examples"] = len(dropped), dropped[:5]
        return split, utterances, cleaning

    def _conflicting_copies(self, utterances: pd.DataFrame, drawable: np.ndarray, scope: np.ndarray,
                            folder: Path) -> np.ndarray:
        """(R,) bool: drawable copies of a text filed under two intents of one split (scope: each row's split), which
        one episode could draw together; a ValueError naming two of them unless conflicting_labels is "drop"."""
        key = normalized_text(utterances["text"])
        copies = np.zeros(len(utterances), dtype=bool)
        for s in SPLITS:  # one episode draws from one split (meta-training: from the pool)
            copies |= conflicting(key, utterances["label"], drawable & (scope == s))
        if copies.any() and self.data.conflicting_labels == "error":
            same = copies & (key == key[copies].iloc[0]).to_numpy()
            found = ", ".join(f"{src} ({lab!r})" for src, lab in utterances.loc[same, ["source", "label"]].to_numpy())
            raise ValueError(f"{self.data.source.path}: {int(copies.sum())} utterances are filed under two intents of "
                             f"one split of {folder}, e.g. {found}; fix the data, or set family.conflicting_labels: "
                             "drop to drop every such copy")
        return copies

    def _check_pool(self, utterances: pd.DataFrame, pool: np.ndarray, train: list[str], folder: Path) -> None:
        """Every training intent has k_shot + n_query usable pool utterances; else a ValueError naming the pool file
        and the intent's first line there (or its line in labels.train.txt when the pool has none)."""
        d, need = self.data, self.data.k_shot + self.data.n_query
        in_pool = pd.notna(pool)
        counts = utterances.loc[utterances["usable"].to_numpy() & in_pool, "label"].value_counts()
        for intent in train:
            if (n := int(counts.get(intent, 0))) < need:
                lines = pool[(utterances["label"] == intent).to_numpy() & in_pool]
                listed = folder / text.SPLIT_FILES["meta_train"]
                where = lines[0] if len(lines) else f"{listed}:{dict(map(reversed, numbered_lines(listed)))[intent]}"
                raise ValueError(f"{where}: intent {intent!r} has {n} usable utterances in the pool "
                                 f"{text.pool_file(folder, d.train_pool).name}, fewer than k_shot + n_query: {need}")

    def build_prefix(self, write: Callable[[str, pd.DataFrame], None]) -> dict:
        """The hidden states entering the first adapted layer for every utterance (table prefix, handed to
        write a chunk at a time), their texts and the frozen sentence embeddings (tables texts, sentences);
        returns counts for the log."""
        utterances, _ = self.clean_utterances()
        sentences, meta = text.stream_utterances(utterances["text"].tolist(), self.model_settings.top_layers,
                                                 self.data.source.max_length, write)
        write("texts", pd.DataFrame({"text": utterances["text"]}))
        write("sentences", sentences)
        return meta

    def examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, None]:
        """Every utterance's label, None where its split's episodes may not draw it (`drawable_labels`); the row
        ids are the inputs (the model looks their prefix up)."""
        return drawable_labels(tables["utterances"]), None

    def open(self, tables: Tables, device: torch.device, splits: Sequence[str] = SPLITS, meta_batch_size: int = 4,
             seed: int = 0) -> TaskData:
        """`ClassificationTasks.open`, with the meta-test episodes ordered by their longest utterance in characters
        (test_ids name each one's episode): a chunk of episodes adapted at once runs padded to its longest
        utterance (`CachedTopEncoder`), so similar lengths per chunk cost least. Characters, a proxy for tokens,
        need no prefix."""
        data = super().open(tables, device, splits, meta_batch_size, seed)
        if data.test is None:
            return data
        lengths = torch.tensor(tables["utterances"]["text"].str.len().to_numpy(dtype=np.int64), device=device)  # (U,)
        longest = torch.maximum(lengths[data.test.x_spt].amax(1), lengths[data.test.x_qry].amax(1))  # (T,)
        order = torch.argsort(longest, stable=True)
        return dataclasses.replace(data, test=data.test.index(order), test_ids=data.test_ids[order.cpu().numpy()])

    # ---- the cached prefix

    def prefix(self, tables: Tables) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense prefix (hidden float16 (U, L, H), mask (U, L)), checked against the task set's utterances."""
        token = getattr(tables, "token", None)
        if token is None or token not in _PREFIX:
            texts, expected = tables["texts"]["text"], tables["utterances"]["text"]
            if not texts.reset_index(drop=True).equals(expected.reset_index(drop=True)):
                raise ValueError(f"the cached prefix was computed from other utterances than the task sets of "
                                 f"{self.data.source.path}: rerun the embeddings stage")
            _PREFIX.clear()  # one dataset's prefix at a time: it is hundreds of MB
            _PREFIX[token] = text.prefix_from_table(tables["prefix"], len(texts))
        return _PREFIX[token] if token is not None else _PREFIX.pop(None)

    def sentences(self, tables: Tables) -> torch.Tensor:
        return torch.tensor(tables["sentences"].to_numpy(np.float32))

    # ---- model and baselines

    def top_config(self, seed: int = 0, lora_b_std: float | None = None) -> text.TopEncoderConfig:
        m = self.model_settings
        return text.TopEncoderConfig(n_layers=m.top_layers, n_way=self.data.n_way,
                                     lora_r=m.lora_r if m.adapted == "lora" else 0, lora_alpha=m.lora_alpha,
                                     lora_b_std=m.lora_b_std if lora_b_std is None else lora_b_std,
                                     target_modules=m.target_modules, seed=seed)

    def model(self, tables: Tables, seed: int = 0, lora_b_std: float | None = None) -> nn.Module:
        hidden, mask = self.prefix(tables)
        backbone, _ = text.load_minilm()
        return text.CachedTopEncoder(text.TopEncoder(backbone, self.top_config(seed, lora_b_std)), hidden, mask)

    def adapted(self, model: nn.Module) -> tuple[str, ...]:
        return text.adapted_names(model)

    def frozen(self, model: nn.Module) -> tuple[str, ...]:
        return text.frozen_names(model)

    def features(self, tables: Tables) -> pd.DataFrame:
        test = ClassificationTasks.open(self, tables, torch.device("cpu"), ["meta_test"]).test  # in episode order
        emb = self.sentences(tables)
        return embedding_features(emb[test.x_spt], test.y_spt).assign(split="meta_test").rename_axis("task_id")

    def baseline_runs(self, tables: Tables, test: EpisodeBatch, model: nn.Module, steps: int,
                      score_steps: list[int], chunk: int, seed: int) -> dict[str, Callable[[], np.ndarray]]:
        """prototypes (nearest class mean of the frozen sentence embeddings, no steps: a flat curve), a linear
        head on them from zeros, and LoRA + head fine-tuned per episode from peft's usual init (B = 0)."""
        b, n_way = self.baselines, self.data.n_way
        emb = self.sentences(tables).to(test.x_spt.device)
        kw = dict(loss_fn=self.loss_fn, chunk=chunk, score_fn=self.score_fn, score_steps=score_steps)

        def prototypes() -> np.ndarray:
            correct = text.prototype_accuracy(emb[test.x_spt], test.y_spt, emb[test.x_qry], test.y_qry, n_way)
            return np.tile(correct, (len(score_steps), 1))

        def linear_head() -> np.ndarray:
            head = text.CachedEmbeddingHead(emb, n_way).to(emb.device)
            return finetune(head, dict(head.named_parameters()), test, steps, b.head_lr, rate_name="baselines.head_lr",
                            **kw)

        def lora_finetune() -> np.ndarray:
            usual = self.model(tables, seed, lora_b_std=0.0).to(emb.device)
            return finetune(usual, dict(usual.named_parameters()), test, steps, b.finetune_lr,
                            adapted=self.adapted(usual), **kw)

        return {"prototypes": prototypes, "linear_head": linear_head, "lora_finetune": lora_finetune}


def drawable_labels(utterances: pd.DataFrame) -> np.ndarray:
    """(R,) object: each utterance's label, or None where the column `usable` (split files) says its split's
    episodes may not draw it (class_members skips None)."""
    labels = utterances["label"].to_numpy(dtype=object)
    return np.where(utterances["usable"].to_numpy(), labels, None) if "usable" in utterances else labels


_PREFIX: dict = {}  # tables.token -> (hidden, mask): the decoded prefix, kept per process
