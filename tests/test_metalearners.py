"""Each meta-algorithm checked in float64 against an independent reference.

The references use a hand-written MLP forward and plain `torch.autograd.grad` in a per-task loop:
no `functional_call`, no `vmap`, no `torch.func`. Gradients are also checked against central
finite differences on a few coordinates.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from components.metalearners import MetaLearner, MetaLearnerConfig, adapt, task_losses
from components.models import MLP
from components.tasksets import SinusoidFamily, TaskBatch, sample_sinusoid_tasks, to_batch

SIZES = (1, 8, 8, 1)
FAST_LR = 0.05
STEPS = 3
EPS = 1e-6


@pytest.fixture(scope="module")
def batch() -> TaskBatch:
    """3 sinusoid tasks, 5 support and 5 query points each, float64."""
    family = SinusoidFamily(k_shot=5, n_query=5)
    return to_batch(sample_sinusoid_tasks(family, {"meta_train": 3}, seed=0), dtype=torch.float64)


def make_learner(algorithm: str, vectorize: bool = True, steps: int = STEPS, **cfg) -> MetaLearner:
    torch.manual_seed(0)
    model = MLP(SIZES).double()
    cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=steps, fast_lr=FAST_LR, vectorize=vectorize, **cfg)
    return MetaLearner(model, cfg, F.mse_loss)


def mlp_forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Hand-written 1-8-8-1 ReLU MLP; weights = [W0, b0, W1, b1, W2, b2]; x (N, 1) -> (N, 1)."""
    h = x
    for i in range(0, len(weights), 2):
        h = h @ weights[i].T + weights[i + 1]
        if i < len(weights) - 2:
            h = torch.relu(h)
    return h


def reference_meta_loss(weights, lrs, batch: TaskBatch, steps: int, first_order: bool) -> torch.Tensor:
    """Mean post-adaptation query loss, one task at a time (MAML, FOMAML, Meta-SGD)."""
    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch):
        fast = list(weights)
        for _ in range(steps):
            support_loss = F.mse_loss(mlp_forward(fast, x_spt), y_spt)
            grads = torch.autograd.grad(support_loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, lr, g in zip(fast, lrs, grads)]
        losses.append(F.mse_loss(mlp_forward(fast, x_qry), y_qry))
    return torch.stack(losses).mean()


def leaves(tensors) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def learner_grads(learner: MetaLearner, batch: TaskBatch) -> list[torch.Tensor]:
    for p in learner.parameters():
        p.grad = None
    learner.meta_backward(batch)
    return [p.grad.clone() for p in learner.parameters()]


def learner_meta_loss(learner: MetaLearner, batch: TaskBatch) -> float:
    first_order = learner.cfg.algorithm == "fomaml"
    with torch.no_grad():
        return learner.query_losses(batch, learner.cfg.inner_steps, first_order).mean().item()


def finite_difference(learner: MetaLearner, batch: TaskBatch, tensor: torch.Tensor, idx) -> float:
    """Central difference of the meta-loss along one coordinate of a meta-parameter."""
    with torch.no_grad():
        tensor[idx] += EPS
        up = learner_meta_loss(learner, batch)
        tensor[idx] -= 2 * EPS
        down = learner_meta_loss(learner, batch)
        tensor[idx] += EPS
    return (up - down) / (2 * EPS)


COORDS = [("net.0.weight", (3, 0)), ("net.2.weight", (1, 5)), ("net.2.bias", (4,)), ("net.4.weight", (0, 2))]


def test_maml_matches_per_task_autograd_loop(batch):
    learner = make_learner("maml")
    weights = leaves(learner.params.values())
    lrs = [torch.full_like(w, FAST_LR) for w in weights]
    expected = torch.autograd.grad(reference_meta_loss(weights, lrs, batch, STEPS, first_order=False), weights)
    for got, want in zip(learner_grads(learner, batch), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_maml_matches_finite_differences(batch):
    learner = make_learner("maml")
    grads = dict(zip(learner.params, learner_grads(learner, batch)))
    for name, idx in COORDS:
        fd = finite_difference(learner, batch, learner.params[name], idx)
        assert grads[name][idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), name


def test_meta_loss_returned_is_mean_query_loss(batch):
    learner = make_learner("maml")
    weights = leaves(learner.params.values())
    lrs = [torch.full_like(w, FAST_LR) for w in weights]
    expected = reference_meta_loss(weights, lrs, batch, STEPS, first_order=False).item()
    assert learner.meta_backward(batch) == pytest.approx(expected, rel=1e-12)


def test_fomaml_drops_second_order_term(batch):
    learner = make_learner("fomaml")
    weights = leaves(learner.params.values())
    lrs = [torch.full_like(w, FAST_LR) for w in weights]
    expected = torch.autograd.grad(reference_meta_loss(weights, lrs, batch, STEPS, first_order=True), weights)
    fomaml = learner_grads(learner, batch)
    for got, want in zip(fomaml, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    maml = learner_grads(make_learner("maml"), batch)
    gap = max((a - b).abs().max().item() for a, b in zip(fomaml, maml))
    assert gap > 1e-4


def test_metasgd_param_gradient_equals_maml_at_uniform_rates(batch):
    metasgd = make_learner("metasgd")
    n = len(metasgd.params)
    assert len(metasgd.parameters()) == 2 * n
    param_grads = learner_grads(metasgd, batch)[:n]
    for got, want in zip(param_grads, learner_grads(make_learner("maml"), batch)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_metasgd_rate_gradient(batch):
    learner = make_learner("metasgd")
    with torch.no_grad():  # non-uniform rates so each rate tensor matters on its own
        for k, v in learner.lrs.items():
            v.copy_(FAST_LR * (0.5 + torch.rand(v.shape, generator=torch.Generator().manual_seed(1),
                                                dtype=v.dtype)))
    n = len(learner.params)
    rate_grads = dict(zip(learner.lrs, learner_grads(learner, batch)[n:]))
    weights = leaves(learner.params.values())
    lrs = leaves(learner.lrs.values())
    expected = torch.autograd.grad(reference_meta_loss(weights, lrs, batch, STEPS, first_order=False), lrs)
    for got, want in zip(rate_grads.values(), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, idx in COORDS:
        fd = finite_difference(learner, batch, learner.lrs[name], idx)
        assert rate_grads[name][idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), name


def test_metasgd_clip_keeps_rates_in_range(batch):
    learner = make_learner("metasgd")
    with torch.no_grad():  # a big step that throws rates far out on both sides
        for v in learner.lrs.values():
            v.grad = torch.where(torch.arange(v.numel()).reshape(v.shape) % 2 == 0, 1.0, -1.0).double()
    torch.optim.SGD(learner.parameters(), lr=1e3).step()
    learner.clip_()
    lo, hi = learner.cfg.lr_range
    rates = torch.cat([v.flatten() for v in learner.lrs.values()])
    assert rates.min().item() == lo and rates.max().item() == hi
    assert ((rates >= lo) & (rates <= hi)).all()


def test_reptile_step_moves_toward_adapted_weights(batch):
    learner = make_learner("reptile")
    theta = [p.detach().clone() for p in learner.params.values()]
    phis = []
    for x_spt, y_spt, _, _ in zip(*batch):
        fast = leaves(theta)
        for _ in range(STEPS):
            grads = torch.autograd.grad(F.mse_loss(mlp_forward(fast, x_spt), y_spt), fast)
            fast = leaves(w - FAST_LR * g for w, g in zip(fast, grads))
        phis.append(fast)
    step = 1e-2
    learner.meta_backward(batch)
    torch.optim.SGD(learner.parameters(), lr=step).step()
    for i, p in enumerate(learner.params.values()):
        mean_phi = torch.stack([phi[i] for phi in phis]).mean(0).detach()
        torch.testing.assert_close(p.detach(), theta[i] + step * (mean_phi - theta[i]), rtol=1e-10, atol=1e-12)
    assert any((p.detach() - t).abs().max() > 1e-6 for p, t in zip(learner.params.values(), theta))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
def test_vectorized_and_looped_agree(batch, algorithm):
    looped = learner_grads(make_learner(algorithm, vectorize=False), batch)
    vectorized = learner_grads(make_learner(algorithm, vectorize=True), batch)
    for got, want in zip(vectorized, looped):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs, field", [
    (dict(algorithm="anil"), "algorithm"),
    (dict(algorithm="metasgd", fast_lr=2.0), "fast_lr"),  # Meta-SGD's rates live in lr_range
    (dict(algorithm="metasgd", fast_lr=1e-6), "fast_lr"),
    (dict(inner_steps=-1), "inner_steps"),
    (dict(lr_range=(0.0, 1.0)), "lr_range"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MetaLearnerConfig(**kwargs)


# --- adapted subsets (ANIL-style): only some weights move in the inner loop ---

HEAD = ("net.4.weight", "net.4.bias")


def make_subset_learner(algorithm: str, adapted=HEAD, frozen=(), zero_init=(), **cfg) -> MetaLearner:
    torch.manual_seed(0)
    model = MLP(SIZES).double()
    cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=STEPS, fast_lr=FAST_LR, **cfg)
    return MetaLearner(model, cfg, F.mse_loss, adapted=adapted, frozen=frozen, zero_init=zero_init)


def reference_subset_loss(weights, adapted_idx, batch: TaskBatch, steps: int) -> torch.Tensor:
    """Mean query loss when only weights[i] for i in adapted_idx take inner SGD steps (second order)."""
    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch):
        fast = list(weights)
        for _ in range(steps):
            grads = torch.autograd.grad(F.mse_loss(mlp_forward(fast, x_spt), y_spt), [fast[i] for i in adapted_idx],
                                        create_graph=True)
            for i, g in zip(adapted_idx, grads):
                fast[i] = fast[i] - FAST_LR * g
        losses.append(F.mse_loss(mlp_forward(fast, x_qry), y_qry))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("vectorize", [True, False])
def test_head_only_maml_reaches_body_through_second_order_terms(batch, vectorize):
    learner = make_subset_learner("maml", vectorize=vectorize)
    assert list(learner.lrs) == list(HEAD)
    weights = leaves(learner.params.values())
    loss = reference_subset_loss(weights, [4, 5], batch, STEPS)
    expected = torch.autograd.grad(loss, weights)
    got = learner_grads(learner, batch)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    assert all(g.abs().max() > 1e-6 for g in got[:4])  # the body is meta-learned, not adapted
    # and not only first-order: the head's inner steps depend on the body, which MAML differentiates
    fomaml = learner_grads(make_subset_learner("fomaml", vectorize=vectorize), batch)
    assert max((a - b).abs().max().item() for a, b in zip(got[:4], fomaml[:4])) > 1e-4


def test_adapt_changes_only_the_adapted_weights(batch):
    learner = make_subset_learner("maml")
    params = {k: v.detach() for k, v in learner.params.items()}
    fast = adapt(learner.model, params, {k: FAST_LR for k in HEAD}, batch.x_spt[0], batch.y_spt[0],
                 F.mse_loss, steps=2)
    for k, v in params.items():
        assert torch.equal(fast[k], v) == (k not in HEAD), k
    per_task = learner.adapt_batch(batch.x_spt, batch.y_spt, 2)
    for k, v in params.items():
        assert torch.equal(per_task[k], v.expand_as(per_task[k])) == (k not in HEAD), k


def test_metasgd_learns_rates_for_adapted_weights_only(batch):
    learner = make_subset_learner("metasgd")
    assert len(learner.parameters()) == len(learner.params) + len(HEAD)
    assert learner.n_adapted == 8 + 1
    grads = learner_grads(learner, batch)
    assert all(torch.isfinite(g).all() for g in grads) and grads[-2].abs().max() > 0


def test_frozen_weights_are_constants(batch):
    learner = make_subset_learner("maml", frozen=("net.0.weight", "net.0.bias"))
    assert set(learner.params) == {"net.2.weight", "net.2.bias", *HEAD}
    weights = leaves(learner.model.parameters())
    expected = torch.autograd.grad(reference_subset_loss(weights, [4, 5], batch, STEPS), weights[2:])
    for got, want in zip(learner_grads(learner, batch), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs, field", [
    (dict(adapted=("net.9.weight",)), "adapted"),
    (dict(frozen=("nope",)), "frozen"),
    (dict(adapted=HEAD, frozen=HEAD), "adapted"),
])
def test_unknown_or_frozen_adapted_names_fail(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_subset_learner("maml", **kwargs)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd"])
def test_task_chunks_sum_to_the_whole_batch_gradient(batch, algorithm):
    whole = learner_grads(make_learner(algorithm), batch)
    torch.manual_seed(0)
    model = MLP(SIZES).double()
    chunked = MetaLearner(model, MetaLearnerConfig(algorithm=algorithm, inner_steps=STEPS, fast_lr=FAST_LR,
                                                   task_chunk=2), F.mse_loss)
    for got, want in zip(learner_grads(chunked, batch), whole):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_query_chunk_needs_task_batched():
    with pytest.raises(ValueError, match="query_chunk"):
        MetaLearnerConfig(query_chunk=2)


# --- zero_init (the "zeroing trick"): a head adapted from zero on every task, never meta-learned ---

@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
def test_zero_init_head_starts_at_zero_and_gets_no_meta_gradient(batch, algorithm):
    torch.manual_seed(0)
    cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=STEPS, fast_lr=FAST_LR)
    learner = MetaLearner(MLP(SIZES).double(), cfg, F.mse_loss, zero_init=HEAD)
    reference = make_learner(algorithm)  # same init, head zeroed by hand, meta-learned as usual
    with torch.no_grad():
        for k in HEAD:
            reference.params[k].zero_()
    for k, v in learner.params.items():
        assert torch.equal(v, reference.params[k]) and (k not in HEAD or not v.any()), k
    assert learner.lrs.keys() == reference.lrs.keys()  # still adapted in the inner loop
    loss = learner.meta_backward(batch)
    assert loss == pytest.approx(reference.meta_backward(batch), rel=1e-12)
    for k, v in learner.params.items():
        if k in HEAD:
            assert v.grad is None and reference.params[k].grad.abs().max() > 0, k
        else:
            torch.testing.assert_close(v.grad, reference.params[k].grad, rtol=1e-10, atol=1e-12)
    if algorithm == "metasgd":  # the head's learned rates are still meta-learned
        assert all(r.grad is not None and r.grad.abs().max() > 0 for k, r in learner.lrs.items() if k in HEAD)
    opt = torch.optim.Adam(learner.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        learner.meta_backward(batch)
        opt.step()
    assert all(not learner.params[k].any() for k in HEAD)
    assert not torch.equal(learner.params["net.0.weight"], reference.params["net.0.weight"])
    fast = learner.adapt_batch(batch.x_spt, batch.y_spt, 1)
    assert all(fast[k].abs().max() > 0 for k in HEAD)  # each task's head moves off zero


def test_zero_init_names_must_be_adapted():
    with pytest.raises(ValueError, match="zero_init"):
        make_subset_learner("maml", adapted=("net.0.weight",), zero_init=HEAD)


def test_lr_range_binds_only_metasgd():
    """MAML and the others never read the range: a fast_lr outside it is theirs to choose."""
    assert MetaLearnerConfig(algorithm="maml", fast_lr=2.0, lr_range=(1e-4, 1.0)).fast_lr == 2.0


# --- the task-batched MLP: all tasks as one network, plain autograd, no vmap ---

TASK_BATCHED = {"one_backward": dict(task_batched=True),
                "query_split": dict(task_batched=True, task_chunk=2, query_chunk=1)}  # adapt, then push dL/dfast


def per_task_weights(model: MLP, n_tasks: int, names) -> dict[str, torch.Tensor]:
    """The model's weights, those in names one per task (T, *shape) and all different, the others shared."""
    g = torch.Generator().manual_seed(3)
    return {k: p.detach() + 0.1 * torch.randn(n_tasks, *p.shape, generator=g, dtype=p.dtype) if k in names
            else p.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("names", [(), ("net.0.weight", "net.2.bias"), ("net.2.weight", "net.4.weight", "net.0.bias"),
                                   ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight",
                                    "net.4.bias")])
def test_task_batched_mlp_equals_the_per_task_forward(names):
    torch.manual_seed(0)
    model = MLP((3, 8, 8, 2)).double()
    n_tasks = 4
    x = torch.randn(n_tasks, 5, 3, dtype=torch.float64)
    weights = per_task_weights(model, n_tasks, names)
    got = functional_call(model, weights, (x,))
    assert got.shape == (n_tasks, 5, 2)
    for t in range(n_tasks):
        own = {k: v[t] if k in names else v for k, v in weights.items()}
        torch.testing.assert_close(got[t], functional_call(model, own, (x[t],)), rtol=1e-12, atol=1e-14)
    if not names:  # all shared: the same ops as the plain path, bit for bit
        assert torch.equal(got, model.net(x))


@pytest.mark.parametrize("path", TASK_BATCHED)
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd"])
def test_task_batched_meta_gradient_matches_the_per_task_reference(batch, algorithm, path):
    learner = make_learner(algorithm, **TASK_BATCHED[path])
    if algorithm == "metasgd":  # non-uniform rates so each rate matters on its own
        with torch.no_grad():
            for v in learner.lrs.values():
                v.mul_(0.5 + torch.rand(v.shape, generator=torch.Generator().manual_seed(1), dtype=v.dtype))
    weights = leaves(learner.params.values())
    lrs = leaves(learner.lrs.values())
    meta_loss = reference_meta_loss(weights, lrs, batch, STEPS, first_order=algorithm == "fomaml")
    wrt = weights + (lrs if algorithm == "metasgd" else [])
    expected = torch.autograd.grad(meta_loss, wrt)
    for p in learner.parameters():
        p.grad = None
    assert learner.meta_backward(batch) == pytest.approx(meta_loss.item(), rel=1e-12)
    got = [p.grad for p in learner.parameters()]
    assert len(got) == len(expected)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
def test_task_batched_and_looped_agree(batch, algorithm):
    looped = learner_grads(make_learner(algorithm, vectorize=False), batch)
    batched = make_learner(algorithm, task_batched=True)
    for got, want in zip(learner_grads(batched, batch), looped):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    fast = batched.adapt_batch(batch.x_spt, batch.y_spt, 2)
    want = make_learner(algorithm, vectorize=False).adapt_batch(batch.x_spt, batch.y_spt, 2)
    for k in want:
        torch.testing.assert_close(fast[k], want[k], rtol=1e-12, atol=1e-14)


# --- task_losses: one op for all tasks where the loss is a known mean ---

class LossCalls(TorchFunctionMode):
    """Counts the calls of each torch function (by name) made while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def one_per_task(loss_fn, pred, target) -> torch.Tensor:
    return torch.stack([loss_fn(p, t) for p, t in zip(pred, target)])


def classification_cases():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (4, 6), generator=g)
    ignored = labels.clone()
    ignored[1, :3] = -100  # the mean runs over the targets that count: task 1 has 3
    probs = torch.softmax(torch.randn(4, 6, 5, generator=g, dtype=torch.float64), -1)
    pixels = torch.randn(4, 6, 5, 2, 3, generator=g, dtype=torch.float64)  # (T, B, C, d1, d2)
    return {"labels": (logits, labels), "ignore_index": (logits, ignored), "probabilities": (logits, probs),
            "spatial": (pixels, torch.randint(0, 5, (4, 6, 2, 3), generator=g))}


@pytest.mark.parametrize("case", ["labels", "ignore_index", "probabilities", "spatial"])
def test_cross_entropy_task_losses_are_one_op_and_equal_the_loop(case):
    pred, target = classification_cases()[case]
    with LossCalls() as calls:
        got = task_losses(F.cross_entropy, pred, target)
    assert calls.counts.get("cross_entropy") == 1
    assert got.shape == (4,)
    torch.testing.assert_close(got, one_per_task(F.cross_entropy, pred, target), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape", [(4, 6, 1), (4, 6, 3), (4, 6)])
def test_mse_task_losses_are_one_op_and_equal_the_loop(shape):
    g = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    target[2] += 3.0  # tasks with different losses
    with LossCalls() as calls:
        got = task_losses(F.mse_loss, pred, target)
    assert calls.counts.get("mse_loss") == 1
    torch.testing.assert_close(got, one_per_task(F.mse_loss, pred, target), rtol=1e-13, atol=1e-15)
    pred32, target32 = pred.float(), target.float()  # float32: the same up to rounding
    torch.testing.assert_close(task_losses(F.mse_loss, pred32, target32), one_per_task(F.mse_loss, pred32, target32))


@pytest.mark.parametrize("loss_fn", [functools.partial(F.cross_entropy, label_smoothing=0.2),
                                     lambda p, t: F.cross_entropy(p, t, reduction="sum")])
def test_other_loss_functions_take_the_per_task_loop(loss_fn):
    pred, target = classification_cases()["labels"]
    with LossCalls() as calls:
        got = task_losses(loss_fn, pred, target)
    assert calls.counts.get("cross_entropy") == len(pred)
    torch.testing.assert_close(got, one_per_task(loss_fn, pred, target), rtol=0, atol=0)
