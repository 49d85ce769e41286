"""Content-addressed stage cache: `<root>/<stage>/<key>/` holding Parquet tables and files.

An entry is complete when its `manifest.json` exists and every file in it matches its sha256;
anything else (a crash mid-write, a truncated or edited file) counts as missing and is recomputed.
Entries are written into a temporary sibling folder and renamed into place, so readers never see
half an entry and a failed stage loses nothing already cached. `lock` serialises the computation of
one entry across processes (two pipeline runs on one project): the second waits, then finds it cached.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

MANIFEST = "manifest.json"
# errors that mean "this folder cannot take the entry" rather than a bug in the stage
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class CacheWriteError(OSError):
    """The stage cache cannot be written (folder not writable, disk full); earlier entries are untouched."""

    def __str__(self) -> str:
        return self.strerror  # the message names stage, folder and cause; no "[Errno 28]" prefix


def content_key(payload: Any) -> str:
    """16 hex digits of the sha256 of a JSON-able payload (dict order does not matter)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_version(*modules) -> str:
    """Hash of the modules' source files: editing a stage's code changes its cache key."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def manifest(self, stage: str, key: str) -> dict | None:
        try:
            return json.loads((self.path(stage, key) / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_complete(self, stage: str, key: str) -> bool:
        """True when the entry exists and every file matches its recorded checksum."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            return False
        entry = self.path(stage, key)
        return all((entry / name).is_file() and file_sha256(entry / name) == sha
                   for name, sha in manifest["files"].items())

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold an exclusive lock on (stage, key) across processes; the OS drops it if the holder dies.

        Holding it, the temporary folders of the key's earlier writers are garbage (a killed run's): removed.
        """
        folder = self.path(stage, key).parent
        with _writable(stage, folder):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f".{key}.lock").touch()
        with file_lock(folder / f".{key}.lock"):
            for junk in [*folder.glob(f".{key}.tmp-*"), *folder.glob(f".{key}.old-*")]:
                shutil.rmtree(junk, ignore_errors=True)
            yield

    @contextlib.contextmanager
    def writing(self, stage: str, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it replaces the entry atomically.

        A folder that cannot be written (permissions, full disk) raises CacheWriteError naming it.
        """
        final = self.path(stage, key)
        with _writable(stage, final.parent):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        try:
            with _writable(stage, final.parent):
                yield tmp
                files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                manifest = {"stage": stage, "key": key, "files": files, "meta": meta or {}}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                self._swap_in(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _swap_in(tmp: Path, final: Path) -> None:
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def read_table(self, stage: str, key: str, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(stage, key) / f"{name}.parquet")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on path (created if missing), blocking; released on exit or when the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _writable(stage: str, folder: Path) -> Iterator[None]:
    """Turn an OSError of WRITE_ERRNOS inside the cache (or without a file name: a full disk under pyarrow)
    into a CacheWriteError naming the stage and the folder; an unreadable input file stays what it is."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as e:
        inside = e.filename is None or Path(e.filename).resolve().is_relative_to(folder.parent.resolve())
        if e.errno not in WRITE_ERRNOS or not inside:
            raise
        where = e.filename or folder
        raise CacheWriteError(e.errno, f"stage {stage}: cannot write {where} ({os.strerror(e.errno)}); "
                                       f"the cache entries already in {folder.parent} are untouched") from e


def write_table(df: pd.DataFrame, folder: Path, name: str) -> Path:
    path = folder / f"{name}.parquet"
    df.to_parquet(path, index=False)
    return path
