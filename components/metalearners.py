"""Meta-learning algorithms over an explicit parameter dict, each one row of a table of variants (`VARIANTS`).

Every algorithm is the same object: meta-parameters (the initialisation theta and, for Meta-SGD or LSLR,
learned inner learning rates) plus a `meta_backward` that writes the algorithm's meta-gradient into
`.grad`, so one `torch.optim` optimizer serves them all.

Which weights the inner loop adapts is a choice (`adapted`): all of them (MAML), the head only
(ANIL), LoRA adapters plus head. The others are still meta-learned by the outer loop, or, when
`frozen`, held constant (a pretrained backbone).

Tasks of a meta-batch run in one of three ways: `torch.func.vmap` (`vectorize=True`), a Python
loop, or, with `task_batched=True`, inside the model itself: it takes x (T, B, ...) and weights
that are either shared (shape) or per task (T, *shape) (`components.conv4.Conv4` and `components.models.MLP`
do), and plain autograd differentiates the whole meta-batch at once, with no vmap.

Classification variants that start the head from the support prototypes (Proto-MAML, prototypical
networks) need the head's input: the model's `features(x)` (its forward is `head(features(x))`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from components.tasksets import TaskBatch

Params = dict[str, torch.Tensor]
Rates = dict[str, "torch.Tensor | float"]
StepRates = Rates | float | list[Rates]  # a list: one Rates per inner step (LSLR)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """An algorithm as flags: what the inner loop adapts, from where, and which meta-gradient the outer loop takes."""

    first_order: bool = False  # inner gradients are constants (no second-order graph is built)
    learn_rates: bool = False  # Meta-SGD: one learned inner rate per adapted weight
    update: str = "query"  # "query": gradient of the post-adaptation query loss; "reptile": theta - mean(phi)
    inner: str = "adapted"  # the inner loop adapts: "adapted" (the family's set), "head" (ANIL), "none" (no inner loop)
    head_init: str = "learned"  # "learned": a meta-learned head start; "prototypes": each episode's support prototypes

    @property
    def needs_head(self) -> bool:
        """The learner must be told the classification head's names."""
        return self.inner == "head" or self.head_init == "prototypes"

    @property
    def inner_loop(self) -> bool:
        """A differentiated inner loop (what the MAML++ options act on)."""
        return self.inner != "none" and self.update == "query"


VARIANTS = {
    "maml": Variant(),
    "fomaml": Variant(first_order=True),
    "reptile": Variant(first_order=True, update="reptile"),
    "metasgd": Variant(learn_rates=True),
    # ANIL (Raghu et al., ICLR 2020); "anil" alone names the adapted-set choice `model.adapted: head` of the others
    "anil_maml": Variant(inner="head"),
    # Proto-MAML (Triantafillou et al., ICLR 2020): gradients reach the body through the prototypes
    "protomaml": Variant(head_init="prototypes"),
    "foprotomaml": Variant(first_order=True, head_init="prototypes"),
    # prototypical networks (Snell et al. 2017): the prototype head alone; see `prototype_head` for the distance
    "protonet": Variant(inner="none", head_init="prototypes"),
}
# the algorithms that run on any model; the others need a classification head
ALGORITHMS = tuple(k for k, v in VARIANTS.items() if not v.needs_head)
MAML_PP = ("lslr", "msl_iterations", "per_step_bn", "first_order_iterations")  # MAML++ options of MetaLearnerConfig


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


def rates_in_force(lrs: "Rates", name: str = "fast_lr") -> dict[str, float]:
    """The inner rates in force, for Diverged reports: {name: rate} when one rate, else their min and max
    (Meta-SGD); name: the setting that gave them (a baseline's, e.g. baselines.scratch_lr)."""
    values = torch.cat([torch.as_tensor(v, dtype=torch.float64).detach().flatten().cpu() for v in lrs.values()]) \
        if lrs else torch.zeros(0)
    if values.numel() == 0:
        return {}
    lo, hi = float(values.min()), float(values.max())
    return {name: lo} if lo == hi else {f"{name}_min": lo, f"{name}_max": hi}


@dataclass(frozen=True)
class MetaLearnerConfig:
    algorithm: str = "maml"  # a key of VARIANTS
    inner_steps: int = 1  # inner SGD steps per task during meta-training
    fast_lr: float = 0.01  # inner learning rate (Meta-SGD, LSLR: its starting value)
    lr_range: tuple[float, float] = (1e-4, 1.0)  # Meta-SGD keeps every rate inside this range
    vectorize: bool = True  # vmap over the tasks of a meta-batch instead of a Python loop
    task_batched: bool = False  # the model runs all tasks at once (x (T, B, ...)); overrides vectorize
    task_chunk: int = 0  # tasks per autograd graph (bounds peak memory); 0 = the whole meta-batch at once
    query_chunk: int = 0  # task_batched: tasks per query graph within a task chunk; 0 = the task chunk
    # MAML++ (Antoniou et al., ICLR 2019), each on its own so its effect can be measured:
    lslr: bool = False  # learned per-layer per-step inner rates: one per adapted tensor and inner step
    msl_iterations: int = 0  # multi-step loss: query loss after every step, annealed to the last over N iterations
    per_step_bn: bool = False  # batch-norm weights and biases per inner step, meta-learned, not adapted
    first_order_iterations: int = 0  # first order for meta-iterations 1..N, then second order

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.algorithm]

    def __post_init__(self):
        if self.algorithm not in VARIANTS:
            raise ValueError(f"algorithm: {self.algorithm!r} is not one of {tuple(VARIANTS)}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"inner_steps: need an integer >= 0, got {self.inner_steps!r}")
        lo, hi = self.lr_range
        if not 0 < lo <= hi:
            raise ValueError(f"lr_range: need 0 < low <= high, got {self.lr_range!r}")
        if self.variant.learn_rates and not lo <= self.fast_lr <= hi:  # the others never read the range
            raise ValueError(f"fast_lr: {self.fast_lr} is outside lr_range {self.lr_range!r}")
        for name in ("task_chunk", "query_chunk", "msl_iterations", "first_order_iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: need an integer >= 0, got {getattr(self, name)!r}")
        if self.query_chunk and not self.task_batched:
            raise ValueError("query_chunk: only task_batched learners split the query apart from the support")
        self._check_maml_pp()

    def _check_maml_pp(self) -> None:
        v, on = self.variant, [name for name in MAML_PP if getattr(self, name)]
        if on and not v.inner_loop:
            why = "has no inner loop" if v.inner == "none" else "does not differentiate its inner loop"
            raise ValueError(f"{on[0]}: a MAML++ option, and {self.algorithm} {why}")
        if self.lslr and v.learn_rates:
            raise ValueError(f"lslr: {self.algorithm} already learns one inner rate per weight")
        if self.first_order_iterations and v.first_order:
            raise ValueError(f"first_order_iterations: {self.algorithm} is first order throughout")
        if self.msl_iterations and self.inner_steps < 2:
            raise ValueError(f"msl_iterations: a multi-step loss needs inner_steps >= 2, got {self.inner_steps}")
        if (self.lslr or self.per_step_bn) and self.inner_steps < 1:
            raise ValueError(f"{'lslr' if self.lslr else 'per_step_bn'}: needs inner_steps >= 1")


def multi_step_weights(steps: int, done: int, anneal: int) -> list[float]:
    """MAML++'s multi-step loss weights of the query losses after inner steps 1..steps, after `done` meta-iterations.

    They start uniform (1 / steps) and move linearly towards the last step, which holds all the weight once
    `done` reaches `anneal`; the others keep at least 0.03 / steps until then (Antoniou et al. 2019, code:
    `get_per_step_loss_importance_vector`, with iterations for epochs). They sum to 1.
    """
    if done >= anneal:
        return [0.0] * (steps - 1) + [1.0]
    decay, floor = done / (steps * anneal), 0.03 / steps
    last = min(1 / steps + (steps - 1) * decay, 1 - (steps - 1) * floor)
    return [max(1 / steps - decay, floor)] * (steps - 1) + [last]


def prototype_head(h: torch.Tensor, y: torch.Tensor, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head whose logits rank classes by squared distance to the support prototypes (class means c).

    h (..., K, d) support features, y (..., K) labels in 0..n_way-1 -> weight (..., n_way, d) = 2 c and bias
    (..., n_way) = -||c||^2. Then x @ weight.T + bias = -||x - c||^2 + ||x||^2: the prototypical network's
    logits up to a per-example constant, so the same softmax, loss and argmax (Snell et al. 2017), and
    Proto-MAML's head start (Triantafillou et al. 2020). Every class needs a support example.
    """
    onehot = (y[..., None] == torch.arange(n_way, device=y.device)).to(h.dtype)  # (..., K, N); one_hot has no vmap rule
    protos = onehot.mT @ h / onehot.sum(-2)[..., None]  # (..., N, d)
    return 2 * protos, -protos.square().sum(-1)


def adapt(model: nn.Module, params: Params, lrs: StepRates, x_spt, y_spt, loss_fn: LossFn,
          steps: int, first_order: bool = False, per_step: Params | None = None, start: int = 0) -> Params:
    """`steps` SGD steps on one task's support set: theta'_k = theta_k - lr_k * dL_spt/dtheta_k.

    lrs: {name: rate tensor or float} for the adapted weights only (the others pass through
    unchanged), or one float for all, or a list of such dicts, one per inner step (LSLR; step s uses
    lrs[min(s, len - 1)]). Differentiable in params and lrs (second order, through the unadapted
    weights too) unless first_order, which treats the inner gradients as constants.
    per_step: {name: (S, *shape)} weights with one value per step (MAML++'s per-step batch norm): the network
    after s steps runs with row min(s, S - 1). start: the steps already taken (the first step here is step start).
    Works under vmap; x_spt (K, d_in), y_spt (K, d_out).
    """
    names = _names(lrs, params)
    if not names:
        return params

    def support_loss(fast: Params, rest: Params) -> torch.Tensor:
        return loss_fn(functional_call(model, {**rest, **fast}, (x_spt,)), y_spt)

    for s in range(start, start + steps):
        # first order: differentiate at detached weights, so no second-order graph is even built
        at = {k: p.detach() for k, p in params.items()} if first_order else params
        rest = {**at, **_row(per_step, s, first_order)} if per_step else at
        grads = grad(support_loss)({k: at[k] for k in names}, rest)
        rates = _step_rates(lrs, s)
        params = {k: _sgd_step(p, grads[k], _rate(rates, k)) if k in grads else p for k, p in params.items()}
    return params


def adapt_tasks(model: nn.Module, params: Params, lrs: StepRates, x_spt, y_spt, loss_fn: LossFn,
                steps: int, first_order: bool = False, per_step: Params | None = None, start: int = 0) -> Params:
    """`adapt` for all T tasks at once through a task-batched model, with plain autograd.

    params: {name: shape} shared by every task or {name: (T, *shape)} per task; x_spt (T, K, ...),
    y_spt (T, K, ...). Returns the adapted weights (names in lrs) per task, (T, *shape), and the
    others unchanged. Each task's gradient is that of its own mean support loss: the tasks of the
    summed loss share no weights, since each adapted weight is expanded to one copy per task.
    lrs, per_step, start: as in `adapt`.
    """
    names = _names(lrs, params)
    if not names:
        return params
    n_tasks, shapes = len(x_spt), {k: p.shape for k, p in model.named_parameters()}
    fast = {k: v.expand(n_tasks, *v.shape) if v.shape == shapes[k] else v for k, v in params.items() if k in names}
    rest = {k: v for k, v in params.items() if k not in names}
    for s in range(start, start + steps):
        with torch.enable_grad():
            if first_order:
                at = {k: v.detach().requires_grad_() for k, v in fast.items()}
                fixed = {k: v.detach() for k, v in rest.items()}
            else:
                at, fixed = fast, rest
            if per_step:
                fixed = {**fixed, **_row(per_step, s, first_order)}
            loss = task_losses(loss_fn, functional_call(model, {**fixed, **at}, (x_spt,)), y_spt).sum()
            grads = torch.autograd.grad(loss, list(at.values()), create_graph=not first_order)
        rates = _step_rates(lrs, s)
        fast = {k: _sgd_step(v, g, _rate(rates, k)) for (k, v), g in zip(fast.items(), grads)}
    return {**rest, **fast}


def task_losses(loss_fn: LossFn, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each task's own loss: pred (T, B, ...), target (T, B, ...) -> (T,).

    F.mse_loss and F.cross_entropy (class-index or probability targets) run once over all tasks (reduction
    "none", then a mean per task); any other loss_fn (a partial with options too) is called once per task.
    Equal to the per-task calls up to float rounding (summation order).
    """
    if loss_fn is F.mse_loss and pred.dim() >= 2 and pred.shape == target.shape:
        return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
    if loss_fn is F.cross_entropy and pred.dim() >= 3:  # a task's pred is a batch (B, C, ...), not one example
        return _cross_entropy_task_losses(pred, target)
    return torch.stack([loss_fn(p, t) for p, t in zip(pred, target)])


def _cross_entropy_task_losses(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """pred (T, B, C, ...) logits, target (T, B, ...) class indices or (T, B, C, ...) probabilities -> (T,)."""
    losses = F.cross_entropy(pred.flatten(0, 1), target.flatten(0, 1), reduction="none").unflatten(0, pred.shape[:2])
    if target.is_floating_point():
        return losses.flatten(1).mean(1)
    # class indices: the mean reduction averages over the targets that are not ignore_index
    return losses.flatten(1).sum(1) / (target != ignore_index).flatten(1).sum(1)


def _names(lrs: StepRates, params: Params) -> list[str]:
    first = lrs[0] if isinstance(lrs, list) else lrs
    return list(first) if isinstance(first, dict) else list(params)


def _step_rates(lrs: StepRates, step: int) -> Rates | float:
    return lrs[min(step, len(lrs) - 1)] if isinstance(lrs, list) else lrs


def _row(per_step: Params | None, step: int, detach: bool = False) -> Params:
    """Each per-step weight's value at inner step `step` (the last row past the end): {name: shape}."""
    return {k: (v.detach() if detach else v)[min(step, len(v) - 1)] for k, v in (per_step or {}).items()}


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


def _weighted(terms: list[tuple[float | None, torch.Tensor]]) -> torch.Tensor:
    """sum(w * loss) over (w, loss); a lone (None, loss) is the loss itself (no multiply: bit-identical)."""
    if len(terms) == 1 and terms[0][0] is None:
        return terms[0][1]
    return sum(w * loss for w, loss in terms)


class _Features(nn.Module):
    """model.features as a forward, so functional_call (which calls forward only) can swap weights into it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


class MetaLearner:
    """Meta-parameters of one algorithm and its meta-gradient on a batch of tasks.

    adapted: names the inner loop adapts (default: every meta-parameter); `lrs` holds one rate
    per adapted name only. frozen: names held constant (neither adapted nor meta-learned).
    zero_init: adapted names whose start is zero on every task and never meta-learned (the "zeroing
    trick" for a classification head, Kao et al. 2022: labels are permuted per episode, so a learned
    head start only carries the last episodes' label order; first-order methods suffer most).
    head: the classification head's names, a (n_way, d) weight and a (n_way,) bias; the variants that
    adapt only it (ANIL) or start it from prototypes (Proto-MAML, prototypical networks) need them. A
    prototype-started head is not a meta-parameter: it is left out of `parameters()`. It is an inner-loop
    variable of its own (the inner gradients hold it fixed, as Triantafillou et al.'s code does), while the
    meta-gradient reaches the body through the prototypes.
    per_step: names given one value per inner step (cfg.per_step_bn: the batch-norm weights), (inner_steps + 1,
    *shape) in `per_step`: the network after s inner steps runs with row min(s, inner_steps); never adapted.
    """

    def __init__(self, model: nn.Module, cfg: MetaLearnerConfig, loss_fn: LossFn,
                 adapted: Sequence[str] | None = None, frozen: Sequence[str] = (), zero_init: Sequence[str] = (),
                 head: Sequence[str] = (), per_step: Sequence[str] = ()):
        self.model, self.cfg, self.loss_fn, self.variant = model, cfg, loss_fn, cfg.variant
        named = dict(model.named_parameters())
        _check_names("frozen", frozen, named)
        self.frozen: Params = {k: named[k].detach() for k in frozen}  # shared storage: a backbone is not copied
        self.params: Params = {k: p.detach().clone().requires_grad_() for k, p in named.items() if k not in self.frozen}
        self.head = self._check_head(head)
        self.per_step = self._split_per_step(per_step)
        adapted = self._adapted(adapted)
        _check_names("adapted", adapted, self.params)
        if cfg.lslr:
            self.lrs: Params = {k: torch.full((cfg.inner_steps,), cfg.fast_lr, dtype=self.params[k].dtype,
                                              device=self.params[k].device, requires_grad=True) for k in adapted}
        else:
            self.lrs = {k: torch.full_like(self.params[k], cfg.fast_lr, requires_grad=self.variant.learn_rates)
                        for k in adapted}
        self.n_adapted = sum(self.params[k].numel() for k in adapted)  # weights the inner loop changes
        self.replaced = self.head if self.variant.head_init == "prototypes" else ()  # started per episode
        if stray := sorted(set(zero_init) - set(self.lrs)):
            raise ValueError(f"zero_init: {stray[:5]} are not adapted by the inner loop (a zero start would stay zero)")
        if zero_init and self.replaced:
            raise ValueError(f"zero_init: {cfg.algorithm} starts the head from the support prototypes on every task")
        self.zero_init = tuple(zero_init)
        with torch.no_grad():
            for k in self.zero_init:
                self.params[k].zero_()
        self._features = _Features(model) if self.replaced else None

    def _check_head(self, head: Sequence[str]) -> tuple[str, ...]:
        if self.variant.needs_head and not head:
            raise ValueError(f"head: {self.cfg.algorithm} needs the names of the classification head's weights")
        _check_names("head", head, self.params)
        if self.variant.head_init == "prototypes":
            shapes = sorted((self.params[k].dim(), k) for k in head)
            if [d for d, _ in shapes] != [1, 2]:
                raise ValueError(f"head: {self.cfg.algorithm} needs a linear head, one (n_way, d) weight and one "
                                 f"(n_way,) bias; got {list(head)}")
            if not hasattr(self.model, "features"):
                raise ValueError(f"head: {self.cfg.algorithm} needs the head's input; the {type(self.model).__name__} "
                                 "model has no features(x)")
            self._bias_name, self._weight_name = (k for _, k in shapes)
        return tuple(head)

    def _split_per_step(self, names: Sequence[str]) -> Params:
        if bool(names) != self.cfg.per_step_bn:
            raise ValueError("per_step: per_step_bn needs the names of the batch-norm weights (and only it takes them)")
        _check_names("per_step", names, self.params)
        rows = self.cfg.inner_steps + 1
        return {k: p.detach().expand(rows, *p.shape).clone().requires_grad_()
                for k, p in ((k, self.params.pop(k)) for k in names)}

    def _adapted(self, adapted: Sequence[str] | None) -> tuple[str, ...]:
        if self.variant.inner == "head":
            return self.head
        if self.variant.inner == "none":
            return ()
        adapted = tuple(self.params) if adapted is None else tuple(adapted)
        return tuple(k for k in adapted if k not in self.per_step)  # MAML++: per-step weights are not adapted

    @property
    def plain(self) -> bool:
        """Every task starts from the meta-parameters themselves and every inner step runs the same weights and
        rates: what `components.evaluation.evaluate_params` assumes (a prototype head, LSLR, per-step weights don't)."""
        return not (self.replaced or self.cfg.lslr or self.per_step)

    def parameters(self) -> list[torch.Tensor]:
        """The meta-parameters, in order: the weights (a prototype-started head left out), per-step weights, rates."""
        weights = [v for k, v in self.params.items() if k not in self.replaced]
        rates = list(self.lrs.values()) if self.variant.learn_rates or self.cfg.lslr else []
        return weights + list(self.per_step.values()) + rates

    def state_dict(self) -> dict[str, Params]:
        state = {"params": {k: v.detach().clone() for k, v in self.params.items()},
                 "lrs": {k: v.detach().clone() for k, v in self.lrs.items()}}
        if self.per_step:
            state["per_step"] = {k: v.detach().clone() for k, v in self.per_step.items()}
        return state

    def load_state_dict(self, state: dict[str, Params]) -> None:
        with torch.no_grad():
            for name, group in (("params", self.params), ("lrs", self.lrs), ("per_step", self.per_step)):
                for k, v in group.items():
                    v.copy_(state[name][k])

    def _per_task(self, fn, *args):
        """fn on every task's slice of args (each (T, ...) or a dict of them) -> stacked results (T, ...)."""
        if self.cfg.vectorize:
            return vmap(fn)(*args)
        return _stack([fn(*(_task(a, t) for a in args)) for t in range(len(args[-1]))])

    def _inner_lrs(self) -> StepRates:
        """LSLR's per-step rates, Meta-SGD's learned rates, or the fixed fast_lr as a float (cheaper than a tensor)."""
        if self.cfg.lslr:
            return [{k: v[s] for k, v in self.lrs.items()} for s in range(self.cfg.inner_steps)]
        if self.variant.learn_rates:
            return self.lrs
        return {k: float(self.cfg.fast_lr) for k in self.lrs}

    def _weights(self, params: Params) -> Params:
        return {**self.frozen, **params}

    def _at_step(self, weights: Params, step: int, per_step: Params | None = None) -> Params:
        """weights as the network after `step` inner steps runs them (per-step weights at their row)."""
        per_step = self.per_step if per_step is None else per_step
        return {**weights, **_row(per_step, step)} if per_step else weights

    def _task_start(self, weights: Params, x_spt, y_spt, per_step: Params | None = None) -> Params:
        """weights with a prototype head from this task's support set (x_spt (K, ...) or task-batched (T, K, ...))."""
        if not self.replaced:
            return weights
        named = {f"model.{k}": v for k, v in self._at_step(weights, 0, per_step).items()}
        h = functional_call(self._features, named, (x_spt,))  # (K, d) or (T, K, d)
        w, b = prototype_head(h, y_spt, self.params[self._weight_name].shape[0])
        return {**weights, self._weight_name: w, self._bias_name: b}

    def _plan(self, steps: int, loss_weights: Sequence[float] | None) -> list[tuple[int, float | None]]:
        """(inner step, weight) of each query loss: the last step alone (weight None), or the multi-step loss."""
        if loss_weights is None:
            return [(steps, None)]
        return [(s + 1, w) for s, w in enumerate(loss_weights) if w > 0]

    def _states(self, adapt_fn, weights: Params, lrs: StepRates, x_spt, y_spt, plan, first_order: bool,
                per_step: Params | None = None) -> Iterator[tuple[int, float | None, Params]]:
        """(step, weight, adapted weights after step) of each step of the plan, adapting on from the previous one."""
        per_step = self.per_step if per_step is None else per_step
        fast, done = self._task_start(weights, x_spt, y_spt, per_step), 0
        for step, w in plan:
            fast = adapt_fn(self.model, fast, lrs, x_spt, y_spt, self.loss_fn, step - done, first_order, per_step, done)
            done = step
            yield step, w, fast

    def loss_weights(self, iteration: int | None) -> list[float] | None:
        """The multi-step loss weights at a meta-iteration (1-based), None once (or where) only the last step counts."""
        if not self.cfg.msl_iterations or iteration is None:
            return None
        weights = multi_step_weights(self.cfg.inner_steps, iteration - 1, self.cfg.msl_iterations)
        return None if weights[-1] == 1 else weights

    def first_order_at(self, iteration: int | None) -> bool:
        """Whether the meta-gradient at this meta-iteration (1-based; None: after meta-training) is first order."""
        return self.variant.first_order or (iteration is not None and iteration <= self.cfg.first_order_iterations)

    def query_losses(self, batch: TaskBatch, steps: int, first_order: bool,
                     loss_weights: Sequence[float] | None = None) -> torch.Tensor:
        """Post-adaptation query loss of every task (T,), differentiable in the meta-parameters.

        loss_weights (steps,): a multi-step loss, the weighted sum of the query losses after steps 1..steps."""
        lrs, weights, plan = self._inner_lrs(), self._weights(self.params), self._plan(steps, loss_weights)
        if self.cfg.task_batched:
            x_spt, y_spt, x_qry, y_qry = batch
            states = self._states(adapt_tasks, weights, lrs, x_spt, y_spt, plan, first_order)
            return _weighted([(w, task_losses(self.loss_fn, functional_call(self.model, self._at_step(fast, s),
                                                                            (x_qry,)), y_qry))
                              for s, w, fast in states])

        def task_loss(x_spt, y_spt, x_qry, y_qry):
            return _weighted([(w, self.loss_fn(functional_call(self.model, self._at_step(fast, s), (x_qry,)), y_qry))
                              for s, w, fast in self._states(adapt, weights, lrs, x_spt, y_spt, plan, first_order)])

        return self._per_task(task_loss, *batch)

    def meta_backward(self, batch: TaskBatch, iteration: int | None = None) -> float:
        """Write the meta-gradient into `.grad` of `parameters()`; return the mean query loss (multi-step: weighted).

        iteration: the meta-iteration (1-based), read by the MAML++ schedules (multi-step loss weights, first
        order first). Tasks are differentiated cfg.task_chunk at a time (task-batched: their query losses
        cfg.query_chunk at a time) and the gradients summed, so only one chunk's graph is alive.
        """
        if self.variant.update == "reptile":
            total = self._reptile_backward(batch)
        else:
            first_order, loss_weights = self.first_order_at(iteration), self.loss_weights(iteration)
            if self.cfg.task_batched and 0 < self.cfg.query_chunk < (self.cfg.task_chunk or len(batch[0])):
                grads, total = self._task_batched_grads(batch, first_order, loss_weights)
            else:
                grads, total = self._chunked_grads(batch, first_order, loss_weights)
            for p, g in zip(self.parameters(), grads):
                p.grad = g
        for k in self.zero_init:  # no gradient: the optimizer leaves them at zero
            self.params[k].grad = None
        return total

    def _chunked_grads(self, batch: TaskBatch, first_order: bool,
                       loss_weights: Sequence[float] | None = None) -> tuple[list[torch.Tensor], float]:
        """Per task chunk: its query losses' gradient in one backward (vmap, the loop, or a task-batched model)."""
        params, n_tasks = self.parameters(), len(batch[0])
        total, grads = 0.0, []
        for part in _slices(n_tasks, self.cfg.task_chunk):
            loss = self.query_losses(tuple(t[part] for t in batch), self.cfg.inner_steps, first_order,
                                     loss_weights).sum() / n_tasks
            grads.append(torch.autograd.grad(loss, params))
            total += loss.item()
        return [_accumulated(gs) for gs in zip(*grads)], total

    def _task_batched_grads(self, batch: TaskBatch, first_order: bool,
                            loss_weights: Sequence[float] | None = None) -> tuple[list[torch.Tensor], float]:
        """A task-batched model whose query is split (query_chunk smaller than the task chunk; otherwise one
        backward per task chunk, `_chunked_grads`, is faster and the same).

        Per task chunk: adapt its tasks in one graph; differentiate their query losses query_chunk tasks
        at a time, only up to the per-task weights (v = dL/dfast, (T, *shape)); then push v through the
        adaptation graph once. The shared weights' direct gradient (the query uses them as they are)
        is added on. A multi-step loss does this for the weights after each of its steps, one push for all.

        The support graph is small, so a big task chunk runs it as a few large batched ops, while the
        large query graphs stay query_chunk tasks at a time.
        """
        n_tasks, params = len(batch[0]), self.parameters()
        total, grads = 0.0, [torch.zeros_like(p) for p in params]
        for part in _slices(n_tasks, self.cfg.task_chunk):
            part_grads, loss = self._adapt_then_query(tuple(t[part] for t in batch), n_tasks, first_order, loss_weights)
            for acc, g in zip(grads, part_grads):
                acc.add_(g)
            total += loss
        return grads, total

    def _adapt_then_query(self, batch: TaskBatch, n_total: int, first_order: bool,
                          loss_weights: Sequence[float] | None = None) -> tuple[list[torch.Tensor], float]:
        x_spt, y_spt, x_qry, y_qry = batch
        n_tasks, params = len(x_spt), self.parameters()
        states = list(self._states(adapt_tasks, self._weights(self.params), self._inner_lrs(), x_spt, y_spt,
                                   self._plan(self.cfg.inner_steps, loss_weights), first_order))
        varying = [*self.lrs, *(k for k in self.replaced if k not in self.lrs)]  # per task: (T, *shape)
        direct = [self.params[k] for k in self.params if k not in varying] + list(self.per_step.values())
        direct_grads, total, pushed = [torch.zeros_like(t) for t in direct], 0.0, []
        for step, w, fast in states:
            v = {k: torch.empty_like(fast[k]) for k in varying}
            for part in _slices(n_tasks, self.cfg.query_chunk):
                leaves = {k: fast[k][part].detach().requires_grad_() for k in varying}
                weights = self._at_step({**self._weights(self.params), **leaves}, step)
                loss = task_losses(self.loss_fn, functional_call(self.model, weights, (x_qry[part],)),
                                   y_qry[part]).sum() / n_total
                loss = loss if w is None else w * loss
                grads = torch.autograd.grad(loss, [*leaves.values(), *direct])
                for k, g in zip(varying, grads):
                    v[k][part] = g
                for acc, g in zip(direct_grads, grads[len(varying):]):
                    acc.add_(g)
                total += loss.item()
            pushed += [(fast[k], v[k]) for k in varying]
        through = torch.autograd.grad([f for f, _ in pushed], params, [v for _, v in pushed], allow_unused=True)
        position, extra = {id(p): i for i, p in enumerate(params)}, [None] * len(params)
        for t, g in zip(direct, direct_grads):
            extra[position[id(t)]] = g
        return [_sum_grads(p, a, b) for p, a, b in zip(params, through, extra)], total

    def _reptile_backward(self, batch: TaskBatch) -> float:
        """Reptile: grad = theta - mean_t(phi_t), phi_t = theta after inner_steps on task t (0 where not adapted)."""
        fast = self.adapt_batch(batch.x_spt, batch.y_spt, self.cfg.inner_steps)
        for k, p in self.params.items():
            p.grad = p.detach() - fast[k].mean(0)
        with torch.no_grad():
            losses = self.evaluate_fast(fast, batch.x_qry, batch.y_qry)
        return losses.mean().item()

    def adapt_batch(self, x_spt: torch.Tensor, y_spt: torch.Tensor, steps: int, fast: Params | None = None,
                    done: int = 0) -> Params:
        """Adapted parameters per task, without a graph to the meta-parameters: {name: (T, *shape)}.

        Every meta-parameter is returned, the unadapted ones repeated per task (frozen ones are not), per-step
        weights at their row after the last step. fast, done: go on from adapt_batch's result after `done` steps
        (default: each task's start).
        """
        params = {k: v.detach() for k, v in self.params.items()}
        per_step = {k: v.detach() for k, v in self.per_step.items()}
        lrs = _detached(self._inner_lrs())
        rows = {k: v.expand(len(x_spt), *v.shape) for k, v in _row(per_step, done + steps).items()}
        if self.cfg.task_batched:
            varying = set(self.lrs) | set(self.replaced) if fast is None else set(params)
            parts = []
            for part in _slices(len(x_spt), self.cfg.task_chunk):
                start = (self._task_start({**self.frozen, **params}, x_spt[part], y_spt[part], per_step) if fast is None
                         else {**self.frozen, **_task(fast, part)})
                parts.append(adapt_tasks(self.model, start, lrs, x_spt[part], y_spt[part], self.loss_fn, steps, True,
                                         per_step, done))
            return {**{k: torch.cat([f[k] for f in parts]) if k in varying else v.expand(len(x_spt), *v.shape)
                       for k, v in params.items()}, **rows}

        def one(xs, ys, start=None):
            start = self._task_start(self._weights(params), xs, ys, per_step) if start is None else self._weights(start)
            return adapt(self.model, start, lrs, xs, ys, self.loss_fn, steps, True, per_step, done)

        out = (self._per_task(one, x_spt, y_spt) if fast is None
               else self._per_task(lambda f, xs, ys: one(xs, ys, f), fast, x_spt, y_spt))
        return {**{k: v for k, v in out.items() if k in params}, **rows}

    def evaluate_fast(self, fast: Params, x: torch.Tensor, y: torch.Tensor,
                      score_fn: LossFn | None = None) -> torch.Tensor:
        """Loss (or score_fn) of each task's own adapted parameters on its points: fast {name: (T, ...)},
        x (T, N, d) -> (T,)."""
        score_fn = score_fn or self.loss_fn
        if self.cfg.task_batched:
            return torch.cat([task_losses(score_fn, functional_call(self.model, self._weights(_task(fast, part)),
                                                                    (x[part],)), y[part])
                              for part in _slices(len(x), self.cfg.query_chunk or self.cfg.task_chunk)])

        def one(f, xs, ys):
            return score_fn(functional_call(self.model, self._weights(f), (xs,)), ys)

        return self._per_task(one, fast, x, y)

    def clip_(self) -> None:
        """Keep Meta-SGD's learned rates positive and inside lr_range (call after each outer step)."""
        if self.variant.learn_rates:
            with torch.no_grad():
                for v in self.lrs.values():
                    v.clamp_(*self.cfg.lr_range)


def _detached(lrs: StepRates) -> StepRates:
    if isinstance(lrs, list):
        return [_detached(r) for r in lrs]
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in lrs.items()}


def _accumulated(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """grads[0] + grads[1] + ..., in order (a lone gradient as it is: no copy)."""
    total = grads[0]
    for g in grads[1:]:
        total = total + g
    return total


def _sum_grads(p: torch.Tensor, *grads: torch.Tensor | None) -> torch.Tensor:
    present = [g for g in grads if g is not None]
    return torch.stack(present).sum(0) if len(present) > 1 else present[0] if present else torch.zeros_like(p)


def _check_names(field: str, names: Sequence[str], known: dict) -> None:
    if unknown := sorted(set(names) - set(known)):
        raise ValueError(f"{field}: {unknown[:5]} are not meta-parameters of the model (frozen ones cannot be adapted)")
