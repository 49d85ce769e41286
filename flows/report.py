"""Figures and the printed results table. matplotlib is imported lazily, with the Agg backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_summary(summary: pd.DataFrame, metric: str, path: Path, confidence: float = 0.95) -> Path:
    """Horizontal bars of each method's mean with its confidence interval. summary: index method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(summary) + 1.2))
    order = summary.iloc[::-1]
    ax.barh(order.index, order["mean"], xerr=order["ci_half"], color="tab:blue", alpha=0.8, capsize=3)
    ax.set_xlabel(f"meta-test {metric} (mean, {confidence:.0%} CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(results: pd.DataFrame, metric: str, path: Path, log_scale: bool = True) -> Path:
    """Mean metric against test-time inner steps, one line per method (results: tidy long table)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = results[results["metric"] == metric].groupby(["method", "steps"])["value"].mean().unstack(0)
    for method in curves.columns:
        ax.plot(curves.index, curves[method], marker="o", ms=3, label=method)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("test-time inner steps")
    ax.set_ylabel(f"meta-test {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(matrix: pd.DataFrame, title: str, path: Path) -> Path:
    """A square task x task similarity or distance matrix."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(matrix.to_numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_text(summary: pd.DataFrame, comparisons: pd.DataFrame, metric: str, reference: str,
                 alpha: float = 0.01, confidence: float = 0.95, diverged: pd.DataFrame | None = None) -> str:
    """A short fixed-width table: each method's mean +- CI and its Holm-corrected p against `reference`.

    `*` marks a difference to the reference with Holm-corrected paired t-test p < alpha. Methods that
    diverged (diverged: method, stage, reason) follow, each with where and why, instead of a score.
    """
    lines = [f"{'method':<20} {f'{metric} ({confidence:.0%} CI)':>24} {'p_holm vs ' + reference:>22}"]
    for method, row in summary.iterrows():
        p = _pair_p(comparisons, method, reference)
        p_text = "-" if np.isnan(p) else f"{p:.2e}{'*' if p < alpha else ' '}"
        lines.append(f"{method:<20} {row['mean']:>12.4f} +- {row['ci_half']:<8.4f} {p_text:>22}")
    for row in ([] if diverged is None else diverged.to_dict("records")):
        lines.append(f"{row['method']:<20} DIVERGED in {row['stage']}: {row['reason']}")
    return "\n".join(lines)


def _pair_p(comparisons: pd.DataFrame, a: str, b: str) -> float:
    pair = comparisons[((comparisons.method_a == a) & (comparisons.method_b == b))
                       | ((comparisons.method_a == b) & (comparisons.method_b == a))]
    return float(pair["p_ttest_holm"].iloc[0]) if len(pair) else float("nan")
