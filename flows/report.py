"""Figures and the printed results table. matplotlib is imported lazily, with the Agg backend.

Every figure of a study colours a method the same way (`method_colors`); the HTML report (flows.report_page)
draws its own figures with the same mapping.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from components.significance import replicate_record, verdict_p

# tab10, then Dark2: distinct hues in order, so a study's first ten methods never share a colour
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_colors(methods: Iterable[str], extra: Iterable[str] = ()) -> dict[str, str]:
    """One colour per method: the sorted names of `methods` take PALETTE in turn, then those of `extra` (methods
    with no score, e.g. diverged, drawn only in training curves), so the significance stage's figures, drawn
    from its scored methods, and the report's agree. A unit label "maml/seed1" takes its algorithm's colour."""
    scored = sorted({_algorithm(m) for m in methods})
    names = scored + sorted({_algorithm(m) for m in extra} - set(scored))
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}


def method_color(colors: dict[str, str], label: str) -> str:
    return colors[_algorithm(label)]


def _algorithm(label: str) -> str:
    return str(label).split("/seed")[0]


def summary_figure(summary: pd.DataFrame, metric: str, confidence: float = 0.95,
                   colors: dict[str, str] | None = None, log_scale: bool | None = None):
    """Each method's mean with its confidence interval, a dot and whiskers per row (best first, on top), on an
    axis spanning the intervals. log_scale None: logarithmic when every interval is positive and they span
    more than a decade (MSE: scratch beside the meta-learners), so every interval stays visible."""
    plt, colors = _pyplot(), colors or method_colors(summary.index)
    low, high = summary["ci_low"].fillna(summary["mean"]), summary["ci_high"].fillna(summary["mean"])
    if log_scale is None:
        log_scale = bool((low > 0).all() and high.max() / low.min() > 10)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(summary) + 1.3))
    for row, (method, r) in enumerate(summary.iloc[::-1].iterrows()):
        ax.errorbar(r["mean"], row, xerr=[[r["mean"] - low[method]], [high[method] - r["mean"]]], fmt="o",
                    color=method_color(colors, method), capsize=4, ms=6, label=method)
    ax.set_yticks(range(len(summary)), summary.index[::-1])
    ax.set_ylim(-0.6, len(summary) - 0.4)
    if log_scale:
        ax.set_xscale("log")
        plain_ticks(ax.xaxis)
    ax.grid(axis="x", alpha=0.3, which="both" if log_scale else "major")
    ax.set_xlabel(f"meta-test {metric} (mean, {confidence:.0%} CI{', log scale' if log_scale else ''})")
    fig.tight_layout()
    return fig


def plot_summary(summary: pd.DataFrame, metric: str, path: Path, confidence: float = 0.95,
                 colors: dict[str, str] | None = None) -> Path:
    """summary_figure to `path`. summary: index method (best first), columns mean, ci_low, ci_high."""
    return save(summary_figure(summary, metric, confidence, colors), path)


def curves_figure(results: pd.DataFrame, metric: str, log_scale: bool = True, colors: dict[str, str] | None = None):
    """Mean metric against test-time inner steps, one line per method (results: tidy long table)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = results[results["metric"] == metric].groupby(["method", "steps"])["value"].mean().unstack(0)
    colors = colors or method_colors(curves.columns)
    for method in curves.columns:
        ax.plot(curves.index, curves[method], marker="o", ms=3, label=method, color=method_color(colors, method))
    if log_scale:
        ax.set_yscale("log")
        plain_ticks(ax.yaxis)
    ax.set_xlabel("test-time inner steps")
    ax.set_ylabel(f"meta-test {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(results: pd.DataFrame, metric: str, path: Path, log_scale: bool = True,
                colors: dict[str, str] | None = None) -> Path:
    return save(curves_figure(results, metric, log_scale, colors), path)


def plain_ticks(axis) -> None:
    """A log axis labelled 0.05, 0.1, 4 rather than 5x10^-2; within a decade its minor ticks get labels too."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):  # LogFormatter decides which ticks get a label, this how
            return f"{x:g}"

    axis.set_major_formatter(Plain(labelOnlyBase=False))
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_heatmap(matrix: pd.DataFrame, title: str, path: Path, label: str = "", distance: bool = False) -> Path:
    """A square task x task similarity or distance matrix; label names the colour bar. A distance runs its colours
    the other way (viridis reversed), so that close tasks take the same colour in both kinds of matrix."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(matrix.to_numpy(), cmap="viridis_r" if distance else "viridis")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    for axis, names in ((ax.xaxis, matrix.columns), (ax.yaxis, matrix.index)):
        axis.set_label_text(names.name or "task")  # where the matrix names them: source, target
        if len(names) <= 20:  # each row named (a task id, an alphabet), not at fractional positions
            axis.set_ticks(range(len(names)), [str(n) for n in names], fontsize=7)
    fig.tight_layout()
    return save(fig, path)


FEW_EPISODES = 30  # below this many paired episodes, say that the intervals and tests are rough


def class_split(family, entry: Path) -> pd.DataFrame | None:
    """The task sets' class split (columns split, class; meta-train, meta-val, meta-test in turn) from a task_sets
    entry's `classes` table; None for a family without classes (sinusoid)."""
    table = entry / "classes.parquet"
    if not table.exists() or not hasattr(family, "class_column"):
        return None
    classes = pd.read_parquet(table)
    order = {s: i for i, s in enumerate(("meta_train", "meta_val", "meta_test"))}
    return (classes[["split", family.class_column]].rename(columns={family.class_column: "class"})
            .sort_values("split", key=lambda s: s.map(order), kind="stable").reset_index(drop=True))

def unfinished_training(cache, cfg, algorithm_keys: Mapping[str, str]) -> dict[str, str]:
    """{unit label: note} for each meta-learner whose cached training (`meta_train` entry of algorithm_keys[label])
    is not the training the config asks for, so that its scores are not what its name promises:
    - a wall-clock budget stopped it before its iterations ("meta-training stopped by the time budget at
      iteration i of n after m min of training in all (--budget-minutes N goes on from its checkpoint)"; the
      minutes across every budgeted run that continued it);
    - it kept its initial state: no validated state had a lower meta-val loss than iteration 0's, so its scores
      are those of the untrained start (the family's initialisation), whatever the algorithm."""
    notes = {}
    for label, key in algorithm_keys.items():
        meta = cache.manifest("meta_train", key)["meta"] if cache.is_complete("meta_train", key) else {}
        if meta.get("stop_reason") == "budget":
            planned = cfg.meta_train.for_algorithm(label.split("/")[0])["iterations"]
            seconds = meta.get("train_seconds_total")
            spent = "" if seconds is None else f" after {seconds:.0f} s of training in all" if seconds < 60 else \
                f" after {seconds / 60:.1f} min of training in all"
            notes[label] = f"meta-training stopped by the time budget at iteration {meta['iterations_total']} of " \
                           f"{planned}{spent} (--budget-minutes N goes on from its checkpoint)"
        elif meta.get("best_iteration") == 0 and meta.get("iterations_total", 0) > 0:
            notes[label] = f"kept its initial state: no meta-val loss in {meta['iterations_total']} iterations was " \
                           f"below iteration 0's, so its scores are the untrained start's"
    return notes


def unfinished_lines(unfinished: Mapping[str, str]) -> list[str]:
    """The lines under a results table for `unfinished_training`'s notes (any labels, e.g. "fold 01 maml")."""
    return [f"~ {label}: {note}" for label, note in unfinished.items()]


def unfinished_tag(unfinished: Mapping[str, str]) -> str:
    """The notes as one MLflow tag value, "label: note; label: note" (`metapeft runs` shows it, export reads it)."""
    return "; ".join(f"{label}: {note}" for label, note in unfinished.items())


SEED_PAIRS = "seed_pairs"  # the significance entry's table of each pair over the meta-training seeds


def results_text(summary: pd.DataFrame, comparisons: pd.DataFrame, metric: str, reference: str,
                 alpha: float = 0.01, confidence: float = 0.95, diverged: pd.DataFrame | None = None,
                 unfinished: Mapping[str, str] | None = None, seeds: pd.DataFrame | None = None) -> str:
    """A short fixed-width table: each method's mean +- CI and its Holm-corrected p against `reference`.

    `*` marks a difference to the reference significant at alpha: both Holm-adjusted paired tests (t-test and
    Wilcoxon) below it, the rule of every verdict (`components.significance.verdict_p`); p shown is that p. Methods that
    diverged (diverged: method, stage, reason) follow, each with where and why, instead of a score. unfinished
    (`unfinished_training`): units whose training a budget stopped, said below the table (`~` marks their method).
    seeds (`components.significance.seed_pairs`, a study with several seeds): a column, in how many seeds the
    method beat the reference and the t-test p over the seeds.
    """
    over = seeds is not None and len(seeds) > 0
    lines = [f"{'method':<20} {f'{metric} ({confidence:.0%} CI)':>24} {'p_holm vs ' + reference:>22}"
             + ("  better in seeds, p over seeds" if over else "")]
    short = {label.split("/")[0] for label in unfinished or {}}
    for method, row in summary.iterrows():
        p = _pair_p(comparisons, method, reference)
        p_text = "-" if np.isnan(p) else f"{p:.2e}{'*' if p < alpha else ' '}"
        name = f"{method}{' ~' if method in short else ''}"
        lines.append(f"{name:<20} {row['mean']:>12.4f} +- {row['ci_half']:<8.4f} {p_text:>22}"
                     + (f"  {over_replicates(seeds, method, reference)}" if over else ""))
    for row in ([] if diverged is None else diverged.to_dict("records")):
        seed = row.get("seed")
        where = f"{row['stage']}{f' (seed {int(seed)})' if seed is not None and pd.notna(seed) else ''}"
        lines.append(f"{row['method']:<20} DIVERGED in {where}: {row['reason']}")
    if over:
        lines.append("a seeded method's score is its seeds' mean: the CI and p say how sure the episodes make us of "
                     "that mean; 'better in seeds' and the t-test over the seeds' means say whether another seed "
                     "would agree")
    lines += unfinished_lines(unfinished or {})
    if "n" in summary and len(summary) and (n := int(summary["n"].min())) < FEW_EPISODES:
        lines.append(f"only {n} meta-test episodes: the t-intervals (which may pass the metric's range) and the "
                     f"p-values are rough; use {FEW_EPISODES} or more")
    return "\n".join(lines)


def over_replicates(pairs: pd.DataFrame, method: str, reference: str, unit: str = "seed") -> str:
    """'2/3 seeds, p 0.21' for method against reference (`seed_pairs`; unit "fold": `fold_pairs`), '-' without
    that pair (the reference itself, two unseeded methods)."""
    r = replicate_record(pairs, method, reference, unit)
    if r is None:
        return "-"
    tested = f"p {r['p']:.2g}" if r["p"] == r["p"] else "no test" if r["n"] > 1 else f"no test over one {unit}"
    return f"{r['better']}/{r['n']} {unit}{'s' * (r['n'] != 1)}, {tested}"


def cached_results_text(path: Path, metric: str, reference: str, alpha: float, confidence: float,
                        unfinished: Mapping[str, str] | None = None) -> str:
    """`results_text` of a significance entry's tables (path: its folder)."""
    from flows.cache import DIVERGED

    seeds = path / f"{SEED_PAIRS}.parquet"
    return results_text(pd.read_parquet(path / "summary.parquet").set_index("method"),
                        pd.read_parquet(path / "comparisons.parquet"), metric, reference, alpha, confidence,
                        pd.read_parquet(path / f"{DIVERGED}.parquet"), unfinished,
                        pd.read_parquet(seeds) if seeds.exists() else None)


def _pair_p(comparisons: pd.DataFrame, a: str, b: str) -> float:
    pair = comparisons[((comparisons.method_a == a) & (comparisons.method_b == b))
                       | ((comparisons.method_a == b) & (comparisons.method_b == a))]
    return float(verdict_p(pair).iloc[0]) if len(pair) else float("nan")
