"""Few-shot evaluation: query loss after 0..steps inner SGD steps, per task, as a tidy long table."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, vmap

from components.metalearners import LossFn, MetaLearner, Params, adapt
from components.tasksets import TaskBatch

EVALUATION_VERSION = "1"


def evaluate_init(learner: MetaLearner, tasks: TaskBatch, steps: int, chunk: int = 200,
                  score_fn: LossFn | None = None) -> np.ndarray:
    """Query score (default: the loss) of every task after 0..steps inner steps from the meta-parameters.

    Uses the learner's inner rates (Meta-SGD: its learned ones). tasks holds T tasks; returns
    (steps + 1, T), row k = after k steps, row 0 = the meta-parameters themselves.
    """
    init = {k: v.detach() for k, v in learner.params.items()}
    return evaluate_params(learner.model, init, learner.lrs, tasks, steps, learner.loss_fn, chunk, per_task=False,
                           score_fn=score_fn)


def evaluate_params(model: nn.Module, init: Params, lrs: Params, tasks: TaskBatch, steps: int, loss_fn: LossFn,
                    chunk: int = 200, per_task: bool = True, score_fn: LossFn | None = None) -> np.ndarray:
    """Query score after 0..steps SGD steps (theta - lrs * grad) on each task's support set.

    The inner steps descend loss_fn; the curve holds score_fn(prediction, y_qry) (default loss_fn),
    e.g. accuracy for classification.

    init: starting weights, {name: (T, *shape)} one per task if per_task else {name: shape} shared.
    lrs: {name: shape} inner rates. Tasks are processed chunk at a time. Returns (steps + 1, T).
    """
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    parts = []
    for lo in range(0, len(tasks), chunk):
        part = {k: v[lo:lo + chunk] for k, v in init.items()} if per_task else init
        parts.append(_loss_curve(model, part, lrs, tasks.index(slice(lo, lo + chunk)), steps, loss_fn, per_task,
                                 score_fn or loss_fn))
    return np.concatenate(parts, axis=1)


def _loss_curve(model, init, lrs, batch: TaskBatch, steps, loss_fn, per_task, score_fn) -> np.ndarray:
    """(steps + 1, T) for one chunk; each step continues from the previous step's fast weights."""
    lrs = {k: v.detach() for k, v in lrs.items()}

    def step(fast, x_spt, y_spt):
        return adapt(model, fast, lrs, x_spt, y_spt, loss_fn, steps=1, first_order=True)

    def query_loss(fast, x_qry, y_qry):
        return score_fn(functional_call(model, fast, (x_qry,)), y_qry)

    with torch.no_grad():  # torch.func.grad inside adapt still differentiates; no graph to init is kept
        fast, dim = init, 0 if per_task else None
        curve = [vmap(query_loss, in_dims=(dim, 0, 0))(fast, batch.x_qry, batch.y_qry)]
        for _ in range(steps):
            fast = vmap(step, in_dims=(dim, 0, 0))(fast, batch.x_spt, batch.y_spt)  # now per task: (T, *shape)
            dim = 0
            curve.append(vmap(query_loss)(fast, batch.x_qry, batch.y_qry))
    return torch.stack(curve).cpu().double().numpy()  # (steps + 1, T)


def results_table(losses: np.ndarray, task_ids, method: str, metric: str = "mse") -> pd.DataFrame:
    """Tidy long table of a loss curve: losses (steps + 1, T), task_ids (T,) in the same task order.

    Columns episode (task id), method, steps, metric, value; (steps + 1) * T rows.
    """
    losses = np.asarray(losses, dtype=float)
    task_ids = np.asarray(task_ids)
    if losses.ndim != 2 or losses.shape[1] != task_ids.shape[0]:
        raise ValueError(f"losses: shape {losses.shape} does not match {task_ids.shape[0]} task_ids")
    n_steps, n_tasks = losses.shape
    return pd.DataFrame({
        "episode": np.tile(task_ids, n_steps),
        "method": method,
        "steps": np.repeat(np.arange(n_steps), n_tasks),
        "metric": metric,
        "value": losses.ravel(),
    })
