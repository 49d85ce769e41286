"""Task2Vec (Achille et al. 2019): a task is the diagonal Fisher information of a probe network's weights.

A probe body f_θ maps one example to features (D,); a linear head (W, b) is fitted on the task's support set
with θ frozen; the model is p(y | x) = softmax(W f_θ(x) + b)_y. The embedding is the diagonal of

    F_θ = (1 / B) Σ_i E_{y ~ q(y | x_i)} [ (∂_θ log p(y | x_i))² ]          (elementwise square)

over the support set x_1..x_B, averaged over the weights of each filter / output unit. The label distribution
q is the model's own p(· | x_i) for the true Fisher ("sampled": S Monte Carlo labels per example, or
"expected": the exact sum Σ_y p(y | x_i) (·)² over the n_way classes), or the point mass on the true label for
the empirical Fisher ("empirical"). Every squared gradient is a per-example gradient; the square of a
batch-mean gradient would be (mean g)², not mean(g²). Two ways to get them (`FISHER_METHODS`):
  unfold  conv4 probes: one forward over the B examples and one backward over all (example, label) rows at
          once, repeated draws merged (`distinct_rows`), each layer's per-example weight gradient the product
          of the gradient at its output and its unfolded input (Goodfellow 2015, "Efficient per-example
          gradient computations"; the method of BackPACK, Dangel et al. 2020, and Opacus). At 64 filters with
          8 sampled labels, about 10x the per-example loop and faster than BackPACK or Opacus on the same
          Fisher; about 2x when every class is a row ("expected"): benchmarks/task2vec.py.
  vmap    any probe: `torch.func.vmap` over the examples of a `vjp` pullback, vmapped over the labels.

Distances between embeddings (all in float64): "normalized_cosine", the paper's
d(F_a, F_b) = 1 - cos(F_a / (F_a + F_b), F_b / (F_a + F_b)), elementwise division (a unit where both are 0
is left out): each unit's pair sums to 1, so units whose Fisher is large everywhere do not dominate, and a
scale common to both cancels; plain "cosine" 1 - cos(F_a, F_b); "euclidean" ||F_a - F_b||_2 and "manhattan"
||F_a - F_b||_1. All four are symmetric and 0 from a task to itself.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

from components.conv4 import PADDING, STRIDE, BatchNorm, Conv4

LABEL_MODES = ("sampled", "expected", "empirical")
FISHER_METHODS = ("unfold", "vmap")
DISTANCES = ("normalized_cosine", "cosine", "euclidean", "manhattan")
Params = dict[str, torch.Tensor]
Head = tuple[torch.Tensor, torch.Tensor]  # weight (n_way, D), bias (n_way,)


@dataclass(frozen=True)
class Task2VecConfig:
    labels: str = "sampled"  # one of LABEL_MODES: sampled / expected = true Fisher, empirical = true labels
    n_samples: int = 8  # labels drawn per example when labels == "sampled"
    head_l2: float = 1e-3  # ridge on the fitted head: a separable support set would send it to infinity
    head_steps: int = 100  # L-BFGS iterations for the head
    chunk_size: int | None = None  # examples per Fisher call; memory ~ chunk_size * labels * n_params
    seed: int = 0  # label sampling

    def __post_init__(self):
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels: {self.labels!r} is not one of {LABEL_MODES}")
        for name in ("n_samples", "head_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size: must be >= 1 or None, got {self.chunk_size}")


@dataclass(frozen=True, eq=False)
class Probe:
    """The weights whose Fisher is the embedding, and the body that uses them.

    features(params, x) -> (B, D) for x (B, ...) (or a tuple of such tensors); row i must depend on example i
    alone, so that log p(y_i | x_i) and its gradient are per-example quantities. unfolded(params, head, x,
    labels, weights) -> {name: Σ_i Σ_s weights[i, s] (∂ log p(labels[i, s] | x_i))²}, summed not averaged
    over the B examples: the body's Fisher in closed form, when it has one (`conv4_probe`).
    """

    params: Params
    features: Callable[[Params, torch.Tensor], torch.Tensor]
    unfolded: Callable[..., Params] | None = None


def module_probe(body: nn.Module, names: tuple[str, ...] | None = None) -> Probe:
    """A probe whose features are body(*x) (or body(x)); Fisher over `names` (default every parameter).

    Parameters left out of `names` enter as constants. Batch norm on batch statistics (torch's in training
    mode, Conv4's always) couples the examples of a batch, so it is refused: use eval mode, or `conv4_probe`.
    """
    coupled = [n for n, m in body.named_modules() if isinstance(m, BatchNorm)
               or isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if coupled:
        raise ValueError(f"body: batch norm on batch statistics couples examples: {coupled}")
    every = dict(body.named_parameters())
    unknown = sorted(set(names or ()) - every.keys())
    if unknown:
        raise ValueError(f"names: {unknown} are not parameters of the body")
    chosen = tuple(every) if names is None else names
    params = {k: every[k].detach() for k in chosen}
    constants = {k: v.detach() for k, v in every.items() if k not in params}

    def features(p: Params, x) -> torch.Tensor:
        return functional_call(body, p | constants, x if isinstance(x, tuple) else (x,))

    return Probe(params, features)


def conv4_probe(model: Conv4, x_spt: torch.Tensor) -> Probe:
    """Conv4's body (four conv + batch norm + ReLU blocks) as a probe; features (B, hidden * 2 * 2).

    Conv4 normalises with the statistics of the batch it is given, which would make example i's output depend
    on the others. Here each batch norm is frozen at the mean and variance that x_spt (B, C, H, W) gives with
    the model's weights, as a pretrained probe in eval mode would be: on x_spt itself the features equal
    model.blocks(x_spt).flatten(1). The Fisher then leaves out the statistics' own dependence on θ. The probe
    carries its Fisher in closed form (`unfolded`), which `fisher_diagonal` uses by default.
    Parameters: `blocks.{i}.conv.weight` (LoRA adapters merged into it), `blocks.{i}.norm.weight`, `.bias`.
    """
    params, stats = {}, []
    h = x_spt
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            params[f"blocks.{i}.conv.weight"] = block.kernel().detach()
            params[f"blocks.{i}.norm.weight"] = block.norm.weight.detach()
            params[f"blocks.{i}.norm.bias"] = block.norm.bias.detach()
            z = F.conv2d(h, params[f"blocks.{i}.conv.weight"], None, STRIDE, PADDING)  # (B, C, h, w)
            mean = z.mean((0, 2, 3))
            var = (z - mean[:, None, None]).square().mean((0, 2, 3))
            stats.append((mean[:, None, None], torch.rsqrt(var + model.cfg.eps)[:, None, None]))
            h = block(h)

    def features(p: Params, x: torch.Tensor) -> torch.Tensor:
        for i, (mean, rstd) in enumerate(stats):
            z = F.conv2d(x, p[f"blocks.{i}.conv.weight"], None, STRIDE, PADDING)
            x = F.relu((z - mean) * rstd * p[f"blocks.{i}.norm.weight"][:, None, None]
                       + p[f"blocks.{i}.norm.bias"][:, None, None])
        return x.flatten(1)

    return Probe(params, features, partial(_conv4_unfolded_fisher, tuple(stats)))


def _conv4_unfolded_fisher(stats: tuple[tuple[torch.Tensor, torch.Tensor], ...], params: Params, head: Head,
                           x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> Params:
    """Σ_i Σ_s weights[i, s] (∂ log p(labels[i, s] | x_i))² of `conv4_probe`'s weights, x (B, C, H, W).

    One forward over the B examples; one backward carrying the N rows of `distinct_rows` at once. Per row,
    ∂/∂bias = Σ_hw g, ∂/∂scale = Σ_hw g * u (u the normalised conv output), and the kernel's gradient is
    G (C_out, hw) @ U^T (hw, C_in * k * k), U the unfolded input of the row's example.
    """
    example, label, weight = distinct_rows(labels, weights, head[0].shape[0])  # (N,) each
    saved, features = _conv4_forward(stats, params, x)
    probs = F.softmax(_logits(features.flatten(1), head), dim=-1)[example]  # (N, n_way)
    # ∂ log p(y | x) / ∂ logits = e_y - p; with √weight folded in, each row's squared gradient carries its weight
    rows = (F.one_hot(label, probs.shape[1]).to(probs) - probs) * weight.sqrt()[:, None]
    g = (rows @ head[0]).view(len(example), *features.shape[1:])  # ∂/∂ last block's output, (N, C, h, w)
    fisher = {}
    for i in reversed(range(len(stats))):
        h_in, u, on, gain = saved[i]
        kernel = params[f"blocks.{i}.conv.weight"]
        g = g * on[example]  # through the ReLU
        fisher[f"blocks.{i}.norm.bias"] = g.sum((2, 3)).square().sum(0)
        fisher[f"blocks.{i}.norm.weight"] = (g * u[example]).sum((2, 3)).square().sum(0)
        g = g * gain  # ∂/∂ conv output
        cols = F.unfold(h_in, kernel.shape[-2:], padding=PADDING, stride=STRIDE)[example]  # (N, C_in * k * k, hw)
        per_row = torch.bmm(g.flatten(2), cols.transpose(1, 2))  # (N, C_out, C_in * k * k)
        fisher[f"blocks.{i}.conv.weight"] = per_row.square_().sum(0).view_as(kernel)
        if i:  # ∂/∂ block input; conv_transpose2d here is about 2x torch.nn.grad.conv2d_input
            lost = [h_in.shape[d] - ((u.shape[d] - 1) * STRIDE - 2 * PADDING + kernel.shape[d]) for d in (-2, -1)]
            g = F.conv_transpose2d(g, kernel, None, STRIDE, PADDING, output_padding=lost)
    return {k: fisher[k] for k in params}


def _conv4_forward(stats, params: Params, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """`conv4_probe`'s features (B, C, h, w) and, per block, what the backward needs: its input, the normalised
    conv output u, the ReLU's mask and ∂(pre-activation)/∂(conv output) = rstd * scale."""
    saved = []
    for i, (mean, rstd) in enumerate(stats):
        scale, shift = params[f"blocks.{i}.norm.weight"][:, None, None], params[f"blocks.{i}.norm.bias"][:, None, None]
        u = (F.conv2d(x, params[f"blocks.{i}.conv.weight"], None, STRIDE, PADDING) - mean) * rstd  # (B, C, h, w)
        a = u * scale + shift
        saved.append((x, u, a > 0, rstd * scale))
        x = F.relu(a)
    return saved, x


def distinct_rows(labels: torch.Tensor, weights: torch.Tensor, n_way: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same Fisher terms in the fewest rows: labels, weights (B, S) -> example, label, weight (N,), N <= B * S.

    Σ_s weights[i, s] g(labels[i, s])² = Σ_y (Σ_{s: labels[i, s] = y} weights[i, s]) g(y)²: one row per
    (example, class) drawn, weighted by the sum of its draws' weights; rows of weight 0 are left out. S draws
    from a confident model repeat a few classes, so N is often near B.
    """
    merged = weights.new_zeros(labels.shape[0], n_way).scatter_add_(1, labels, weights)  # (B, n_way)
    example, label = merged.nonzero(as_tuple=True)
    return example, label, merged[example, label]


def fit_head(features: torch.Tensor, y: torch.Tensor, n_way: int, l2: float = 1e-3, steps: int = 100) -> Head:
    """Multinomial logistic regression on frozen features (B, D), labels y (B,) in 0..n_way-1.

    Minimises mean cross-entropy + l2 * ||W||² by L-BFGS from W = 0, b = 0 (deterministic). Returns weight
    (n_way, D) and bias (n_way,) in the features' dtype and device.
    """
    features = features.detach()
    weight = features.new_zeros(n_way, features.shape[1], requires_grad=True)
    bias = features.new_zeros(n_way, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def predictive(probe: Probe, head: Head, x) -> torch.Tensor:
    """p(y | x) of probe + head for x (B, ...): (B, n_way), no gradient."""
    with torch.no_grad():
        return F.softmax(_logits(probe.features(probe.params, x), head), dim=-1)


def fisher_labels(probs: torch.Tensor, y: torch.Tensor | None, mode: str, n_samples: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and their weights for the Fisher expectation: (B, S) int64 and (B, S) in probs' dtype.

    probs (B, n_way) = p(· | x_i); y (B,) the true labels, read by empirical only. sampled: S = n_samples draws
    from p(· | x_i), weight 1 / S each. expected: S = n_way, every class, weight p(y | x_i). empirical: S = 1,
    the true label, weight 1.
    """
    n, n_way = probs.shape
    if mode == "sampled":
        labels = torch.multinomial(probs, n_samples, replacement=True, generator=generator)
        return labels, probs.new_full((n, n_samples), 1.0 / n_samples)
    if mode == "expected":
        return torch.arange(n_way, device=probs.device).expand(n, n_way), probs
    if mode == "empirical":
        if y is None:
            raise ValueError("y: the empirical Fisher needs the true labels")
        return y[:, None], probs.new_ones(n, 1)
    raise ValueError(f"mode: {mode!r} is not one of {LABEL_MODES}")


def fisher_diagonal(probe: Probe, head: Head, x, labels: torch.Tensor, weights: torch.Tensor,
                    chunk_size: int | None = None, method: str | None = None) -> Params:
    """Diagonal Fisher of every probe weight: F = (1/B) Σ_i Σ_s weights[i, s] (∂_θ log p(labels[i, s] | x_i))².

    x (B, ...) (or a tuple of such tensors); labels, weights (B, S) from `fisher_labels`; chunk_size examples at
    a time. method (one of FISHER_METHODS): "unfold" is the probe's own `unfolded` Fisher; "vmap" is one
    forward and S backward passes per example (vmap over the vjp's one-hot cotangents), vmapped over the
    examples; None takes unfold where the probe has it, else vmap. Returns {name: (shape of the weight)}.
    """
    method = method or ("unfold" if probe.unfolded else "vmap")
    if method not in FISHER_METHODS:
        raise ValueError(f"method: {method!r} is not one of {FISHER_METHODS}")
    if method == "unfold" and probe.unfolded is None:
        raise ValueError("method: this probe has no unfolded Fisher; use 'vmap'")
    summed = probe.unfolded if method == "unfold" else _vmap_fisher(probe)
    n = labels.shape[0]
    step = chunk_size or n
    total = {k: torch.zeros_like(v) for k, v in probe.params.items()}
    for start in range(0, n, step):
        rows = slice(start, start + step)
        for k, v in summed(probe.params, head, _index(x, rows), labels[rows], weights[rows]).items():
            total[k] += v
    return {k: v / n for k, v in total.items()}


def _vmap_fisher(probe: Probe):
    """(params, head, x (B, ...), labels, weights (B, S)) -> {name: Σ_i Σ_s weights[i, s] (∂ log p)²}."""
    per_example = vmap(partial(_example_fisher, probe), in_dims=(None, None, 0, 0, 0))

    def summed(params: Params, head: Head, x, labels: torch.Tensor, weights: torch.Tensor) -> Params:
        return {k: v.sum(0) for k, v in per_example(params, head, x, labels, weights).items()}

    return summed


def _example_fisher(probe: Probe, params: Params, head: Head, x, labels: torch.Tensor, weights: torch.Tensor
                    ) -> Params:
    """One example x (...), labels, weights (S,) -> {name: Σ_s weights[s] (∂ log p(labels[s] | x))²}."""
    log_p, pullback = vjp(lambda p: _log_probs(probe, head, p, x), params)  # (n_way,)
    cotangents = F.one_hot(labels, log_p.shape[-1]).to(log_p.dtype)  # (S, n_way)
    (grads,) = vmap(pullback)(cotangents)  # {name: (S, *shape)}
    return {k: torch.tensordot(weights, g.square(), dims=1) for k, g in grads.items()}


def _log_probs(probe: Probe, head: Head, params: Params, x) -> torch.Tensor:
    """log p(· | x) (n_way,) for one example x (...)."""
    one = x[None] if torch.is_tensor(x) else tuple(t[None] for t in x)
    return F.log_softmax(_logits(probe.features(params, one), head), dim=-1)[0]


def _logits(features: torch.Tensor, head: Head) -> torch.Tensor:
    return features @ head[0].T + head[1]


def _index(x, rows: slice):
    return x[rows] if torch.is_tensor(x) else tuple(t[rows] for t in x)


def unit_fisher(fisher: Params) -> torch.Tensor:
    """The embedding (E,): each weight's Fisher averaged per output unit (dim 0: a conv filter, a linear row,
    a batch-norm channel), concatenated in the dict's order; E = Σ over weights of their dim-0 size."""
    return torch.cat([f.reshape(f.shape[0], -1).mean(1) if f.dim() else f.reshape(1) for f in fisher.values()])


def task2vec(probe: Probe, x_spt, y_spt: torch.Tensor, n_way: int, cfg: Task2VecConfig = Task2VecConfig()
             ) -> torch.Tensor:
    """Task2Vec embedding (E,) of one support set: fit the head, draw labels, Fisher, average per unit.

    x_spt (B, ...) (or a tuple), y_spt (B,) in 0..n_way-1, on the probe's device; computed there. Deterministic
    given cfg.seed (a torch.Generator on that device).
    """
    head = fit_head(probe.features(probe.params, x_spt), y_spt, n_way, cfg.head_l2, cfg.head_steps)
    generator = torch.Generator(device=y_spt.device).manual_seed(cfg.seed)
    labels, weights = fisher_labels(predictive(probe, head, x_spt), y_spt, cfg.labels, cfg.n_samples, generator)
    return unit_fisher(fisher_diagonal(probe, head, x_spt, labels, weights, cfg.chunk_size))


def conv4_task2vec(model: Conv4, x_spt: torch.Tensor, y_spt: torch.Tensor, n_way: int,
                   cfg: Task2VecConfig = Task2VecConfig()) -> torch.Tensor:
    """Task2Vec of T episodes with one Conv4 probe: x_spt (T, B, C, H, W), y_spt (T, B) -> (T, E).

    Each episode gets its own batch-norm statistics (`conv4_probe`) and label seed cfg.seed + t.
    """
    return torch.stack([task2vec(conv4_probe(model, x), x, y, n_way, replace(cfg, seed=cfg.seed + t))
                        for t, (x, y) in enumerate(zip(x_spt, y_spt))])


def pairwise_distances(a: torch.Tensor, b: torch.Tensor | None = None, metric: str = "normalized_cosine"
                       ) -> torch.Tensor:
    """Distances (n, m) in float64 between the rows of a (n, E) and b (m, E) (b = a when None).

    normalized_cosine needs non-negative rows (Fisher diagonals); it and cosine refuse all-zero rows.
    """
    if metric not in DISTANCES:
        raise ValueError(f"metric: {metric!r} is not one of {DISTANCES}")
    a = a.double()
    b = a if b is None else b.to(a)
    if metric == "euclidean":
        return torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")  # mm form: self-distance != 0
    if metric == "manhattan":
        return torch.cdist(a, b, p=1.0)
    for name, rows in (("a", a), ("b", b)):
        if (rows.abs().sum(1) == 0).any():
            raise ValueError(f"{name}: an all-zero row has no {metric} distance")
    if metric == "cosine":
        return (1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).clamp_min(0.0)
    if (a < 0).any() or (b < 0).any():
        raise ValueError("normalized_cosine: embeddings must be non-negative (Fisher diagonals)")
    total = a[:, None, :] + b[None, :, :]  # (n, m, E)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    u, v = a[:, None, :] / safe, b[None, :, :] / safe  # 0 where both are 0: that unit drops out
    return (1.0 - F.cosine_similarity(u, v, dim=-1)).clamp_min(0.0)
