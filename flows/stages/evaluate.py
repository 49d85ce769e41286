"""evaluate: every meta-trained unit's start, adapted on the same meta-test episodes, scored after 0..steps."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from components.evaluation import evaluate_init, results_table, score_steps_every
from components.families import TaskFamily, Tables
from components.storage import load_tensors
from flows.cache import RESULTS, write_table


def evaluate_unit(family: TaskFamily, tables: Tables, settings, state: Path, steps: int, score_every: int,
                  chunk: int, method: str, device: torch.device, out: Path) -> pd.DataFrame:
    """Per-episode query score of one unit's meta-learned start (settings: its AlgorithmSettings) after
    steps test-time steps, scored every score_every; columns as results_table plus seed."""
    data, scored = family.open(tables, device, ("meta_test",)), score_steps_every(steps, score_every)
    learner = family.learner(tables, settings.learner, device, settings.train.seed, settings.zero_head)
    learner.load_state_dict(load_tensors(state, device))
    scores = evaluate_init(learner, data.test, steps, chunk, family.score_fn, scored)
    results = results_table(scores, data.test_ids, method, family.metric, scored).assign(seed=settings.train.seed)
    write_table(results, out, RESULTS)
    return results
