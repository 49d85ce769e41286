"""A user's own images as a few-shot task family: ``<root>/<class>/<image>``, one folder per class.

Any file Pillow reads counts as an image, of any size and mode. Each is read once, turned upright by its
EXIF orientation, converted to grayscale ('L') or RGB (transparent pixels on white paper, `on_white`), and
resized to size x size with LANCZOS, the filter ``components.omniglot`` uses; the aspect ratio is not kept (a non-square image is
stretched). Pixels are not inverted (Omniglot's strokes-are-1 convention is Omniglot's own).

The image table has one row per image: ``class_id, file, pixels, channels, size``. ``class_id`` is the
class folder's name, ``file`` the path below root (``"<class>/<name>"``, '/'-separated), ``pixels``
channels * size * size uint8 bytes in (C, H, W) order, as Omniglot's table stores its drawings (uint8, since
Pillow resizes 8-bit images to 8 bits: float32 would hold no more and take 4x the space); ``images_to_array``
scales them to float32 in [0, 1].

Meta-splits come either from ``components.episodes.class_split`` (seeded, by fractions) or from class lists
``classes.train.txt``, ``classes.val.txt``, ``classes.test.txt`` (one class per line). Class names are compared
in Unicode NFC (``class_name``): macOS writes 'é' in folder names decomposed (NFD), most editors composed.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from components import episodes
from components.episodes import class_split

MODES = {1: "L", 3: "RGB"}  # channels -> Pillow mode
CLASS_LIST_FILES = {"meta_train": "classes.train.txt", "meta_val": "classes.val.txt", "meta_test": "classes.test.txt"}
_LAYOUT = "<root>/<class>/<image>"
SKIPPED_FOLDERS = {"__MACOSX"}  # the resource forks unzipping an archive made on macOS leaves beside the classes
# Pillow refuses an image over 2 x Image.MAX_IMAGE_PIXELS, and warns over 1 x (an error under `-W error`)
TOO_LARGE = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def scan_image_folder(root: Path) -> pd.DataFrame:
    """Every image of every class folder: columns ``class_id, file`` (file relative to root), sorted.

    Hidden files and folders (name starting with '.') and ``__MACOSX`` folders are skipped, and so are plain
    files directly in root (the class lists live there). ``class_id`` is the folder's name in NFC
    (``class_name``), ``file`` keeps the folder's own. Raises naming the path: root missing, no class folder,
    two folders of one NFC name, a class folder holding no image or a nested folder, a file Pillow cannot
    identify or one over Pillow's size limit.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found (need {_LAYOUT})")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not _skipped(p))
    if not classes:
        raise ValueError(f"{root}: no class folders (need {_LAYOUT})")
    seen: dict[str, Path] = {}
    for folder in classes:
        if (name := class_name(folder.name)) in seen:
            raise ValueError(f"{seen[name]} and {folder}: two class folders named {name!r} (in Unicode NFC); "
                             f"rename or merge one")
        seen[name] = folder
    rows = [(class_name(folder.name), f"{folder.name}/{path.name}") for folder in classes
            for path in _class_images(folder)]
    return pd.DataFrame(rows, columns=["class_id", "file"])


def class_name(name: str) -> str:
    """A class folder's or class list line's name in Unicode NFC, the form names are compared in."""
    return unicodedata.normalize("NFC", name)


def _skipped(path: Path) -> bool:
    return path.name.startswith(".") or path.name in SKIPPED_FOLDERS


def too_large(where: object, e: Exception) -> ValueError:
    """The error for an image Pillow refuses to open as a possible decompression bomb (``TOO_LARGE``)."""
    return ValueError(f"{where}: image too large for Pillow to open: {str(e).rstrip('.')} "
                      "(PIL.Image.MAX_IMAGE_PIXELS); shrink the image")


def _class_images(folder: Path) -> list[Path]:
    entries = sorted(p for p in folder.iterdir() if not _skipped(p))
    if nested := [p for p in entries if p.is_dir()]:
        raise ValueError(f"{nested[0]}: nested folders are not read; put the images directly in {folder}/")
    if not entries:
        raise ValueError(f"{folder}: class folder holds no images")
    for path in entries:
        try:
            with Image.open(path):  # reads the header only
                pass
        except TOO_LARGE as e:
            raise too_large(path, e) from e
        except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{path}: not an image Pillow can read ({e})") from e
    return entries


def load_image_folder(root: Path, image_size: int, channels: int) -> pd.DataFrame:
    """Read every image of ``scan_image_folder(root)`` once: the image table (module docstring), in scan order.

    channels: 1 (grayscale, Pillow's 'L') or 3 ('RGB'); image_size: side of the square every image is
    resized to (LANCZOS).
    """
    if channels not in MODES:
        raise ValueError(f"channels: need one of {sorted(MODES)}, got {channels!r}")
    if image_size < 1:
        raise ValueError(f"image_size: must be >= 1, got {image_size}")
    table = scan_image_folder(root)
    pixels = [decode_image(Path(root) / f, image_size, channels) for f in table["file"]]
    return table.assign(pixels=pixels, channels=channels, size=image_size)


def on_white(image: Image.Image) -> Image.Image:
    """An image with transparency (an alpha band, or a palette's transparent colour) composited on white paper,
    as a viewer shows it; others as they are. Without this, transparent paper stored as black reads as ink."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def decode_image(path: Path, size: int, channels: int) -> bytes:
    """(C, size, size) uint8 bytes of one image file, read as the folder's images are (module docstring)."""
    mode = MODES[channels]
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16"):  # 16-bit gray: convert('L') would clip at 255, not scale
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
            elif image.mode in ("I", "F"):
                raise ValueError(f"mode {image.mode!r} (32-bit) has no fixed range; save it as 8 or 16 bits")
            resized = on_white(image).convert(mode).resize((size, size), Image.Resampling.LANCZOS)
    except TOO_LARGE as e:
        raise too_large(path, e) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: image failed to decode ({e})") from e
    hwc = np.asarray(resized, dtype=np.uint8).reshape(size, size, -1)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1)).tobytes()


def images_to_array(table: pd.DataFrame) -> np.ndarray:
    """The ``pixels`` column as floats in [0, 1]: (R, C, size, size) float32, rows in table order."""
    shapes = table[["channels", "size"]].drop_duplicates()
    if len(shapes) != 1:
        raise ValueError(f"table: need one (channels, size) in every row, got {sorted(map(tuple, shapes.values))}")
    c, s = (int(v) for v in shapes.iloc[0])
    if (bad := table["pixels"].map(len) != c * s * s).any():
        raise ValueError(f"pixels: {int(bad.sum())} rows are not {c} x {s} x {s} bytes, e.g. {table['file'][bad].iloc[0]}")
    flat = np.frombuffer(b"".join(table["pixels"]), dtype=np.uint8)
    return flat.reshape(len(table), c, s, s).astype(np.float32) / 255


def split_classes(table: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Seeded class-disjoint split of the table's classes: split -> sorted class ids (``episodes.class_split``)."""
    return class_split(table["class_id"], fractions, seed)


def read_class_lists(folder: Path) -> dict[str, list[str]]:
    """meta_train / meta_val / meta_test -> class ids (NFC, ``class_name``) in file order, from ``CLASS_LIST_FILES``
    in folder (``episodes.read_class_lists``: a missing file, a class listed twice or in two lists is named by
    file and line)."""
    lists = episodes.read_class_lists(folder, CLASS_LIST_FILES)
    return {split: [class_name(c) for c in listed] for split, listed in lists.items()}


def check_class_lists(lists: dict[str, list[str]], classes: Iterable[str], folder: Path | None = None) -> None:
    """Raise unless every listed class is one of ``classes`` (e.g. ``scan_image_folder(root)["class_id"]``).

    folder: where the lists were read from, to name the file and line of the first unknown class.
    Classes in no list are allowed (held out). Names are compared in NFC (``class_name``).
    """
    known = set(map(class_name, classes))
    for split, listed in lists.items():
        if unknown := [c for c in listed if class_name(c) not in known]:
            name = CLASS_LIST_FILES.get(split, split)
            where = name
            if folder is not None:
                lines = {class_name(cls): i for i, cls in episodes.numbered_lines(Path(folder) / name)}
                where = f"{Path(folder) / name}:{lines.get(class_name(unknown[0]), '?')}"
            raise ValueError(f"{where}: class {unknown[0]!r} is not a class folder "
                             f"({len(unknown)} unknown in {name}, {len(known)} class folders)")
