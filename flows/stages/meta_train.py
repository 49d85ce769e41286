"""meta_train: one (algorithm, seed) unit, resumable from its checkpoint; writes the kept state and history.

A unit that diverges (a non-finite loss or weight) writes no state: its entry records where and why
(`diverged` table, stop_reason "diverged"), and evaluation reports the method as diverged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from components.families import TaskFamily, Tables
from components.metalearners import Diverged
from components.training import checkpoint_iteration, meta_train
from flows.cache import DIVERGED, HISTORY, STATE, write_table


def resume_point(checkpoint: Path, iterations: int) -> tuple[Path, int, int]:
    """The checkpoint file a unit of `iterations` iterations goes on from (the trajectory's, or `upto-<iterations>.pt`
    beside it when the trajectory's is past them), the iteration it holds (0: none, training starts afresh) and the
    iteration the trajectory's own checkpoint holds. Each file is read once."""
    held = checkpoint_iteration(checkpoint)
    if held <= iterations:
        return checkpoint, held, held
    beside = checkpoint.with_name(f"upto-{iterations}.pt")
    return beside, checkpoint_iteration(beside), held


def resume_note(checkpoint: Path, iterations: int) -> str:
    """How a unit's training will start, for logs and dry runs: '' (afresh, no checkpoint), 'goes on from its
    checkpoint at iteration N', or 'from the start: its checkpoint at iteration N is past iterations M'."""
    _, at, held = resume_point(checkpoint, iterations)
    if at:
        return f"goes on from its checkpoint at iteration {at}"
    if held:
        return f"from the start: its checkpoint at iteration {held} is past iterations {iterations} (kept for the longer run)"
    return ""


def train_unit(family: TaskFamily, tables: Tables, settings, device: torch.device, out: Path, checkpoint: Path,
               log: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """settings: flows.families.AlgorithmSettings. The unit's seed (settings.train.seed) draws the
    initialisation and the meta-training episodes; the fixed meta-val episodes are the task sets'.
    Returns what the entry records: iterations, stop_reason, the state kept and why (or the divergence).

    A checkpoint past settings.train.iterations (a longer run of the same trajectory) is left alone: this
    run trains from the start beside it, in `upto-<iterations>.pt`.
    """
    data = family.open(tables, device, ("meta_train", "meta_val"), settings.train.meta_batch_size,
                       settings.train.seed)
    checkpoint, _, _ = resume_point(checkpoint, settings.train.iterations)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    learner = family.learner(tables, settings.learner, device, settings.train.seed, settings.zero_head)
    try:
        result = meta_train(learner, data.train, data.val, settings.train, checkpoint, log)
    except Diverged as e:
        write_table(pd.DataFrame([{"stage": "meta_train", **e.record()}]), out, DIVERGED)
        return {"stop_reason": "diverged", "diverged": str(e), "iterations_total": e.iteration, "iterations_run": 0,
                "best_iteration": -1}
    torch.save(result.state, out / STATE)
    write_table(result.history, out, HISTORY)
    return {"iterations_run": result.iterations_run, "iterations_total": result.iterations_total,
            "train_seconds_total": round(result.seconds_total, 3),
            "stop_reason": result.stop_reason, "best_iteration": result.best_iteration,
            "kept_state": f"iteration {result.best_iteration} of {result.iterations_total}: the lowest meta-val "
                          f"loss of the validated states (the last one included)"}
