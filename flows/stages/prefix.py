"""prefix (text families): the frozen encoder's hidden states below the adapted layers, once per utterance."""
from __future__ import annotations

from pathlib import Path

from components.families import TaskFamily
from flows.cache import table_appender


def build_prefix(family: TaskFamily, out: Path) -> dict:
    """The family's `build_prefix(write)` tables (text families: hidden states, texts, sentence embeddings), each
    appended to its Parquet file as the family hands it over: the hidden states a chunk of utterances at a time."""
    with table_appender(out) as write:
        return family.build_prefix(write)
