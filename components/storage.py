"""The one atomic file writer: a crash or a full disk never leaves half a file where a whole one was."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temporary file beside path, then rename it over path (0644); on any error the
    temporary file is removed and path is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_tensors(path: Path, device: str | torch.device = "cpu"):
    """A file written by torch.save, on `device` whatever device wrote it (a CUDA checkpoint loads on a
    CPU-only machine); weights_only: tensors and plain containers, never arbitrary pickled objects."""
    return torch.load(path, weights_only=True, map_location=device)
