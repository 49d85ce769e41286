"""evaluate: every meta-trained unit's start, adapted on the same meta-test episodes, scored after 0..steps."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from components.evaluation import evaluate_init, results_table, score_steps_every
from components.families import TaskFamily, Tables
from components.metalearners import Diverged
from components.storage import load_tensors
from flows.cache import DIVERGED, RESULTS, STATE, write_table

COLUMNS = ["episode", "method", "steps", "metric", "value", "seed"]


def evaluate_unit(family: TaskFamily, tables: Tables, settings, train_entry: Path, steps: int, score_every: int,
                  chunk: int, method: str, device: torch.device, out: Path) -> pd.DataFrame:
    """Per-episode query score of one unit's meta-learned start (settings: its AlgorithmSettings; train_entry:
    its meta_train entry) after steps test-time steps, scored every score_every; columns COLUMNS.

    A unit that diverged, in meta-training or here, gets no scores: a `diverged` row says where and why."""
    seed = settings.train.seed
    diverged = pd.DataFrame()
    if (train_entry / f"{DIVERGED}.parquet").exists():
        diverged = pd.read_parquet(train_entry / f"{DIVERGED}.parquet")
        results = pd.DataFrame(columns=COLUMNS)
    else:
        data, scored = family.open(tables, device, ("meta_test",)), score_steps_every(steps, score_every)
        learner = family.learner(tables, settings.learner, device, seed, settings.zero_head)
        learner.load_state_dict(load_tensors(train_entry / STATE, device))
        try:
            scores = evaluate_init(learner, data.test, steps, chunk, family.score_fn, scored)
            results = results_table(scores, data.test_ids, method, family.metric, scored).assign(seed=seed)
        except Diverged as e:
            diverged, results = pd.DataFrame([{"stage": "evaluate", **e.record()}]), pd.DataFrame(columns=COLUMNS)
    write_table(results, out, RESULTS)
    write_table(diverged.assign(method=method, seed=seed) if len(diverged) else diverged, out, DIVERGED)
    return results
