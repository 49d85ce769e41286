import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from torch import nn

from components.conv4 import Conv4, Conv4Config
from components.task2vec import (DISTANCES, LABEL_MODES, Task2VecConfig, conv4_probe, conv4_task2vec, distinct_rows,
                                 fisher_diagonal, fisher_labels, fit_head, module_probe, pairwise_distances, predictive,
                                 task2vec, unit_fisher)

N_WAY = 3


def mlp_probe() -> tuple:
    """A float64 tanh MLP probe 4 -> 5 -> 6, a random head (3, 6), 7 examples."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh()).double()
    head = (torch.randn(N_WAY, 6, dtype=torch.float64), torch.randn(N_WAY, dtype=torch.float64))
    x = torch.randn(7, 4, dtype=torch.float64)
    return module_probe(body), head, x, torch.arange(7) % N_WAY


def loop_fisher(probe, head, x, labels, weights) -> dict:
    """Brute force: one autograd.grad per (example, label), squared and weighted one at a time."""
    params = {k: v.clone().requires_grad_() for k, v in probe.params.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(labels.shape[0]):
        for label, weight in zip(labels[i], weights[i]):
            one = x[i:i + 1] if torch.is_tensor(x) else tuple(t[i:i + 1] for t in x)
            logits = probe.features(params, one) @ head[0].T + head[1]
            grads = torch.autograd.grad(F.log_softmax(logits, -1)[0, label], list(params.values()))
            for k, g in zip(params, grads):
                total[k] += weight * g.square()
    return {k: v / labels.shape[0] for k, v in total.items()}


def assert_fisher_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-10, atol=1e-14)


def task_distance(a, b, metric="normalized_cosine") -> float:
    """One pair's distance, through the batched function the pipeline uses."""
    return float(pairwise_distances(a[None], b[None], metric)[0, 0])


@pytest.mark.parametrize("mode", LABEL_MODES)
def test_fisher_matches_per_example_loop(mode):
    probe, head, x, y = mlp_probe()
    gen = torch.Generator().manual_seed(1)
    labels, weights = fisher_labels(predictive(probe, head, x), y, mode, 5, gen)
    assert_fisher_close(fisher_diagonal(probe, head, x, labels, weights), loop_fisher(probe, head, x, labels, weights))
    chunked = fisher_diagonal(probe, head, x, labels, weights, chunk_size=3)
    assert_fisher_close(chunked, loop_fisher(probe, head, x, labels, weights))


class MaskedMeanBody(nn.Module):
    """Two inputs, like a text encoder's (hidden (B, L, D), mask (B, L)): masked mean, then linear + tanh."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 5)

    def forward(self, hidden, mask):
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.tanh(self.proj(pooled))


def test_fisher_with_tuple_inputs_matches_loop():
    torch.manual_seed(0)
    probe = module_probe(MaskedMeanBody().double(), names=("proj.weight",))
    x = (torch.randn(5, 3, 4, dtype=torch.float64), torch.tensor([[1.0, 1, 0]] * 3 + [[1.0, 0, 0]] * 2).double())
    head = (torch.randn(N_WAY, 5, dtype=torch.float64), torch.zeros(N_WAY, dtype=torch.float64))
    labels, weights = fisher_labels(predictive(probe, head, x), None, "expected", 0)
    fisher = fisher_diagonal(probe, head, x, labels, weights, chunk_size=2)
    assert list(fisher) == ["proj.weight"]
    assert_fisher_close(fisher, loop_fisher(probe, head, x, labels, weights))


def tiny_conv4() -> tuple:
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY, hidden=3, image_size=8)).double()  # 8 -> 4 -> 2 -> 1 -> 1
    return model, torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.arange(6) % N_WAY


def test_conv4_probe_equals_model_body_on_support():
    model, x, _ = tiny_conv4()
    probe = conv4_probe(model, x)
    torch.testing.assert_close(probe.features(probe.params, x), model.blocks(x).flatten(1).detach())
    assert list(probe.params) == [f"blocks.{i}.{p}" for i in range(4) for p in ("conv.weight", "norm.weight",
                                                                                  "norm.bias")]


def test_conv4_fisher_matches_per_example_loop():
    model, x, y = tiny_conv4()
    probe = conv4_probe(model, x)
    head = (torch.randn(N_WAY, 3, dtype=torch.float64), torch.zeros(N_WAY, dtype=torch.float64))
    labels, weights = fisher_labels(predictive(probe, head, x), y, "sampled", 4, torch.Generator().manual_seed(0))
    assert_fisher_close(fisher_diagonal(probe, head, x, labels, weights), loop_fisher(probe, head, x, labels, weights))


@pytest.mark.parametrize("mode", LABEL_MODES)
def test_conv4_unfolded_fisher_matches_float64_loop(mode):
    # 12 -> 6 -> 3 -> 2 -> 1: three of the four transposed convolutions need an output_padding; LoRA merges
    # adapters into the kernels; 7 draws from 3 classes repeat labels, which unfold merges into fewer rows.
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY, hidden=4, image_size=12, lora_rank=2, lora_b_std=0.1)).double()
    x, y = torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.arange(5) % N_WAY
    probe = conv4_probe(model, x)
    head = (torch.randn(N_WAY, 4, dtype=torch.float64), torch.randn(N_WAY, dtype=torch.float64))
    labels, weights = fisher_labels(predictive(probe, head, x), y, mode, 7, torch.Generator().manual_seed(0))
    expected = loop_fisher(probe, head, x, labels, weights)
    unfolded = fisher_diagonal(probe, head, x, labels, weights, method="unfold")
    assert_fisher_close(unfolded, expected)
    assert_fisher_close(fisher_diagonal(probe, head, x, labels, weights, chunk_size=2), expected)  # the default
    # what a batch gradient gives instead: the square of the mean gradient, far from the mean of the squares
    params = {k: v.clone().requires_grad_() for k, v in probe.params.items()}
    log_p = F.log_softmax(probe.features(params, x) @ head[0].T + head[1], -1)
    grads = torch.autograd.grad((weights * log_p.gather(1, labels)).sum() / len(x), list(params.values()))
    wrong = max(((g.square() - expected[k]).abs().max() / expected[k].abs().max()).item()
                for k, g in zip(params, grads))
    assert wrong > 0.1


def test_distinct_rows_merge_repeated_draws_and_drop_zero_weights():
    labels, weights = torch.tensor([[0, 2, 0, 2], [1, 1, 1, 1]]), torch.tensor([[0.25] * 4, [0.25, 0.25, 0.5, 0.0]])
    example, label, weight = distinct_rows(labels, weights, 3)
    assert example.tolist() == [0, 0, 1] and label.tolist() == [0, 2, 1]
    torch.testing.assert_close(weight, torch.tensor([0.5, 0.5, 1.0]))
    expected = distinct_rows(torch.arange(3).expand(2, 3), torch.tensor([[0.2, 0.0, 0.8], [0.1, 0.3, 0.6]]), 3)
    assert expected[0].tolist() == [0, 0, 1, 1, 1] and expected[1].tolist() == [0, 2, 0, 1, 2]


def test_fisher_method_must_exist_for_the_probe():
    probe, head, x, y = mlp_probe()
    labels, weights = fisher_labels(predictive(probe, head, x), y, "empirical", 1)
    with pytest.raises(ValueError, match="no unfolded Fisher"):
        fisher_diagonal(probe, head, x, labels, weights, method="unfold")
    with pytest.raises(ValueError, match="method"):
        fisher_diagonal(probe, head, x, labels, weights, method="backpack")


def test_linear_probe_expected_fisher_closed_form():
    # f(x) = A x, logits = W A x: d log p_y / dA = W^T (e_y - p) x^T, so
    # F_A = (1/B) sum_i sum_y p_iy (W^T (e_y - p_i))^2 (x_i^2)^T.
    torch.manual_seed(0)
    body = nn.Linear(4, 5, bias=False).double()
    probe, x = module_probe(body), torch.randn(6, 4, dtype=torch.float64)
    head = (torch.randn(N_WAY, 5, dtype=torch.float64), torch.zeros(N_WAY, dtype=torch.float64))
    p = predictive(probe, head, x)  # (B, N)
    residual = torch.eye(N_WAY, dtype=torch.float64)[None] - p[:, None, :]  # (B, y, N): e_y - p_i
    back = residual @ head[0]  # (B, y, 5)
    expected = torch.einsum("by,byo,bi->oi", p, back.square(), x.square()) / x.shape[0]
    labels, weights = fisher_labels(p, None, "expected", 0)
    torch.testing.assert_close(fisher_diagonal(probe, head, x, labels, weights)["weight"], expected)


def test_sampled_fisher_converges_to_expected():
    probe, head, x, y = mlp_probe()
    p = predictive(probe, head, x)
    exact = unit_fisher(fisher_diagonal(probe, head, x, *fisher_labels(p, y, "expected", 0)))
    sampled = fisher_labels(p, y, "sampled", 4000, torch.Generator().manual_seed(0))
    estimate = unit_fisher(fisher_diagonal(probe, head, x, *sampled))
    torch.testing.assert_close(estimate, exact, rtol=0.1, atol=0.0)


def test_empirical_fisher_below_true_when_right_above_when_wrong():
    # A confident, correct head: the true label's gradient (e_y - p) is small, the model's own rare labels
    # are not; with every label wrong, the empirical Fisher uses exactly those large gradients.
    probe, _, x, y = mlp_probe()
    feats = probe.features(probe.params, x)
    head = fit_head(feats, y, N_WAY, l2=1e-4)
    p = predictive(probe, head, x)
    assert (p.argmax(1) == y).all() and p.max(1).values.min() > 0.9

    def total(mode, labels):
        return sum(f.sum() for f in fisher_diagonal(probe, head, x, *fisher_labels(p, labels, mode, 0)).values())

    true = total("expected", y)
    assert total("empirical", y) < 0.5 * true
    assert total("empirical", (y + 1) % N_WAY) > 2 * true


def test_fit_head_separates_support():
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]]).repeat(3, 1)
    y = torch.arange(3).repeat(3)
    weight, bias = fit_head(x, y, 3)
    assert weight.shape == (3, 2) and bias.shape == (3,)
    assert ((x @ weight.T + bias).argmax(1) == y).all()


def test_task2vec_conv4_shape_and_seed():
    torch.manual_seed(0)
    model = Conv4(Conv4Config(hidden=4))
    x, y = torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2)
    probe = conv4_probe(model, x)
    a = task2vec(probe, x, y, 5, Task2VecConfig(seed=3))
    assert a.shape == (4 * 3 * 4,) and (a >= 0).all()  # 4 blocks x (conv filters, bn weights, bn biases)
    torch.testing.assert_close(task2vec(probe, x, y, 5, Task2VecConfig(seed=3)), a, rtol=0, atol=0)
    assert not torch.equal(task2vec(probe, x, y, 5, Task2VecConfig(seed=4)), a)


def test_conv4_task2vec_embeds_each_episode_on_its_own():
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY, hidden=2, image_size=8))
    x, y = torch.rand(3, 6, 1, 8, 8), (torch.arange(6) % N_WAY).expand(3, -1)
    cfg = Task2VecConfig(seed=2)
    batch = conv4_task2vec(model, x, y, N_WAY, cfg)
    assert batch.shape == (3, 4 * 3 * 2)
    alone = task2vec(conv4_probe(model, x[1]), x[1], y[1], N_WAY, Task2VecConfig(seed=3))
    torch.testing.assert_close(batch[1], alone, rtol=0, atol=0)


def test_unit_fisher_averages_per_output_unit():
    fisher = {"conv": torch.arange(8.0).reshape(2, 1, 2, 2), "bias": torch.tensor([5.0, 7.0]),
              "scale": torch.tensor(3.0)}
    torch.testing.assert_close(unit_fisher(fisher), torch.tensor([1.5, 5.5, 5.0, 7.0, 3.0]))


def test_module_probe_refuses_batch_statistics():
    with pytest.raises(ValueError, match="batch norm"):
        module_probe(Conv4(Conv4Config(hidden=2)).blocks)
    with pytest.raises(ValueError, match="batch norm"):
        module_probe(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    module_probe(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())
    with pytest.raises(ValueError, match="names"):
        module_probe(nn.Linear(2, 2), names=("nope",))


def embeddings() -> torch.Tensor:
    return torch.rand(6, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("metric", DISTANCES)
def test_distance_to_self_is_zero_and_symmetric(metric):
    e = embeddings()
    d = pairwise_distances(e, metric=metric)
    assert d.shape == (6, 6) and (d >= 0).all()
    torch.testing.assert_close(d.diagonal(), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(d, d.T, atol=1e-15, rtol=0)
    assert task_distance(e[2], e[4], metric) == pytest.approx(float(d[2, 4]))


@pytest.mark.parametrize("metric, scipy_metric", [("cosine", "cosine"), ("euclidean", "euclidean"),
                                                  ("manhattan", "cityblock")])
def test_metrics_agree_with_scipy(metric, scipy_metric):
    e = embeddings()
    np.testing.assert_allclose(pairwise_distances(e[:4], e[2:], metric).numpy(),
                               cdist(e[:4].numpy(), e[2:].numpy(), scipy_metric), rtol=1e-12, atol=1e-14)


def test_normalized_cosine_by_hand():
    # F_a + F_b = (2, 2, 1): u = (1/2, 0, 1), v = (1/2, 1, 0), cos = (1/4) / (5/4) = 1/5.
    a, b = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])
    assert task_distance(a, b) == pytest.approx(0.8)
    assert task_distance(7 * a, 7 * b) == pytest.approx(0.8)  # blind to a common scale
    with_dead_unit = task_distance(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 2.0, 0.0, 0.0]))
    assert with_dead_unit == pytest.approx(0.8)  # a unit zero in both drops out


def test_distances_refuse_bad_input():
    with pytest.raises(ValueError, match="metric"):
        pairwise_distances(embeddings(), metric="chebyshev")
    with pytest.raises(ValueError, match="non-negative"):
        task_distance(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="all-zero"):
        task_distance(torch.zeros(3), torch.ones(3), "cosine")
