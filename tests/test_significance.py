import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from components.significance import compare_methods, holm, mean_ci, paired_comparison, summarize

T_975_DF3 = 3.182446305284263  # Student t quantile, 0.975, 3 degrees of freedom (from tables)


def tidy(scores: dict[str, list[float]], metric: str = "accuracy") -> pd.DataFrame:
    """Long table (episode, method, metric, value) from method -> per-episode scores."""
    return pd.DataFrame([{"episode": e, "method": m, "metric": metric, "value": v}
                         for m, vs in scores.items() for e, v in enumerate(vs)])


# Per-episode differences, all distinct and positive so the Wilcoxon p is exact: 2 / 2**8.
DIFFS = np.array([0.10, 0.12, 0.09, 0.11, 0.13, 0.08, 0.14, 0.07])
BASE = np.array([0.50, 0.62, 0.55, 0.70, 0.48, 0.66, 0.58, 0.61])


def test_mean_ci_matches_hand_computation():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = np.sqrt(((np.array([1, 2, 3, 4]) - 2.5) ** 2).sum() / 3)
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(T_975_DF3 * sd / 2.0)
    assert half == pytest.approx(2.0542603, abs=1e-6)


def test_mean_ci_narrows_with_confidence_and_is_nan_for_one_value():
    assert mean_ci([1.0, 2.0, 3.0, 4.0], 0.90)[1] < mean_ci([1.0, 2.0, 3.0, 4.0], 0.95)[1]
    mean, half = mean_ci([3.5])
    assert mean == 3.5 and np.isnan(half)


def test_mean_ci_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError, match="nan"):
        mean_ci([1.0, np.nan])


@pytest.mark.parametrize("pvalues, expected", [
    ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),  # step-down with a monotonicity fix
    ([0.01, 0.02, 0.5], [0.03, 0.04, 0.5]),
    ([0.5, 0.6], [1.0, 1.0]),  # clipped at 1
    ([0.04], [0.04]),
    ([0.01, np.nan, 0.04], [0.02, np.nan, 0.04]),  # nan does not count towards m
])
def test_holm_hand_computed(pvalues, expected):
    np.testing.assert_allclose(holm(pvalues), expected)


def test_holm_empty():
    assert holm([]).shape == (0,)


def test_paired_comparison_clear_winner_matches_scipy_and_hand_formulas():
    a, b = BASE + DIFFS, BASE
    res = paired_comparison(a, b)
    d = a - b
    sd = d.std(ddof=1)
    t = d.mean() / (sd / np.sqrt(8))
    assert res["n"] == 8
    assert res["mean_diff"] == pytest.approx(DIFFS.mean())
    half = stats.t.ppf(0.975, 7) * sd / np.sqrt(8)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert res["t_stat"] == pytest.approx(t)
    assert res["p_ttest"] == pytest.approx(2 * stats.t.sf(abs(t), 7))
    assert res["p_ttest"] < 1e-4
    assert res["wilcoxon_stat"] == 0.0
    assert res["p_wilcoxon"] == pytest.approx(2 / 2**8)
    assert res["cohens_dz"] == pytest.approx(d.mean() / sd)


def test_wilcoxon_matches_exact_enumeration():
    d = np.array([1.0, -2.0, 3.0, 4.0, 5.0, -6.0, 7.0, 8.0])  # rank sums: W- = 8, W+ = 28
    res = paired_comparison(BASE + d, BASE)
    # Under H0 each rank's sign is a fair coin: P(W <= 8) = #{subsets of 1..8 with sum <= 8} / 2**8.
    sums = [sum(r for r in range(1, 9) if mask >> (r - 1) & 1) for mask in range(2**8)]
    assert res["wilcoxon_stat"] == 8.0
    assert res["p_wilcoxon"] == pytest.approx(2 * sum(s <= 8 for s in sums) / 2**8)


def test_paired_comparison_is_antisymmetric():
    ab, ba = paired_comparison(BASE + DIFFS, BASE), paired_comparison(BASE, BASE + DIFFS)
    for key in ("mean_diff", "t_stat", "cohens_dz"):
        assert ab[key] == pytest.approx(-ba[key])
    assert ab["ci_low"] == pytest.approx(-ba["ci_high"])
    assert ab["p_ttest"] == pytest.approx(ba["p_ttest"])
    assert ab["p_wilcoxon"] == pytest.approx(ba["p_wilcoxon"])


def test_paired_comparison_identical_methods_gives_p_one():
    res = paired_comparison(BASE, BASE.copy())
    assert res["p_ttest"] == 1.0 and res["p_wilcoxon"] == 1.0
    assert res["mean_diff"] == 0.0 and res["cohens_dz"] == 0.0


def test_paired_comparison_degenerate_cases_are_explicit():
    constant = paired_comparison([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert constant["t_stat"] == np.inf and constant["p_ttest"] == 0.0
    assert constant["cohens_dz"] == np.inf
    single = paired_comparison([1.0], [0.5])
    assert single["n"] == 1 and single["mean_diff"] == 0.5
    assert np.isnan(single["p_ttest"]) and np.isnan(single["ci_low"]) and np.isnan(single["cohens_dz"])


def test_differences_equal_up_to_rounding_count_as_constant():
    """0.3 - 0.2, 0.7 - 0.6, 0.4 - 0.3 are 0.1 up to 6e-17: sd(ddof=1) is not 0 and scipy warns."""
    a, b = [0.3, 0.7, 0.4], [0.2, 0.6, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = paired_comparison(a, b)
        assert mean_ci(np.subtract(a, b))[1] == 0.0
    assert res["t_stat"] == np.inf and res["p_ttest"] == 0.0 and res["cohens_dz"] == np.inf
    assert res["ci_low"] == res["ci_high"] == res["mean_diff"] == pytest.approx(0.1)


def test_paired_comparison_no_effect_is_not_significant():
    d = np.array([0.1, -0.1, 0.2, -0.2, 0.05, -0.05])
    res = paired_comparison(BASE[:6] + d, BASE[:6])
    assert res["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert res["p_ttest"] == pytest.approx(1.0)
    assert res["p_wilcoxon"] > 0.5


def test_paired_comparison_rejects_misaligned():
    with pytest.raises(ValueError, match="aligned"):
        paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0])


@pytest.fixture
def three_methods() -> pd.DataFrame:
    """'good' beats 'mid' beats 'bad' on every episode; a second metric must be ignored."""
    scores = {"bad": BASE, "good": BASE + 2 * DIFFS, "mid": BASE + DIFFS[::-1]}
    other = tidy({m: -v for m, v in scores.items()}, metric="loss")
    return pd.concat([tidy(scores), other], ignore_index=True)


def test_compare_methods_orders_pairs_best_first(three_methods):
    table = compare_methods(three_methods, "accuracy", lower_is_better=False)
    assert list(zip(table["method_a"], table["method_b"])) == [
        ("good", "mid"), ("good", "bad"), ("mid", "bad")]
    assert (table["mean_diff"] > 0).all()
    assert (table["n"] == 8).all()
    assert table["a_better"].all()


def test_compare_methods_respects_lower_is_better(three_methods):
    table = compare_methods(three_methods, "loss", lower_is_better=True)  # loss = -accuracy
    assert list(zip(table["method_a"], table["method_b"])) == [
        ("good", "mid"), ("good", "bad"), ("mid", "bad")]
    assert (table["mean_diff"] < 0).all()
    assert table["a_better"].all()
    flipped = compare_methods(three_methods, "loss", lower_is_better=False)
    assert list(flipped["method_a"]) == ["bad", "bad", "mid"]


def test_compare_methods_rows_match_paired_comparison_and_holm(three_methods):
    table = compare_methods(three_methods, "accuracy", lower_is_better=False)
    row = table.iloc[1]
    expected = paired_comparison(BASE + 2 * DIFFS, BASE)
    for key, value in expected.items():
        assert row[key] == pytest.approx(value)
    np.testing.assert_allclose(table["p_ttest_holm"], holm(table["p_ttest"]))
    np.testing.assert_allclose(table["p_wilcoxon_holm"], holm(table["p_wilcoxon"]))
    assert table["p_wilcoxon_holm"].iloc[0] == pytest.approx(3 * 2 / 2**8)


def test_compare_methods_no_difference_is_not_better():
    d = np.array([0.1, -0.1, 0.2, -0.2, 0.05, -0.05, 0.3, -0.3])
    table = compare_methods(tidy({"x": BASE + d, "y": BASE}), "accuracy", lower_is_better=False)
    assert len(table) == 1
    assert not table["a_better"].iloc[0]


def test_compare_methods_a_better_needs_both_tests():
    # 5 episodes all favouring x: the t-test is tiny but the exact Wilcoxon p cannot go below 2/32.
    table = compare_methods(tidy({"x": BASE[:5] + DIFFS[:5], "y": BASE[:5]}), "accuracy", False)
    assert table["p_ttest_holm"].iloc[0] < 0.05
    assert table["p_wilcoxon_holm"].iloc[0] == pytest.approx(2 / 2**5)
    assert not table["a_better"].iloc[0]


def test_compare_methods_raises_naming_method_with_missing_episodes(three_methods):
    holey = three_methods.drop(three_methods.index[(three_methods["method"] == "mid")
                                                   & (three_methods["episode"] == 3)])
    with pytest.raises(ValueError, match="mid"):
        compare_methods(holey, "accuracy", lower_is_better=False)


def test_compare_methods_rejects_duplicates_and_unknown_metric(three_methods):
    with pytest.raises(ValueError, match="duplicate"):
        compare_methods(pd.concat([three_methods, three_methods.iloc[:1]]), "accuracy", False)
    with pytest.raises(ValueError, match="f1"):
        compare_methods(three_methods, "f1", False)


def test_summarize_matches_mean_ci_and_sorts(three_methods):
    table = summarize(three_methods, "accuracy")
    assert list(table.index) == ["good", "mid", "bad"]
    mean, half = mean_ci(BASE + 2 * DIFFS)
    assert table.loc["good", "n"] == 8
    assert table.loc["good", "mean"] == pytest.approx(mean)
    assert table.loc["good", "ci_half"] == pytest.approx(half)
    assert table.loc["good", "ci_low"] == pytest.approx(mean - half)
    assert table.loc["good", "ci_high"] == pytest.approx(mean + half)
    assert list(summarize(three_methods, "loss", lower_is_better=True).index) == ["good", "mid", "bad"]
    assert list(summarize(three_methods, "loss").index) == ["bad", "mid", "good"]


def test_a_better_follows_the_configured_alpha_not_the_confidence():
    """p_holm about 0.04 on both tests: a_better at alpha 0.05, not at alpha 0.01, whatever the confidence."""
    rng = np.random.default_rng(3)
    n = 40
    base = rng.normal(0, 1, n)
    for shift in np.linspace(0.2, 0.6, 81):  # find a shift whose Holm p lies between 0.01 and 0.05
        table = pd.DataFrame({"episode": np.tile(np.arange(n), 2), "method": ["a"] * n + ["b"] * n,
                              "metric": "acc", "value": np.concatenate([base + shift, base + rng.normal(0, 1.2, n)])})
        loose = compare_methods(table, "acc", lower_is_better=False, confidence=0.95, alpha=0.05)
        p = loose.loc[0, ["p_ttest_holm", "p_wilcoxon_holm"]].max()
        if 0.01 < p < 0.05:
            break
    assert 0.01 < p < 0.05
    strict = compare_methods(table, "acc", lower_is_better=False, confidence=0.95, alpha=0.01)
    assert bool(loose.loc[0, "a_better"]) and not bool(strict.loc[0, "a_better"])
    assert bool(compare_methods(table, "acc", lower_is_better=False, confidence=0.99, alpha=0.05).loc[0, "a_better"])


def test_stars_and_a_better_follow_one_rule():
    """t-test p below alpha but Wilcoxon above: neither a star in the results table nor a_better."""
    from flows.report import results_text

    summary = pd.DataFrame({"mean": [0.9, 0.8], "ci_half": [0.01, 0.01]}, index=pd.Index(["maml", "scratch"],
                                                                                        name="method"))
    comparisons = pd.DataFrame({"method_a": ["maml"], "method_b": ["scratch"], "mean_diff": [0.1],
                                "p_ttest_holm": [0.023], "p_wilcoxon_holm": [0.064]})
    line = next(r for r in results_text(summary, comparisons, "accuracy", "scratch", alpha=0.05).splitlines()
                if r.startswith("maml"))
    assert "6.40e-02" in line and "*" not in line
    assert not _significantly_better_row(comparisons, alpha=0.05)
    assert "*" in next(r for r in results_text(summary, comparisons.assign(p_wilcoxon_holm=0.03), "accuracy",
                                               "scratch", alpha=0.05).splitlines() if r.startswith("maml"))


def test_a_handful_of_episodes_is_called_rough():
    """With n = 2 a t-interval of an accuracy can pass 0 and 1: the table says the numbers are rough."""
    from flows.report import FEW_EPISODES, results_text

    comparisons = pd.DataFrame({"method_a": ["maml"], "method_b": ["scratch"], "mean_diff": [0.1],
                                "p_ttest_holm": [0.5], "p_wilcoxon_holm": [0.5]})
    for n, rough in ((2, True), (FEW_EPISODES, False)):
        summary = pd.DataFrame({"mean": [0.55, 0.5], "ci_half": [0.63, 0.2], "n": [n, n]},
                               index=pd.Index(["maml", "scratch"], name="method"))
        text = results_text(summary, comparisons, "accuracy", "scratch")
        assert (f"only {n} meta-test episodes" in text) == rough


def _significantly_better_row(comparisons, alpha):
    from components.significance import _significantly_better

    return bool(_significantly_better(comparisons, lower_is_better=False, alpha=alpha).iloc[0])


def test_seed_pairs_test_each_pair_over_the_seeds_means():
    """Hand-computed: maml trained with seeds 0-2 and 7, fomaml with 0-2, proto (a baseline) without seeds: its one
    mean stands against every seed. Seed 7, which fomaml lacks, is dropped from maml - fomaml only."""
    from components.significance import seed_pairs

    means = {"maml": [0.8, 0.7, 0.9], "fomaml": [0.6, 0.75, 0.5]}
    spread = pd.DataFrame([{"method": m, "seed": s, "metric": "accuracy", "value": v}
                           for m, values in means.items() for s, v in enumerate(values)]
                          + [{"method": "maml", "seed": 7, "metric": "accuracy", "value": 0.0}])
    summary = pd.DataFrame({"mean": [0.8, 0.62, 0.72]}, index=pd.Index(["maml", "fomaml", "proto"], name="method"))
    comparisons = pd.DataFrame({"method_a": ["maml", "maml", "proto"], "method_b": ["fomaml", "proto", "fomaml"]})
    rows = seed_pairs(spread, summary, comparisons, lower_is_better=False).set_index(["method_a", "method_b"])
    for pair, d, counts in ((("maml", "fomaml"), [0.2, -0.05, 0.4], (3, 2, 1)),
                            (("maml", "proto"), [0.08, -0.02, 0.18, -0.72], (4, 2, 2)),
                            (("proto", "fomaml"), [0.12, -0.03, 0.22], (3, 2, 1))):
        r, test = rows.loc[pair], stats.ttest_1samp(d, 0.0)
        assert (r["n_seeds"], r["seeds_a_better"], r["seeds_b_better"]) == counts
        assert r["mean_diff"] == pytest.approx(np.mean(d)) and r["p_seeds"] == pytest.approx(test.pvalue)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(test.confidence_interval(0.95)))
    lower = seed_pairs(spread, summary, comparisons, lower_is_better=True).set_index(["method_a", "method_b"])
    assert (lower.loc[("maml", "fomaml"), "seeds_a_better"], lower.loc[("maml", "fomaml"), "seeds_b_better"]) == (1, 2)
    unseeded = pd.DataFrame({"method_a": ["proto"], "method_b": ["scratch"]})
    assert seed_pairs(spread, summary, unseeded, lower_is_better=False).empty  # neither has seeds


def test_replicate_pairs_read_rounding_as_a_tie_and_equal_differences_as_untestable():
    """Fold means that differ by float rounding only tie (no fold 'won'); differences equal up to rounding give no
    t-test (NaN), not p ~ 1e-15 from scipy's t ~ 1e15."""
    from components.significance import fold_pairs

    means = pd.DataFrame({"fold": ["01", "02", "01", "02", "01", "02"], "method": ["a", "a", "b", "b", "c", "c"],
                          "mean": [0.3 - 0.2, 0.7, 0.1, 0.7 - 1e-17, 0.3 - 0.2 - 0.016, 0.7 - 0.016]})
    comparisons = pd.DataFrame({"method_a": ["a", "a"], "method_b": ["b", "c"]})
    rows = fold_pairs(means, comparisons, lower_is_better=False).set_index("method_b")
    assert (rows.loc["b", "folds_a_better"], rows.loc["b", "folds_b_better"]) == (0, 0)
    assert rows.loc["c", "folds_a_better"] == 2 and np.isnan(rows.loc["c", "p_folds"])
