"""baselines: the family's baselines on the same meta-test episodes with the same test-time steps."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from components.evaluation import results_table, score_steps_every
from components.families import TaskFamily, Tables
from flows.cache import RESULTS, write_table


def run_baselines(family: TaskFamily, tables: Tables, steps: int, score_every: int, chunk: int, seed: int,
                  device: torch.device, out: Path) -> pd.DataFrame:
    data, scored = family.open(tables, device, ("meta_test",)), score_steps_every(steps, score_every)
    torch.manual_seed(seed)
    model = family.model(tables, seed).to(device)
    curves = family.baseline_curves(tables, data.test, model, steps, scored, chunk, seed)
    results = pd.concat([results_table(c, data.test_ids, m, family.metric, scored) for m, c in curves.items()],
                        ignore_index=True)
    write_table(results, out, RESULTS)
    return results
