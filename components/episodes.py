"""Episodes, the one type every family's tasks take, and the one N-way K-shot sampler over class members.

An episode batch holds T tasks as support/query tensors. Classification families (images, text) sample
their episodes the same way: each class is a list of example rows (an image, an utterance); an episode
picks N distinct classes and K + Q distinct rows of each, the first K support and the last Q query; its
label j is the j-th class picked. Rows become inputs by the family (images gathered, utterance ids kept).
Every seed the pipeline draws from comes from `derive_seed`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

SPLITS = ("meta_train", "meta_val", "meta_test")
TRAIN_STREAM = 0  # derive_seed stream of the meta-training episodes; fixed episode sets use 1, 2, ...


class EpisodeBatch(NamedTuple):
    """T tasks: x_spt (T, S, ...), y_spt (T, S, ...), x_qry (T, Q, ...), y_qry (T, Q, ...).

    Classification: S = N*K and Q = N*Q' examples grouped by label, y_spt[t] = [0]*K + [1]*K + ... (int64).
    Regression (sinusoid): x and y are (T, K, 1) points.
    """

    x_spt: torch.Tensor
    y_spt: torch.Tensor
    x_qry: torch.Tensor
    y_qry: torch.Tensor

    def index(self, idx) -> "EpisodeBatch":
        return EpisodeBatch(*(t[idx] for t in self))

    def to(self, device) -> "EpisodeBatch":
        return EpisodeBatch(*(t.to(device) for t in self))

    def __len__(self) -> int:  # number of tasks
        return self.x_spt.shape[0]


def derive_seed(seed: int, iteration: int = 0, stream: int = TRAIN_STREAM) -> int:
    """An independent 32-bit seed per (seed, stream, iteration): stream 0 draws the meta-training batches
    (iteration i of a run seeded `seed`; entropy [seed, i], as the sinusoid pool's batches always had), other
    streams fixed episode sets (val 1, test 2, ...; entropy [seed, stream, i]). Every seed drawn comes from here."""
    entropy = [seed, iteration] if stream == TRAIN_STREAM else [seed, stream, iteration]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def class_split(labels: Sequence[str], fractions: dict[str, float], seed: int,
                groups: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Class-disjoint splits: split -> sorted labels, by ``fractions`` (split -> share, summing to 1).

    labels: one per example (repeats allowed). groups (aligned with labels, e.g. CLINC150 domains or an
    Omniglot character's rotations): split whole groups, so every group's classes land in one split;
    fractions then count groups.
    """
    shares = np.array(list(fractions.values()), dtype=float)
    if len(shares) == 0 or (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"fractions: need non-negative shares summing to 1, got {fractions}")
    labels = pd.Series(np.asarray(labels, dtype=object))
    if groups is None:
        group_of = pd.Series(labels.unique(), index=labels.unique())
    else:
        pairs = pd.DataFrame({"label": labels, "group": np.asarray(groups, dtype=object)}).drop_duplicates()
        if (bad := pairs["label"][pairs["label"].duplicated()]).any():
            raise ValueError(f"groups: labels {sorted(bad.unique())[:5]} belong to more than one group")
        group_of = pairs.set_index("label")["group"]
    units = sorted(group_of.unique())
    order = np.random.default_rng(seed).permutation(len(units))
    bounds = np.concatenate([[0], np.rint(np.cumsum(shares) * len(units)).astype(int)])
    split = {}
    for name, share, lo, hi in zip(fractions, shares, bounds[:-1], bounds[1:]):
        if share > 0 and hi == lo:
            raise ValueError(f"fractions: split {name!r} gets none of the {len(units)} "
                             f"{'groups' if groups is not None else 'classes'}")
        chosen = {units[i] for i in order[lo:hi]}
        split[name] = sorted(group_of.index[group_of.isin(chosen)])
    return split


def read_class_lists(folder: Path, files: Mapping[str, str]) -> dict[str, list[str]]:
    """split -> classes in file order, from files (split -> file name, e.g. {"meta_train": "labels.train.txt"}) in
    folder: the class split a dataset ships with.

    One class per line; surrounding whitespace and blank lines ignored; an empty list is allowed. Raises
    naming the file (and line): a missing file, a class listed twice, a class in two lists.
    """
    paths = {split: Path(folder) / name for split, name in files.items()}
    numbered = {split: numbered_lines(path) for split, path in paths.items()}  # every file missing fails first
    seen: dict[str, str] = {}  # class -> "file:line" where first listed
    lists = {}
    for split, path in paths.items():
        lists[split] = []
        for i, cls in numbered[split]:
            if cls in seen:
                again = "twice" if seen[cls].startswith(f"{path}:") else "in two lists"
                raise ValueError(f"{path}:{i}: class {cls!r} listed {again}, first at {seen[cls]}")
            seen[cls] = f"{path}:{i}"
            lists[split].append(cls)
    return lists


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank lines of a class list (UTF-8; a byte-order mark, as
    some editors write, is not part of the first class)."""
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a class list (a file of one class per line)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class list not found (one class per line)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the class list as UTF-8") \
            from None
    return [(i, s) for i, line in enumerate(text.splitlines(), 1) if (s := line.strip())]


def class_members(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """(C, M) int64 rows of each class of ``classes`` in ``labels``, padded with -1 to the largest class's M."""
    if len(classes) == 0 or len(set(classes)) != len(classes):
        raise ValueError(f"classes: need distinct labels, got {len(classes)} with {len(set(classes))} distinct")
    index = pd.Series(np.arange(len(labels))).groupby(np.asarray(labels, dtype=object)).indices
    if missing := [c for c in classes if c not in index]:
        raise ValueError(f"classes: {len(missing)} have no example in labels, e.g. {missing[:5]}")
    width = max(len(index[c]) for c in classes)
    members = np.full((len(classes), width), -1, dtype=np.int64)
    for i, c in enumerate(classes):
        members[i, :len(index[c])] = index[c]
    return members


def sample_rows(members: np.ndarray, n_way: int, k_shot: int, n_query: int, n_episodes: int, seed: int,
                class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which rows make each N-way K-shot episode with Q queries per class; deterministic in seed.

    members: (C, M) rows per class, -1 padded (`class_members`). Returns rows (T, N, K+Q) int64, distinct
    per class, the first K support and the last Q query; and ways (T, N) int64, distinct class positions
    in random order: label j of episode t is class ways[t, j]. class_names only name classes in errors.
    """
    for name, value, lo in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("n_query", n_query, 0),
                            ("n_episodes", n_episodes, 0)):
        if not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"{name}: need an integer >= {lo}, got {value!r}")
    counts = (members >= 0).sum(1)
    if n_way > len(members):
        raise ValueError(f"n_way: {n_way} exceeds the split's {len(members)} classes")
    if (short := counts < k_shot + n_query).any():  # every short class named, up to 10
        where = np.flatnonzero(short)
        examples = [class_names[i] for i in where[:10]] if class_names is not None else where[:10].tolist()
        more = f" and {len(where) - 10} more" if len(where) > 10 else ""
        raise ValueError(f"k_shot + n_query: {k_shot + n_query} exceeds the examples of {len(where)} "
                         f"classes, e.g. {examples} ({counts[where[:10]].tolist()}){more}")
    rng = np.random.default_rng(seed)
    ways = rng.random((n_episodes, len(members))).argsort(1)[:, :n_way]  # (T, N)
    keys = rng.random((n_episodes, n_way, members.shape[1]))
    keys[np.arange(members.shape[1]) >= counts[ways][..., None]] = 2.0  # padding sorts last
    picks = keys.argsort(-1)[..., :k_shot + n_query]  # (T, N, K+Q)
    return members[ways[..., None], picks].astype(np.int64), ways.astype(np.int64)


def episodes_from_rows(rows, k_shot: int) -> EpisodeBatch:
    """rows (T, N, K+Q) -> EpisodeBatch of row ids: x_spt (T, N*K), x_qry (T, N*Q) int64; y = the way index."""
    rows = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows, dtype=np.int64))  # a copy:
    # Parquet arrays are read-only
    n_episodes, n_way, n_total = rows.shape
    labels = torch.arange(n_way).view(1, n_way, 1)

    def part(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rows[:, :, lo:hi].flatten(1), labels.expand(n_episodes, n_way, hi - lo).flatten(1)

    return EpisodeBatch(*part(0, k_shot), *part(k_shot, n_total))


def episode_table(rows: np.ndarray, ways: np.ndarray, classes: Sequence[str], split: str) -> pd.DataFrame:
    """The long form of fixed episodes: split, episode, way, slot (< K support, else query), label, row."""
    t, w, k = np.meshgrid(*(np.arange(n) for n in rows.shape), indexing="ij")
    label = np.asarray(classes, dtype=object)[np.asarray(ways)][..., None].repeat(rows.shape[2], -1)
    return pd.DataFrame({"split": split, "episode": t.ravel(), "way": w.ravel(), "slot": k.ravel(),
                         "label": label.ravel(), "row": np.asarray(rows).ravel()})


def table_rows(table: pd.DataFrame, n_way: int) -> np.ndarray:
    """`episode_table` back to rows (T, N, K+Q), episodes in order."""
    table = table.sort_values(["episode", "way", "slot"])
    return table["row"].to_numpy().reshape(table["episode"].nunique(), n_way, -1)


def gather(ids: EpisodeBatch, items: torch.Tensor) -> EpisodeBatch:
    """Row ids -> inputs: x_spt (T, N*K) ids become items[ids] (T, N*K, *item_shape); labels unchanged."""
    return EpisodeBatch(items[ids.x_spt], ids.y_spt, items[ids.x_qry], ids.y_qry)


def normalized_text(texts: pd.Series) -> pd.Series:
    """Casefolded, whitespace collapsed: 'Turn  up the Volume ' and 'turn up the volume' are one utterance."""
    return texts.astype(str).str.casefold().str.split().str.join(" ")


def pixel_keys(pixels: pd.Series) -> pd.Series:
    """sha1 of each image's bytes: identical pixels, identical key."""
    return pixels.map(lambda b: hashlib.sha1(bytes(b)).hexdigest())


def conflicting(key: pd.Series, labels: pd.Series, drawable: np.ndarray) -> np.ndarray:
    """(R,) bool: the drawable rows whose key (what makes two examples the same) is under two labels among the
    drawable rows, i.e. copies that could meet in one episode. key, labels: (R,) per row; drawable: (R,) bool."""
    key, labels = pd.Series(np.asarray(key)), pd.Series(np.asarray(labels, dtype=object))
    per_key = labels[drawable].groupby(key[drawable]).nunique()
    return drawable & key.isin(per_key.index[per_key > 1]).to_numpy()


_conflicting_rows = conflicting  # clean_examples' parameter `conflicting` shadows the name there


CONFLICTS = ("error", "drop")  # an example under two labels: a named error, or every copy dropped


def clean_examples(table: pd.DataFrame, key: pd.Series, label: str = "label", conflicting: str = "error",
                   where: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels stripped of surrounding whitespace; an example repeated within its label kept once; an example
    under two labels a ValueError naming them (conflicting="error") or dropped with every copy ("drop").

    table: one row per example with a `label` column (and optionally `source`, e.g. 'file.csv:12', or `file`,
    naming the example in messages); key: (len(table),) what makes two examples the same (normalized_text, pixel_keys). Returns the
    clean table (index reset) and what was changed: rows (what, count, examples) for the validation report.
    """
    if conflicting not in CONFLICTS:
        raise ValueError(f"conflicting: need one of {CONFLICTS}, got {conflicting!r}")
    table, key = table.reset_index(drop=True), pd.Series(np.asarray(key), name="key")
    labels = table[label].astype(str)
    stripped = labels != labels.str.strip()
    table[label] = labels.str.strip()
    name = next((table[c].astype(str) for c in ("source", "file") if c in table),
                pd.Series([f"row {i + 1}" for i in table.index]))
    conflicts = pd.Series(_conflicting_rows(key, table[label], np.ones(len(table), dtype=bool)))  # all drawable
    if conflicts.any() and conflicting == "error":
        first = key[conflicts].iloc[0]
        rows = table[key == first]
        found = ", ".join(f"{s} ({lab!r})" for s, lab in zip(name[rows.index], rows[label]))
        raise ValueError(f"{where}{key[conflicts].nunique()} examples are filed under more than one label, e.g. "
                         f"{found}; fix the data, or set family.conflicting_labels: drop to drop every copy")
    repeated = key.duplicated() & ~conflicts
    report = pd.DataFrame([
        ("labels_stripped", int(stripped.sum()), list(name[stripped][:5])),
        ("duplicates_dropped", int(repeated.sum()), list(name[repeated][:5])),
        ("conflicts_dropped", int(conflicts.sum()), list(name[conflicts][:5])),
    ], columns=["what", "count", "examples"])
    return table[~(repeated | conflicts)].reset_index(drop=True), report
