"""task_sets: the family's tables, validated by Great Expectations before anything is cached."""
from __future__ import annotations

import json
from pathlib import Path

from components.families import TaskFamily
from flows.cache import VALIDATION, write_tables
from flows.validation import validate_family


def build_task_sets(family: TaskFamily, seed: int, out: Path) -> dict:
    """Build, validate (a failure raises ValidationFailed and caches nothing) and write the task sets."""
    tables = family.build(seed)
    report = validate_family(family, tables)
    (out / VALIDATION).write_text(json.dumps(report, default=str))
    write_tables(tables, out)
    return summary(tables)


def summary(tables) -> dict:
    """Counts for the log: classes per split (classification) or tasks per split (regression)."""
    if "classes" in tables:
        return {f"n_classes_{s}": int(n) for s, n in tables["classes"].groupby("split").size().items()}
    return {f"n_tasks_{s}": int(t["task_id"].nunique()) for s, t in tables.items()}
