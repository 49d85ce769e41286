import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from components.features import (FEATURE_COLUMNS, TaskFeatureExtractor,
                                 pairwise_similarity)
from components.tasksets import SinusoidFamily, sample_sinusoid_tasks


def task_table(tasks: dict[int, tuple[list[float], list[float]]], n_query: int = 2) -> pd.DataFrame:
    """Long table from task_id -> (x_spt, y_spt), plus n_query junk query rows per task."""
    rows = [{"task_id": t, "role": "support", "x": x, "y": y}
            for t, (xs, ys) in tasks.items() for x, y in zip(xs, ys)]
    rows += [{"task_id": t, "role": "query", "x": 9.0, "y": 1e3} for t in tasks for _ in range(n_query)]
    return pd.DataFrame(rows)


def test_moments_hand_computed():
    f = TaskFeatureExtractor().transform(task_table({7: ([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])}))
    row = f.loc[7]
    assert list(f.columns) == list(FEATURE_COLUMNS)
    assert (row["n_support"], row["n_query"]) == (3, 2)
    assert row["x_mean"] == pytest.approx(1.0)
    assert row["x_std"] == pytest.approx(np.sqrt(2 / 3))
    assert row["y_mean"] == pytest.approx(3.0)
    assert row["y_std"] == pytest.approx(np.sqrt(8 / 3))
    assert (row["y_min"], row["y_max"], row["y_range"]) == (1.0, 5.0, 4.0)
    assert row["corr_xy"] == pytest.approx(1.0)
    assert row["slope"] == pytest.approx(2.0)


@pytest.mark.parametrize("amplitude, phase", [(1.0, 0.0), (3.7, 1.2), (0.1, 3.0), (5.0, -2.5)])
def test_recovers_exact_sinusoid(amplitude, phase):
    x = np.linspace(-5.0, 5.0, 10)
    f = TaskFeatureExtractor().transform(task_table({0: (x, amplitude * np.sin(x + phase))}))
    assert f.loc[0, "sin_amplitude"] == pytest.approx(amplitude, abs=1e-6)
    assert f.loc[0, "sin_phase"] == pytest.approx(phase, abs=1e-6)
    assert f.loc[0, "sin_rmse"] == pytest.approx(0.0, abs=1e-6)


def test_recovers_true_parameters_of_sampled_tasks():
    tasks = sample_sinusoid_tasks(SinusoidFamily(k_shot=5), {"meta_train": 50, "meta_test": 20}, seed=3)
    f = TaskFeatureExtractor().transform(tasks)
    truth = tasks.groupby("task_id")[["amplitude", "phase"]].first()
    assert list(f.index) == list(truth.index)
    np.testing.assert_allclose(f["sin_amplitude"], truth["amplitude"], atol=1e-6)
    np.testing.assert_allclose(f["sin_phase"], truth["phase"], atol=1e-6)
    assert (f["n_support"] == 5).all() and (f["n_query"] == 10).all()
    # noise-free tasks fit exactly: rmse 0, not rounding noise that standardising would give full weight
    assert (f["sin_rmse"] == 0).all()


def test_many_tasks_match_per_task_numpy_reference():
    rng = np.random.default_rng(0)
    tasks = {t: (rng.uniform(-5, 5, 8), rng.normal(size=8)) for t in range(30)}
    f = TaskFeatureExtractor().transform(task_table(tasks))
    for t, (x, y) in tasks.items():
        (a, b), *_ = np.linalg.lstsq(np.stack([np.sin(x), np.cos(x)], axis=1), y, rcond=None)
        assert f.loc[t, "corr_xy"] == pytest.approx(np.corrcoef(x, y)[0, 1])
        assert f.loc[t, "slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
        assert f.loc[t, "y_std"] == pytest.approx(y.std())
        assert f.loc[t, "sin_amplitude"] == pytest.approx(np.hypot(a, b))
        assert f.loc[t, "sin_phase"] == pytest.approx(np.arctan2(b, a))
        resid = y - a * np.sin(x) - b * np.cos(x)
        assert f.loc[t, "sin_rmse"] == pytest.approx(np.sqrt(np.mean(resid ** 2)))  # a real residual: kept


def test_query_rows_do_not_change_features():
    x = np.linspace(-3, 3, 6)
    table = task_table({0: (x, np.sin(x)), 1: (x, x ** 2)})
    moved = table.assign(y=np.where(table["role"] == "query", -5.0, table["y"]))
    pd.testing.assert_frame_equal(TaskFeatureExtractor().transform(table),
                                  TaskFeatureExtractor().transform(moved))


def test_degenerate_tasks_give_zero_correlation_and_slope():
    f = TaskFeatureExtractor().transform(task_table({
        0: ([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]),  # constant x
        1: ([0.0, 1.0, 2.0], [0.3, 0.3, 0.3]),  # constant y
        2: ([1.5], [2.0]),  # one shot
    }))
    assert (f["corr_xy"] == 0).all() and (f["slope"] == 0).all()
    assert f.loc[0, "x_std"] == 0 and f.loc[1, "y_std"] == 0 and f.loc[2, "y_range"] == 0
    assert np.isfinite(f.to_numpy()).all()


def test_columns_select_and_order_features():
    extractor = TaskFeatureExtractor(columns=("slope", "n_support"))
    f = extractor.transform(task_table({0: ([0.0, 1.0], [0.0, 3.0])}))
    assert list(f.columns) == ["slope", "n_support"]
    assert f.loc[0, "slope"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="wiggle"):
        TaskFeatureExtractor(columns=("slope", "wiggle"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        extractor.columns = ("x_mean",)


def test_bad_tables_raise():
    good = task_table({0: ([0.0, 1.0], [0.0, 1.0])})
    with pytest.raises(ValueError, match="'y'"):
        TaskFeatureExtractor().transform(good.drop(columns="y"))
    with pytest.raises(ValueError, match="train"):
        TaskFeatureExtractor().transform(good.assign(role="train"))
    query_only = pd.concat([good, pd.DataFrame([{"task_id": 5, "role": "query", "x": 0.0, "y": 0.0}])])
    with pytest.raises(ValueError, match=r"\[5\]"):
        TaskFeatureExtractor().transform(query_only)


@pytest.fixture
def features() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(rng.normal(size=(6, 4)) * [1.0, 10.0, 0.1, 3.0],
                        index=pd.Index([10, 11, 12, 13, 14, 15], name="task_id"),
                        columns=["a", "b", "c", "d"])


@pytest.mark.parametrize("metric, scipy_metric", [("euclidean", "euclidean"), ("manhattan", "cityblock")])
def test_distances_match_cdist_on_standardized_features(features, metric, scipy_metric):
    x = features.to_numpy()
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    d = pairwise_similarity(features, metric)
    np.testing.assert_allclose(d.to_numpy(), cdist(z, z, scipy_metric), atol=1e-12)
    assert list(d.index) == list(d.columns) == list(features.index)
    np.testing.assert_array_equal(np.diag(d.to_numpy()), 0.0)
    np.testing.assert_allclose(d.to_numpy(), d.to_numpy().T)


def test_cosine_similarity_matches_cdist(features):
    x = features.to_numpy()
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    s = pairwise_similarity(features, "cosine").to_numpy()
    np.testing.assert_allclose(s, 1.0 - cdist(z, z, "cosine"), atol=1e-12)
    np.testing.assert_allclose(np.diag(s), 1.0)
    np.testing.assert_allclose(s, s.T)


def test_pairwise_hand_computed_and_constant_columns_ignored():
    f = pd.DataFrame({"u": [0.0, 2.0], "const": [4.0, 4.0]})  # u standardizes to [-1, 1]
    assert pairwise_similarity(f, "euclidean").iloc[0, 1] == pytest.approx(2.0)
    assert pairwise_similarity(f, "manhattan").iloc[0, 1] == pytest.approx(2.0)
    assert pairwise_similarity(f, "cosine").iloc[0, 1] == pytest.approx(-1.0)


def test_pairwise_rejects_unknown_metric_and_nan(features):
    with pytest.raises(ValueError, match="chebyshev"):
        pairwise_similarity(features, "chebyshev")
    with pytest.raises(ValueError, match="nan"):
        pairwise_similarity(features.assign(a=np.nan), "cosine")


def test_start_features_match_a_hand_computation():
    import torch
    import torch.nn.functional as F

    from components.features import MODEL_FEATURES, start_features

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(2, 4, 3, dtype=torch.double), torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]])
    weight = torch.randn(2, 3, dtype=torch.double)
    table = start_features(model, {"weight": weight}, x, y)
    assert list(table.columns) == list(MODEL_FEATURES) and len(table) == 2
    for t in range(2):
        w = weight.clone().requires_grad_()
        logits = x[t] @ w.T + model.bias.detach()
        loss = F.cross_entropy(logits, y[t])
        (g,) = torch.autograd.grad(loss, w)
        assert table["start_loss"][t] == pytest.approx(loss.item())
        assert table["start_accuracy"][t] == pytest.approx((logits.argmax(-1) == y[t]).double().mean().item())
        assert table["grad_norm"][t] == pytest.approx(g.norm().item())  # only the swapped-in weight counts
