"""Content-addressed stage cache: `<root>/<stage>/<key>/` holding Parquet tables and files.

An entry is complete when its `manifest.json` exists and every file in it matches its sha256;
anything else (a crash mid-write, a truncated or edited file) counts as missing and is recomputed.
Entries are written into a temporary sibling folder and renamed into place, so readers never see
half an entry and a failed stage loses nothing already cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

MANIFEST = "manifest.json"


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
    def writing(self, stage: str, key: str, meta: dict | None = None) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it replaces the entry atomically."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
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


def write_table(df: pd.DataFrame, folder: Path, name: str) -> Path:
    path = folder / f"{name}.parquet"
    df.to_parquet(path, index=False)
    return path
