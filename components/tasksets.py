"""Few-shot task families as tidy tables, and their conversion to tensor batches.

A task set is a long table with one row per point: ``task_id, split, role, point, x, y`` plus the
task's own parameters (``amplitude, phase`` for sinusoids). Roles are ``support`` (the K shots)
and ``query`` (held-out points of the same task).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from components.episodes import SPLITS, EpisodeBatch


@dataclass(frozen=True)
class SinusoidFamily:
    """y = A sin(x + phi), as in Finn et al. 2017, section 5.1."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    k_shot: int = 10  # support points per task
    n_query: int = 10  # query points per task, drawn from the same sine


TaskBatch = EpisodeBatch  # the sinusoid family's tasks: x, y (T, K, 1) points


def sample_sinusoid_tasks(family: SinusoidFamily, n_tasks: dict[str, int], seed: int) -> pd.DataFrame:
    """Sample disjoint task sets, one per split, from one seeded generator.

    n_tasks maps split -> number of tasks. Task ids are unique across splits.
    Returns the long table (sum(n_tasks) * (k_shot + n_query) rows).
    """
    rng = np.random.default_rng(seed)
    frames, next_id = [], 0
    for split in SPLITS:
        n = n_tasks.get(split, 0)
        amp = rng.uniform(*family.amplitude, size=n)
        phase = rng.uniform(*family.phase, size=n)
        n_pts = family.k_shot + family.n_query
        x = rng.uniform(*family.x_range, size=(n, n_pts))
        y = amp[:, None] * np.sin(x + phase[:, None])
        frames.append(pd.DataFrame({
            "task_id": np.repeat(np.arange(next_id, next_id + n), n_pts),
            "split": split,
            "role": np.tile(np.where(np.arange(n_pts) < family.k_shot, "support", "query"), n),
            "point": np.tile(np.arange(n_pts), n),
            "x": x.ravel(),
            "y": y.ravel(),
            "amplitude": np.repeat(amp, n_pts),
            "phase": np.repeat(phase, n_pts),
        }))
        next_id += n
    return pd.concat(frames, ignore_index=True)


def to_batch(tasks: pd.DataFrame, dtype: torch.dtype = torch.float32) -> TaskBatch:
    """Stack a regression task table into tensors, tasks in task_id order.

    Every task must have the same number of support and of query points.
    """
    tasks = tasks.sort_values(["task_id", "point"])
    n_tasks = tasks["task_id"].nunique()

    def stack(role: str, col: str) -> torch.Tensor:
        values = tasks.loc[tasks["role"] == role, col].to_numpy(dtype=np.float64)
        return torch.tensor(values.reshape(n_tasks, -1, 1), dtype=dtype)

    return TaskBatch(stack("support", "x"), stack("support", "y"), stack("query", "x"), stack("query", "y"))


def task_ids(tasks: pd.DataFrame) -> np.ndarray:
    """Task ids in the order `to_batch` stacks them."""
    return np.sort(tasks["task_id"].unique())
