"""Omniglot (Lake et al. 2015) as a tidy image table, class splits, and N-way K-shot episodes.

The image table has one row per drawing: ``background, alphabet, character, drawing, pixels``.
``character`` is ``"Alphabet/characterNN"``, the form the Vinyals split files use; ``pixels`` holds
size * size uint8 bytes, row-major, **inverted** so that strokes are 255 (1.0) and paper is 0, the
MAML / Prototypical Networks / learn2learn convention.

A class is a (character, rotation) pair, named ``"Alphabet/characterNN/rotDDD"``. Rotations are
counter-clockwise, as PIL's ``Image.rotate`` and ``np.rot90`` turn an image on screen.
"""
from __future__ import annotations

import io
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.episodes import EpisodeBatch, class_split, sample_rows
from components.image_folder import TOO_LARGE, on_white, too_large

PARTS = {"images_background": True, "images_evaluation": False}  # archive stem -> `background` flag
VINYALS_SPLITS = ("train", "val", "test")
ROTATIONS = (0, 90, 180, 270)  # degrees, counter-clockwise

_SOURCE = "github brendenlake/omniglot, python/ folder"
_CLASS_ID = re.compile(r"^(?P<character>.+)/rot(?P<degrees>\d{3})$")


def load_omniglot(root: Path, size: int = 28, alphabets: Sequence[str] | None = None) -> pd.DataFrame:
    """Read both Omniglot parts from ``root``, each from its official zip or, failing that, its extracted folder.

    Every drawing becomes grayscale, inverted (strokes 255), resized once to size x size (LANCZOS).
    ``alphabets`` keeps only those alphabets (each must exist in one of the parts).
    Returns one row per drawing (32,460 for the full set), background part first, then by name.
    """
    root = Path(root)
    sources = {stem: find_source(root, stem) for stem in PARTS}  # fail on a missing part before decoding
    wanted = None if alphabets is None else set(alphabets)
    rows = [row for stem, src in sources.items() for row in _read_part(src, stem, size, wanted)]
    table = pd.DataFrame(rows, columns=["background", "alphabet", "character", "drawing", "pixels"])
    if wanted is not None and (missing := sorted(wanted - set(table["alphabet"]))):
        raise ValueError(f"alphabets: {missing} not found under {root}")
    if table.empty:
        raise ValueError(f"{root}: no <part>/<Alphabet>/<character>/<id>_<rr>.png images found")
    return table


def find_source(root: Path, stem: str) -> Path:
    for path in (root / f"{stem}.zip", root / stem):
        if path.exists():
            return path
    raise FileNotFoundError(f"{root / stem}.zip not found (nor an extracted {stem}/ folder); "
                            f"download {stem}.zip from {_SOURCE}")


def _read_part(src: Path, stem: str, size: int, alphabets: set[str] | None) -> Iterator[tuple]:
    pattern = re.compile(rf"^{stem}/(?P<alphabet>[^/]+)/(?P<character>[^/]+)/\d+_(?P<rr>\d+)\.png$")
    for name, data in _read_pngs(src, pattern, alphabets):
        m = pattern.match(name)
        pixels = _decode(data, size, f"{src}: {name}")
        yield PARTS[stem], m["alphabet"], f"{m['alphabet']}/{m['character']}", int(m["rr"]) - 1, pixels


def _read_pngs(src: Path, pattern: re.Pattern, alphabets: set[str] | None) -> Iterator[tuple[str, bytes]]:
    """(member name relative to the part's parent, PNG bytes), sorted by name, from a zip or a folder."""
    def keep(name: str) -> bool:
        m = pattern.match(name)
        return m is not None and (alphabets is None or m["alphabet"] in alphabets)

    if src.is_dir():
        names = sorted(p.relative_to(src.parent).as_posix() for p in src.rglob("*.png"))
        yield from ((n, (src.parent / n).read_bytes()) for n in names if keep(n))
        return
    try:
        with zipfile.ZipFile(src) as archive:
            for name in sorted(filter(keep, archive.namelist())):
                yield name, archive.read(name)
    except (zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{src}: damaged zip archive ({e})") from e


def _decode(data: bytes, size: int, name: str, any_polarity: bool = False) -> bytes:
    """size * size uint8 bytes, strokes 255: grayscale (transparent pixels on white paper), inverted, resized
    (LANCZOS). any_polarity: an image whose paper is dark (`dark_paper`) is not inverted."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            gray = np.asarray(on_white(image).convert("L"))
    except TOO_LARGE as e:
        raise too_large(name, e) from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{name}: image failed to decode ({e})") from e
    light_paper = not any_polarity or not dark_paper(gray)
    inverted = Image.fromarray(255 - gray if light_paper else gray)  # the files draw strokes black (0) on white
    return np.asarray(inverted.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8).tobytes()


def dark_paper(gray: np.ndarray) -> bool:
    """Whether a drawing's paper is dark, judged by its outermost ring of pixels (the paper around the strokes;
    a bold character cropped to its strokes may be mostly ink, but its border is still mostly paper): their
    median below 127.5. gray: (H, W) uint8."""
    ring = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return bool(np.median(ring) < 127.5)


def decode_drawing(data: bytes, size: int, name: str) -> bytes:
    """An image from outside the archive (a fixed episode's file, any size or format Pillow reads) in the table's
    form: the archive's transform (grayscale, strokes 255, LANCZOS to size x size), whichever way it draws its
    strokes: an image whose paper (its border, `dark_paper`) is dark is taken as light strokes on dark paper and
    not inverted; transparent pixels are paper (`on_white`)."""
    return _decode(data, size, name, any_polarity=True)


def archive_members(root: Path) -> dict[str, Path]:
    """Every drawing's name as the loader names it (``images_evaluation/<Alphabet>/<characterNN>/<id>_<rr>.png``)
    -> the zip or extracted folder holding it."""
    members = {}
    for stem in PARTS:
        src = find_source(Path(root), stem)
        if src.is_dir():
            members.update((p.relative_to(src.parent).as_posix(), src) for p in src.rglob("*.png"))
            continue
        try:
            with zipfile.ZipFile(src) as archive:
                members.update((n, src) for n in archive.namelist() if n.endswith(".png"))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{src}: damaged zip archive ({e})") from e
    return members


def read_members(members: dict[str, Path]) -> dict[str, bytes]:
    """The bytes of each named drawing (members: name -> its zip or folder, as `archive_members` gives them)."""
    out: dict[str, bytes] = {}
    for src in set(members.values()):
        names = sorted(n for n, s in members.items() if s == src)
        if src.is_dir():
            out.update((n, (src.parent / n).read_bytes()) for n in names)
            continue
        with zipfile.ZipFile(src) as archive:
            out.update((n, archive.read(n)) for n in names)
    return out


def pixels_to_array(table: pd.DataFrame) -> np.ndarray:
    """The ``pixels`` column as floats in [0, 1], strokes 1: (n, size, size) float32."""
    lengths = table["pixels"].map(len).unique()
    side = int(np.sqrt(lengths[0])) if len(lengths) else 0
    if len(lengths) != 1 or side * side != lengths[0]:
        raise ValueError(f"pixels: need one square image size in every row, got byte lengths {sorted(lengths)}")
    flat = np.frombuffer(b"".join(table["pixels"]), dtype=np.uint8)
    return flat.reshape(len(table), side, side).astype(np.float32) / 255


def parse_class_id(class_id: str) -> tuple[str, int]:
    """'Alphabet/character01/rot090' -> ('Alphabet/character01', 90)."""
    m = _CLASS_ID.match(class_id)
    if m is None or int(m["degrees"]) not in ROTATIONS:
        raise ValueError(f"class id {class_id!r}: need '<Alphabet>/<character>/rotDDD' with DDD in {ROTATIONS}")
    return m["character"], int(m["degrees"])


def read_vinyals_split(split_dir: Path) -> dict[str, list[str]]:
    """split -> class ids in file order, from ``{train,val,test}.txt`` (4112 / 688 / 1692 classes)."""
    splits = {}
    for split in VINYALS_SPLITS:
        path = Path(split_dir) / f"{split}.txt"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; get it from github jakesnell/prototypical-networks, "
                                    "data/omniglot/splits/vinyals")
        lines = [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        for i, line in lines:
            try:
                parse_class_id(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: {e}") from e
        splits[split] = [line for _, line in lines]
    return splits


def random_class_split(characters: Sequence[str], fractions: dict[str, float], seed: int,
                       rotations: Sequence[int] = ROTATIONS) -> dict[str, list[str]]:
    """Split characters at random by ``fractions`` (split -> share, summing to 1), each with all its rotations.

    Rotations of one character never straddle splits (`episodes.class_split` over character groups).
    Class ids are sorted within each split.
    """
    chars = sorted(set(characters))
    ids = [f"{c}/rot{r:03d}" for c in chars for r in rotations]
    return class_split(ids, fractions, seed, groups=[i.rsplit("/", 1)[0] for i in ids])


def rotate(images: np.ndarray, degrees: int) -> np.ndarray:
    """Turn images (..., H, W) counter-clockwise by a multiple of 90 degrees."""
    if degrees not in ROTATIONS:
        raise ValueError(f"degrees: need one of {ROTATIONS}, got {degrees}")
    return np.rot90(images, degrees // 90, axes=(-2, -1))


@dataclass(frozen=True, eq=False)
class ClassPool:
    """The classes of one split: images (C, D, 1, size, size) float32 in [0, 1], D drawings per class."""

    images: torch.Tensor
    class_ids: tuple[str, ...]  # class_ids[c] names images[c]


def build_class_pool(table: pd.DataFrame, class_ids: Sequence[str]) -> ClassPool:
    """Stack the drawings of every class in ``class_ids`` (in that order), rotated as the id says."""
    if len(class_ids) == 0 or len(set(class_ids)) != len(class_ids):
        raise ValueError(f"class_ids: need distinct ids, got {len(class_ids)} with {len(set(class_ids))} distinct")
    parsed = [parse_class_id(c) for c in class_ids]
    chars = sorted({c for c, _ in parsed})
    if missing := sorted(set(chars) - set(table["character"])):
        raise ValueError(f"class_ids: {len(missing)} characters not in the table, e.g. {missing[:5]}")
    rows = table[table["character"].isin(chars)].sort_values(["character", "drawing"])
    counts = rows.groupby("character").size()
    if counts.nunique() != 1 or rows.duplicated(["character", "drawing"]).any():
        raise ValueError(f"table: every character needs the same distinct drawings, got counts "
                         f"{counts.value_counts().to_dict()}")
    images_2d = pixels_to_array(rows)
    per_char = images_2d.reshape(len(chars), counts.iloc[0], *images_2d.shape[1:])  # (n_chars, D, s, s)
    position = {c: i for i, c in enumerate(chars)}
    char_idx = np.array([position[c] for c, _ in parsed])
    degrees = np.array([d for _, d in parsed])
    images = np.empty((len(parsed), *per_char.shape[1:]), dtype=np.float32)
    for d in ROTATIONS:
        images[degrees == d] = rotate(per_char[char_idx[degrees == d]], d)
    return ClassPool(torch.from_numpy(images).unsqueeze(2), tuple(class_ids))


def sample_episode_indices(n_classes: int, n_drawings: int, n_way: int, k_shot: int, n_query: int,
                           n_episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which classes and drawings make each episode (`episodes.sample_rows` over a full class x drawing grid).

    Returns classes (T, N), distinct per episode and in random order, so label j is classes[:, j];
    and drawings (T, N, K+Q), distinct per class: the first K are support, the last Q query.
    """
    members = np.arange(n_classes * n_drawings, dtype=np.int64).reshape(n_classes, n_drawings)
    if k_shot + n_query > n_drawings:
        raise ValueError(f"k_shot + n_query: {k_shot + n_query} exceeds the {n_drawings} drawings per class")
    rows, classes = sample_rows(members, n_way, k_shot, n_query, n_episodes, seed)
    return classes, rows % max(n_drawings, 1)


def sample_episodes(pool: ClassPool, n_way: int, k_shot: int, n_query: int, n_episodes: int,
                    seed: int) -> tuple[EpisodeBatch, torch.Tensor]:
    """Sample T = n_episodes N-way K-shot episodes with Q queries per class; deterministic in seed.

    Returns the batch and classes (T, N) int64, indices into the pool: label j of episode t is
    class classes[t, j]. Support and query drawings of a class are disjoint.
    """
    n_classes, n_drawings = pool.images.shape[:2]
    classes, drawings = sample_episode_indices(n_classes, n_drawings, n_way, k_shot, n_query, n_episodes, seed)
    return episodes_from_indices(pool, classes, drawings, k_shot), torch.from_numpy(classes)


def episodes_from_indices(pool: ClassPool, classes: np.ndarray, drawings: np.ndarray, k_shot: int) -> EpisodeBatch:
    """Gather episodes: classes (T, N) pool indices, drawings (T, N, K+Q); the first K drawings are support."""
    classes, drawings = torch.tensor(np.asarray(classes)), torch.tensor(np.asarray(drawings))  # copies: Parquet arrays are read-only
    n_episodes, n_way, n_total = drawings.shape
    x = pool.images[classes[..., None], drawings]  # (T, N, K+Q, 1, s, s)
    labels = torch.arange(n_way).view(1, n_way, 1)

    def part(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :, lo:hi].flatten(1, 2), labels.expand(n_episodes, n_way, hi - lo).flatten(1)

    return EpisodeBatch(*part(0, k_shot), *part(k_shot, n_total))


def class_row_index(table: pd.DataFrame, class_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of a split: every drawing of every class (a character at a rotation), class by class in class_ids
    order, drawings in drawing order. Returns (positions in table (R,), rotation in degrees (R,), label (R,)).
    Characters may have different numbers of drawings (a duplicate dropped)."""
    parsed = [parse_class_id(c) for c in class_ids]
    order = np.lexsort((table["drawing"].to_numpy(), table["character"].to_numpy()))
    positions = pd.Series(order).groupby(table["character"].to_numpy()[order], sort=False).indices
    if missing := sorted({char for char, _ in parsed} - set(positions)):
        raise ValueError(f"class_ids: {len(missing)} characters not in the table, e.g. {missing[:5]}")
    rows = [order[positions[char]] for char, _ in parsed]
    degrees = np.concatenate([np.full(len(r), d) for r, (_, d) in zip(rows, parsed)])
    labels = np.repeat(np.asarray(class_ids, dtype=object), [len(r) for r in rows])
    return np.concatenate(rows), degrees, labels


def class_rows(table: pd.DataFrame, class_ids: Sequence[str]) -> tuple[np.ndarray, torch.Tensor]:
    """The split's rows (`class_row_index`) as labels (R,) and images (R, 1, s, s) float32 in [0, 1], each
    rotated as its class id says."""
    rows, degrees, labels = class_row_index(table, class_ids)
    images = pixels_to_array(table.iloc[rows])
    for d in ROTATIONS:
        images[degrees == d] = rotate(images[degrees == d], d)
    return labels, torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
