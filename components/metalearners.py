"""MAML (second order), FOMAML, Reptile and Meta-SGD over an explicit parameter dict.

Every algorithm is the same object: meta-parameters (the initialisation theta and, for Meta-SGD,
one inner learning rate per weight) plus a `meta_backward` that writes the algorithm's
meta-gradient into `.grad`, so one `torch.optim` optimizer serves all four.
Tasks of a meta-batch are batched with `torch.func.vmap` (`vectorize=True`) or looped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from components.tasksets import TaskBatch

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")
METALEARNERS_VERSION = "1"

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MetaLearnerConfig:
    algorithm: str = "maml"
    inner_steps: int = 1  # inner SGD steps per task during meta-training
    fast_lr: float = 0.01  # inner learning rate (Meta-SGD: its starting value)
    lr_range: tuple[float, float] = (1e-4, 1.0)  # Meta-SGD keeps every rate inside this range
    vectorize: bool = True  # vmap over the tasks of a meta-batch instead of a Python loop

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: {self.algorithm!r} is not one of {ALGORITHMS}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"inner_steps: need an integer >= 0, got {self.inner_steps!r}")
        lo, hi = self.lr_range
        if not 0 < lo <= hi:
            raise ValueError(f"lr_range: need 0 < low <= high, got {self.lr_range!r}")
        if not lo <= self.fast_lr <= hi:
            raise ValueError(f"fast_lr: {self.fast_lr} is outside lr_range {self.lr_range!r}")


def adapt(model: nn.Module, params: Params, lrs: Params | float, x_spt, y_spt, loss_fn: LossFn,
          steps: int, first_order: bool = False) -> Params:
    """`steps` SGD steps on one task's support set: theta' = theta - lr * dL_spt/dtheta.

    lrs: one rate tensor per weight (Meta-SGD), or one float for all. Differentiable in params
    and lrs (second order) unless first_order, which treats the inner gradients as constants.
    Works under vmap; x_spt (K, d_in), y_spt (K, d_out).
    """
    def support_loss(p: Params) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x_spt,)), y_spt)

    for _ in range(steps):
        # first order: differentiate at detached weights, so no second-order graph is even built
        at = {k: p.detach() for k, p in params.items()} if first_order else params
        grads = grad(support_loss)(at)
        params = {k: _sgd_step(p, grads[k], lrs[k] if isinstance(lrs, dict) else lrs) for k, p in params.items()}
    return params


def _sgd_step(p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor | float) -> torch.Tensor:
    # a float rate folds into one op (add with alpha): about 4% faster second-order MAML under vmap
    return p - lr * g if isinstance(lr, torch.Tensor) else torch.add(p, g, alpha=-lr)


def _task(arg: torch.Tensor | Params, t: int) -> torch.Tensor | Params:
    """Task t's slice of a per-task tensor (T, ...) or dict of them."""
    return {k: v[t] for k, v in arg.items()} if isinstance(arg, dict) else arg[t]


def _stack(outs: list[torch.Tensor | Params]) -> torch.Tensor | Params:
    """Per-task results -> one (T, ...) tensor or dict of them, as vmap returns."""
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return torch.stack(outs)


class MetaLearner:
    """Meta-parameters of one algorithm and its meta-gradient on a batch of tasks."""

    def __init__(self, model: nn.Module, cfg: MetaLearnerConfig, loss_fn: LossFn):
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        self.params: Params = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
        self.lrs: Params = {k: torch.full_like(p, cfg.fast_lr, requires_grad=cfg.algorithm == "metasgd")
                            for k, p in self.params.items()}

    def parameters(self) -> list[torch.Tensor]:
        extra = list(self.lrs.values()) if self.cfg.algorithm == "metasgd" else []
        return list(self.params.values()) + extra

    def state_dict(self) -> dict[str, Params]:
        return {"params": {k: v.detach().clone() for k, v in self.params.items()},
                "lrs": {k: v.detach().clone() for k, v in self.lrs.items()}}

    def load_state_dict(self, state: dict[str, Params]) -> None:
        with torch.no_grad():
            for name, group in (("params", self.params), ("lrs", self.lrs)):
                for k, v in group.items():
                    v.copy_(state[name][k])

    def _per_task(self, fn, *args):
        """fn on every task's slice of args (each (T, ...) or a dict of them) -> stacked results (T, ...)."""
        if self.cfg.vectorize:
            return vmap(fn)(*args)
        return _stack([fn(*(_task(a, t) for a in args)) for t in range(len(args[-1]))])

    def _inner_lrs(self) -> Params | float:
        """Meta-SGD's learned rates, or the fixed fast_lr as a float (cheaper than a rate tensor)."""
        return self.lrs if self.cfg.algorithm == "metasgd" else float(self.cfg.fast_lr)

    def query_losses(self, batch: TaskBatch, steps: int, first_order: bool) -> torch.Tensor:
        """Post-adaptation query loss of every task (T,), differentiable in the meta-parameters."""
        lrs = self._inner_lrs()

        def task_loss(x_spt, y_spt, x_qry, y_qry):
            fast = adapt(self.model, self.params, lrs, x_spt, y_spt, self.loss_fn, steps, first_order)
            return self.loss_fn(functional_call(self.model, fast, (x_qry,)), y_qry)

        return self._per_task(task_loss, *batch)

    def meta_backward(self, batch: TaskBatch) -> float:
        """Write the meta-gradient into `.grad` of `parameters()`; return the mean query loss."""
        if self.cfg.algorithm == "reptile":
            return self._reptile_backward(batch)
        first_order = self.cfg.algorithm == "fomaml"
        loss = self.query_losses(batch, self.cfg.inner_steps, first_order).mean()
        grads = torch.autograd.grad(loss, self.parameters())
        for p, g in zip(self.parameters(), grads):
            p.grad = g
        return loss.item()

    def _reptile_backward(self, batch: TaskBatch) -> float:
        """Reptile: grad = theta - mean_t(phi_t), phi_t = theta after inner_steps on task t."""
        fast = self.adapt_batch(batch.x_spt, batch.y_spt, self.cfg.inner_steps)
        for k, p in self.params.items():
            p.grad = p.detach() - fast[k].mean(0)
        with torch.no_grad():
            losses = self.evaluate_fast(fast, batch.x_qry, batch.y_qry)
        return losses.mean().item()

    def adapt_batch(self, x_spt: torch.Tensor, y_spt: torch.Tensor, steps: int) -> Params:
        """Adapted parameters per task, without a graph to the meta-parameters: {name: (T, *shape)}."""
        params = {k: v.detach() for k, v in self.params.items()}
        lrs = self._inner_lrs()
        lrs = {k: v.detach() for k, v in lrs.items()} if isinstance(lrs, dict) else lrs

        def one(xs, ys):
            return adapt(self.model, params, lrs, xs, ys, self.loss_fn, steps, first_order=True)

        return self._per_task(one, x_spt, y_spt)

    def evaluate_fast(self, fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of each task's own adapted parameters on its points: fast {name: (T, ...)}, x (T, N, d) -> (T,)."""
        def one(f, xs, ys):
            return self.loss_fn(functional_call(self.model, f, (xs,)), ys)

        return self._per_task(one, fast, x, y)

    def clip_(self) -> None:
        """Keep Meta-SGD's learned rates positive and inside lr_range (call after each outer step)."""
        if self.cfg.algorithm == "metasgd":
            with torch.no_grad():
                for v in self.lrs.values():
                    v.clamp_(*self.cfg.lr_range)
