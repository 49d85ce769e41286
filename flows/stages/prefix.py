"""prefix (text families): the frozen encoder's hidden states below the adapted layers, once per utterance."""
from __future__ import annotations

from pathlib import Path

from components.families.text import TextTasks
from flows.cache import write_tables


def build_prefix(family: TextTasks, out: Path) -> dict:
    tables, meta = family.build_prefix()
    write_tables(tables, out)
    return meta
