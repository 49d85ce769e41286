"""The study's self-contained HTML report, built from its cache entries (figures inlined as base64).

It opens with the answer in words (flows.answer), then a study summary, the results, a forest plot of
paired differences, learning curves, the pairwise tests and the task-set validation, whose full
Great Expectations rendering is written beside it (validation.html). Every figure colours a method as
`flows.report.method_colors` does. Kept apart from `flows.report` on purpose: that module's source is part
of the embeddings and significance cache keys, and restyling this page must not recompute them.
"""
from __future__ import annotations

import base64
import html
import io
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from components.significance import verdict_p

from flows.answer import Answer, study_answer
from flows.cache import DIVERGED, HISTORY, MANIFEST, VALIDATION, StageCache
from flows.config import StudyConfig
from flows.report import (SEED_PAIRS, _algorithm, _pair_p, _pyplot, class_split, method_color, method_colors,
                          over_replicates, unfinished_training)

VALIDATION_PAGE = "validation.html"  # beside the report
PACKAGES = ("torch", "prefect", "mlflow", "great_expectations", "pandas", "scipy")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222;
       line-height: 1.4; }
h1 { margin-bottom: 0.1em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.verdict { font-size: 1.08em; background: #f4f7fb; border-left: 4px solid #1f77b4; padding: 0.6em 1em; }
.facts { display: grid; grid-template-columns: max-content 1fr max-content 1fr; gap: 0.1em 1.2em;
         font-size: 0.88em; margin: 0.6em 0; }
.facts dt { color: #666; }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f6f6f6; text-align: left; }
td:first-child, td.name { text-align: left; }
td.wrap { white-space: normal; text-align: left; min-width: 12em; max-width: 40em; overflow-wrap: anywhere; }
tr.best td { font-weight: bold; }
.sw { display: inline-block; width: 0.75em; height: 0.75em; border-radius: 2px; margin-right: 0.35em; }
.pass { color: #1a7f37; } .fail { color: #b3261e; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.row { display: flex; flex-wrap: wrap; gap: 0.5em; } .row img { max-width: 32%; min-width: 280px; }
.meta { color: #666; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class Entries:
    """What the report reads from the study's cache entries."""

    summary: pd.DataFrame  # index method, best first: n, mean, ci_half, ci_low, ci_high
    comparisons: pd.DataFrame  # one row per pair, method_a the better
    diverged: pd.DataFrame  # method, stage, reason
    seeds: pd.DataFrame | None  # method, seed, metric, value (evaluate tables with a seed column)
    seed_pairs: pd.DataFrame | None  # each pair over the seeds (components.significance.seed_pairs)
    histories: dict[str, pd.DataFrame]  # unit label -> iteration, metric, value
    validation: dict | None  # the task sets' Great Expectations report
    significance: Path  # the entry's folder (its figures)
    heatmaps: list[Path]

    @classmethod
    def read(cls, cache: StageCache, keys: dict[str, str], algorithm_keys: dict[str, str]) -> "Entries":
        key, entry = keys["significance"], cache.path("significance", keys["significance"])

        def optional(name: str) -> pd.DataFrame | None:
            return cache.read_table("significance", key, name) if (entry / f"{name}.parquet").exists() else None

        histories = {a: cache.read_table("meta_train", k, HISTORY) for a, k in algorithm_keys.items()
                     if cache.is_complete("meta_train", k)
                     and (cache.path("meta_train", k) / f"{HISTORY}.parquet").exists()}
        tasks = cache.path("task_sets", keys["task_sets"]) / VALIDATION if "task_sets" in keys else None
        embeddings = "embeddings" in keys and cache.is_complete("embeddings", keys["embeddings"])
        diverged = optional(DIVERGED)
        return cls(cache.read_table("significance", key, "summary").set_index("method"),
                   cache.read_table("significance", key, "comparisons"),
                   pd.DataFrame(columns=["method", "stage", "reason"]) if diverged is None else diverged,
                   optional("seeds"), optional(SEED_PAIRS), histories,
                   json.loads(tasks.read_text()) if tasks is not None and tasks.is_file() else None, entry,
                   sorted(cache.path("embeddings", keys["embeddings"]).glob("similarity_*.png")) if embeddings else [])


def _utc(file: Path) -> str:
    """When a cache entry was written: its manifest's modification time (the entry's last, atomic write), UTC;
    'at a time not recorded' for a folder without one."""
    if not file.is_file():
        return "at a time not recorded"
    return f"{datetime.fromtimestamp(file.stat().st_mtime, timezone.utc):%Y-%m-%d %H:%M} UTC"


def study_report(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], algorithm_keys: dict[str, str],
                 out: Path, run_id: str | None = None) -> Path:
    """Write the report of one study run to `out` (an .html file) from its significance, meta-training,
    task-set and embeddings entries, and the task-set validation beside it (validation.html); missing
    optional entries (embeddings, a training history, the validation report) are left out."""
    from flows.families import family_for

    family, sig, e = family_for(cfg), cfg.significance, Entries.read(cache, keys, algorithm_keys)
    summary, comparisons = e.summary, e.comparisons
    colors = method_colors(summary.index, [*e.diverged.get("method", []), *e.histories])
    answer = study_answer(summary, comparisons, family.metric, set(cfg.meta_train.algorithms), sig.confidence,
                          sig.alpha, e.seed_pairs)
    reference = family.reference if family.reference in summary.index else summary.index[0] if len(summary) else None
    parts = [
        f"<h1>{_e(cfg.label)}</h1>",
        f"<p class='meta'>MLflow run {_e(run_id or '-')} &middot; significance entry {_e(keys['significance'])}"
        f", computed {_utc(e.significance / MANIFEST)} &middot; page written {datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
        f" UTC</p>",
        verdict_html(answer, family.lower_is_better, e.diverged, int(summary["n"].max()) if len(summary) else 0),
        study_facts(cfg, family, summary, unfinished_training(cache, cfg, algorithm_keys)),
        classes_html(class_split(family, cache.path("task_sets", keys["task_sets"])) if "task_sets" in keys else None),
        f"<h2>Results: meta-test {_e(family.metric)}</h2>",
        results_table(summary, comparisons, family.metric, reference, sig.alpha, sig.confidence, colors),
        diverged_html(e.diverged),
        _img(e.significance / "summary.png", "means with confidence intervals"),
    ]
    if reference is not None and len(summary) > 1:
        parts += forest_section(comparisons, list(summary.index), reference, family, sig, colors)
    parts += ["<h2>Learning curves</h2>",
              _img(e.significance / "curves.png", "meta-test score against test-time steps")]
    if e.histories:
        parts.append(_img_bytes(png(training_figure(e.histories, colors)), "meta-validation loss during meta-training"))
    parts += ["<h2>Pairwise significance</h2>", significance_table(comparisons, colors, sig.alpha)]
    if e.seeds is not None and e.seeds["seed"].nunique() > 1:
        parts += ["<h2>Meta-training seeds</h2>", seeds_table(e.seeds, colors, e.seed_pairs, reference)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if e.validation is not None:
        (out.parent / VALIDATION_PAGE).write_text(page(f"{cfg.label}: task-set validation", validation_html(
            e.validation, cfg.label, out.name, f"{VALIDATION} in the task_sets entry {keys['task_sets']}")))
        parts += ["<h2>Task-set validation</h2>", validation_summary(e.validation, VALIDATION_PAGE)]
    if e.heatmaps:
        parts += ["<h2>Task embeddings</h2><div class='row'>", *[_img(p, heatmap_caption(p)) for p in e.heatmaps],
                  "</div>"]
    out.write_text(page(f"metapeft: {cfg.label}", "\n".join(parts)))
    return out


def fold_study_report(cfg: StudyConfig, family, entry: Path, fold_pages: dict[str, Path], out: Path,
                      run_id: str | None = None, unfinished: dict[str, str] | None = None) -> Path:
    """Write the report of a fold study's own run to `out`: the answer over folds, each method's mean over folds
    with its interval over the fold means and its fold means, the pair with the reference over the folds, the
    pooled-episode tests, and a link to each fold's own report. entry: a folder with the study's summary tables
    (its "folds" cache entry, `flows.folds.summarize`, or the copies its run logged); family: any fold's (its
    metric and reference); fold_pages: fold -> its pipeline run's report.html; unfinished:
    `flows.folds.fold_unfinished`."""
    import os

    tables = {name: pd.read_parquet(entry / f"{name}.parquet")
              for name in ("summary", "fold_means", "comparisons", "fold_pairs", "diverged")}
    summary = tables["summary"].set_index("method").rename(columns={"n_episodes": "n"})
    comparisons, sig, gone = tables["comparisons"], cfg.significance, tables["diverged"]
    diverged = pd.DataFrame({"method": gone.get("method", pd.Series(dtype=str)),
                             "stage": [f"fold {f}" for f in gone.get("fold", [])]})
    colors = method_colors(summary.index, diverged["method"])
    answer = study_answer(summary, comparisons, family.metric, set(cfg.meta_train.algorithms), sig.confidence,
                          sig.alpha, tables["fold_pairs"], unit="fold")
    reference = family.reference if family.reference in summary.index else summary.index[0] if len(summary) else None
    links = ", ".join(f"<a href='{_e(Path(os.path.relpath(page, out.parent)).as_posix())}'>fold {_e(f)}</a>"
                      for f, page in fold_pages.items())
    folds, episodes = len(cfg.folds or ()), int(summary["n"].max()) if len(summary) else 0
    parts = [
        f"<h1>{_e(cfg.name)}: {folds} fold{'s' * (folds != 1)}</h1>",
        f"<p class='meta'>MLflow run {_e(run_id or '-')} &middot; summary computed "
        f"{_utc(entry / MANIFEST) if (entry / MANIFEST).is_file() else 'by this run (the tables it logged)'} "
        f"&middot; page written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        verdict_html(answer, family.lower_is_better, diverged, episodes,
                     f"over the means of {folds} folds ({episodes} meta-test episodes pooled)" if folds > 1 else
                     f"over one fold's {episodes} meta-test episodes (one fold: no interval over folds)",
                     " on the pooled episodes"),
        study_facts(cfg, family, summary, unfinished),
        f"<p>Each fold is a class split of its own (folder under {_e(cfg.family.split_root or '-')}), run as its own "
        f"pipeline: {links or 'no fold runs recorded'}.</p>",
        f"<h2>Results: meta-test {_e(family.metric)}, mean over folds</h2>",
        folds_table(summary, tables, reference, sig.alpha, sig.confidence, colors),
        diverged_html(diverged.assign(reason="left out of the study")),
    ]
    if reference is not None and len(summary) > 1:
        parts += forest_section(comparisons, list(summary.index), reference, family, sig, colors)
    parts += ["<h2>Pairwise significance (pooled episodes)</h2>",
              significance_table(comparisons, colors, sig.alpha, "the study's folds entry")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(f"metapeft: {cfg.name} ({len(cfg.folds or ())} folds)", "\n".join(parts)))
    return out


def folds_table(summary: pd.DataFrame, tables: dict[str, pd.DataFrame], reference: str | None, alpha: float,
                confidence: float, colors: dict[str, str]) -> str:
    """One row per method (best first): the mean over folds with its t-interval over the fold means, each fold's
    mean, the pooled-episode p against the reference (both Holm-adjusted tests: `verdict_p`) and the same pair
    over the folds (in how many folds it was the better, the t-test p over the fold means)."""
    means = tables["fold_means"].pivot(index="method", columns="fold", values="mean")
    folds = list(dict.fromkeys(tables["fold_means"]["fold"]))
    head = (f"<tr><th>method</th><th>mean over folds</th><th>{confidence:.0%} CI over folds</th>"
            + "".join(f"<th>fold {_e(f)}</th>" for f in folds)
            + f"<th>p (Holm, pooled) vs {_e(reference or '-')}</th><th>better in folds, p over folds</th></tr>")
    rows = []
    for i, (method, r) in enumerate(summary.iterrows()):
        p = _pair_p(tables["comparisons"], method, reference) if reference else float("nan")
        interval = f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]" if len(folds) > 1 else "n/a (one fold)"
        rows.append(f"<tr{' class=best' if i == 0 else ''}><td>{_swatch(colors, method)}{_e(method)}</td>"
                    f"<td>{_num(r['mean'])}</td><td>{interval}</td>"
                    + "".join(f"<td>{_num(means.loc[method, f])}</td>" for f in folds)
                    + f"<td>{'-' if pd.isna(p) else _p(p) + (' *' if p < alpha else '')}</td>"
                    f"<td>{_e(over_replicates(tables['fold_pairs'], method, reference, 'fold')) if reference else '-'}"
                    f"</td></tr>")
    few = f" Only {len(folds)} folds: {len(folds) - 1} degree(s) of freedom, so the interval is wide and may pass " \
        f"the metric's range." if 1 < len(folds) < 5 else ""
    note = (f"<p class='meta'>The interval is over the {len(folds)} fold means (episodes are nested in folds).{few} "
            f"* significant at &alpha; = {alpha:g} on the pooled episodes: both Holm-adjusted paired tests agree; "
            f"they count every fold's episodes as independent, so the last column says whether the difference holds "
            f"from one class split to another.</p>")
    return f"<div class='scroll'><table>{head}{''.join(rows)}</table></div>{note}"


def forest_section(comparisons: pd.DataFrame, methods: list[str], reference: str, family, sig,
                   colors: dict[str, str]) -> list[str]:
    """The forest plot of (method - reference) with its heading and a note on the test."""
    figure = forest_figure(comparisons, methods, reference, family.metric, sig.confidence, sig.alpha,
                           family.lower_is_better, colors)
    return [f"<h2>Paired differences to {_e(reference)}</h2>",
            _img_bytes(png(figure), f"forest plot: each method minus {reference}"),
            f"<p class='meta'>Each row: the mean over the same meta-test episodes of (method &minus; {_e(reference)}), "
            f"with its {sig.confidence:.0%} t-interval; p: the larger of the paired t-test and Wilcoxon p, each "
            f"Holm-adjusted over all {len(comparisons)} pairs (both must agree); * p &lt; {sig.alpha:g}.</p>"]


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------- the answer and the study

def verdict_html(answer: Answer | None, lower_is_better: bool, diverged: pd.DataFrame, n_episodes: int,
                 over: str | None = None, gaps_on: str = "") -> str:
    """The first paragraph: the best method and its score, each gap the answer states (runner-up, best
    baseline or best meta-learner) with its CI and Holm-adjusted p at the answer's alpha, the diverged methods.
    over: what the score's interval is over [default: 'over <n_episodes> meta-test episodes']; gaps_on: what the
    gaps' intervals and tests are on, when that differs (a fold study's: ' on the pooled episodes')."""
    gone = diverged_names(diverged)
    if answer is None:
        return f"<p class='verdict'>No method finished: every method diverged ({_e(gone)}).</p>"
    level = f"{answer.confidence:.0%}"
    lead = f"<b>{_e(answer.best)}</b> scores best" if not answer.tied(answer.runner_up) else \
        f"<b>{_e(answer.best)}</b> and <b>{_e(answer.runner_up.other)}</b> tie (their means differ by rounding only)"
    interval = f"({level} CI {_num(answer.ci_low)} to {_num(answer.ci_high)}) " \
        if pd.notna(answer.ci_low) and pd.notna(answer.ci_high) else ""  # one fold: none
    text = (f"{lead}: meta-test {_e(answer.metric)} {_num(answer.mean)} {interval}"
            f"{over or f'over {n_episodes} meta-test episodes'}"
            f" ({'lower' if lower_is_better else 'higher'} is better).")
    for what, gap in answer.gaps():
        sure = "significant" if gap.p_holm < answer.alpha else "not significant"
        by = "the same" if gap.diff == 0 else f"{_num(abs(gap.diff))} {'lower' if gap.diff < 0 else 'higher'}"
        text += (f" Against {_e(what)}, <b>{_e(gap.other)}</b>: {by} "
                 f"({_e(answer.best)} &minus; {_e(gap.other)} = {gap.diff:+.4g}, {level} CI{gaps_on} "
                 f"{gap.ci_low:+.4g} to "
                 f"{gap.ci_high:+.4g}, Holm-adjusted p = {_p(gap.p_holm)}), <b>{sure}</b> at &alpha; = "
                 f"{answer.alpha:g}.{_e(gap.units_text())}")
    if gone:
        text += f" Diverged, with no score: {_e(gone)}."
    return f"<p class='verdict'>{text}</p>"


def heatmap_caption(path: Path) -> str:
    """'meta-test tasks: euclidean distance' for the embeddings entry's similarity_euclidean.png (every matrix is
    written as similarity_<metric>; cosine is a similarity, the others distances)."""
    from components.features import SIMILARITIES

    metric = path.stem.removeprefix("similarity_")
    return f"meta-test tasks: {metric} {'similarity' if metric in SIMILARITIES else 'distance'}"


def diverged_names(diverged: pd.DataFrame) -> str:
    """"metasgd (meta_train)": each diverged method once, with the stages where it diverged."""
    if diverged is None or diverged.empty:
        return ""
    stages = diverged.groupby("method", sort=True)["stage"].agg(lambda s: ", ".join(dict.fromkeys(s)))
    return ", ".join(f"{m} ({s})" for m, s in stages.items())


def classes_html(split: pd.DataFrame | None, shown: int = 30) -> str:
    """The class split (`report.class_split`): per meta-split its number of classes and their names (the first
    `shown`, the rest counted), said disjoint only when they are; '' without one."""
    if split is None or split.empty:
        return ""
    groups = {name: part["class"].astype(str).tolist() for name, part in split.groupby("split", sort=False)}
    spread = split.groupby(split["class"].astype(str))["split"].nunique()
    overlap = sorted(spread.index[spread > 1])
    head = ", ".join(f"{name.replace('_', '-')} {len(c)}" for name, c in groups.items())
    lines = [f"<li><b>{_e(name.replace('_', '-'))}</b>: " + _e(", ".join(c[:shown]))
             + (f" and {len(c) - shown} more" if len(c) > shown else "") + "</li>" for name, c in groups.items()]
    said = "in no two splits" if not overlap else f"<span class='fail'>shared by splits: {_e(', '.join(overlap))}</span>"
    return (f"<details><summary>Classes: {_e(head)} ({said})</summary><ul>{''.join(lines)}</ul>"
            f"<p class='meta'>the full table: MLflow artifact task_sets/classes.csv</p></details>")


def study_facts(cfg: StudyConfig, family, summary: pd.DataFrame,
                unfinished: dict[str, str] | None = None) -> str:
    """The settings a reader needs to weigh the answer (unfinished: `report.unfinished_training`, training a budget
    stopped short), and the code and packages that computed it."""
    f, mt = cfg.family, cfg.meta_train
    episodes = f"{f.n_way}-way {f.k_shot}-shot, {f.n_query} queries per class" if hasattr(f, "n_way") \
        else f"regression, K = {f.k_shot} support and {f.n_query} query points"
    fixed = getattr(f, "test_episodes", None)
    if fixed:  # the file sets the meta-test episodes and their queries; n_query is meta-training's and meta-val's
        episodes += f" at meta-train and meta-val; meta-test: the fixed episode file {fixed} (its own queries)"
    learners = ", ".join(mt.algorithms)
    facts = {
        "family": f"{f.kind}{' (' + f.dataset + ')' if hasattr(f, 'dataset') else ''}, metric {family.metric} "
                  f"({'lower' if family.lower_is_better else 'higher'} is better)",
        "episodes": episodes,
        "meta-test episodes": (str(int(summary["n"].max())) if len(summary) else "-") +
                              (f", from {fixed}" if fixed else ""),
        "model": f"{cfg.model.kind}, adapted: {cfg.model.adapted}",
        "meta-training": f"{learners}; {mt.iterations} iterations, meta-batch {mt.meta_batch_size}, "
                         f"{mt.inner_steps} inner step(s)" + "".join(f"; {k}: {v}" for k, v in (unfinished or {}).items()),
        "test-time steps": str(cfg.evaluate.steps),
        "seeds": ", ".join(map(str, cfg.seeds)) if cfg.seeds else f"{cfg.seed} (one)",
        "tests": f"paired t-test and Wilcoxon, Holm over all pairs, a difference when both agree; "
                 f"{cfg.significance.confidence:.0%} CI, "
                 f"\u03b1 = {cfg.significance.alpha:g}",
        "code": git_commit(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions().items()),
    }
    return "<dl class='facts'>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items()) + "</dl>"


def git_commit() -> str:
    """The commit of this code (the runs' provenance tags, `tracking.context_tags`), "+ uncommitted changes"
    when tracked files differ from it."""
    from flows.tracking import code_commit

    if (found := code_commit()) is None:
        return "- (no git)"
    commit, dirty = found
    return f"{commit[:10]}{' + uncommitted changes' if dirty else ''} (at report time)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


# ---------------------------------------------------------------- tables

def results_table(summary: pd.DataFrame, comparisons: pd.DataFrame, metric: str, reference: str | None,
                  alpha: float, confidence: float, colors: dict[str, str]) -> str:
    """One row per method (summary: index method, columns n, mean, ci_low, ci_high; best first) with
    its verdict p against `reference` (both Holm-adjusted tests: `verdict_p`); bold: the best method."""
    head = (f"<tr><th>method</th><th>n</th><th>mean {_e(metric)}</th><th>{confidence:.0%} CI</th>"
            f"<th>p (Holm) vs {_e(reference or '-')}</th></tr>")
    rows = []
    for i, (method, r) in enumerate(summary.iterrows()):
        p = _pair_p(comparisons, method, reference) if reference else float("nan")
        p_text = "-" if pd.isna(p) else f"{_p(p)}{' *' if p < alpha else ''}"
        rows.append(f"<tr{' class=best' if i == 0 else ''}><td>{_swatch(colors, method)}{_e(method)}</td>"
                    f"<td>{int(r['n'])}</td><td>{_num(r['mean'])}</td>"
                    f"<td>[{_num(r['ci_low'])}, {_num(r['ci_high'])}]</td><td>{p_text}</td></tr>")
    note = (f"<p class='meta'>* significant at &alpha; = {alpha:g}: p is the larger of the Holm-adjusted paired "
            f"t-test and Wilcoxon p over the same episodes (both tests must agree)</p>")
    return f"<div class='scroll'><table>{head}{''.join(rows)}</table></div>{note}"


def diverged_html(diverged: pd.DataFrame) -> str:
    if diverged.empty:
        return ""
    rows = "; ".join(f"{_e(r['method'])} in {_e(r['stage'])}: {_e(r['reason'])}" for r in diverged.to_dict("records"))
    return f"<p><b>Diverged</b> (no score, left out of the comparison): {rows}</p>"


def significance_table(comparisons: pd.DataFrame, colors: dict[str, str], alpha: float,
                       entry: str = "the significance entry") -> str:
    """Every pair, compact: a - b with its CI, the Holm-adjusted t-test and Wilcoxon p, Cohen's d_z, and
    whether a is better at alpha (both tests); the raw p-values are in comparisons.parquet."""
    head = ("<tr><th>a</th><th>b</th><th>n</th><th>a &minus; b</th><th>CI</th><th>p t-test (Holm)</th>"
            "<th>p Wilcoxon (Holm)</th><th>d<sub>z</sub></th><th>a better</th></tr>")
    rows = []
    for r in comparisons.to_dict("records"):
        rows.append(f"<tr><td>{_swatch(colors, r['method_a'])}{_e(r['method_a'])}</td>"
                    f"<td class='name'>{_swatch(colors, r['method_b'])}{_e(r['method_b'])}</td><td>{int(r['n'])}</td>"
                    f"<td>{r['mean_diff']:+.4g}</td><td>[{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]</td>"
                    f"<td>{_p(r['p_ttest_holm'])}</td><td>{_p(r.get('p_wilcoxon_holm'))}</td>"
                    f"<td>{_num(r['cohens_dz'], 2)}</td><td>{'yes' if r.get('a_better') else 'no'}</td></tr>")
    note = (f"<p class='meta'>a: the method with the better mean. a better: both Holm-adjusted p &lt; {alpha:g} "
            f"and the difference favours a. Raw p-values: comparisons.parquet in {entry}.</p>")
    return f"<div class='scroll'><table>{head}{''.join(rows)}</table></div>{note}"


def seeds_table(seeds: pd.DataFrame, colors: dict[str, str], pairs: pd.DataFrame | None = None,
                reference: str | None = None) -> str:
    """Each method's mean score per meta-training seed (seeds: method, seed, metric, value); with pairs
    (`seed_pairs`), a column: in how many seeds it beat `reference` and the t-test p over the seeds."""
    wide = seeds.pivot_table(index="method", columns="seed", values="value", aggfunc="mean")
    over = pairs is not None and len(pairs) > 0 and reference is not None
    head = "<tr><th>method</th>" + "".join(f"<th>seed {int(s)}</th>" for s in wide.columns) + \
        (f"<th>vs {_e(reference)}: better in seeds, p over seeds</th>" if over else "") + "</tr>"
    rows = "".join(f"<tr><td>{_swatch(colors, m)}{_e(m)}</td>" + "".join(f"<td>{_num(v)}</td>" for v in r)
                   + (f"<td>{_e(over_replicates(pairs, m, reference))}</td>" if over else "") + "</tr>"
                   for m, r in wide.iterrows())
    note = ("<p class='meta'>A method's score above is its seeds' mean; its interval says how sure the episodes "
            "make us of that mean. Whether another seed would agree is this table's last column.</p>") if over else ""
    return f"<div class='scroll'><table>{head}{rows}</table></div>{note}"


# ---------------------------------------------------------------- figures

def reference_gaps(comparisons: pd.DataFrame, methods: list[str], reference: str) -> pd.DataFrame:
    """method - reference for each method but the reference, in the order of `methods`: columns method,
    mean_diff, ci_low, ci_high, p_holm (comparisons store a - b with a the better one: flipped where needed)."""
    rows = []
    for method in methods:
        pair = comparisons[((comparisons.method_a == method) & (comparisons.method_b == reference))
                           | ((comparisons.method_a == reference) & (comparisons.method_b == method))]
        if method == reference or pair.empty:
            continue
        r, sign = pair.iloc[0], 1.0 if pair.iloc[0]["method_a"] == method else -1.0
        low, high = sorted((sign * r["ci_low"], sign * r["ci_high"]))
        rows.append({"method": method, "mean_diff": sign * r["mean_diff"], "ci_low": low, "ci_high": high,
                     "p_holm": verdict_p(pd.DataFrame([r])).iloc[0]})
    return pd.DataFrame(rows, columns=["method", "mean_diff", "ci_low", "ci_high", "p_holm"])


def forest_figure(comparisons: pd.DataFrame, methods: list[str], reference: str, metric: str, confidence: float,
                  alpha: float, lower_is_better: bool, colors: dict[str, str]):
    """One row per (method, reference) pair: the paired mean difference with its CI, a line at zero, the
    Holm-adjusted p on the right; methods in the order given (best first, on top)."""
    plt, gaps = _pyplot(), reference_gaps(comparisons, methods, reference)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(gaps) + 1.5))
    rows = range(len(gaps) - 1, -1, -1)
    for row, r in zip(rows, gaps.to_dict("records")):
        ax.errorbar(r["mean_diff"], row, xerr=[[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]],
                    fmt="s", color=method_color(colors, r["method"]), capsize=4, ms=6, label=r["method"])
    ax.axvline(0, color="#444", lw=1, ls="--")
    ax.set_yticks(list(rows), gaps["method"])
    ax.set_ylim(-0.6, len(gaps) - 0.4)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(list(rows), [f"p = {_p(p)}{' *' if p < alpha else ''}" for p in gaps["p_holm"]], fontsize=8)
    arrow = "\u2190 better" if lower_is_better else "better \u2192"
    ax.set_xlabel(f"method \u2212 {reference}: meta-test {metric} ({confidence:.0%} CI)    {arrow}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def training_figure(histories: dict[str, pd.DataFrame], colors: dict[str, str]):
    """val_loss against meta-iteration, one line per unit (histories: label -> long iteration, metric, value);
    a unit takes its algorithm's colour, seeds of one algorithm differ by line style."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    styles, seen = ("-", "--", ":", "-."), {}
    for label, history in histories.items():
        val = history[history["metric"] == "val_loss"]
        algorithm = _algorithm(label)
        seen[algorithm] = seen.get(algorithm, -1) + 1
        ax.plot(val["iteration"], val["value"], marker="o", ms=3, label=label, color=method_color(colors, label),
                ls=styles[seen[algorithm] % len(styles)])
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("meta-val loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------- Great Expectations

def expectation_rows(report: dict) -> pd.DataFrame:
    """One row per expectation of a flows.validation report: table, expectation, column, expected,
    observed, success."""
    rows = []
    for table, result in report.get("results", {}).items():
        for r in result.get("results", []):
            config, detail = r.get("expectation_config", {}), r.get("result") or {}
            given = config.get("kwargs", {})
            kwargs = {k: v for k, v in given.items() if k not in ("batch_id", "column", "column_list")}
            column = given.get("column") or ", ".join(given.get("column_list", []))
            rows.append({"table": table, "expectation": config.get("type", "?").removeprefix("expect_"),
                         "column": column, "expected": _short(", ".join(f"{k}={v}" for k, v in kwargs.items())),
                         "observed": _observed(r, detail), "success": bool(r.get("success"))})
    return pd.DataFrame(rows, columns=["table", "expectation", "column", "expected", "observed", "success"])


def _observed(result: dict, detail: dict) -> str:
    if (result.get("exception_info") or {}).get("raised_exception"):
        return "error: " + _short(str(result["exception_info"].get("exception_message")))
    if "unexpected_count" in detail:
        text = f"{detail['unexpected_count']} of {detail.get('element_count', '?')} unexpected"
        examples = detail.get("partial_unexpected_list") or []
        return text + (f", e.g. {_short(', '.join(map(str, examples[:5])))}" if examples else "")
    if "observed_value" in detail:
        return _short(str(detail["observed_value"]))
    return ""


def validation_summary(report: dict, link: str) -> str:
    """The report's short account: expectations passed per table, failures named, what cleaning changed, and a
    link to the full rendering."""
    rows = expectation_rows(report)
    passed = int(rows["success"].sum())
    status = "<span class='pass'>passed</span>" if report.get("success") else "<span class='fail'>FAILED</span>"
    per_table = rows.groupby("table", sort=False)["success"].agg(["size", "sum"])
    table = "".join(f"<tr><td>{_e(t)}</td><td>{int(r['size'])}</td><td>{int(r['sum'])}</td>"
                    f"<td>{int(r['size'] - r['sum'])}</td></tr>" for t, r in per_table.iterrows())
    failures = "".join(f"<li class='fail'>{_e(f)}</li>" for f in report.get("failures", []))
    return (f"<p>Great Expectations {status}: {passed} of {len(rows)} expectations over {len(per_table)} tables. "
            f"{cleaning_text(report)} Every expectation, with what it saw: <a href='{_e(link)}'>{_e(link)}</a>.</p>"
            + (f"<ul>{failures}</ul>" if failures else "")
            + "<div class='scroll'><table><tr><th>table</th><th>expectations</th><th>passed</th><th>failed</th></tr>"
            + table + "</table></div>")


def cleaning_text(report: dict) -> str:
    cleaning = report.get("cleaning")
    if not cleaning:
        return "No cleaning step for this family."
    return "Cleaning: " + "; ".join(f"{_e(c.get('what'))} {int(c.get('count', 0))}" for c in cleaning) + "."


def validation_html(report: dict, study: str, back: str = "report.html", source: str = "") -> str:
    """The body of validation.html: the verdict, the failing expectations, a table of every expectation
    (pass or fail, expected, observed) and the cleaning counts with examples; back: the report's file name."""
    rows = expectation_rows(report)
    status = "<span class='pass'>passed</span>" if report.get("success") else "<span class='fail'>FAILED</span>"
    failures = "".join(f"<li class='fail'>{_e(f)}</li>" for f in report.get("failures", []))
    body = [f"<h1>{_e(study)}: task-set validation</h1>",
            f"<p>Great Expectations {status}: {int(rows['success'].sum())} of {len(rows)} expectations. "
            f"<a href='{_e(back)}'>Back to the report</a>.</p>",
            f"<p class='meta'>From {_e(source)}.</p>" if source else "",
            f"<h2>Failing expectations</h2><ul>{failures}</ul>" if failures else "",
            "<h2>Expectations</h2><div class='scroll'><table><tr><th>table</th><th>expectation</th><th>column</th>"
            "<th>expected</th><th>observed</th><th>result</th></tr>"]
    for r in rows.to_dict("records"):
        result = "<span class='pass'>pass</span>" if r["success"] else "<span class='fail'>FAIL</span>"
        body.append(f"<tr><td>{_e(r['table'])}</td><td class='name'>{_e(r['expectation'])}</td>"
                    f"<td class='name'>{_e(r['column'])}</td><td class='wrap'>{_e(r['expected'])}</td>"
                    f"<td class='wrap'>{_e(r['observed'])}</td><td>{result}</td></tr>")
    body.append("</table></div>")
    cleaning = report.get("cleaning") or []
    body.append("<h2>Cleaning</h2>" + ("<p>No cleaning step for this family.</p>" if not cleaning else
                "<div class='scroll'><table><tr><th>what</th><th>count</th><th>examples</th></tr>" + "".join(
                    f"<tr><td>{_e(c.get('what'))}</td><td>{int(c.get('count', 0))}</td>"
                    f"<td class='wrap'>{_e(_short(str(c.get('examples', ''))))}</td></tr>" for c in cleaning)
                + "</table></div>"))
    return "\n".join(body)


# ---------------------------------------------------------------- small pieces

def _num(x, digits: int = 4) -> str:
    """digits significant digits, trailing zeros kept (5.010, not 5.01), so a column's numbers line up."""
    return "-" if x is None or pd.isna(x) else f"{x:#.{digits}g}".rstrip(".")


def _p(p) -> str:
    return "-" if p is None or pd.isna(p) else f"{p:.2g}"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _swatch(colors: dict[str, str], method: str) -> str:
    return f"<span class='sw' style='background:{method_color(colors, method)}'></span>"


def _img(path: Path, alt: str) -> str:
    return _img_bytes(path.read_bytes(), alt) if path.is_file() else ""


def _img_bytes(png_bytes: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png_bytes).decode()}'>"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
