"""Few-shot evaluation: query loss after 0..steps inner SGD steps, per task, as a tidy long table."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, vmap

from components.metalearners import Diverged, LossFn, MetaLearner, Params, adapt, rates_in_force
from components.tasksets import TaskBatch


def evaluate_init(learner: MetaLearner, tasks: TaskBatch, steps: int, chunk: int = 200,
                  score_fn: LossFn | None = None, score_steps: Sequence[int] | None = None) -> np.ndarray:
    """Query score (default: the loss) of every task after 0..steps inner steps from the meta-parameters.

    Uses the learner's inner rates (Meta-SGD: its learned ones). tasks holds T tasks; returns
    (steps + 1, T), row k = after k steps, row 0 = the meta-parameters themselves (only the rows of
    score_steps when given: scoring the query set is most of the cost for large models).
    A learner that is not `plain` adapts by its own rules: row 0 is each episode's start (Proto-MAML: the
    prototype head), steps past its training steps reuse the last step's rates and per-step weights, and
    one without an inner loop (prototypical networks) gives a flat curve.
    """
    if not learner.plain:
        return _learner_curve(learner, tasks, steps, chunk, score_fn, score_steps)
    init = {k: v.detach() for k, v in learner.params.items()}
    return evaluate_params(learner.model, init, learner.lrs, tasks, steps, learner.loss_fn, chunk, per_task=False,
                           score_fn=score_fn, score_steps=score_steps)


def evaluate_params(model: nn.Module, init: Params, lrs: Params, tasks: TaskBatch, steps: int, loss_fn: LossFn,
                    chunk: int = 200, per_task: bool = True, score_fn: LossFn | None = None,
                    score_steps: Sequence[int] | None = None, rate_name: str = "fast_lr") -> np.ndarray:
    """Query score after 0..steps SGD steps (theta - lrs * grad) on each task's support set.

    The inner steps descend loss_fn; the curve holds score_fn(prediction, y_qry) (default loss_fn),
    e.g. accuracy for classification.

    init: starting weights, {name: (T, *shape)} one per task if per_task else {name: shape} shared.
    lrs: {name: shape} inner rates, named rate_name (the setting that gave them) when adaptation diverges.
    Tasks are processed chunk at a time. Returns (steps + 1, T), or (len(score_steps), T) with the rows of the
    sorted score_steps (a subset of 0..steps). Raises Diverged (`_finite`): a non-finite score, or one that blew
    up.
    """
    score_steps = _checked_steps(steps, score_steps)
    parts = []
    for lo in range(0, len(tasks), chunk):
        part = {k: v[lo:lo + chunk] for k, v in init.items()} if per_task else init
        parts.append(_loss_curve(model, part, lrs, tasks.index(slice(lo, lo + chunk)), score_steps, loss_fn,
                                 per_task, score_fn or loss_fn))
    return _finite(np.concatenate(parts, axis=1), score_steps, lrs, rate_name)


def _checked_steps(steps: int, score_steps: Sequence[int] | None) -> list[int]:
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    score_steps = list(range(steps + 1)) if score_steps is None else sorted(set(score_steps))
    if not score_steps or score_steps[0] < 0 or score_steps[-1] > steps:
        raise ValueError(f"score_steps: need a non-empty subset of 0..{steps}, got {score_steps}")
    return score_steps


BLOW_UP = 1e6  # a query score this many times the scores' scale at the start (at least 1): adaptation diverged


def _finite(curve: np.ndarray, score_steps: list[int], lrs: Params, rate_name: str = "fast_lr") -> np.ndarray:
    """curve (len(score_steps), T), checked: raised here, a diverged adaptation never reaches a results table.

    Diverged: a non-finite score, or a finite blow-up: an episode's |score| at some step above BLOW_UP times
    max(1, the mean |score| over episodes at the first scored step), said with how many episodes did. Scores
    bounded by 1 (accuracy) can never pass it; a loss that adaptation multiplies a million-fold (an inner rate too
    large for the test-time steps) is no result, even on one episode of many: the method is unstable there."""
    if not np.isfinite(curve).all():
        row = int(np.flatnonzero(~np.isfinite(curve).all(1))[0])
        bad = int((~np.isfinite(curve[row])).sum())
        raise Diverged(f"the query score is non-finite on {bad} of {curve.shape[1]} episodes", step=score_steps[row],
                       rates=rates_in_force(lrs, rate_name))
    start = max(1.0, float(np.abs(curve[0]).mean()))
    if (blown := np.abs(curve) > BLOW_UP * start).any():
        row = int(np.flatnonzero(blown.any(1))[0])
        raise Diverged(f"the query score blew up on {int(blown.any(0).sum())} of {curve.shape[1]} episodes (up to "
                       f"{np.abs(curve).max():.3g}; over {BLOW_UP:g} times the mean |score| {start:.4g} at step "
                       f"{score_steps[0]})", step=score_steps[row], rates=rates_in_force(lrs, rate_name))
    return curve


def _learner_curve(learner: MetaLearner, tasks: TaskBatch, steps: int, chunk: int, score_fn: LossFn | None,
                   score_steps: Sequence[int] | None) -> np.ndarray:
    """evaluate_init through the learner's own adapt_batch, each chunk's steps taken once: (len(score_steps), T)."""
    score_steps, parts = _checked_steps(steps, score_steps), []
    with torch.no_grad():
        for lo in range(0, len(tasks), chunk):
            part, fast, done, curve = tasks.index(slice(lo, lo + chunk)), None, 0, []
            for k in score_steps:
                fast, done = learner.adapt_batch(part.x_spt, part.y_spt, k - done, fast, done), k
                curve.append(learner.evaluate_fast(fast, part.x_qry, part.y_qry, score_fn))
            parts.append(torch.stack(curve).cpu().double().numpy())
    return _finite(np.concatenate(parts, axis=1), score_steps, learner.lrs)


def score_steps_every(steps: int, every: int) -> list[int]:
    """0, every, 2 * every, ... and steps itself: the test-time steps at which the query set is scored."""
    if every < 1:
        raise ValueError(f"every: need >= 1, got {every}")
    return sorted(set(range(0, steps + 1, every)) | {steps})


def _loss_curve(model, init, lrs, batch: TaskBatch, score_steps, loss_fn, per_task, score_fn) -> np.ndarray:
    """(len(score_steps), T) for one chunk; each step continues from the previous step's fast weights."""
    lrs = {k: v.detach() for k, v in lrs.items()}

    def step(fast, x_spt, y_spt):
        return adapt(model, fast, lrs, x_spt, y_spt, loss_fn, steps=1, first_order=True)

    def query_loss(fast, x_qry, y_qry):
        return score_fn(functional_call(model, fast, (x_qry,)), y_qry)

    with torch.no_grad():  # torch.func.grad inside adapt still differentiates; no graph to init is kept
        fast, dim, curve = init, 0 if per_task else None, []
        for k in range(score_steps[-1] + 1):
            if k > 0:
                fast = vmap(step, in_dims=(dim, 0, 0))(fast, batch.x_spt, batch.y_spt)  # now per task: (T, *shape)
                dim = 0
            if k in score_steps:
                curve.append(vmap(query_loss, in_dims=(dim, 0, 0))(fast, batch.x_qry, batch.y_qry))
    return torch.stack(curve).cpu().double().numpy()  # (len(score_steps), T)


def results_table(losses: np.ndarray, task_ids, method: str, metric: str = "mse",
                  steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Tidy long table of a loss curve: losses (S, T), task_ids (T,) in the same task order, row s after
    steps[s] test-time steps (default: s steps).

    Columns episode (task id), method, steps, metric, value; S * T rows.
    """
    losses = np.asarray(losses, dtype=float)
    task_ids = np.asarray(task_ids)
    if losses.ndim != 2 or losses.shape[1] != task_ids.shape[0]:
        raise ValueError(f"losses: shape {losses.shape} does not match {task_ids.shape[0]} task_ids")
    n_steps, n_tasks = losses.shape
    steps = np.arange(n_steps) if steps is None else np.asarray(sorted(steps))
    if len(steps) != n_steps:
        raise ValueError(f"steps: {len(steps)} given for {n_steps} rows of losses")
    return pd.DataFrame({
        "episode": np.tile(task_ids, n_steps),
        "method": method,
        "steps": np.repeat(steps, n_tasks),
        "metric": metric,
        "value": losses.ravel(),
    })
