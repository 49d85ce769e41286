"""Fixed episode files: a benchmark's own meta-test episodes, read and checked before any image is decoded.

A file is a table, CSV or Parquet (by extension), one row per image of an episode: ``episode`` (any id),
``role`` (``support`` or ``query``), ``image`` (what the family resolves to an image: a path relative to
the table's folder or absolute, or for Omniglot an archive member) and ``label`` (any string or integer,
compared only within its episode: labels need not name classes across episodes). Every episode is N-way
K-shot with Q queries per label: K support rows of each of its N labels, Q query rows of each, the same Q in
every episode. Episodes are numbered 0..T-1 in the order they first appear; way j of an episode is its j-th
label in sorted order; support rows keep their file order as slots 0..K-1, queries K..K+Q-1.

An optional column ``rotation`` turns an image counter-clockwise by 0, 90, 180 or 270 degrees (no column: 0
everywhere; with it, every cell is given), as Omniglot's classes ``<character>/rot090`` etc. turn their drawings:
an image is then the pair (image, rotation), so one file at two rotations is two images (`shown` names them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.omniglot import ROTATIONS

FILE_COLUMNS = ("episode", "role", "image", "label")
ROTATION = "rotation"  # the optional column: degrees counter-clockwise, one of ROTATIONS; missing: 0
ROLES = ("support", "query")
READERS = {".csv": lambda p: pd.read_csv(p, dtype={"role": str, "image": str}),
           ".parquet": pd.read_parquet, ".pq": pd.read_parquet}


def read_episode_file(path: Path) -> pd.DataFrame:
    """The file's columns FILE_COLUMNS and ROTATION (int degrees; 0 in every row without the column), rows in file
    order. Raises naming the file (and the column, the episode and the data row, 1-based): an unknown extension, a
    missing file or column, an empty cell, a rotation not in ROTATIONS."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: a fixed episode file is {' or '.join(READERS)}, "
                         f"got {path.suffix or 'no extension'!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fixed episode file not found (family.test_episodes)")
    try:
        table = reader(path)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: not a readable {path.suffix} table ({e})") from None
    if missing := [c for c in FILE_COLUMNS if c not in table]:
        raise ValueError(f"{path}: column(s) {missing} missing; a fixed episode file needs {list(FILE_COLUMNS)}")
    if table.empty:
        raise ValueError(f"{path}: no rows")
    columns = [*FILE_COLUMNS, *([ROTATION] if ROTATION in table else [])]
    table = table[columns].reset_index(drop=True)
    for column in columns:
        if (empty := table[column].isna()).any():
            raise ValueError(f"{path}: column {column!r} is empty at {where(table, np.flatnonzero(empty)[0])}")
    return table.assign(**{ROTATION: rotations(table, str(path)) if ROTATION in table else 0})


def rotations(table: pd.DataFrame, name: str) -> np.ndarray:
    """The ROTATION column as degrees (R,) int64: 90, 90.0 and '90' are 90. Raises ValueError starting with name (the
    file), naming the column, the episode and the row: a value not in ROTATIONS (45, 'ninety', -90)."""
    degrees = table[ROTATION].map(_degrees)
    if (bad := degrees.isna()).any():
        i = np.flatnonzero(bad)[0]
        raise ValueError(f"{name}: column {ROTATION!r}: {plain(table[ROTATION].iloc[i])!r} at {where(table, i)}; "
                         f"need degrees counter-clockwise, one of {ROTATIONS}")
    return degrees.to_numpy(dtype=np.int64)


def _degrees(value) -> int | None:
    """A rotation cell as degrees, or None unless it is one of ROTATIONS (a bool is not)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return int(number) if number in ROTATIONS else None


def shown(image: str, degrees: int) -> str:
    """An image of a file as messages name it: 'a/0965_01.png', or 'a/0965_01.png @90' when rotated."""
    return image if degrees == 0 else f"{image} @{degrees}"


def where(table: pd.DataFrame, i: int) -> str:
    """'episode 3, row 12': an error's place in the file (row: 1-based data row, the CSV line after the header);
    'row 12 (no episode)' when its episode cell is empty."""
    episode = table["episode"].iloc[i]
    return f"row {i + 1} (no episode)" if pd.isna(episode) else f"episode {plain(episode)!r}, row {i + 1}"


def plain(value):
    """A table's cell as Python writes it in a message: 3, not np.int64(3)."""
    return value.item() if isinstance(value, np.generic) else value


def episode_rows(table: pd.DataFrame, n_way: int, k_shot: int, name: str = "") -> pd.DataFrame:
    """The file's rows (`read_episode_file`) as `episodes.episode_table` rows: episode (0..T-1), way, slot, label
    (as text), plus image, rotation (degrees) and source_episode (the file's id), sorted by episode, way, slot.

    Raises ValueError starting with name (the file), naming the column and the episode: an unknown role, an
    episode whose support is not n_way labels x k_shot rows, a query label absent from its episode's support,
    labels or episodes with different numbers of queries."""
    roles = table["role"].astype(str).str.strip().str.lower()
    if (bad := ~roles.isin(ROLES)).any():
        i = np.flatnonzero(bad)[0]
        raise ValueError(f"{name}: column 'role': {plain(table['role'].iloc[i])!r} at {where(table, i)}; "
                         f"need one of {ROLES}")
    rows = table.assign(role=roles, id=pd.factorize(table["episode"])[0], at=np.arange(len(table)))
    _check_distinct(rows, name)
    support, query = rows[rows["role"] == "support"], rows[rows["role"] == "query"]
    shots = support.groupby(["id", "label"]).size()  # (episode, label) -> support rows
    _check_support(rows, shots, n_way, k_shot, name)
    known = pd.MultiIndex.from_frame(query[["id", "label"]]).isin(shots.index)
    if not known.all():
        i = query["at"].to_numpy()[~known][0]
        labels = sorted(map(plain, shots.loc[rows["id"].iloc[i]].index))
        raise ValueError(f"{name}: column 'label': query label {plain(table['label'].iloc[i])!r} at "
                         f"{where(table, i)} is not among its support labels {labels}")
    _check_queries(rows, query.groupby(["id", "label"]).size().reindex(shots.index, fill_value=0), name)
    ways = shots.reset_index()[["id", "label"]].assign(way=lambda t: t.groupby("id").cumcount())  # labels sorted
    slot = rows.groupby(["id", "role", "label"]).cumcount() + np.where(rows["role"] == "query", k_shot, 0)
    out = rows.assign(slot=slot).merge(ways, on=["id", "label"])
    return pd.DataFrame({"split": "meta_test", "episode": out["id"], "way": out["way"], "slot": out["slot"],
                         "label": out["label"].astype(str), "image": out["image"].astype(str),
                         "rotation": out[ROTATION].astype(np.int64), "source_episode": out["episode"].astype(str)}
                        ).sort_values(["episode", "way", "slot"], ignore_index=True)


def _check_distinct(rows: pd.DataFrame, name: str) -> None:
    """No image (at a rotation) twice in an episode: a query that is also a support image is answered by memory,
    and a support image given twice is one shot, not two. Another name for the same picture is caught once the
    images are decoded (`families.images`)."""
    twice = rows.duplicated(["id", "image", ROTATION], keep=False)
    if twice.any():
        first = rows[twice].iloc[0]
        same = rows[twice & (rows["id"] == first["id"]) & (rows["image"] == first["image"])
                    & (rows[ROTATION] == first[ROTATION])]
        raise ValueError(f"{name}: column 'image': {shown(first['image'], int(first[ROTATION]))!r} is in "
                         f"{_episode(rows, first['id'])} {len(same)} times (rows {list(same['at'] + 1)}, as "
                         f"{list(same['role'])}); an episode's images must be distinct")


def _check_support(rows: pd.DataFrame, shots: pd.Series, n_way: int, k_shot: int, name: str) -> None:
    """Every episode: n_way support labels, k_shot support rows of each (so n_way x k_shot support rows)."""
    stats = shots.groupby(level="id").agg(["size", "min", "max"]).reindex(range(rows["id"].max() + 1))  # NaN: none
    bad = (stats["size"] != n_way) | (stats["min"] != k_shot) | (stats["max"] != k_shot)
    if bad.any():
        episode = int(np.flatnonzero(bad)[0])
        counts = shots.loc[episode].to_dict() if episode in shots.index.get_level_values("id") else {}
        raise ValueError(f"{name}: column 'label': {_episode(rows, episode)} has support rows per label {counts}; "
                         f"need family.n_way {n_way} labels x family.k_shot {k_shot} rows each "
                         f"({n_way * k_shot} support rows)")


def _check_queries(rows: pd.DataFrame, queries: pd.Series, name: str) -> None:
    """The same number Q >= 1 of query rows of every label of every episode (queries: (episode, label) -> rows)."""
    q = int(queries.iloc[0])
    if (bad := (queries != q) | (queries == 0)).any():
        episode = queries.index[np.flatnonzero(bad)[0]][0]
        raise ValueError(f"{name}: column 'role': {_episode(rows, episode)} has query rows per label "
                         f"{queries.loc[episode].to_dict()}; need the same number (at least 1) of every label in "
                         f"every episode (the first label of the first episode has {q})")


def _episode(rows: pd.DataFrame, episode: int) -> str:
    """'episode 'e3'': the file's own id of the episode numbered `episode`."""
    return f"episode {plain(rows['episode'][rows['id'] == episode].iloc[0])!r}"
