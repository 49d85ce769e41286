"""Content-addressed stage cache: `<root>/<stage>/<key>/` holding Parquet tables and files.

An entry is complete when its `manifest.json` exists and every file in it matches its sha256;
anything else (a crash mid-write, a truncated or edited file) counts as missing and is recomputed.
Entries are written into a temporary sibling folder and renamed into place, so readers never see
half an entry and a failed stage loses nothing already cached. `lock` serialises the computation of
one entry across processes (two pipeline runs on one project): the second waits, then finds it cached.

An entry also records the manifest digests of the entries it was computed from (`inputs`): when one of
those is rewritten (a meta-training continued under a larger budget), the entry is stale and recomputed,
although its key is unchanged. This module alone knows the file names inside an entry.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import pandas as pd
from filelock import UnixFileLock

from flows.versions import file_sha256

MANIFEST = "manifest.json"
STATE, HISTORY, RESULTS, VALIDATION = "state.pt", "history", "results", "validation.json"  # inside entries
DIVERGED = "diverged"  # methods whose numbers went non-finite: where, why, the rates in force
CHECKPOINT = "checkpoint.pt"  # inside <root>/checkpoints/<trajectory key>/
SUMMARY_TEXT = "results.txt"  # a fold study's summary as text, inside its "folds" entry
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


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._verified: set[tuple] = set()  # (file, size, mtime_ns, sha256) already checked by this instance

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
        return all(self._matches(entry / name, sha) for name, sha in manifest["files"].items())

    def _matches(self, file: Path, sha: str) -> bool:
        """file's sha256 is sha; hashed once per (size, mtime) by this instance (a status walk over the entry
        graph asks again for every entry downstream: a text prefix is hundreds of MB)."""
        try:
            stat = file.stat()
        except FileNotFoundError:
            return False
        stamp = (str(file), stat.st_size, stat.st_mtime_ns, sha)
        if stamp not in self._verified:
            if file_sha256(file) != sha:
                return False
            self._verified.add(stamp)
        return True

    def digest(self, stage: str, key: str) -> str | None:
        """A hash of the entry's files (from its manifest): changes whenever its content does."""
        return _manifest_digest(self.path(stage, key))

    def tables(self, *entries: tuple[str, str]) -> "EntryTables":
        """The tables of the entries (pairs (stage, key)), by name."""
        return EntryTables([self.path(stage, key) for stage, key in entries])

    def input_digests(self, reads) -> dict[str, str | None]:
        """{"stage/key": digest} of the entries in reads (pairs (stage, key)) as they are now."""
        return {f"{stage}/{key}": self.digest(stage, key) for stage, key in reads}

    def status(self, stage: str, key: str, reads=()) -> str:
        """"cached", "missing" or "stale": complete but computed from other versions of the entries it reads."""
        if not self.is_complete(stage, key):
            return "missing"
        recorded = (self.manifest(stage, key) or {}).get("inputs", {})
        return "cached" if recorded == self.input_digests(reads) else "stale"

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
    def writing(self, stage: str, key: str, meta: dict | None = None, reads=()) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it replaces the entry atomically, recording the
        digests of the entries it read (reads: pairs (stage, key)), taken before the work started.

        A folder that cannot be written (permissions, full disk) raises CacheWriteError naming it.
        """
        final, inputs = self.path(stage, key), self.input_digests(reads)
        with _writable(stage, final.parent):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        try:
            with _writable(stage, final.parent):
                yield tmp
                files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                manifest = {"stage": stage, "key": key, "files": files, "meta": meta or {}, "inputs": inputs}
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

    def checkpoint(self, trajectory: str) -> Path:
        """A meta-training's checkpoint file, keyed by its trajectory (`flows.plan`: no iterations or budget)."""
        return self.root / "checkpoints" / trajectory / CHECKPOINT

    def read_table(self, stage: str, key: str, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(stage, key) / f"{name}.parquet")


def file_lock(path: Path) -> UnixFileLock:
    """An exclusive flock on path (created if missing), blocking; released on exit or when the process dies.

    No soft fallback on a filesystem without flock: a soft lock outlives a killed holder and would block
    every later run, so such a filesystem raises instead.
    """
    return UnixFileLock(path, fallback_to_soft=False)


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


DATA_SUFFIXES = (".parquet", ".pt")  # what later stages read; reports and figures (GX times, PNGs) are not


def _manifest_digest(entry: Path) -> str | None:
    """Hash of the entry's data files (their sha256s; not the log meta, reports or figures): equal for a
    byte-identical recompute, so a repaired entry does not make everything after it stale."""
    try:
        files = json.loads((entry / MANIFEST).read_text())["files"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    data = {name: sha for name, sha in files.items() if name.endswith(DATA_SUFFIXES)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class EntryTables(Mapping):
    """Tables of cache entries by name, read lazily from `<entry>/<name>.parquet` (the first entry holding it)
    and kept; what a family reads instead of paths. token: the entries' manifest digests (a decoded copy's key)."""

    def __init__(self, entries: list[Path]):
        self.entries, self._read = list(entries), {}
        self.token = tuple(_manifest_digest(p) for p in self.entries)  # changes whenever an entry is rewritten

    def _file(self, name: str) -> Path | None:
        return next((p / f"{name}.parquet" for p in self.entries if (p / f"{name}.parquet").is_file()), None)

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._read:
            file = self._file(name)
            if file is None:
                raise KeyError(f"no table {name!r} in the cache entries {[str(p) for p in self.entries]}")
            self._read[name] = pd.read_parquet(file)
        return self._read[name]

    def __iter__(self):
        return iter(sorted({p.stem for e in self.entries for p in e.glob("*.parquet")}))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@contextlib.contextmanager
def table_appender(folder: Path) -> Iterator[Callable[[str, pd.DataFrame], None]]:
    """write(name, df): df appended to `<folder>/<name>.parquet` as one more row group (the first call fixes the
    columns and types), so a table can be written a chunk at a time; every file is closed on exit. Floating-point
    columns (hidden states, embeddings: nearly all values distinct) skip dictionary encoding: smaller, 4x faster
    to read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writers: dict[str, pq.ParquetWriter] = {}

    def write(name: str, df: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(df, preserve_index=False)
        if name not in writers:
            keep = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
            writers[name] = pq.ParquetWriter(folder / f"{name}.parquet", table.schema, use_dictionary=keep)
        writers[name].write_table(table.cast(writers[name].schema))

    try:
        yield write
    finally:
        for writer in writers.values():
            writer.close()


def write_tables(tables: Mapping[str, pd.DataFrame], folder: Path) -> None:
    for name, table in tables.items():
        write_table(table, folder, name)


def write_table(df: pd.DataFrame, folder: Path, name: str) -> Path:
    path = folder / f"{name}.parquet"
    df.to_parquet(path, index=False)
    return path


def copy_tables(source: Path, folder: Path, leave_out: Iterable[str] = ()) -> list[str]:
    """Copy the tables of the entry at source into folder (an entry being written), but those named in leave_out;
    the copies are byte-identical, so entries that read them see the same digest. Returns the names copied."""
    names = sorted(p.stem for p in source.glob("*.parquet") if p.stem not in set(leave_out))
    for name in names:
        shutil.copyfile(source / f"{name}.parquet", folder / f"{name}.parquet")
    return names
