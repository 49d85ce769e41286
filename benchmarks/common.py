"""What every benchmark script shares: atomic result files (a crash never leaves half a JSON behind)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from components.storage import write_atomic


def write_json_atomic(obj: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
