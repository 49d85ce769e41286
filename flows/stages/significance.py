"""significance: paired tests between all methods at the last test-time step; tables and figures."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.significance import across_seeds, compare_methods, seed_pairs, seed_spread, summarize
from flows import report
from flows.cache import DIVERGED, write_table


def compare(results: pd.DataFrame, diverged: pd.DataFrame, metric: str, lower_is_better: bool, confidence: float,
            alpha: float, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """results: the evaluate and baselines tables together (a seed column: per-seed spread, then seed means);
    diverged: their methods that diverged (no scores; listed, not compared). With seeds, a method with a
    diverged seed is left out of the comparison: averaging the other seeds would hide it."""
    write_table(diverged, out, DIVERGED)
    if len(diverged):
        results = results[~results["method"].isin(set(diverged["method"]))]
    spread = seed_spread(results) if "seed" in results.columns else None
    if spread is not None:
        write_table(spread, out, "seeds")
    results = across_seeds(results)
    final = results[results["steps"] == results["steps"].max()]
    comparisons = compare_methods(final, metric, lower_is_better=lower_is_better, confidence=confidence, alpha=alpha)
    summary = summarize(final, metric, confidence, lower_is_better=lower_is_better)
    write_table(comparisons, out, "comparisons")
    write_table(summary.reset_index(), out, "summary")
    if spread is not None and spread["seed"].nunique() > 1:  # each pair over the seeds too
        write_table(seed_pairs(spread[spread["metric"] == metric], summary, comparisons, lower_is_better,
                               confidence), out, report.SEED_PAIRS)
    report.plot_summary(summary, metric, out / "summary.png", confidence)
    report.plot_curves(results, metric, out / "curves.png", log_scale=lower_is_better)
    return summary, comparisons
