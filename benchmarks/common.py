"""What every benchmark script shares: atomic result files (a crash never leaves half a JSON behind), the git
state a result records."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from components.storage import write_atomic


def write_json_atomic(obj: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def git_state() -> dict | None:
    """{"commit", "dirty"} of this checkout (the README's provenance line), None outside a git checkout."""
    from flows.tracking import code_commit

    found = code_commit()
    return {"commit": found[0], "dirty": found[1]} if found else None
