"""The study's self-contained HTML report, built from its cache entries (figures inlined as base64).

Kept apart from `flows.report` on purpose: that module's source is part of the embeddings and
significance cache keys, and restyling this page must not recompute them.
"""
from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from flows.cache import StageCache
from flows.config import StudyConfig
from flows.report import _pair_p, _pyplot

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.name { text-align: left; }
tr.best td { font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.meta { color: #666; font-size: 0.85em; }
"""


def study_report(cfg: StudyConfig, cache: StageCache, keys: dict[str, str], algorithm_keys: dict[str, str],
                 out: Path, run_id: str | None = None) -> Path:
    """Write the report of one study run to `out` (an .html file) from its significance, meta-training
    and embeddings entries; missing optional entries (embeddings, a training history) are left out."""
    from flows.families import family_for

    family, sig = family_for(cfg), cache.path("significance", keys["significance"])
    summary = pd.read_parquet(sig / "summary.parquet").set_index("method")
    comparisons = pd.read_parquet(sig / "comparisons.parquet")
    histories = {a: pd.read_parquet(cache.path("meta_train", k) / "history.parquet")
                 for a, k in algorithm_keys.items()
                 if cache.is_complete("meta_train", k) and (cache.path("meta_train", k) / "history.parquet").exists()}
    diverged = pd.read_parquet(sig / "diverged.parquet") if (sig / "diverged.parquet").exists() else pd.DataFrame()
    heatmaps = sorted(cache.path("embeddings", keys["embeddings"]).glob("similarity_*.png")) \
        if "embeddings" in keys and cache.is_complete("embeddings", keys["embeddings"]) else []
    parts = [
        f"<h1>{_e(cfg.name)}</h1>",
        f"<p class='meta'>MLflow run {_e(run_id or '-')} &middot; significance entry {_e(keys['significance'])}"
        f" &middot; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        f"<h2>Results: meta-test {_e(family.metric)}</h2>",
        results_table(summary, comparisons, family.metric, family.reference, cfg.significance.alpha,
                      cfg.significance.confidence),
        *(["<p><b>Diverged</b> (no score, left out of the comparison): "
           + "; ".join(f"{_e(r['method'])} in {_e(r['stage'])}: {_e(r['reason'])}" for r in diverged.to_dict("records"))
           + "</p>"] if len(diverged) else []),
        _img(sig / "summary.png", "means with confidence intervals"),
        "<h2>Learning curves</h2>",
        _img(sig / "curves.png", "meta-test score against test-time steps"),
    ]
    if histories:
        parts.append(_img_bytes(training_curves_png(histories), "meta-validation loss during meta-training"))
    parts += ["<h2>Pairwise significance</h2>", significance_table(comparisons)]
    if heatmaps:
        parts.append("<h2>Task embeddings</h2>")
        parts += [_img(p, p.stem.replace("_", " ")) for p in heatmaps]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(f"metapeft: {cfg.name}", "\n".join(parts)))
    return out


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def results_table(summary: pd.DataFrame, comparisons: pd.DataFrame, metric: str, reference: str,
                  alpha: float, confidence: float) -> str:
    """One row per method (summary: index method, columns n, mean, ci_low, ci_high; best first) with
    its Holm-corrected paired t-test p against `reference`; bold: the best method."""
    head = (f"<tr><th>method</th><th>n</th><th>mean {_e(metric)}</th><th>{confidence:.0%} CI</th>"
            f"<th>p (Holm) vs {_e(reference)}</th></tr>")
    rows = []
    for i, (method, r) in enumerate(summary.iterrows()):
        p = _pair_p(comparisons, method, reference)
        p_text = "-" if pd.isna(p) else f"{p:.2e}{' *' if p < alpha else ''}"
        rows.append(f"<tr{' class=best' if i == 0 else ''}><td>{_e(method)}</td><td>{int(r['n'])}</td>"
                    f"<td>{r['mean']:.4f}</td><td>[{r['ci_low']:.4f}, {r['ci_high']:.4f}]</td><td>{p_text}</td></tr>")
    note = f"<p class='meta'>* p &lt; {alpha} (paired t-test over the same episodes, Holm-corrected)</p>"
    return f"<table>{head}{''.join(rows)}</table>{note}"


def significance_table(comparisons: pd.DataFrame) -> str:
    """Every pair: mean difference a - b with its CI, t-test and Wilcoxon p (raw and Holm), Cohen's d_z."""
    columns = ["method_a", "method_b", "n", "mean_diff", "ci_low", "ci_high", "p_ttest", "p_ttest_holm",
               "p_wilcoxon", "p_wilcoxon_holm", "cohens_dz", "a_better"]
    shown = comparisons[[c for c in columns if c in comparisons]]
    formats = {c: "{:.2e}".format for c in shown if c.startswith("p_")}
    formats |= {c: "{:.4f}".format for c in ("mean_diff", "ci_low", "ci_high", "cohens_dz") if c in shown}
    return shown.to_html(index=False, border=0, formatters=formats, na_rep="-", escape=True)


def training_curves_png(histories: dict[str, pd.DataFrame]) -> bytes:
    """val_loss against meta-iteration, one line per algorithm (histories: long iteration, metric, value)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for algorithm, history in histories.items():
        val = history[history["metric"] == "val_loss"]
        ax.plot(val["iteration"], val["value"], marker="o", ms=3, label=algorithm)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("meta-val loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _img(path: Path, alt: str) -> str:
    return _img_bytes(path.read_bytes(), alt) if path.is_file() else ""


def _img_bytes(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
