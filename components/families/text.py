"""Few-shot intent classification on a frozen MiniLM: LoRA on its top layers plus a head are adapted.

Episodes hold utterance ids (rows of the task set's utterance table); the model looks their cached prefix
(the hidden states below the top layers, from `build_prefix`) up, so only the top layers run per episode.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from components import text
from components.baselines import BaselineConfig, finetune
from components.episodes import SPLITS, EpisodeBatch, class_split, clean_examples, normalized_text
from components.families import ClassificationTasks, EpisodeSettings, Tables
from components.features import episode_features

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
    split_by: str = "class"  # or "domain": whole domains per split
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)


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

    # ---- data

    def input_files(self) -> tuple[Path, ...]:
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
        return clean_examples(utterances, normalized_text(utterances["text"]), "label", self.data.conflicting_labels,
                              f"{self.data.source.path}: ")

    def prefix_settings(self) -> dict:
        """What the cached prefix depends on: not k_shot etc., so 1-shot and 5-shot studies share it."""
        return {"source": asdict(self.data.source), "conflicting_labels": self.data.conflicting_labels,
                "top_layers": self.model_settings.top_layers}

    def build(self, seed: int) -> dict[str, pd.DataFrame]:
        """utterances, classes (split, label) and the fixed meta-val / meta-test episode tables."""
        d = self.data
        utterances, cleaning = self.clean_utterances()
        if d.split_by == "domain" and "domain" not in utterances:
            raise ValueError(f"family.split_by: 'domain', but {d.source.path} gives no domains")
        groups = utterances["domain"] if d.split_by == "domain" else None
        split = class_split(utterances["label"], dict(zip(SPLITS, d.fractions)), seed, groups)
        classes = pd.DataFrame([(s, c) for s in SPLITS for c in split[s]], columns=["split", "label"])
        labels = dict.fromkeys(SPLITS, utterances["label"].to_numpy())
        return {"utterances": utterances, "classes": classes, "cleaning": cleaning,
                **self.episode_tables(labels, split, seed, f"{d.source.path}: ")}

    def build_prefix(self) -> tuple[dict[str, pd.DataFrame], dict]:
        """The hidden states entering the first adapted layer for every utterance, their texts and the
        frozen sentence embeddings (tables prefix, texts, sentences), and counts for the log."""
        utterances, _ = self.clean_utterances()
        prefix, sentences, meta = text.encode_utterances(utterances["text"].tolist(), self.model_settings.top_layers,
                                                         self.data.source.max_length)
        return {"prefix": prefix, "texts": pd.DataFrame({"text": utterances["text"]}), "sentences": sentences}, meta

    def examples(self, tables: Tables, split: str, device: torch.device) -> tuple[np.ndarray, None]:
        """Every utterance's label; the row ids are the inputs (the model looks their prefix up)."""
        return tables["utterances"]["label"].to_numpy(), None

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
        test = self.open(tables, torch.device("cpu"), ["meta_test"]).test
        emb = self.sentences(tables)
        return episode_features(emb[test.x_spt], test.y_spt).assign(split="meta_test").rename_axis("task_id")

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
            return finetune(head, dict(head.named_parameters()), test, steps, b.head_lr, **kw)

        def lora_finetune() -> np.ndarray:
            usual = self.model(tables, seed, lora_b_std=0.0).to(emb.device)
            return finetune(usual, dict(usual.named_parameters()), test, steps, b.finetune_lr,
                            adapted=self.adapted(usual), **kw)

        return {"prototypes": prototypes, "linear_head": linear_head, "lora_finetune": lora_finetune}


_PREFIX: dict = {}  # tables.token -> (hidden, mask): the decoded prefix, kept per process
