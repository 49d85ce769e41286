"""The classification algorithms (ANIL, Proto-MAML first and second order, prototypical networks) and the MAML++
options (LSLR, multi-step loss, per-step batch norm, first order first, cosine meta learning rate), each checked in
float64 against an independent reference: hand-written forwards (a tanh MLP with a linear head, conv4, the MiniLM
top's pooled output), class means by boolean masks, plain `torch.autograd.grad` task by task; and central finite
differences on a few coordinates. The conv4 checks run every path, the grouped task-batched one included.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.conv4 import Conv4, Conv4Config, adapted_names
from components.episodes import EpisodeBatch
from components.evaluation import _learner_curve, evaluate_init, evaluate_params
from components.families import accuracy
from components.metalearners import VARIANTS, MetaLearner, MetaLearnerConfig, multi_step_weights, prototype_head
from components.training import TrainConfig, meta_lr_schedule, meta_train

N_WAY, K_SHOT, N_QUERY, D_IN, HIDDEN, N_TASKS = 3, 2, 2, 4, 6, 3
FAST_LR, STEPS, EPS = 0.3, 2, 1e-6
HEAD = ("head.weight", "head.bias")


class TinyNet(nn.Module):
    """Two tanh layers (the body) and a linear head: features(x (B, 4)) -> (B, 6); forward -> logits (B, 3)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D_IN, HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, N_WAY)

    def features(self, x):
        return torch.tanh(self.mid(torch.tanh(self.body(x))))

    def forward(self, x):
        return self.head(self.features(x))


def tiny_features(w, x, step=0):
    h = torch.tanh(x @ w["body.weight"].T + w["body.bias"])
    return torch.tanh(h @ w["mid.weight"].T + w["mid.bias"])


def class_means(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([h[y == c].mean(0) for c in range(int(y.max()) + 1)])


@pytest.fixture(scope="module")
def batch() -> EpisodeBatch:
    """3 tasks, 3-way 2-shot, 2 queries per class: Gaussian classes in 4-D, float64."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(N_TASKS, N_WAY, D_IN, generator=g, dtype=torch.float64)
    y_spt = torch.arange(N_WAY).repeat_interleave(K_SHOT).expand(N_TASKS, -1)
    y_qry = torch.arange(N_WAY).repeat_interleave(N_QUERY).expand(N_TASKS, -1)

    def draw(y):
        return means[torch.arange(N_TASKS)[:, None], y] + 0.8 * torch.randn(*y.shape, D_IN, generator=g,
                                                                            dtype=torch.float64)

    return EpisodeBatch(draw(y_spt), y_spt, draw(y_qry), y_qry)


def make(algorithm: str, adapted=None, steps: int = STEPS, **cfg) -> MetaLearner:
    torch.manual_seed(0)
    config = MetaLearnerConfig(algorithm=algorithm, inner_steps=steps, fast_lr=FAST_LR, **cfg)
    return MetaLearner(TinyNet().double(), config, F.cross_entropy, adapted=adapted,
                       head=HEAD if VARIANTS[algorithm].needs_head else ())


def leaves(learner: MetaLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in learner.params.items()}


def learned(learner: MetaLearner, w: dict) -> list[torch.Tensor]:
    """The reference's tensors in the order of learner.parameters() (weights only)."""
    return [w[k] for k in learner.params if k not in learner.replaced]


def grads_of(learner: MetaLearner, batch, iteration=None) -> tuple[float, list[torch.Tensor]]:
    for p in learner.parameters():
        p.grad = None
    loss = learner.meta_backward(batch, iteration)
    return loss, [p.grad.clone() for p in learner.parameters()]


def reference_meta_loss(w, batch, steps, adapted, rate, features=tiny_features, first_order=False, proto=False,
                        loss_weights=None) -> torch.Tensor:
    """Mean over tasks of the query loss after `steps` SGD steps on the adapted weights, one task at a time.

    logits = features(w, x, s) @ head.weight.T + head.bias, s the steps taken; rate(name, step) -> inner rate;
    proto: the head starts at 2 c, -||c||^2 from the task's support class means c of features(w), its own inner-loop
    variable: the inner gradients are partial derivatives at a fixed head (the clones below are what they are taken
    with respect to), while the meta-gradient reaches w through c. loss_weights: the weighted query losses after each
    step (multi-step loss) instead of the last one."""
    def logits(fast, x, s):
        return features(fast, x, s) @ fast["head.weight"].T + fast["head.bias"]

    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch):
        fast = {k: v.clone() for k, v in w.items()}
        if proto:
            c = class_means(features(w, x_spt, 0), y_spt)
            fast["head.weight"], fast["head.bias"] = 2 * c, -(c * c).sum(1)
        terms = []
        for s in range(steps):
            support = F.cross_entropy(logits(fast, x_spt, s), y_spt)
            grads = torch.autograd.grad(support, [fast[k] for k in adapted], create_graph=not first_order)
            fast.update({k: fast[k] - rate(k, s) * g for k, g in zip(adapted, grads)})
            terms.append(F.cross_entropy(logits(fast, x_qry, s + 1), y_qry))
        if loss_weights is None:
            losses.append(F.cross_entropy(logits(fast, x_qry, steps), y_qry))
        else:
            losses.append(sum(a * t for a, t in zip(loss_weights, terms)))
    return torch.stack(losses).mean()


def fixed_rate(name, step):
    return FAST_LR


def assert_grads(got, want, names=None):
    for i, (g, e) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=lambda m: f"{names[i] if names else i}: {m}")


def finite_difference(learner: MetaLearner, batch, tensor, idx, first_order=False) -> float:
    def loss():
        with torch.no_grad():
            return learner.query_losses(batch, learner.cfg.inner_steps, first_order).mean().item()

    with torch.no_grad():
        tensor[idx] += EPS
    up = loss()
    with torch.no_grad():
        tensor[idx] -= 2 * EPS
    down = loss()
    with torch.no_grad():
        tensor[idx] += EPS
    return (up - down) / (2 * EPS)


# --- the variant table ---

def test_every_algorithm_is_a_row_of_the_table():
    assert tuple(VARIANTS) == ("maml", "fomaml", "reptile", "metasgd", "anil_maml", "protomaml", "foprotomaml",
                               "protonet")
    from components.metalearners import ALGORITHMS
    assert ALGORITHMS == ("maml", "fomaml", "reptile", "metasgd")  # the ones without a head: any model


def test_prototype_head_scores_like_negative_squared_distance():
    g = torch.Generator().manual_seed(3)
    h, x = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    weight, bias = prototype_head(h, y, 3)
    c = class_means(h, y)
    distance = ((x[:, None] - c[None]) ** 2).sum(-1)
    torch.testing.assert_close(x @ weight.T + bias, -distance + (x * x).sum(1, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.log_softmax(x @ weight.T + bias, -1), torch.log_softmax(-distance, -1),
                               rtol=1e-12, atol=1e-12)


# --- Proto-MAML ---

@pytest.mark.parametrize("vectorize", [True, False])
def test_protomaml_matches_reference(batch, vectorize):
    learner = make("protomaml", vectorize=vectorize)
    assert learner.replaced == HEAD and len(learner.parameters()) == 4  # the head start is not meta-learned
    w = leaves(learner)
    meta_loss = reference_meta_loss(w, batch, STEPS, list(w), fixed_rate, proto=True)
    loss, got = grads_of(learner, batch)
    assert loss == pytest.approx(meta_loss.item(), rel=1e-12)
    assert_grads(got, torch.autograd.grad(meta_loss, learned(learner, w)))


def test_protomaml_matches_finite_differences(batch):
    learner = make("protomaml")
    _, got = grads_of(learner, batch)
    grads = dict(zip([k for k in learner.params if k not in HEAD], got))
    for name, idx in [("body.weight", (2, 1)), ("mid.weight", (0, 4)), ("mid.bias", (3,))]:
        fd = finite_difference(learner, batch, learner.params[name], idx)
        assert grads[name][idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), name


def test_first_order_protomaml_keeps_the_gradient_through_the_prototypes(batch):
    learner = make("foprotomaml")
    w = leaves(learner)
    meta_loss = reference_meta_loss(w, batch, STEPS, list(w), fixed_rate, first_order=True, proto=True)
    _, got = grads_of(learner, batch)
    assert_grads(got, torch.autograd.grad(meta_loss, learned(learner, w)))
    second = grads_of(make("protomaml"), batch)[1]
    assert max((a - b).abs().max().item() for a, b in zip(got, second)) > 1e-4
    # first-order MAML from a learned head gives the body only what the query loss says at the adapted weights:
    fomaml = grads_of(make("fomaml"), batch)[1][:4]
    assert max((a - b).abs().max().item() for a, b in zip(got, fomaml)) > 1e-4


def test_protomaml_over_a_head_only_adapted_set_is_anil_from_prototypes(batch):
    learner = make("protomaml", adapted=HEAD)
    w = leaves(learner)
    meta_loss = reference_meta_loss(w, batch, STEPS, list(HEAD), fixed_rate, proto=True)
    assert_grads(grads_of(learner, batch)[1], torch.autograd.grad(meta_loss, learned(learner, w)))


# --- prototypical networks ---

def reference_protonet(w, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean query loss, per-task accuracy) with logits = -squared euclidean distance to the class means."""
    losses, correct = [], []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch):
        c = class_means(tiny_features(w, x_spt), y_spt)
        logits = -((tiny_features(w, x_qry)[:, None] - c[None]) ** 2).sum(-1)
        losses.append(F.cross_entropy(logits, y_qry))
        correct.append((logits.argmax(-1) == y_qry).double().mean())
    return torch.stack(losses).mean(), torch.stack(correct).detach()


@pytest.mark.parametrize("vectorize", [True, False])
def test_protonet_meta_gradient_is_the_query_loss_gradient(batch, vectorize):
    learner = make("protonet", vectorize=vectorize)
    assert learner.lrs == {} and learner.n_adapted == 0
    w = leaves(learner)
    meta_loss, correct = reference_protonet(w, batch)
    loss, got = grads_of(learner, batch)
    assert loss == pytest.approx(meta_loss.item(), rel=1e-12)
    assert_grads(got, torch.autograd.grad(meta_loss, learned(learner, w)))
    curve = evaluate_init(learner, batch, 3, score_fn=accuracy)  # no inner loop: every step scores the prototypes
    assert curve.shape == (4, N_TASKS) and (curve == curve[0]).all()
    torch.testing.assert_close(torch.from_numpy(curve[0]), correct, rtol=0, atol=1e-6)  # accuracy is float32


def test_protomaml_step_zero_is_the_prototypical_network(batch):
    protomaml, protonet = make("protomaml"), make("protonet")
    curve = evaluate_init(protomaml, batch, 2, score_fn=accuracy)
    assert (curve[0] == evaluate_init(protonet, batch, 0, score_fn=accuracy)[0]).all()


# --- ANIL ---

def test_anil_adapts_the_head_only_and_meta_learns_the_body(batch):
    learner = make("anil_maml", adapted=None)  # the family's set (all) is replaced by the head
    assert tuple(learner.lrs) == HEAD and len(learner.parameters()) == 6
    w = leaves(learner)
    meta_loss = reference_meta_loss(w, batch, STEPS, list(HEAD), fixed_rate)
    _, got = grads_of(learner, batch)
    assert_grads(got, torch.autograd.grad(meta_loss, list(w.values())))
    assert all(g.abs().max() > 1e-6 for g in got[:4])
    fast = learner.adapt_batch(batch.x_spt, batch.y_spt, 1)
    assert all(torch.equal(fast[k], w[k].detach().expand_as(fast[k])) for k in w if k not in HEAD)


# --- MAML++: LSLR ---

def randomise_rates(learner: MetaLearner, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in learner.lrs.values():
            v.copy_(FAST_LR * (0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "protomaml"])
def test_lslr_learns_one_rate_per_tensor_and_step(batch, algorithm):
    learner = make(algorithm, lslr=True)
    assert all(v.shape == (STEPS,) for v in learner.lrs.values())
    randomise_rates(learner)
    w, rates = leaves(learner), {k: v.detach().clone().requires_grad_() for k, v in learner.lrs.items()}
    meta_loss = reference_meta_loss(w, batch, STEPS, list(w), lambda k, s: rates[k][s],
                                    first_order=algorithm == "fomaml", proto=algorithm == "protomaml")
    _, got = grads_of(learner, batch)
    assert_grads(got, torch.autograd.grad(meta_loss, learned(learner, w) + list(rates.values())))
    if algorithm == "maml":
        fd = finite_difference(learner, batch, learner.lrs["mid.weight"], (1,))
        rate_grad = got[len(learner.params) + list(learner.lrs).index("mid.weight")]  # rates follow the weights
        assert rate_grad[1].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_lslr_evaluation_reuses_the_last_rate_past_the_trained_steps(batch):
    learner = make("maml", lslr=True)
    randomise_rates(learner)
    w = {k: v.detach() for k, v in learner.params.items()}
    curve = evaluate_init(learner, batch, 3)
    for t, (x_spt, y_spt, x_qry, y_qry) in enumerate(zip(*batch)):
        fast = {k: v.clone().requires_grad_() for k, v in w.items()}
        for s in range(4):
            query = F.cross_entropy(tiny_features(fast, x_qry) @ fast["head.weight"].T + fast["head.bias"], y_qry)
            assert curve[s, t] == pytest.approx(query.item(), rel=1e-10), (s, t)
            support = F.cross_entropy(tiny_features(fast, x_spt) @ fast["head.weight"].T + fast["head.bias"], y_spt)
            grads = torch.autograd.grad(support, list(fast.values()))
            fast = {k: (v - learner.lrs[k][min(s, STEPS - 1)].detach() * g).detach().requires_grad_()
                    for (k, v), g in zip(fast.items(), grads)}


# --- MAML++: multi-step loss ---

def test_multi_step_weights_hand_computed():
    assert multi_step_weights(3, 0, 10) == pytest.approx([1 / 3] * 3)
    assert multi_step_weights(3, 5, 10) == pytest.approx([1 / 6, 1 / 6, 2 / 3])  # decay 5 / 30
    assert multi_step_weights(3, 9, 10) == pytest.approx([1 / 30, 1 / 30, 14 / 15])
    assert multi_step_weights(3, 10, 10) == [0.0, 0.0, 1.0]
    assert multi_step_weights(4, 49, 50) == pytest.approx([0.0075, 0.0075, 0.0075, 0.9775])  # floor 0.03 / 4, cap
    for done in range(12):
        assert sum(multi_step_weights(4, done, 11)) == pytest.approx(1.0)


@pytest.mark.parametrize("vectorize", [True, False])
def test_multi_step_loss_matches_reference_and_ends_as_maml(batch, vectorize):
    learner = make("maml", msl_iterations=10, vectorize=vectorize)
    w = leaves(learner)
    meta_loss = reference_meta_loss(w, batch, STEPS, list(w), fixed_rate, loss_weights=[0.35, 0.65])  # iteration 4
    loss, got = grads_of(learner, batch, iteration=4)
    assert loss == pytest.approx(meta_loss.item(), rel=1e-12)
    assert_grads(got, torch.autograd.grad(meta_loss, list(w.values())))
    after, maml = grads_of(learner, batch, iteration=11), grads_of(make("maml", vectorize=vectorize), batch)
    assert after[0] == maml[0] and all(torch.equal(a, b) for a, b in zip(after[1], maml[1]))


# --- MAML++: first order first ---

def test_first_order_for_the_first_iterations_then_second_order(batch):
    learner = make("maml", first_order_iterations=3)
    fomaml, maml = grads_of(make("fomaml"), batch)[1], grads_of(make("maml"), batch)[1]
    for iteration, want in ((1, fomaml), (3, fomaml), (4, maml), (None, maml)):
        assert all(torch.equal(a, b) for a, b in zip(grads_of(learner, batch, iteration)[1], want)), iteration


def test_meta_train_hands_each_iteration_to_the_learner(batch):
    learner, seen = make("maml", first_order_iterations=2), []
    backward = learner.meta_backward
    learner.meta_backward = lambda b, iteration=None: seen.append(iteration) or backward(b, iteration)
    meta_train(learner, batch, batch, TrainConfig(iterations=4, meta_batch_size=2, val_every=4))
    assert seen == [1, 2, 3, 4]


# --- conv4: every path, the grouped one included, against a per-task reference ---

C4_WAY, C4_QUERY = 5, 2
PATHS = {"task_batched": dict(task_batched=True), "task_batched_chunked": dict(task_batched=True, task_chunk=2,
                                                                                 query_chunk=1),
         "vmap": dict(vectorize=True), "loop": dict(vectorize=False)}
OPTIONS = {
    "protomaml": dict(algorithm="protomaml", inner_steps=1),
    "foprotomaml": dict(algorithm="foprotomaml"),
    "lslr": dict(lslr=True),
    "msl": dict(msl_iterations=10),
    "per_step_bn": dict(per_step_bn=True),
    "all": dict(algorithm="protomaml", lslr=True, msl_iterations=10, per_step_bn=True),
}


@pytest.fixture(scope="module")
def episodes(random_episodes) -> EpisodeBatch:
    return random_episodes(3, C4_WAY, C4_QUERY)


def conv4_learner(algorithm="maml", inner_steps=STEPS, **cfg) -> MetaLearner:
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=C4_WAY)).double()
    config = MetaLearnerConfig(algorithm=algorithm, inner_steps=inner_steps, fast_lr=0.4, **cfg)
    norms = tuple(k for k, _ in model.named_parameters() if ".norm." in k) if config.per_step_bn else ()
    return MetaLearner(model, config, F.cross_entropy, adapted=adapted_names(model, "full"),
                       head=HEAD if config.variant.needs_head else (), per_step=norms)


def conv4_features(w, x, step, rows=None):
    """conv4 written out; batch norm from this batch's mean and biased variance, its affine at row min(step, S - 1)."""
    h = x
    for i in range(4):
        h = F.conv2d(h, w[f"blocks.{i}.conv.weight"], stride=2, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        gamma, beta = (w[f"blocks.{i}.norm.{p}"] if rows is None else rows[f"blocks.{i}.norm.{p}"][
            min(step, len(rows[f"blocks.{i}.norm.{p}"]) - 1)] for p in ("weight", "bias"))
        h = torch.relu((h - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1))
    return h.flatten(1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", OPTIONS)
def test_conv4_options_match_the_per_task_reference(episodes, option, path):
    learner = conv4_learner(**OPTIONS[option], **PATHS[path])
    cfg, iteration = learner.cfg, 4  # msl at iteration 4, anneal 10, 2 steps: weights 0.35, 0.65
    if cfg.lslr:
        randomise_rates(learner)
    with torch.no_grad():
        for v in learner.per_step.values():  # rows that differ, so each step's own row matters
            v.add_(0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5), dtype=v.dtype))
    w = leaves(learner)
    rows = {k: v.detach().clone().requires_grad_() for k, v in learner.per_step.items()}
    rates = {k: v.detach().clone().requires_grad_() for k, v in learner.lrs.items()}

    def features(fast, x, s):
        return conv4_features(fast, x, s, rows or None)

    meta_loss = reference_meta_loss(w, episodes, cfg.inner_steps, list(learner.lrs),
                                    (lambda k, s: rates[k][s]) if cfg.lslr else (lambda k, s: 0.4), features,
                                    first_order=cfg.variant.first_order, proto=cfg.variant.head_init == "prototypes",
                                    loss_weights=[0.35, 0.65] if cfg.msl_iterations else None)
    loss, got = grads_of(learner, episodes, iteration)
    assert loss == pytest.approx(meta_loss.item(), rel=1e-10)
    wrt = learned(learner, w) + list(rows.values()) + (list(rates.values()) if cfg.lslr else [])
    assert_grads(got, torch.autograd.grad(meta_loss, wrt))


@pytest.mark.parametrize("path", PATHS)
def test_conv4_protonet_matches_the_distance_reference(episodes, path):
    learner = conv4_learner("protonet", **PATHS[path])
    w = leaves(learner)
    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*episodes):
        c = class_means(conv4_features(w, x_spt, 0), y_spt)
        losses.append(F.cross_entropy(-((conv4_features(w, x_qry, 0)[:, None] - c[None]) ** 2).sum(-1), y_qry))
    meta_loss = torch.stack(losses).mean()
    loss, got = grads_of(learner, episodes)
    assert loss == pytest.approx(meta_loss.item(), rel=1e-10)
    assert_grads(got, torch.autograd.grad(meta_loss, learned(learner, w)))


def test_conv4_evaluation_agrees_across_paths_and_with_the_reference(episodes):
    """Proto-MAML + LSLR + per-step batch norm at test time, 3 steps after 2 trained ones (last rate and row reused)."""
    curves = {}
    for path in ("task_batched_chunked", "loop"):
        learner = conv4_learner(**OPTIONS["all"], **PATHS[path])
        randomise_rates(learner)
        with torch.no_grad():
            for v in learner.per_step.values():
                v.add_(0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5), dtype=v.dtype))
        curves[path] = evaluate_init(learner, episodes, 3, chunk=2, score_steps=[0, 1, 3])
    torch.testing.assert_close(curves["task_batched_chunked"], curves["loop"], rtol=1e-10, atol=1e-12)
    w = {k: v.detach() for k, v in learner.params.items()}
    rows = {k: v.detach() for k, v in learner.per_step.items()}
    for t, (x_spt, y_spt, x_qry, y_qry) in enumerate(zip(*episodes)):
        c = class_means(conv4_features(w, x_spt, 0, rows), y_spt)
        fast = {**w, "head.weight": 2 * c, "head.bias": -(c * c).sum(1)}
        fast = {k: v.clone().requires_grad_() for k, v in fast.items()}
        for s in range(4):
            if s in (0, 1, 3):
                logits = conv4_features(fast, x_qry, s, rows) @ fast["head.weight"].T + fast["head.bias"]
                assert curves["loop"][[0, 1, 3].index(s), t] == pytest.approx(F.cross_entropy(logits, y_qry).item(),
                                                                              rel=1e-9)
            logits = conv4_features(fast, x_spt, s, rows) @ fast["head.weight"].T + fast["head.bias"]
            grads = torch.autograd.grad(F.cross_entropy(logits, y_spt), [fast[k] for k in learner.lrs])
            fast.update({k: (fast[k] - learner.lrs[k][min(s, STEPS - 1)].detach() * g).detach().requires_grad_()
                         for k, g in zip(learner.lrs, grads)})


def test_the_learners_own_curve_equals_evaluate_params_for_a_plain_learner(batch):
    learner = make("metasgd")
    randomise_rates(learner)
    init = {k: v.detach() for k, v in learner.params.items()}
    want = evaluate_params(learner.model, init, learner.lrs, batch, 3, F.cross_entropy, per_task=False,
                           score_fn=accuracy)
    got = _learner_curve(learner, batch, 3, 2, accuracy, None)
    assert learner.plain and (got == want).all()


# --- the text model: Proto-MAML over the cached MiniLM top ---

def test_protomaml_over_cached_text_rows_matches_reference():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from torch.func import functional_call

    from components.text import CachedTopEncoder, PooledTop, TopEncoder, TopEncoderConfig, adapted_names as lora_names
    from components.text import frozen_names

    bert_cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    top = TopEncoder(transformers.BertModel(bert_cfg, add_pooling_layer=False).eval(),
                     TopEncoderConfig(n_layers=1, n_way=3, lora_r=2, lora_b_std=0.05)).double()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(18, 5, 8, generator=g, dtype=torch.float64)
    mask = (torch.arange(5) < torch.randint(2, 6, (18,), generator=g)[:, None]).long()
    model = CachedTopEncoder(top, hidden, mask)
    rows = torch.randperm(18, generator=g).view(2, 9)  # 2 tasks, 3 classes x (1 support + 2 queries)
    labels = torch.arange(3).expand(2, 3)
    batch = EpisodeBatch(rows[:, :3], labels, rows[:, 3:], torch.arange(3).repeat_interleave(2).expand(2, 6))
    head = ("top.head.weight", "top.head.bias")
    learner = MetaLearner(model, MetaLearnerConfig(algorithm="protomaml", fast_lr=0.5), F.cross_entropy,
                          adapted=lora_names(model), frozen=frozen_names(model), head=head)
    pooled = PooledTop(top)
    w = leaves(learner)

    def features(fast, x, step):
        return functional_call(pooled, fast, (hidden[x], mask[x]))

    losses = []
    for x_spt, y_spt, x_qry, y_qry in zip(*batch):
        c = class_means(features(w, x_spt, 0), y_spt)
        fast = {**{k: v.clone() for k, v in w.items()}, head[0]: 2 * c, head[1]: -(c * c).sum(1)}
        names = list(learner.lrs)
        support = F.cross_entropy(features(fast, x_spt, 0) @ fast[head[0]].T + fast[head[1]], y_spt)
        grads = torch.autograd.grad(support, [fast[k] for k in names], create_graph=True)
        fast.update({k: fast[k] - 0.5 * gk for k, gk in zip(names, grads)})
        losses.append(F.cross_entropy(features(fast, x_qry, 1) @ fast[head[0]].T + fast[head[1]], y_qry))
    meta_loss = torch.stack(losses).mean()
    loss, got = grads_of(learner, batch)
    assert loss == pytest.approx(meta_loss.item(), rel=1e-10)
    assert_grads(got, torch.autograd.grad(meta_loss, learned(learner, w)))
    assert all(g.abs().max() > 0 for g in got)  # every LoRA factor learns, through the prototypes too


# --- cosine annealing of the meta learning rate ---

@pytest.fixture(scope="module")
def pools():
    from components.tasksets import SinusoidFamily, sample_sinusoid_tasks, to_batch

    table = sample_sinusoid_tasks(SinusoidFamily(k_shot=5, n_query=5), {"meta_train": 12, "meta_val": 4}, seed=0)
    return tuple(to_batch(table[table["split"] == s]) for s in ("meta_train", "meta_val"))


def sine_learner():
    from components.models import MLP

    torch.manual_seed(0)
    return MetaLearner(MLP((1, 8, 8, 1)), MetaLearnerConfig(inner_steps=2, fast_lr=0.02), F.mse_loss)


def test_cosine_schedule_values():
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = meta_lr_schedule(opt, TrainConfig(meta_lr=0.1, cosine_iterations=4, min_meta_lr=0.02))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    mid = 0.02 + 0.08 * (1 + 2 ** -0.5) / 2
    assert seen == pytest.approx([0.1, mid, 0.06, 0.02 + 0.08 * (1 - 2 ** -0.5) / 2, 0.02, 0.02])
    assert meta_lr_schedule(opt, TrainConfig(meta_lr=0.1)) is None


def test_cosine_run_resumes_exactly_and_differs_from_a_constant_one(pools, tmp_path):
    train, val = pools
    cfg = dict(meta_lr=1e-2, iterations=14, meta_batch_size=4, val_every=3, checkpoint_every=5, seed=1)
    cosine = TrainConfig(**cfg, cosine_iterations=14, min_meta_lr=1e-4)
    fresh = meta_train(sine_learner(), train, val, cosine)
    ckpt = tmp_path / "run.pt"
    meta_train(sine_learner(), train, val, TrainConfig(**{**cfg, "iterations": 7}, cosine_iterations=14,
                                                       min_meta_lr=1e-4), ckpt)
    resumed = meta_train(sine_learner(), train, val, cosine, ckpt)
    assert resumed.iterations_run == 7
    for k, v in fresh.final_state["params"].items():
        assert torch.equal(resumed.final_state["params"][k], v), k
    assert resumed.history.equals(fresh.history)
    constant = meta_train(sine_learner(), train, val, TrainConfig(**cfg))
    assert not torch.equal(constant.final_state["params"]["net.0.weight"], fresh.final_state["params"]["net.0.weight"])
    with pytest.raises(ValueError, match="train.cosine_iterations"):
        meta_train(sine_learner(), train, val, TrainConfig(**cfg), ckpt)


def test_a_checkpoint_from_before_the_new_fields_resumes(pools, tmp_path):
    from components.storage import load_tensors

    train, val = pools
    cfg = TrainConfig(meta_lr=1e-2, iterations=6, meta_batch_size=4, val_every=3, seed=1)
    ckpt = tmp_path / "run.pt"
    meta_train(sine_learner(), train, val, TrainConfig(**{**cfg.__dict__, "iterations": 3}), ckpt)
    state = load_tensors(ckpt)
    for name in ("cosine_iterations", "min_meta_lr"):
        del state["config"]["train"][name]
    for name in ("lslr", "msl_iterations", "per_step_bn", "first_order_iterations"):
        del state["config"]["learner"][name]
    torch.save(state, ckpt)
    assert meta_train(sine_learner(), train, val, cfg, ckpt).iterations_run == 3


# --- configuration errors name the field ---

@pytest.mark.parametrize("kwargs, field", [
    (dict(algorithm="metasgd", lslr=True), "lslr"),
    (dict(algorithm="reptile", lslr=True), "lslr"),
    (dict(algorithm="protonet", msl_iterations=5, inner_steps=2), "msl_iterations"),
    (dict(algorithm="maml", msl_iterations=5, inner_steps=1), "msl_iterations"),
    (dict(algorithm="fomaml", first_order_iterations=5), "first_order_iterations"),
    (dict(algorithm="reptile", per_step_bn=True), "per_step_bn"),
    (dict(algorithm="maml", first_order_iterations=-1), "first_order_iterations"),
])
def test_option_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MetaLearnerConfig(**kwargs)


def test_learner_errors_name_the_argument():
    model = TinyNet().double()
    with pytest.raises(ValueError, match="head"):
        MetaLearner(model, MetaLearnerConfig(algorithm="anil_maml"), F.cross_entropy)
    with pytest.raises(ValueError, match="head"):
        MetaLearner(model, MetaLearnerConfig(algorithm="protomaml"), F.cross_entropy, head=("head.weight",))
    with pytest.raises(ValueError, match="zero_init"):
        MetaLearner(model, MetaLearnerConfig(algorithm="protomaml"), F.cross_entropy, head=HEAD, zero_init=HEAD)
    with pytest.raises(ValueError, match="per_step"):
        MetaLearner(model, MetaLearnerConfig(), F.cross_entropy, per_step=("mid.bias",))
    with pytest.raises(ValueError, match="features"):
        MetaLearner(nn.Sequential(nn.Linear(4, 3)).double(), MetaLearnerConfig(algorithm="protonet"), F.cross_entropy,
                    head=("0.weight", "0.bias"))


def test_families_give_the_learner_its_head_and_batch_norms():
    from components.families.omniglot import OmniglotTasks
    from components.families.sinusoid import SinusoidTasks

    family = OmniglotTasks()
    anil = family.learner({}, MetaLearnerConfig(algorithm="anil_maml"), torch.device("cpu"), 0)
    assert tuple(anil.lrs) == HEAD and anil.head == HEAD
    bn = family.learner({}, MetaLearnerConfig(algorithm="protomaml", inner_steps=3, per_step_bn=True),
                        torch.device("cpu"), 0)
    assert list(bn.per_step) == [f"blocks.{i}.norm.{p}" for i in range(4) for p in ("weight", "bias")]
    assert all(v.shape == (4, 64) for v in bn.per_step.values()) and not set(bn.per_step) & set(bn.lrs)
    assert set(bn.state_dict()) == {"params", "lrs", "per_step"}
    with pytest.raises(ValueError, match="per_step_bn"):
        SinusoidTasks().learner({}, MetaLearnerConfig(per_step_bn=True), torch.device("cpu"), 0)


def study(**meta_train) -> dict:
    return {"family": {"kind": "omniglot"}, "model": {"kind": "conv4"}, "meta_train": meta_train}


@pytest.mark.parametrize("raw, field", [
    ({"meta_train": {"algorithms": ["protomaml"]}}, "meta_train.algorithms"),
    ({"model": {"kind": "minilm", "adapted": "head"}, "family": {"kind": "text"},
      "meta_train": {"algorithms": ["maml"], "per_step_bn": True}}, "meta_train.per_step_bn"),
    (study(algorithms=["maml", "reptile"], lslr=True), "meta_train.lslr"),
    (study(algorithms=["maml"], overrides={"maml": {"lslr": True}}, metasgd_lr_range=[1e-4, 0.5],
           min_meta_lr=1e-5), "meta_train.min_meta_lr"),
    (study(algorithms=["metasgd"], overrides={"metasgd": {"lslr": True}}), "meta_train.overrides.metasgd.lslr"),
    (study(algorithms=["protomaml"], zero_head=True), "meta_train.zero_head"),
    ({"model": {"kind": "minilm", "adapted": "head"}, "family": {"kind": "text"},
      "meta_train": {"algorithms": ["protonet"]}}, "model.adapted"),
])
def test_config_errors_name_the_key(tmp_path, raw, field):
    import yaml

    from flows.config import ConfigError, load_config

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(path)


def test_config_to_settings_carries_every_option(tmp_path):
    import yaml

    from flows.config import Algorithm, load_config
    from flows.families import algorithm_settings
    from typing import get_args

    assert get_args(Algorithm) == tuple(VARIANTS)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study(
        algorithms=["maml", "anil_maml", "protomaml", "foprotomaml", "protonet", "reptile"], inner_steps=3,
        iterations=600, overrides={"maml": {"lslr": True, "msl_iterations": 100, "per_step_bn": True,
                                            "first_order_iterations": 50, "meta_lr_schedule": "cosine",
                                            "min_meta_lr": 1e-5}})))
    cfg = load_config(path)
    maml = algorithm_settings(cfg, "maml", 0)
    assert (maml.learner.lslr, maml.learner.msl_iterations, maml.learner.per_step_bn,
            maml.learner.first_order_iterations) == (True, 100, True, 50)
    assert (maml.train.cosine_iterations, maml.train.min_meta_lr) == (600, 1e-5)
    plain = algorithm_settings(cfg, "reptile", 0)
    assert plain.learner == MetaLearnerConfig(algorithm="reptile", inner_steps=3, fast_lr=0.01)
    assert (plain.train.cosine_iterations, plain.train.min_meta_lr) == (0, 0.0)
    assert algorithm_settings(cfg, "protonet", 0).learner.variant.inner == "none"
