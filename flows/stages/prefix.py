"""prefix (text families): the frozen encoder's hidden states below the adapted layers, once per utterance."""
from __future__ import annotations

from pathlib import Path

from components.families import TaskFamily
from flows.cache import write_tables


def build_prefix(family: TaskFamily, out: Path) -> dict:
    """The family's `build_prefix()` tables (text families: hidden states, texts, sentence embeddings)."""
    tables, meta = family.build_prefix()
    write_tables(tables, out)
    return meta
