"""The study's answer, from the significance stage's tables: which start is best, by how much, how sure.

What the parent MLflow run carries as metrics and tags and the Prefect verdict artifact says in words.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from components.significance import replicate_record, verdict_p


TIE = 1e-6  # relative: means closer than this differ by float32 rounding (one query of 75,000 is 1.3e-5)


@dataclass(frozen=True)
class Gap:
    """best - other on the paired meta-test episodes: mean difference, its CI and p_holm, the larger of the
    Holm-adjusted paired t-test and Wilcoxon p (`verdict_p`: a difference when both tests agree)."""

    other: str
    diff: float
    ci_low: float
    ci_high: float
    p_holm: float
    # over replicates (meta-training seeds, class-split folds): in how many of them best beat other, and the
    # paired t-test over their means (`seed_pairs`, `fold_pairs`)
    unit: str = "seed"
    units_better: int | None = None
    n_units: int | None = None
    p_units: float = float("nan")

    def units_text(self) -> str:
        if self.n_units is None:
            return ""
        if self.p_units != self.p_units:  # NaN: one replicate, or differences equal up to rounding
            why = f"one {self.unit}: no test over {self.unit}s" if self.n_units < 2 else "no test: equal differences"
            return f" Better in {self.units_better} of {self.n_units} {self.unit}{'s' * (self.n_units != 1)} ({why})."
        return f" Better in {self.units_better} of {self.n_units} {self.unit}s (t-test over the {self.unit}s' " \
               f"means p = {self.p_units:.2g})."


@dataclass(frozen=True)
class Answer:
    metric: str
    best: str
    mean: float
    ci_low: float
    ci_high: float
    confidence: float
    alpha: float
    runner_up: Gap | None  # None: a single method
    baseline: Gap | None  # the best baseline, when the best method is a meta-learner
    meta_learner: Gap | None = None  # the best meta-learner, when the best method is a baseline

    def metrics(self) -> dict[str, float]:
        name = f"best_meta_test_{self.metric}"
        out = {name: self.mean, f"{name}_ci_low": self.ci_low, f"{name}_ci_high": self.ci_high}
        for what, gap in (("runner_up", self.runner_up), ("best_baseline", self.baseline),
                          ("best_meta_learner", self.meta_learner)):
            if gap is not None:
                out |= {f"best_vs_{what}_diff": gap.diff, f"best_vs_{what}_ci_low": gap.ci_low,
                        f"best_vs_{what}_ci_high": gap.ci_high, f"best_vs_{what}_p_holm": gap.p_holm}
                if gap.n_units is not None:
                    out |= {f"best_vs_{what}_{gap.unit}s_better": gap.units_better,
                            f"best_vs_{what}_p_{gap.unit}s": gap.p_units}
        return out

    def tags(self) -> dict[str, str]:
        out = {"metapeft.best_method": self.best, "metapeft.verdict": self.sentence()}
        if self.runner_up is not None:
            out["metapeft.runner_up"] = self.runner_up.other
        if self.baseline is not None:
            out["metapeft.best_baseline"] = self.baseline.other
        if self.meta_learner is not None:
            out["metapeft.best_meta_learner"] = self.meta_learner.other
        return out

    def tied(self, gap: Gap | None) -> bool:
        """Whether gap's means differ by rounding only (two methods with the same scores, e.g. the same predictions
        from the same frozen features): then neither is best."""
        return gap is not None and abs(gap.diff) <= TIE * max(1.0, abs(self.mean))

    def leader(self) -> str:
        """'maml is best', or 'protonet and linear_head tie' when the runner-up differs by rounding only."""
        return f"{self.best} and {self.runner_up.other} tie" if self.tied(self.runner_up) else f"{self.best} is best"

    def sentence(self) -> str:
        level = f"{self.confidence:.0%}"
        text = f"{self.leader()}: meta-test {self.metric} {self.mean:.4g} ({level} CI {self.ci_low:.4g} to " \
               f"{self.ci_high:.4g})."
        for what, gap in self.gaps():
            sure = "significant" if gap.p_holm < self.alpha else "not significant"
            text += f" Against {what}, {gap.other}: {gap.diff:+.4g} ({level} CI {gap.ci_low:+.4g} to " \
                    f"{gap.ci_high:+.4g}), Holm p = {gap.p_holm:.2g}, {sure} at alpha = {self.alpha:g}." + \
                    gap.units_text()
        return text

    def gaps(self) -> list[tuple[str, Gap]]:
        """(what, gap) of each comparison the verdict states: the runner-up, then the best baseline (or, when a
        baseline is best, the best meta-learner), one entry when they are the same method."""
        other = self.baseline or self.meta_learner
        what = "best baseline" if self.baseline else "best meta-learner"
        if self.runner_up is not None and self.runner_up == other:
            return [(f"the runner-up and {what}", other)]
        return [(w, g) for w, g in (("the runner-up", self.runner_up), (f"the {what}", other)) if g is not None]


def study_answer(summary: pd.DataFrame, comparisons: pd.DataFrame, metric: str, meta_learners: set[str],
                 confidence: float, alpha: float, replicates: pd.DataFrame | None = None,
                 unit: str = "seed") -> Answer | None:
    """summary: the significance stage's summary (index method, best first); comparisons: its pairwise table
    (method_a the better one); meta_learners: the methods that are meta-learned starts; replicates: its
    `seed_pairs` (unit "seed") or a fold study's `fold_pairs` (unit "fold"): each gap also says in how many of
    them it held. None without methods."""
    if summary.empty:
        return None
    best, row = summary.index[0], summary.iloc[0]
    baselines = [m for m in summary.index if m not in meta_learners]
    learners = [m for m in summary.index if m in meta_learners]
    baseline = baselines[0] if best in meta_learners and baselines else None
    learner = learners[0] if best not in meta_learners and learners else None
    return Answer(metric, best, float(row["mean"]), float(row["ci_low"]), float(row["ci_high"]), confidence, alpha,
                  _gap(comparisons, best, summary.index[1], replicates, unit) if len(summary) > 1 else None,
                  _gap(comparisons, best, baseline, replicates, unit) if baseline else None,
                  _gap(comparisons, best, learner, replicates, unit) if learner else None)


def _gap(comparisons: pd.DataFrame, best: str, other: str, replicates: pd.DataFrame | None = None,
         unit: str = "seed") -> Gap:
    """best - other from their pair's row, whichever way round the row is: the summary ranks by its means (a fold
    study: the mean of fold means) and the pairs by theirs (the pooled episodes; a rounding step apart for two
    methods of the same scores), so the summary's best may be the row's method_b."""
    pair = comparisons[(comparisons["method_a"] == best) & (comparisons["method_b"] == other)]
    sign = 1.0
    if pair.empty:
        pair, sign = comparisons[(comparisons["method_a"] == other) & (comparisons["method_b"] == best)], -1.0
    row = pair.iloc[0]
    low, high = sorted((sign * float(row["ci_low"]), sign * float(row["ci_high"])))
    rep = None if replicates is None else replicate_record(replicates, best, other, unit)
    over = {} if rep is None else \
        {"unit": unit, "units_better": rep["better"], "n_units": rep["n"], "p_units": rep["p"]}
    return Gap(other, sign * float(row["mean_diff"]), low, high,
               float(verdict_p(row.to_frame().T).iloc[0]), **over)  # both tests, as every verdict
