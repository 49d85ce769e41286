"""evaluate_init, results_table and the scratch / pretrain baselines, against plain torch references."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.baselines import finetune, pooled_points, pretrain, scratch
from components.evaluation import evaluate_init, results_table
from components.metalearners import MetaLearner, MetaLearnerConfig
from components.models import MLP
from components.tasksets import SinusoidFamily, TaskBatch, sample_sinusoid_tasks, task_ids, to_batch

SIZES = (1, 8, 8, 1)
STEPS = 4


@pytest.fixture(scope="module")
def table():
    family = SinusoidFamily(k_shot=5, n_query=6)
    return sample_sinusoid_tasks(family, {"meta_train": 8, "meta_test": 5}, seed=0)


@pytest.fixture(scope="module")
def tasks(table) -> TaskBatch:
    """5 meta-test tasks, float64."""
    return to_batch(table[table["split"] == "meta_test"], dtype=torch.float64)


@pytest.fixture(scope="module")
def train(table) -> TaskBatch:
    return to_batch(table[table["split"] == "meta_train"], dtype=torch.float64)


def make_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(SIZES).double()


def make_learner(algorithm: str = "maml") -> MetaLearner:
    return MetaLearner(make_model(), MetaLearnerConfig(algorithm=algorithm, fast_lr=0.05), F.mse_loss)


def reference_curve(model, lrs: list[torch.Tensor], x_spt, y_spt, x_qry, y_qry, steps) -> list[float]:
    """Query loss after 0..steps manual SGD steps on one task: per-weight rates, plain autograd, no torch.func."""
    model = copy.deepcopy(model)
    curve = []
    for k in range(steps + 1):
        with torch.no_grad():
            curve.append(F.mse_loss(model(x_qry), y_qry).item())
        if k == steps:
            break
        grads = torch.autograd.grad(F.mse_loss(model(x_spt), y_spt), list(model.parameters()))
        with torch.no_grad():
            for p, lr, g in zip(model.parameters(), lrs, grads):
                p -= lr * g
    return curve


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_evaluate_init_matches_manual_sgd(tasks, algorithm):
    learner = make_learner(algorithm)
    if algorithm == "metasgd":  # distinct per-weight rates, so a mix-up of rates would show
        with torch.no_grad():
            for v in learner.lrs.values():
                v.uniform_(0.01, 0.1, generator=torch.Generator().manual_seed(3))
    losses = evaluate_init(learner, tasks, STEPS)
    assert losses.shape == (STEPS + 1, len(tasks))
    lrs = [learner.lrs[k] for k, _ in learner.model.named_parameters()]
    for t in range(len(tasks)):
        ref = reference_curve(learner.model, lrs, *(x[t] for x in tasks), STEPS)
        np.testing.assert_allclose(losses[:, t], ref, rtol=1e-10, atol=1e-12)


def test_step_zero_is_the_unadapted_loss(tasks):
    learner = make_learner()
    with torch.no_grad():
        expected = [F.mse_loss(learner.model(x), y).item() for x, y in zip(tasks.x_qry, tasks.y_qry)]
    np.testing.assert_allclose(evaluate_init(learner, tasks, 0)[0], expected, rtol=1e-12)


def test_chunks_and_adapt_batch_agree(tasks):
    learner = make_learner()
    whole = evaluate_init(learner, tasks, STEPS)
    np.testing.assert_allclose(evaluate_init(learner, tasks, STEPS, chunk=2), whole, rtol=1e-12)
    fast = learner.adapt_batch(tasks.x_spt, tasks.y_spt, STEPS)
    last = learner.evaluate_fast(fast, tasks.x_qry, tasks.y_qry).detach().numpy()
    np.testing.assert_allclose(whole[-1], last, rtol=1e-10)
    on_support = evaluate_init(learner, TaskBatch(tasks.x_spt, tasks.y_spt, tasks.x_spt, tasks.y_spt), 1)
    assert (on_support[1] < on_support[0]).all()  # a small step lowers the loss it descends


def test_results_table_is_tidy(table):
    losses = np.arange(6.0).reshape(3, 2)  # (steps + 1, T)
    df = results_table(losses, [10, 20], "maml")
    assert list(df.columns) == ["episode", "method", "steps", "metric", "value"]
    row = df[(df["episode"] == 20) & (df["steps"] == 2)]
    assert row["value"].item() == losses[2, 1] and row["metric"].item() == "mse"
    assert len(df) == 6 and set(df["method"]) == {"maml"}
    with pytest.raises(ValueError, match="task_ids"):
        results_table(losses, [1, 2, 3], "maml")
    ids = task_ids(table[table["split"] == "meta_test"])
    assert len(results_table(np.zeros((2, 5)), ids, "x")) == 10


def test_scratch_is_seeded_and_matches_a_fresh_model(tasks):
    def factory():
        return MLP(SIZES).double()

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = scratch(factory, tasks, STEPS, 0.05, seed=7, loss_fn=F.mse_loss)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    np.testing.assert_array_equal(a, scratch(factory, tasks, STEPS, 0.05, seed=7, loss_fn=F.mse_loss, chunk=2))
    assert not np.array_equal(a, scratch(factory, tasks, STEPS, 0.05, seed=8, loss_fn=F.mse_loss))
    assert a.shape == (STEPS + 1, len(tasks)) and not np.array_equal(a[:, 0], a[:, 1])
    torch.manual_seed(7)
    first = factory()  # task 0's model is the first drawn from the seeded stream
    lrs = [torch.full_like(p, 0.05) for p in first.parameters()]
    np.testing.assert_allclose(a[:, 0], reference_curve(first, lrs, *(x[0] for x in tasks), STEPS), rtol=1e-10)


def test_pretrain_lowers_pooled_loss_and_finetune_starts_from_it(train, tasks):
    model = make_model()
    x, y = pooled_points(train)
    assert x.shape == (8 * 11, 1)
    with torch.no_grad():
        before = F.mse_loss(model(x), y).item()
    params = pretrain(model, train, iterations=150, batch_size=32, lr=1e-2, seed=0, loss_fn=F.mse_loss)
    again = pretrain(model, train, iterations=150, batch_size=32, lr=1e-2, seed=0, loss_fn=F.mse_loss)
    assert all(torch.equal(params[k], again[k]) for k in params)
    assert torch.equal(model.net[0].weight, make_model().net[0].weight)  # the model passed in is untouched
    trained = copy.deepcopy(model)
    trained.load_state_dict(params)
    with torch.no_grad():
        assert F.mse_loss(trained(x), y).item() < 0.8 * before
    curve = finetune(model, params, tasks, STEPS, 0.05, F.mse_loss)
    lrs = [torch.full_like(p, 0.05) for p in trained.parameters()]
    np.testing.assert_allclose(curve[:, 2], reference_curve(trained, lrs, *(x[2] for x in tasks), STEPS), rtol=1e-10)


def test_a_finite_blow_up_of_the_query_score_is_divergence_not_a_score(tasks):
    """Fine-tuning with a rate far too large multiplies the query MSE without overflowing (float64): a finite
    number that means nothing. It is Diverged, naming where, how far and the setting of the rate; a sane rate on
    the same tasks gives its curve."""
    from components.metalearners import Diverged

    model = make_model()
    params = dict(model.named_parameters())
    with pytest.raises(Diverged, match=r"the query score blew up on 5 of 5 episodes \(up to [\d.e+]+; over 1e\+06 "
                                       r"times the mean \|score\| [\d.]+ at step 0\) at test-time step \d+ "
                                       r"\(baselines.finetune_lr 3\)"):
        finetune(model, params, tasks, 40, 3.0, F.mse_loss)
    one = TaskBatch(*(torch.cat([t, 100 * t[:1]]) for t in (tasks.x_spt, tasks.y_spt, tasks.x_qry, tasks.y_qry)))
    with pytest.raises(Diverged, match=r"blew up on 1 of 6 episodes"):  # one task's inputs 100x: it alone blows up
        finetune(model, params, one, 40, 0.01, F.mse_loss)
    sane = finetune(model, params, tasks, 40, 0.01, F.mse_loss)  # no error: it moves, it does not blow up
    assert np.isfinite(sane).all() and sane.max() < 10 * sane[0].mean()


def test_accuracy_is_an_exact_fraction_so_equal_counts_tie_exactly():
    """k/B in float32 (2/3 -> 0.6666667) against the same count computed in float64 elsewhere (the text family's
    prototypes) was a 1e-8 'difference' that paired tests run on."""
    import torch

    from components.families import accuracy

    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])  # predictions 1, 0, 0
    assert accuracy(logits, torch.tensor([[1, 0, 1]])).item() == 2 / 3
