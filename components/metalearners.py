"""MAML (second order), FOMAML, Reptile and Meta-SGD over an explicit parameter dict.

Every algorithm is the same object: meta-parameters (the initialisation theta and, for Meta-SGD,
one inner learning rate per adapted weight) plus a `meta_backward` that writes the algorithm's
meta-gradient into `.grad`, so one `torch.optim` optimizer serves all four.

Which weights the inner loop adapts is a choice (`adapted`): all of them (MAML), the head only
(ANIL), LoRA adapters plus head. The others are still meta-learned by the outer loop, or, when
`frozen`, held constant (a pretrained backbone).

Tasks of a meta-batch run in one of three ways: `torch.func.vmap` (`vectorize=True`), a Python
loop, or, with `task_batched=True`, inside the model itself: it takes x (T, B, ...) and weights
that are either shared (shape) or per task (T, *shape) (`components.conv4.Conv4` does), and plain
autograd differentiates the whole meta-batch at once, with no vmap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from components.tasksets import TaskBatch

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")

Params = dict[str, torch.Tensor]
Rates = dict[str, "torch.Tensor | float"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Diverged(ArithmeticError):
    """A loss, score or weight went non-finite: where (meta-training iteration or test-time step), what, and
    the learning rates in force. Raised where it arises, so nothing non-finite is kept as a result."""

    def __init__(self, what: str, *, iteration: int | None = None, step: int | None = None,
                 rates: dict[str, float] | None = None):
        self.what, self.iteration, self.step, self.rates = what, iteration, step, dict(rates or {})
        where = (f"at meta-training iteration {iteration}" if iteration is not None
                 else f"at test-time step {step}" if step is not None else "")
        rates_text = ", ".join(f"{k} {v:g}" for k, v in self.rates.items())
        super().__init__(" ".join(p for p in (what, where, f"({rates_text})" if rates_text else "") if p))

    def record(self) -> dict:
        """Plain fields for a table row or a cache entry's meta."""
        return {"reason": str(self), "iteration": self.iteration, "step": self.step,
                **{f"rate_{k}": v for k, v in self.rates.items()}}


def rates_in_force(lrs: "Rates") -> dict[str, float]:
    """The inner rates in force, for Diverged reports: {fast_lr} when one rate, else its min and max (Meta-SGD)."""
    values = torch.cat([torch.as_tensor(v, dtype=torch.float64).detach().flatten().cpu() for v in lrs.values()]) \
        if lrs else torch.zeros(0)
    if values.numel() == 0:
        return {}
    lo, hi = float(values.min()), float(values.max())
    return {"fast_lr": lo} if lo == hi else {"fast_lr_min": lo, "fast_lr_max": hi}


@dataclass(frozen=True)
class MetaLearnerConfig:
    algorithm: str = "maml"
    inner_steps: int = 1  # inner SGD steps per task during meta-training
    fast_lr: float = 0.01  # inner learning rate (Meta-SGD: its starting value)
    lr_range: tuple[float, float] = (1e-4, 1.0)  # Meta-SGD keeps every rate inside this range
    vectorize: bool = True  # vmap over the tasks of a meta-batch instead of a Python loop
    task_batched: bool = False  # the model runs all tasks at once (x (T, B, ...)); overrides vectorize
    task_chunk: int = 0  # tasks per autograd graph (bounds peak memory); 0 = the whole meta-batch at once
    query_chunk: int = 0  # task_batched: tasks per query graph within a task chunk; 0 = the task chunk

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: {self.algorithm!r} is not one of {ALGORITHMS}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"inner_steps: need an integer >= 0, got {self.inner_steps!r}")
        lo, hi = self.lr_range
        if not 0 < lo <= hi:
            raise ValueError(f"lr_range: need 0 < low <= high, got {self.lr_range!r}")
        if self.algorithm == "metasgd" and not lo <= self.fast_lr <= hi:  # the others never read the range
            raise ValueError(f"fast_lr: {self.fast_lr} is outside lr_range {self.lr_range!r}")
        for name in ("task_chunk", "query_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: need an integer >= 0, got {getattr(self, name)!r}")
        if self.query_chunk and not self.task_batched:
            raise ValueError("query_chunk: only task_batched learners split the query apart from the support")


def adapt(model: nn.Module, params: Params, lrs: Rates | float, x_spt, y_spt, loss_fn: LossFn,
          steps: int, first_order: bool = False) -> Params:
    """`steps` SGD steps on one task's support set: theta'_k = theta_k - lr_k * dL_spt/dtheta_k.

    lrs: {name: rate tensor or float} for the adapted weights only (the others pass through
    unchanged), or one float for all. Differentiable in params and lrs (second order, through
    the unadapted weights too) unless first_order, which treats the inner gradients as constants.
    Works under vmap; x_spt (K, d_in), y_spt (K, d_out).
    """
    names = list(lrs) if isinstance(lrs, dict) else list(params)

    def support_loss(fast: Params, rest: Params) -> torch.Tensor:
        return loss_fn(functional_call(model, {**rest, **fast}, (x_spt,)), y_spt)

    for _ in range(steps):
        # first order: differentiate at detached weights, so no second-order graph is even built
        at = {k: p.detach() for k, p in params.items()} if first_order else params
        grads = grad(support_loss)({k: at[k] for k in names}, at)
        params = {k: _sgd_step(p, grads[k], _rate(lrs, k)) if k in grads else p for k, p in params.items()}
    return params


def adapt_tasks(model: nn.Module, params: Params, lrs: Rates, x_spt, y_spt, loss_fn: LossFn,
                steps: int, first_order: bool = False) -> Params:
    """`adapt` for all T tasks at once through a task-batched model, with plain autograd.

    params: {name: shape} shared by every task or {name: (T, *shape)} per task; x_spt (T, K, ...),
    y_spt (T, K, ...). Returns the adapted weights (names in lrs) per task, (T, *shape), and the
    others unchanged. Each task's gradient is that of its own mean support loss: the tasks of the
    summed loss share no weights, since each adapted weight is expanded to one copy per task.
    """
    n_tasks, shapes = len(x_spt), {k: p.shape for k, p in model.named_parameters()}
    fast = {k: v.expand(n_tasks, *v.shape) if v.shape == shapes[k] else v for k, v in params.items() if k in lrs}
    rest = {k: v for k, v in params.items() if k not in lrs}
    for _ in range(steps):
        with torch.enable_grad():
            if first_order:
                at = {k: v.detach().requires_grad_() for k, v in fast.items()}
                fixed = {k: v.detach() for k, v in rest.items()}
            else:
                at, fixed = fast, rest
            loss = task_losses(loss_fn, functional_call(model, {**fixed, **at}, (x_spt,)), y_spt).sum()
            grads = torch.autograd.grad(loss, list(at.values()), create_graph=not first_order)
        fast = {k: _sgd_step(v, g, _rate(lrs, k)) for (k, v), g in zip(fast.items(), grads)}
    return {**rest, **fast}


def task_losses(loss_fn: LossFn, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each task's own loss: pred (T, B, ...), target (T, B, ...) -> (T,)."""
    return torch.stack([loss_fn(p, t) for p, t in zip(pred, target)])


def _rate(lrs: Rates | float, name: str) -> torch.Tensor | float:
    return lrs[name] if isinstance(lrs, dict) else lrs


def _sgd_step(p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor | float) -> torch.Tensor:
    # a float rate folds into one op (add with alpha): about 4% faster second-order MAML under vmap
    return p - lr * g if isinstance(lr, torch.Tensor) else torch.add(p, g, alpha=-lr)


def _slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most size (0 = all n) covering range(n)."""
    size = size or n
    return [slice(lo, lo + size) for lo in range(0, n, size)]


def _task(arg: torch.Tensor | Params, t: int | slice) -> torch.Tensor | Params:
    """Task t's slice (or a slice of tasks) of a per-task tensor (T, ...) or dict of them."""
    return {k: v[t] for k, v in arg.items()} if isinstance(arg, dict) else arg[t]


def _stack(outs: list[torch.Tensor | Params]) -> torch.Tensor | Params:
    """Per-task results -> one (T, ...) tensor or dict of them, as vmap returns."""
    if isinstance(outs[0], dict):
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    return torch.stack(outs)


class MetaLearner:
    """Meta-parameters of one algorithm and its meta-gradient on a batch of tasks.

    adapted: names the inner loop adapts (default: every meta-parameter); `lrs` holds one rate
    per adapted name only. frozen: names held constant (neither adapted nor meta-learned).
    zero_init: adapted names whose start is zero on every task and never meta-learned (the "zeroing
    trick" for a classification head, Kao et al. 2022: labels are permuted per episode, so a learned
    head start only carries the last episodes' label order; first-order methods suffer most).
    """

    def __init__(self, model: nn.Module, cfg: MetaLearnerConfig, loss_fn: LossFn,
                 adapted: Sequence[str] | None = None, frozen: Sequence[str] = (), zero_init: Sequence[str] = ()):
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        named = dict(model.named_parameters())
        _check_names("frozen", frozen, named)
        self.frozen: Params = {k: named[k].detach() for k in frozen}  # shared storage: a backbone is not copied
        self.params: Params = {k: p.detach().clone().requires_grad_() for k, p in named.items() if k not in self.frozen}
        adapted = tuple(self.params) if adapted is None else tuple(adapted)
        _check_names("adapted", adapted, self.params)
        self.lrs: Params = {k: torch.full_like(self.params[k], cfg.fast_lr, requires_grad=cfg.algorithm == "metasgd")
                            for k in adapted}
        self.n_adapted = sum(self.params[k].numel() for k in adapted)  # weights the inner loop changes
        if stray := sorted(set(zero_init) - set(self.lrs)):
            raise ValueError(f"zero_init: {stray[:5]} are not adapted by the inner loop (a zero start would stay zero)")
        self.zero_init = tuple(zero_init)
        with torch.no_grad():
            for k in self.zero_init:
                self.params[k].zero_()

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

    def _inner_lrs(self) -> Rates:
        """Meta-SGD's learned rates, or the fixed fast_lr as a float (cheaper than a rate tensor)."""
        if self.cfg.algorithm == "metasgd":
            return self.lrs
        return {k: float(self.cfg.fast_lr) for k in self.lrs}

    def _weights(self, params: Params) -> Params:
        return {**self.frozen, **params}

    def query_losses(self, batch: TaskBatch, steps: int, first_order: bool) -> torch.Tensor:
        """Post-adaptation query loss of every task (T,), differentiable in the meta-parameters."""
        lrs, weights = self._inner_lrs(), self._weights(self.params)
        if self.cfg.task_batched:
            x_spt, y_spt, x_qry, y_qry = batch
            fast = adapt_tasks(self.model, weights, lrs, x_spt, y_spt, self.loss_fn, steps, first_order)
            return task_losses(self.loss_fn, functional_call(self.model, fast, (x_qry,)), y_qry)

        def task_loss(x_spt, y_spt, x_qry, y_qry):
            fast = adapt(self.model, weights, lrs, x_spt, y_spt, self.loss_fn, steps, first_order)
            return self.loss_fn(functional_call(self.model, fast, (x_qry,)), y_qry)

        return self._per_task(task_loss, *batch)

    def meta_backward(self, batch: TaskBatch) -> float:
        """Write the meta-gradient into `.grad` of `parameters()`; return the mean query loss.

        Tasks are differentiated cfg.task_chunk at a time (task-batched: their query losses
        cfg.query_chunk at a time) and the gradients summed, so only one chunk's graph is alive.
        """
        if self.cfg.algorithm == "reptile":
            total = self._reptile_backward(batch)
        else:
            first_order = self.cfg.algorithm == "fomaml"
            if self.cfg.task_batched:
                grads, total = self._task_batched_grads(batch, first_order)
            else:
                grads, total = self._chunked_grads(batch, first_order)
            for p, g in zip(self.parameters(), grads):
                p.grad = g
        for k in self.zero_init:  # no gradient: the optimizer leaves them at zero
            self.params[k].grad = None
        return total

    def _chunked_grads(self, batch: TaskBatch, first_order: bool) -> tuple[list[torch.Tensor], float]:
        params, n_tasks = self.parameters(), len(batch[0])
        total, grads = 0.0, [torch.zeros_like(p) for p in params]
        for part in _slices(n_tasks, self.cfg.task_chunk):
            loss = self.query_losses(tuple(t[part] for t in batch), self.cfg.inner_steps, first_order).sum() / n_tasks
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc.add_(g)
            total += loss.item()
        return grads, total

    def _task_batched_grads(self, batch: TaskBatch, first_order: bool) -> tuple[list[torch.Tensor], float]:
        """Per task chunk: adapt its tasks in one graph; differentiate their query losses query_chunk tasks
        at a time, only up to the adapted weights (v = dL/dfast, (T, *shape)); then push v through the
        adaptation graph once. The unadapted weights' direct gradient (the query uses them as they are)
        is added on.

        The support graph is small, so a big task chunk runs it as a few large batched ops, while the
        large query graphs stay query_chunk tasks at a time.
        """
        n_tasks, params = len(batch[0]), self.parameters()
        total, grads = 0.0, [torch.zeros_like(p) for p in params]
        for part in _slices(n_tasks, self.cfg.task_chunk):
            part_grads, loss = self._adapt_then_query(tuple(t[part] for t in batch), n_tasks, first_order)
            for acc, g in zip(grads, part_grads):
                acc.add_(g)
            total += loss
        return grads, total

    def _adapt_then_query(self, batch: TaskBatch, n_total: int, first_order: bool) -> tuple[list[torch.Tensor], float]:
        x_spt, y_spt, x_qry, y_qry = batch
        n_tasks, params = len(x_spt), self.parameters()
        fast = adapt_tasks(self.model, self._weights(self.params), self._inner_lrs(), x_spt, y_spt, self.loss_fn,
                           self.cfg.inner_steps, first_order)
        adapted, direct = list(self.lrs), [k for k in self.params if k not in self.lrs]
        v = {k: torch.empty_like(fast[k]) for k in adapted}
        direct_grads, total = {k: torch.zeros_like(self.params[k]) for k in direct}, 0.0
        for part in _slices(n_tasks, self.cfg.query_chunk):
            leaves = {k: fast[k][part].detach().requires_grad_() for k in adapted}
            pred = functional_call(self.model, {**self._weights(self.params), **leaves}, (x_qry[part],))
            loss = task_losses(self.loss_fn, pred, y_qry[part]).sum() / n_total
            grads = torch.autograd.grad(loss, [*leaves.values(), *(self.params[k] for k in direct)])
            for k, g in zip(adapted, grads):
                v[k][part] = g
            for k, g in zip(direct, grads[len(adapted):]):
                direct_grads[k].add_(g)
            total += loss.item()
        through = torch.autograd.grad([fast[k] for k in adapted], params, [v[k] for k in adapted], allow_unused=True)
        extra = [direct_grads.get(k) for k in self.params] + [None] * (len(params) - len(self.params))
        return [_sum_grads(p, a, b) for p, a, b in zip(params, through, extra)], total

    def _reptile_backward(self, batch: TaskBatch) -> float:
        """Reptile: grad = theta - mean_t(phi_t), phi_t = theta after inner_steps on task t (0 where not adapted)."""
        fast = self.adapt_batch(batch.x_spt, batch.y_spt, self.cfg.inner_steps)
        for k, p in self.params.items():
            p.grad = p.detach() - fast[k].mean(0)
        with torch.no_grad():
            losses = self.evaluate_fast(fast, batch.x_qry, batch.y_qry)
        return losses.mean().item()

    def adapt_batch(self, x_spt: torch.Tensor, y_spt: torch.Tensor, steps: int) -> Params:
        """Adapted parameters per task, without a graph to the meta-parameters: {name: (T, *shape)}.

        Every meta-parameter is returned, the unadapted ones repeated per task (frozen ones are not).
        """
        params = {k: v.detach() for k, v in self.params.items()}
        lrs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self._inner_lrs().items()}
        if self.cfg.task_batched:
            parts = [adapt_tasks(self.model, {**self.frozen, **params}, lrs, x_spt[part], y_spt[part], self.loss_fn,
                                 steps, True) for part in _slices(len(x_spt), self.cfg.task_chunk)]
            return {k: torch.cat([f[k] for f in parts]) if k in lrs else v.expand(len(x_spt), *v.shape)
                    for k, v in params.items()}

        def one(xs, ys):
            return adapt(self.model, self._weights(params), lrs, xs, ys, self.loss_fn, steps, first_order=True)

        return {k: v for k, v in self._per_task(one, x_spt, y_spt).items() if k in params}

    def evaluate_fast(self, fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of each task's own adapted parameters on its points: fast {name: (T, ...)}, x (T, N, d) -> (T,)."""
        if self.cfg.task_batched:
            return torch.cat([task_losses(self.loss_fn, functional_call(self.model, self._weights(_task(fast, part)),
                                                                        (x[part],)), y[part])
                              for part in _slices(len(x), self.cfg.query_chunk or self.cfg.task_chunk)])

        def one(f, xs, ys):
            return self.loss_fn(functional_call(self.model, self._weights(f), (xs,)), ys)

        return self._per_task(one, fast, x, y)

    def clip_(self) -> None:
        """Keep Meta-SGD's learned rates positive and inside lr_range (call after each outer step)."""
        if self.cfg.algorithm == "metasgd":
            with torch.no_grad():
                for v in self.lrs.values():
                    v.clamp_(*self.cfg.lr_range)


def _sum_grads(p: torch.Tensor, *grads: torch.Tensor | None) -> torch.Tensor:
    present = [g for g in grads if g is not None]
    return torch.stack(present).sum(0) if len(present) > 1 else present[0] if present else torch.zeros_like(p)


def _check_names(field: str, names: Sequence[str], known: dict) -> None:
    if unknown := sorted(set(names) - set(known)):
        raise ValueError(f"{field}: {unknown[:5]} are not meta-parameters of the model (frozen ones cannot be adapted)")
