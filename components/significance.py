"""Statistics for comparing few-shot methods evaluated on the same episodes.

Every method is scored on the same held-out episodes, so comparisons are paired: the unit of
analysis is the per-episode difference a_i - b_i. Input tables are tidy long tables with at
least the columns ``episode, method, metric, value``.
"""
from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

RESULT_COLUMNS = ("episode", "method", "metric", "value")
PAIR_FIELDS = ("n", "mean_diff", "ci_low", "ci_high", "t_stat", "p_ttest",
               "wilcoxon_stat", "p_wilcoxon", "cohens_dz")


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of a two-sided Student-t confidence interval.

    values: (n,) scores. Half-width = t_{(1+confidence)/2, n-1} * sd(ddof=1) / sqrt(n);
    it is nan for n = 1, where the spread is unknown, and 0 for constant values (see _constant).
    """
    x = _as_vector(values, "values")
    if x.size < 2:
        return float(x[0]), float("nan")
    if _constant(x):
        return float(x.mean()), 0.0
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence_level=confidence)
    return float(x.mean()), float((ci.high - ci.low) / 2)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, (m,) -> (m,), in the input order.

    The i-th smallest p gets max_{j<=i} min(1, (m - j + 1) p_(j)) (statsmodels' "holm"). nan
    p-values (tests that could not be run) stay nan and do not count towards m.
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    finite = ~np.isnan(p)
    out = np.full(p.shape, np.nan)
    out[finite] = multipletests(p[finite], method="holm")[1]
    return out


def paired_comparison(a, b, confidence: float = 0.95) -> dict:
    """Compare two methods scored on the same n episodes: a (n,), b (n,), a[i] and b[i] on episode i.

    Tests H0: the mean (t-test) or the median (Wilcoxon signed-rank) of d = a - b is zero. The
    Wilcoxon test is scipy.stats.wilcoxon's default: episodes with d = 0 (ties, common for accuracy
    on easy episodes) are dropped before ranking (zero_method="wilcox", Wilcoxon 1945), so it
    tests the direction among the episodes where the methods differ; the t-test counts them all.
    Returns n, mean_diff, the t-interval ci_low/ci_high of mean(d), t_stat/p_ttest,
    wilcoxon_stat/p_wilcoxon and Cohen's d_z = mean(d) / sd(d, ddof=1). When every d is zero
    both tests give statistic 0 and p = 1 and d_z is 0 (scipy would give nan or raise); a
    constant non-zero d gives t and d_z = +-inf, p_ttest = 0; any constant d gives the
    zero-width CI [mean(d), mean(d)]; n = 1 gives nan t, CI and d_z.
    """
    a, b = _as_vector(a, "a"), _as_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must be aligned per episode; got shapes {a.shape} and {b.shape}")
    d = a - b
    t_stat, p_t, ci_low, ci_high = _ttest(a, b, d, confidence)
    w_stat, p_w = _wilcoxon(d)
    return {"n": int(d.size), "mean_diff": float(d.mean()), "ci_low": ci_low,
            "ci_high": ci_high, "t_stat": t_stat, "p_ttest": p_t,
            "wilcoxon_stat": w_stat, "p_wilcoxon": p_w, "cohens_dz": _cohens_dz(d)}


def compare_methods(results: pd.DataFrame, metric: str, lower_is_better: bool,
                    confidence: float = 0.95, alpha: float | None = None) -> pd.DataFrame:
    """All pairwise paired comparisons of the methods in `results` on one metric.

    results: tidy table (episode, method, metric, value), one row per episode x method x metric.
    Returns one row per unordered pair, (M choose 2) rows: method_a is the one with the better
    mean, then PAIR_FIELDS for a - b, p_ttest_holm and p_wilcoxon_holm (Holm over all pairs
    of this table) and a_better: both Holm-adjusted p < alpha (default 1 - confidence) and mean_diff favours a.
    confidence sets the intervals' level, alpha the tests' significance level.
    """
    scores = _paired_scores(results, metric)
    ranked = _rank(scores.mean(), lower_is_better)
    rows = [{"method_a": a, "method_b": b, **paired_comparison(scores[a], scores[b], confidence)}
            for a, b in itertools.combinations(ranked, 2)]
    table = pd.DataFrame(rows, columns=["method_a", "method_b", *PAIR_FIELDS])
    table["p_ttest_holm"] = holm(table["p_ttest"])
    table["p_wilcoxon_holm"] = holm(table["p_wilcoxon"])
    table["p_holm"] = verdict_p(table)
    table["a_better"] = _significantly_better(table, lower_is_better, 1 - confidence if alpha is None else alpha)
    return table


def summarize(results: pd.DataFrame, metric: str, confidence: float = 0.95, *,
              lower_is_better: bool = False) -> pd.DataFrame:
    """Per-method n, mean, ci_half (t-interval half-width), ci_low, ci_high; best method first.

    results: tidy table (episode, method, metric, value). Returns (M, 5) indexed by method.
    """
    values = _metric_rows(results, metric).groupby("method")["value"]
    rows = {m: (v.size, *mean_ci(v.to_numpy(), confidence)) for m, v in values}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["n", "mean", "ci_half"])
    table["ci_low"] = table["mean"] - table["ci_half"]
    table["ci_high"] = table["mean"] + table["ci_half"]
    table.index.name = "method"
    return table.loc[_rank(table["mean"], lower_is_better)]


def _as_vector(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains nan or inf")
    return x


def _constant(x: np.ndarray) -> bool:
    """All equal up to float rounding: 0.3 - 0.2 and 0.1 differ by 3e-17, so sd(ddof=1) == 0 misses
    them, and scipy's t-tests warn of precision loss and return noise (t ~ 1e15) there."""
    return bool(np.all(np.abs(x - x[0]) <= 1e-12 * np.abs(x[0])))


def _ttest(a: np.ndarray, b: np.ndarray, d: np.ndarray,
           confidence: float) -> tuple[float, float, float, float]:
    """scipy's ttest_rel and its t-interval of mean(d) -> (t, p, ci_low, ci_high), with its
    warning-prone corners made explicit."""
    if d.size < 2:
        return (float("nan"),) * 4  # no spread to test against
    if _constant(d):  # t is 0 or +-inf, the CI has zero width
        mean = float(d.mean())
        t, p = (0.0, 1.0) if d[0] == 0 else (float(np.copysign(np.inf, d[0])), 0.0)
        return t, p, mean, mean
    res = stats.ttest_rel(a, b)
    ci = res.confidence_interval(confidence_level=confidence)
    return float(res.statistic), float(res.pvalue), float(ci.low), float(ci.high)


def _wilcoxon(d: np.ndarray) -> tuple[float, float]:
    if not d.any():
        return 0.0, 1.0
    res = stats.wilcoxon(d)
    return float(res.statistic), float(res.pvalue)


def _cohens_dz(d: np.ndarray) -> float:
    mean = d.mean()
    if d.size < 2:
        return float("nan")
    if _constant(d):
        return 0.0 if mean == 0 else float(np.copysign(np.inf, mean))
    return float(mean / d.std(ddof=1))


def _metric_rows(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of one metric, checked: required columns present, one row per episode x method."""
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results lacks columns {missing}")
    rows = results.loc[results["metric"] == metric, ["episode", "method", "value"]]
    if rows.empty:
        raise ValueError(f"no results for metric {metric!r}")
    dup = rows.duplicated(["episode", "method"])
    if dup.any():
        raise ValueError(f"duplicate (episode, method) rows for metric {metric!r}: "
                         f"{rows.loc[dup, ['episode', 'method']].head().values.tolist()}")
    return rows


def _paired_scores(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """(episodes x methods) scores; raises if any method lacks an episode another has."""
    scores = _metric_rows(results, metric).pivot(index="episode", columns="method", values="value")
    lacking = scores.columns[scores.isna().any()].tolist()
    if lacking:
        raise ValueError(f"methods {lacking} lack episodes that other methods have on metric "
                         f"{metric!r}; paired tests need the same episodes for every method")
    return scores


def _rank(means: pd.Series, lower_is_better: bool) -> list:
    """Method names best-first; ties broken by name so the order is deterministic."""
    frame = pd.DataFrame({"mean": means.to_numpy(), "name": means.index.astype(str)}, index=means.index)
    return frame.sort_values(["mean", "name"], ascending=[lower_is_better, True]).index.tolist()


def verdict_p(table: pd.DataFrame) -> pd.Series:
    """The p-value every verdict reads: the larger of the Holm-adjusted t-test and Wilcoxon p, so a difference
    is significant at alpha only when both tests say so (a nan Wilcoxon, e.g. n = 1, leaves the t-test's)."""
    return table[["p_ttest_holm", "p_wilcoxon_holm"]].max(axis=1, skipna=True)


def _significantly_better(table: pd.DataFrame, lower_is_better: bool, alpha: float) -> pd.Series:
    favours_a = table["mean_diff"] < 0 if lower_is_better else table["mean_diff"] > 0
    return (favours_a & (verdict_p(table) < alpha)).astype(bool)


def across_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """Each method's score per (episode, steps) averaged over its meta-training seeds (no seed column: unchanged)."""
    if "seed" not in results.columns:
        return results
    return results.groupby(["episode", "method", "steps", "metric"], as_index=False, sort=False)["value"].mean()


def seed_spread(results: pd.DataFrame) -> pd.DataFrame:
    """Per method and seed, the mean score over episodes at the last step: (method, seed, metric, value)."""
    final = results[(results["steps"] == results["steps"].max()) & results["seed"].notna()]
    return final.groupby(["method", "seed", "metric"], as_index=False)["value"].mean()


# ---------------------------------------------------------------- studies over several class splits (folds)

def pool_folds(per_fold: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-fold tidy results (fold -> table with episode, method, metric, value) as one table with a `fold`
    column, each episode renamed '<fold>/<episode>' so the folds' episodes stay distinct when pooled."""
    if not per_fold:
        raise ValueError("per_fold: need the results of at least one fold")
    return pd.concat([t.assign(fold=fold, episode=f"{fold}/" + t["episode"].astype(str))
                      for fold, t in per_fold.items()], ignore_index=True)


def fold_means(per_fold: Mapping[str, pd.DataFrame], metric: str) -> pd.DataFrame:
    """Each method's mean over the episodes of each fold: (fold, method, n, mean), folds in the given order."""
    pooled = pool_folds(per_fold)
    rows = pooled.loc[_metric_rows(pooled, metric).index]  # checked: one row per episode x method
    return rows.groupby(["fold", "method"], sort=False)["value"].agg(n="size", mean="mean").reset_index()


def fold_summary(per_fold: Mapping[str, pd.DataFrame], metric: str, confidence: float = 0.95, *,
                 lower_is_better: bool = False) -> pd.DataFrame:
    """Per method the mean over folds of its fold means, with a Student-t interval over those F fold means
    (F - 1 degrees of freedom: episodes are nested in folds, and the folds, not the pooled episodes, are the
    independent replicates of a class split); best first.

    per_fold: fold -> tidy results (episode, method, metric, value), one row per episode x method. Returns
    (M, 6) indexed by method: n_folds, n_episodes (pooled), mean, ci_half, ci_low, ci_high. A method without
    scores in some fold raises, naming it: a mean over other folds would not be comparable.
    """
    means = fold_means(per_fold, metric)
    wide = means.pivot(index="method", columns="fold", values="mean")
    if wide.isna().any().any():
        lacking = {m: wide.columns[wide.loc[m].isna()].tolist() for m in wide.index[wide.isna().any(axis=1)]}
        raise ValueError(f"methods lack scores in some folds: {lacking}; a mean over folds needs every fold")
    episodes = means.groupby("method")["n"].sum()
    rows = {m: (wide.shape[1], int(episodes[m]), *mean_ci(wide.loc[m].to_numpy(), confidence)) for m in wide.index}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["n_folds", "n_episodes", "mean", "ci_half"])
    table["ci_low"] = table["mean"] - table["ci_half"]
    table["ci_high"] = table["mean"] + table["ci_half"]
    table.index.name = "method"
    return table.loc[_rank(table["mean"], lower_is_better)]


def compare_folds(results: Mapping[str, pd.DataFrame], diverged: Mapping[str, pd.DataFrame], metric: str,
                  lower_is_better: bool, confidence: float = 0.95,
                  alpha: float | None = None) -> dict[str, pd.DataFrame]:
    """What a study over folds reports. results: fold -> its scores (episode, method, steps, metric, value
    [, seed]; the evaluate and baselines tables together), taken at the last test-time step and averaged over
    seeds; diverged: fold -> its diverged methods (a `method` column), which are left out everywhere.

    Returns tables fold_means (`fold_means`), summary (`fold_summary`: mean over folds, t-interval over the fold
    means), comparisons (`compare_methods` on the pooled episodes, Holm over all pairs), fold_pairs (`fold_pairs`:
    the same pairs tested over the folds) and diverged (fold, method).
    """
    out = pd.DataFrame([(fold, m) for fold, t in diverged.items() for m in dict.fromkeys(t.get("method", ()))],
                       columns=["fold", "method"])
    final = {}
    for fold, table in results.items():
        table = across_seeds(table[~table["method"].isin(set(out["method"]))])
        final[fold] = table[table["steps"] == table["steps"].max()]
    means = fold_means(final, metric)
    comparisons = compare_methods(pool_folds(final), metric, lower_is_better, confidence, alpha)
    return {"fold_means": means,
            "summary": fold_summary(final, metric, confidence, lower_is_better=lower_is_better).reset_index(),
            "comparisons": comparisons, "fold_pairs": fold_pairs(means, comparisons, lower_is_better, confidence),
            "diverged": out}


def fold_pairs(means: pd.DataFrame, comparisons: pd.DataFrame, lower_is_better: bool,
               confidence: float = 0.95) -> pd.DataFrame:
    """Each compared pair over the folds themselves: the pooled-episode tests count the episodes of every fold as
    independent, but a new class split replicates a fold, not an episode. means: `fold_means`; comparisons:
    `compare_methods`' pairs (method_a the better on the pooled episodes).

    Returns one row per pair: method_a, method_b, n_folds, folds_a_better, folds_b_better (folds where that
    method's mean is the better; equal means count for neither), mean_diff (mean over folds of a - b), ci_low,
    ci_high (Student t over the fold differences, F - 1 degrees of freedom) and p_folds (the paired t-test over
    folds; NaN with fewer than 2 folds or equal differences)."""
    return _replicate_pairs(means.pivot(index="fold", columns="method", values="mean"), comparisons,
                            lower_is_better, confidence, "fold")


def seed_pairs(spread: pd.DataFrame, summary: pd.DataFrame, comparisons: pd.DataFrame, lower_is_better: bool,
               confidence: float = 0.95) -> pd.DataFrame:
    """Each compared pair over the meta-training seeds: the episode tests score the seeds' mean, so they say how
    sure the episodes make us of that mean, not whether another seed would agree. spread: `seed_spread` (method,
    seed, metric, value); summary: `summarize` (index method, column mean), which gives a method trained without
    seeds (a baseline) its one mean, the same against every seed; comparisons: `compare_methods`' pairs.

    Returns, for each pair with a seeded method, the columns of `fold_pairs` with seed in place of fold
    (n_seeds, seeds_a_better, seeds_b_better, mean_diff, ci_low, ci_high, p_seeds); pairs of two unseeded
    methods are left out. Seed s of two seeded methods are paired; a seed only one has is dropped."""
    wide = spread.pivot_table(index="seed", columns="method", values="value", aggfunc="mean")
    seeded = set(wide.columns)
    for method in set(summary.index) - seeded:
        wide[method] = float(summary.loc[method, "mean"])
    pairs = comparisons[comparisons["method_a"].isin(seeded) | comparisons["method_b"].isin(seeded)]
    return _replicate_pairs(wide, pairs, lower_is_better, confidence, "seed")


def replicate_record(pairs: pd.DataFrame, method: str, other: str, unit: str) -> dict | None:
    """method against other in a `fold_pairs` (unit "fold") or `seed_pairs` (unit "seed") table, whichever way
    round its row is: {"better": replicates where method was the better, "n": replicates, "p": the t-test over
    them}; None without that pair."""
    a, b = pairs["method_a"], pairs["method_b"]
    rows = pairs[((a == method) & (b == other)) | ((a == other) & (b == method))]
    if rows.empty:
        return None
    row = rows.iloc[0]
    side = "a" if row["method_a"] == method else "b"
    return {"better": int(row[f"{unit}s_{side}_better"]), "n": int(row[f"n_{unit}s"]), "p": float(row[f"p_{unit}s"])}


def _replicate_pairs(wide: pd.DataFrame, comparisons: pd.DataFrame, lower_is_better: bool, confidence: float,
                     unit: str) -> pd.DataFrame:
    """`fold_pairs` over any replicate: wide is replicate x method (its mean score)."""
    rows = []
    for a, b in comparisons[["method_a", "method_b"]].itertuples(index=False):
        pair = wide[[a, b]].dropna()
        d = (pair[a] - pair[b]).to_numpy(dtype=float, copy=True)
        # a difference within float rounding of the scores (the same count of correct queries summed in another
        # order) is a tie, not a win; equal differences up to rounding leave nothing to test (scipy: t ~ 1e15)
        d[np.abs(d) <= 1e-12 * pair.abs().max(axis=1).to_numpy(dtype=float)] = 0.0
        better, worse = (int((d < 0).sum()), int((d > 0).sum())) if lower_is_better else \
            (int((d > 0).sum()), int((d < 0).sum()))
        low = high = p = float("nan")
        if len(d) >= 2 and not _constant(d):
            test = stats.ttest_1samp(d, 0.0)
            low, high = test.confidence_interval(confidence)
            p = float(test.pvalue)
        rows.append({"method_a": a, "method_b": b, f"n_{unit}s": len(d), f"{unit}s_a_better": better,
                     f"{unit}s_b_better": worse, "mean_diff": float(d.mean()) if len(d) else float("nan"),
                     "ci_low": float(low), "ci_high": float(high), f"p_{unit}s": p})
    return pd.DataFrame(rows, columns=["method_a", "method_b", f"n_{unit}s", f"{unit}s_a_better",
                                       f"{unit}s_b_better", "mean_diff", "ci_low", "ci_high", f"p_{unit}s"])
