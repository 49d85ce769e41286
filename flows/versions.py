"""What a cache key knows about code and data: the project modules a stage imports, and input file contents.

Code: a stage's version hashes the code of every module of this project (packages `components` and
`flows`) that its entry modules import, transitively, read from the files with `ast` so imports inside
functions count too. Nothing is listed by hand, so a module that gains an import gains a key dependency.
What is hashed is the module's syntax tree without its docstrings: an edit to a comment, a docstring or the
layout changes no key; any change to what runs does.

Data: an input file enters a key by its sha256. Each digest is remembered per (path, size, mtime_ns) in
a small JSON file, so a 14 MB archive is hashed once, not on every run; an edit that changes the size
or the modification time is hashed again.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from components.storage import write_atomic

PACKAGES = ("components", "flows")
ROOT = Path(__file__).resolve().parent.parent  # the folder holding components/ and flows/


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a project module `a.b.c` (a module file or a package's __init__), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(name: str, root: Path = ROOT) -> set[str]:
    """Project modules that module `name` imports anywhere in its source (function bodies included).

    `from pkg import x` counts `pkg.x` when x is a module, else `pkg`; importing `a.b.c` also imports the
    packages `a` and `a.b` (their __init__ runs). Relative imports are resolved against `name`.
    """
    path = module_file(name, root)
    if path is None:
        raise ModuleNotFoundError(f"no project module {name!r} under {root}")
    return _parsed(name, path, root)[0]


def code_digest(name: str, root: Path = ROOT) -> str:
    """sha256 of module `name`'s syntax tree without docstrings (`ast.dump`): blind to comments, docstrings and
    layout, not to any change in what runs."""
    return _parsed(name, module_file(name, root), root)[1]


_PARSED: dict[tuple, tuple[set[str], str]] = {}  # (module, file, mtime_ns, size) -> (imports, digest): parse once


def _parsed(name: str, path: Path, root: Path) -> tuple[set[str], str]:
    stat = path.stat()
    stamp = (name, str(path), stat.st_mtime_ns, stat.st_size)
    if stamp not in _PARSED:
        tree = ast.parse(path.read_text(), filename=str(path))
        _PARSED[stamp] = _parse_imports(name, path, root, tree), _tree_digest(tree)
    return _PARSED[stamp]


def _tree_digest(tree: ast.Module) -> str:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def _parse_imports(name: str, path: Path, root: Path, tree: ast.Module) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if module_file(child, root) else base)
    project = set()
    for module in found:
        parts = module.split(".")
        if parts[0] in PACKAGES:
            project.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in project if module_file(m, root) is not None}


def module_closure(names: Iterable[str], root: Path = ROOT) -> tuple[str, ...]:
    """`names` and every project module they import, transitively; sorted."""
    names = list(names)
    seen, todo = set(), [".".join(n.split(".")[:i]) for n in names for i in range(1, len(n.split(".")) + 1)]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(name, root) - seen)
    return tuple(sorted(seen))


def code_version(names: Iterable[str], root: Path = ROOT) -> str:
    """16 hex digits hashing the code (`code_digest`) of `names` and everything they import from the project.

    Each file is parsed once per (size, mtime): an edit between two plans in one process is seen."""
    digest = hashlib.sha256()
    for name in module_closure(names, root):
        digest.update(f"{name}\0{code_digest(name, root)}".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- input files by content

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_path(path: Path | str) -> str:
    """An input file's name in the digests: absolute, '..' folded, symbolic links kept, never resolved: the name
    says what the file is (an image's class folder), so a link moved to another class folder changes the keys."""
    return os.path.abspath(path)


def input_digests(paths: Iterable[Path], memo: Path | None = None) -> dict[str, str]:
    """{`input_path`: sha256} of the input files (a link: of the file it points to), hashing only those whose
    (size, mtime_ns) the memo file has not seen (the memo names files resolved, so links to one file share it).

    A missing file raises FileNotFoundError naming it, a folder ValueError naming it. memo (a JSON file) is
    rewritten atomically when it grows.
    """
    known = _read_memo(memo)
    digests, changed = {}, False
    for path in paths:
        name, target = input_path(path), str(Path(path).resolve())
        try:
            stat = os.stat(target)
        except FileNotFoundError:
            raise FileNotFoundError(f"input file not found: {name}"
                                    + (f" (a link to {target})" if target != name else "")) from None
        if os.path.isdir(target):
            raise ValueError(f"{name}: a folder, not a file; name the data file itself")
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = known.get(target)
        if entry is None or entry["stamp"] != stamp:
            known[target], changed = {"stamp": stamp, "sha256": file_sha256(Path(target))}, True
        digests[name] = known[target]["sha256"]
    if changed and memo is not None:
        _write_memo(memo, known)
    return digests


def _read_memo(memo: Path | None) -> dict:
    if memo is None:
        return {}
    try:
        return json.loads(Path(memo).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_memo(memo: Path, known: dict) -> None:
    try:
        write_atomic(Path(memo), lambda tmp: tmp.write_text(json.dumps(known)))
    except OSError:
        pass  # a read-only cache folder: digests are recomputed next time, keys stay right
