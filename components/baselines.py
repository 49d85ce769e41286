"""Non-meta-learned baselines, scored by the same inner loop and steps as the meta-learners.

- scratch: a fresh random initialisation per task, then the test-time SGD steps.
- pretrain + finetune: one model trained jointly on every meta-train point, then the same SGD steps.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from components.evaluation import evaluate_params
from components.metalearners import LossFn, Params
from components.tasksets import TaskBatch



def scratch(model_factory: Callable[[], nn.Module], tasks: TaskBatch, steps: int, lr: float, seed: int,
            loss_fn: LossFn, chunk: int = 200, score_fn: LossFn | None = None,
            score_steps: Sequence[int] | None = None) -> np.ndarray:
    """Query loss after 0..steps SGD steps (rate lr) from a fresh torch-default init per task.

    The T inits come, in task order, from one global RNG stream seeded with seed (the caller's RNG
    state is restored afterwards). tasks holds T tasks; returns (steps + 1, T).
    """
    device = tasks.x_spt.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inits = [dict(model_factory().named_parameters()) for _ in range(len(tasks))]
        model = model_factory().to(device)  # only its structure is used: functional_call swaps the weights
    init = {k: torch.stack([p[k].detach() for p in inits]).to(device) for k in inits[0]}  # (T, *shape)
    return evaluate_params(model, init, _constant_lrs(model, lr), tasks, steps, loss_fn, chunk, score_fn=score_fn,
                           score_steps=score_steps, rate_name="baselines.scratch_lr")


def pretrain(model: nn.Module, train: TaskBatch, iterations: int, batch_size: int, lr: float, seed: int,
             loss_fn: LossFn) -> Params:
    """Train a copy of model with Adam on all meta-train points pooled (support + query of every task).

    Each iteration takes batch_size points without replacement from the T * (K + Q) pooled points,
    drawn from a generator seeded with seed. Returns {name: tensor} of the trained weights; the
    model passed in is left untouched.
    """
    model = copy.deepcopy(model)
    x, y = pooled_points(train)
    if batch_size > len(x):
        raise ValueError(f"batch_size: {batch_size} exceeds the {len(x)} pooled points")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        idx = torch.randperm(len(x), generator=g)[:batch_size].to(x.device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def finetune(model: nn.Module, params: Params, tasks: TaskBatch, steps: int, lr: float, loss_fn: LossFn,
             chunk: int = 200, score_fn: LossFn | None = None, adapted: Sequence[str] | None = None,
             score_steps: Sequence[int] | None = None, rate_name: str = "baselines.finetune_lr") -> np.ndarray:
    """Query loss after 0..steps SGD steps (rate lr) from shared weights params {name: shape}: (steps + 1, T).

    adapted: the weights the steps change (e.g. LoRA factors and head); default all of them. rate_name: the
    setting lr comes from, named when adaptation diverges.
    """
    lrs = _constant_lrs(model, lr)
    if adapted is not None:
        if unknown := sorted(set(adapted) - lrs.keys()):
            raise ValueError(f"adapted: {unknown[:5]} are not parameters of the model")
        lrs = {k: lrs[k] for k in adapted}
    params = {k: v.detach() for k, v in params.items()}
    return evaluate_params(model, params, lrs, tasks, steps, loss_fn, chunk, per_task=False, score_fn=score_fn,
                           score_steps=score_steps, rate_name=rate_name)


def pooled_points(tasks: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """All support and query points of all tasks: x (T * (K + Q), d_in), y (T * (K + Q), d_out)."""
    x = torch.cat([tasks.x_spt, tasks.x_qry], dim=1)
    y = torch.cat([tasks.y_spt, tasks.y_qry], dim=1)
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def _constant_lrs(model: nn.Module, lr: float) -> Params:
    return {k: torch.full_like(p, lr).detach() for k, p in model.named_parameters()}


def pretrain_classifier(model: nn.Module, images: torch.Tensor, iterations: int, batch_size: int, lr: float,
                        seed: int, loss_fn: LossFn, members: torch.Tensor | None = None) -> Params:
    """Train a copy of model (one output per class) with Adam on every image of a class pool.

    images (C, D, *shape): D drawings of each of C classes; label = class index. Each iteration
    takes batch_size random (class, drawing) pairs from a generator seeded with seed. Classes of
    unequal size: images (R, *shape) and members (C, M) int64 rows of each class, -1 padded
    (`episodes.class_members`); a pick is then a class, then one of its rows, both uniform. Returns the
    trained weights; the standard transfer baseline then swaps in a fresh N-way head.
    """
    model = copy.deepcopy(model)
    n_classes = len(images) if members is None else len(members)
    counts = None if members is None else (members >= 0).sum(1).double()  # (C,)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        c = torch.randint(n_classes, (batch_size,), generator=g)
        if members is None:
            x = images[c, torch.randint(images.shape[1], (batch_size,), generator=g)]
        else:  # float64: rand * count stays below count
            x = images[members[c, (torch.rand(batch_size, generator=g, dtype=torch.float64) * counts[c]).long()]]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), c.to(images.device)).backward()
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@dataclass(frozen=True)
class BaselineConfig:
    scratch_lr: float = 0.01  # test-time SGD rate from a fresh init
    finetune_lr: float = 0.01  # test-time SGD rate from the pretrained init (text: LoRA + head fine-tuning)
    pretrain_iterations: int = 2000  # Adam steps of the pooled pre-training
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 25
    head_lr: float = 0.5  # text: a linear head on the frozen sentence embedding, from zeros
