"""baselines: the family's baselines on the same meta-test episodes with the same test-time steps.

Each baseline runs on its own: one that diverges gets a `diverged` row instead of scores, the others finish.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from components.evaluation import results_table, score_steps_every
from components.families import TaskFamily, Tables
from components.metalearners import Diverged
from flows.cache import DIVERGED, RESULTS, write_table


def run_baselines(family: TaskFamily, tables: Tables, steps: int, score_every: int, chunk: int, seed: int,
                  device: torch.device, out: Path) -> pd.DataFrame:
    data, scored = family.open(tables, device, ("meta_test",)), score_steps_every(steps, score_every)
    torch.manual_seed(seed)
    model = family.model(tables, seed).to(device)
    results, diverged = [], []
    for method, run in family.baseline_runs(tables, data.test, model, steps, scored, chunk, seed).items():
        try:
            results.append(results_table(run(), data.test_ids, method, family.metric, scored))
        except Diverged as e:
            diverged.append({"method": method, "stage": "baselines", **e.record()})
    results = pd.concat(results, ignore_index=True) if results else pd.DataFrame(
        columns=["episode", "method", "steps", "metric", "value"])
    write_table(results, out, RESULTS)
    write_table(pd.DataFrame(diverged), out, DIVERGED)
    return results
