"""meta_train: one (algorithm, seed) unit, resumable from its checkpoint; writes the kept state and history."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from components.families import TaskFamily, Tables
from components.training import TrainResult, checkpoint_iteration, meta_train
from flows.cache import HISTORY, STATE, write_table


def train_unit(family: TaskFamily, tables: Tables, settings, device: torch.device, out: Path, checkpoint: Path,
               log: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """settings: flows.families.AlgorithmSettings. The unit's seed (settings.train.seed) draws the
    initialisation and the meta-training episodes; the fixed meta-val episodes are the task sets'.

    A checkpoint past settings.train.iterations (a longer run of the same trajectory) is left alone: this
    run trains from the start beside it, in `upto-<iterations>.pt`.
    """
    data = family.open(tables, device, ("meta_train", "meta_val"), settings.train.meta_batch_size,
                       settings.train.seed)
    if checkpoint_iteration(checkpoint) > settings.train.iterations:
        checkpoint = checkpoint.with_name(f"upto-{settings.train.iterations}.pt")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    learner = family.learner(tables, settings.learner, device, settings.train.seed, settings.zero_head)
    result = meta_train(learner, data.train, data.val, settings.train, checkpoint, log)
    torch.save(result.state, out / STATE)
    write_table(result.history, out, HISTORY)
    return result
