import numpy as np
import pandas as pd
import pytest
from scipy import stats

from components.transfer import (CORRELATION_COLUMNS, distance_matrix, distance_table, group_means,
                                 nearest_source, transfer_correlation, transfer_pairs)


def groups_on_a_line(n: int, noise: float = 0.0, seed: int = 0):
    """n groups at random points of a line: embedding (n, 2) = (position, 1); gain = -|distance| + noise."""
    rng = np.random.default_rng(seed)
    names = [f"g{i}" for i in range(n)]
    position = rng.uniform(0, 10, n)
    emb = pd.DataFrame({"pos": position, "one": 1.0}, index=names)
    gains = -np.abs(position[:, None] - position[None, :]) + noise * rng.normal(size=(n, n))
    return emb, pd.DataFrame(gains, index=names, columns=names)


def test_perfect_anti_correlation_gives_minus_one():
    emb, gains = groups_on_a_line(8)
    table = transfer_correlation(gains, distance_table({"line": emb}, ["euclidean", "manhattan"]), n_boot=300)
    assert list(table.columns) == list(CORRELATION_COLUMNS)
    assert list(table["metric"]) == ["euclidean", "manhattan"]
    assert (table["n_pairs"] == 8 * 7).all()
    np.testing.assert_allclose(table[["rho", "ci_low", "ci_high"]].to_numpy(), -1.0, atol=1e-12)


def test_rho_matches_scipy_and_ci_covers_it():
    emb, gains = groups_on_a_line(10, noise=2.0)
    table = transfer_correlation(gains, distance_table({"line": emb}, ["euclidean"]), n_boot=500)
    pairs = transfer_pairs(gains)
    d = distance_matrix(emb, "euclidean")
    expected = stats.spearmanr([d.loc[s, t] for s, t in zip(pairs["source"], pairs["target"])], pairs["gain"])
    row = table.iloc[0]
    assert row["rho"] == pytest.approx(expected.statistic)
    assert row["ci_low"] < row["rho"] < row["ci_high"] < 0


@pytest.mark.parametrize("resample", ["targets", "pairs"])
def test_ci_shrinks_with_more_pairs(resample):
    def width(n):
        emb, gains = groups_on_a_line(n, noise=3.0, seed=1)
        row = transfer_correlation(gains, distance_table({"line": emb}, ["euclidean"]), n_boot=400,
                                   resample=resample).iloc[0]
        return row["ci_high"] - row["ci_low"]

    assert width(24) < 0.6 * width(6)


def test_targets_resampling_is_wider_than_pairs_and_seeded():
    emb, gains = groups_on_a_line(12, noise=3.0)
    dist = distance_table({"line": emb}, ["euclidean"])
    by_target = transfer_correlation(gains, dist, n_boot=400, seed=3)
    by_pair = transfer_correlation(gains, dist, n_boot=400, resample="pairs", seed=3)
    assert (by_target["ci_high"] - by_target["ci_low"]).item() > (by_pair["ci_high"] - by_pair["ci_low"]).item()
    pd.testing.assert_frame_equal(transfer_correlation(gains, dist, n_boot=400, seed=3), by_target)


def test_off_diagonal_finite_pairs_only():
    gains = pd.DataFrame([[9.0, 1.0, np.nan], [2.0, 9.0, 3.0], [4.0, 5.0, 9.0]], index=list("abc"),
                         columns=list("abc"))
    pairs = transfer_pairs(gains)
    assert list(zip(pairs["source"], pairs["target"], pairs["gain"])) == [
        ("a", "b", 1.0), ("b", "a", 2.0), ("b", "c", 3.0), ("c", "a", 4.0), ("c", "b", 5.0)]


def test_distance_table_is_tidy_and_refuses_missing_groups():
    emb, gains = groups_on_a_line(4)
    table = distance_table({"line": emb, "half": emb.iloc[:3] * 0.5}, {"line": ["euclidean"], "half": ["cosine"]})
    assert list(table.columns) == ["embedding", "metric", "source", "target", "distance"]
    assert len(table) == 16 + 9
    with pytest.raises(ValueError, match="half/cosine lacks"):
        transfer_correlation(gains, table)
    with pytest.raises(ValueError, match="resample"):
        transfer_correlation(gains, table, resample="groups")


def test_nearest_source_by_hand():
    # From (0, 0): a = (3, 0) is 3 away either way; b = (2, 2) is sqrt(8) = 2.83 euclidean but 4 manhattan.
    sources = pd.DataFrame([[3.0, 0.0], [2.0, 2.0], [9.0, 9.0]], index=["a", "b", "c"])
    assert nearest_source(sources, [0.0, 0.0], "euclidean") == "b"
    assert nearest_source(sources, [0.0, 0.0], "manhattan") == "a"
    # normalized cosine from t = (0, 2, 0.5): z gives u = (0, .4, .33), v = (0, .6, .67), d = 0.011;
    # y gives d = 0.52, x (disjoint support) d = 1.
    fisher = pd.DataFrame([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 3.0, 1.0]], index=["x", "y", "z"])
    assert nearest_source(fisher, [0.0, 2.0, 0.5]) == "z"
    assert nearest_source(fisher, [0.0, 2.0, 0.5], "cosine") == "z"


def test_group_means():
    means = group_means(np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]]), ["b", "b", "a"])
    assert list(means.index) == ["a", "b"]
    np.testing.assert_allclose(means.to_numpy(), [[10.0, 0.0], [2.0, 3.0]])


def test_within_target_rho_ranks_sources_per_target():
    from components.transfer import within_target_correlation

    groups = ["a", "b", "c", "d"]
    gains = pd.DataFrame([[0, 3, 1, 2], [1, 0, 3, 1], [2, 1, 0, 3], [3, 2, 2, 0]], index=groups, columns=groups,
                         dtype=float)
    rows = [(s, t, -gains.loc[s, t] + 10 * groups.index(t)) for s in groups for t in groups]  # target offsets
    distances = pd.DataFrame(rows, columns=["source", "target", "distance"]).assign(embedding="e", metric="m")
    table = within_target_correlation(gains, distances)
    assert list(table["target"]) == groups and (table["n_sources"] == 3).all()
    np.testing.assert_allclose(table["rho"], -1.0)  # within each target, nearer sources gain more
    pooled = transfer_correlation(gains, distances, n_boot=100)["rho"].iloc[0]
    assert pooled > -0.5  # over pooled pairs the targets' offsets swamp it
