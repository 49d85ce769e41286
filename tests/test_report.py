"""The HTML report answers the question: the verdict in words, one colour per method in every figure, a forest
plot of the paired differences, the Great Expectations validation as HTML; terminal progress only on a TTY."""
import io
import json
import logging
import sys

import pandas as pd
import pytest

from flows import report, report_page, terminal
from flows.answer import study_answer

# accuracy, higher is better: maml first, fomaml the runner-up, pretrain_finetune the best baseline
SUMMARY = pd.DataFrame({
    "method": ["maml", "fomaml", "pretrain_finetune", "scratch"], "n": [50] * 4,
    "mean": [0.80, 0.78, 0.70, 0.50], "ci_half": [0.02, 0.02, 0.03, 0.04],
}).assign(ci_low=lambda t: t["mean"] - t["ci_half"], ci_high=lambda t: t["mean"] + t["ci_half"]).set_index("method")
PAIRS = [  # method_a (better), method_b, mean_diff, ci_low, ci_high, p_ttest_holm
    ("maml", "fomaml", 0.02, -0.004, 0.044, 0.21),
    ("maml", "pretrain_finetune", 0.10, 0.06, 0.14, 0.0031),
    ("maml", "scratch", 0.30, 0.25, 0.35, 1e-9),
    ("fomaml", "pretrain_finetune", 0.08, 0.04, 0.12, 0.004),
    ("fomaml", "scratch", 0.28, 0.23, 0.33, 2e-9),
    ("pretrain_finetune", "scratch", 0.20, 0.15, 0.25, 3e-8),
]
COMPARISONS = pd.DataFrame([{"method_a": a, "method_b": b, "n": 50, "mean_diff": d, "ci_low": lo, "ci_high": hi,
                             "p_ttest": p / 6, "p_ttest_holm": p, "p_wilcoxon": p / 6, "p_wilcoxon_holm": p,
                             "cohens_dz": d / 0.1, "a_better": p < 0.05} for a, b, d, lo, hi, p in PAIRS])
DIVERGED = pd.DataFrame([{"method": "metasgd", "stage": "meta_train", "reason": "non-finite loss at iteration 7"}])


def test_verdict_names_the_best_method_and_its_gaps_with_ci_and_p_at_the_configured_level():
    answer = study_answer(SUMMARY, COMPARISONS, "accuracy", {"maml", "fomaml"}, confidence=0.9, alpha=0.05)
    text = report_page.verdict_html(answer, lower_is_better=False, diverged=DIVERGED, n_episodes=50)

    assert text.startswith("<p class='verdict'><b>maml</b> scores best: meta-test accuracy 0.8000 (90% CI 0.7800 to")
    assert ("Against the runner-up, <b>fomaml</b>: 0.02000 higher (maml &minus; fomaml = +0.02, 90% CI -0.004 to "
            "+0.044, Holm-adjusted p = 0.21), <b>not significant</b> at &alpha; = 0.05.") in text
    assert ("Against the best baseline, <b>pretrain_finetune</b>: 0.1000 higher (maml &minus; pretrain_finetune = "
            "+0.1, 90% CI +0.06 to +0.14, Holm-adjusted p = 0.0031), <b>significant</b> at &alpha; = 0.05.") in text
    assert "Diverged, with no score: metasgd (meta_train)." in text


def test_means_that_differ_by_rounding_only_are_a_tie_not_a_best_method():
    """Two frozen-feature baselines with the same predictions differ by ~1e-9 (float sums): neither is best."""
    comparisons = COMPARISONS.copy()
    comparisons.loc[0, ["mean_diff", "ci_low", "ci_high", "p_ttest_holm", "p_wilcoxon_holm"]] = [4.967e-9, 0, 1e-8, 1, 1]
    summary = SUMMARY.assign(mean=[0.80 + 4.967e-9, 0.80, 0.70, 0.50])
    answer = study_answer(summary, comparisons, "accuracy", {"maml", "fomaml"}, 0.95, 0.01)
    assert answer.sentence().startswith("maml and fomaml tie: meta-test accuracy 0.8")
    assert "<b>maml</b> and <b>fomaml</b> tie" in report_page.verdict_html(answer, False, DIVERGED, 50)
    assert study_answer(SUMMARY, COMPARISONS, "accuracy", {"maml"}, 0.95, 0.01).sentence().startswith("maml is best")


def test_a_best_method_that_its_pair_ranks_second_gets_a_negative_gap_not_a_crash():
    """A fold study ranks by the mean of fold means, its pairs by the pooled episodes: the summary's best can be
    the pair's method_b. Its gap is then read the other way round (sign and interval flipped)."""
    summary = SUMMARY.loc[["fomaml", "maml"]]
    comparisons = COMPARISONS[(COMPARISONS.method_a == "maml") & (COMPARISONS.method_b == "fomaml")]
    answer = study_answer(summary, comparisons, "accuracy", {"maml", "fomaml"}, 0.95, 0.01)
    gap = answer.runner_up
    assert (gap.other, gap.diff, gap.ci_low, gap.ci_high) == ("maml", -0.02, -0.044, 0.004)
    assert gap.p_holm == pytest.approx(0.21)


def test_verdict_when_a_baseline_is_best_names_the_best_meta_learner():
    summary = SUMMARY.loc[["pretrain_finetune", "scratch"]]
    comparisons = COMPARISONS[COMPARISONS.method_a == "pretrain_finetune"].query("method_b == 'scratch'")
    answer = study_answer(summary, comparisons, "accuracy", {"maml"}, 0.95, 0.01)
    assert answer.meta_learner is None and [w for w, _ in answer.gaps()] == ["the runner-up"]

    summary = SUMMARY.loc[["pretrain_finetune", "maml"]].assign(mean=[0.9, 0.8])
    comparisons = pd.DataFrame([{**COMPARISONS.iloc[1].to_dict(), "method_a": "pretrain_finetune", "method_b": "maml"}])
    answer = study_answer(summary, comparisons, "accuracy", {"maml"}, 0.95, 0.01)
    assert answer.gaps() == [("the runner-up and best meta-learner", answer.meta_learner)]
    assert answer.metrics()["best_vs_best_meta_learner_p_holm"] == pytest.approx(0.0031)
    assert "Against the runner-up and best meta-learner, maml" in answer.sentence()


def test_every_figure_gives_a_method_the_same_colour():
    from matplotlib.colors import to_hex

    colors = report.method_colors(SUMMARY.index, extra=DIVERGED["method"])
    results = pd.DataFrame([{"episode": e, "method": m, "steps": s, "metric": "accuracy", "value": 0.5 + 0.01 * s}
                            for e in range(3) for m in SUMMARY.index for s in range(3)])
    history = pd.DataFrame({"iteration": [0, 10], "metric": "val_loss", "value": [1.0, 0.5]})
    figures = {
        "summary (stage, its own mapping)": report.summary_figure(SUMMARY, "accuracy"),
        "summary": report.summary_figure(SUMMARY, "accuracy", colors=colors),
        "curves": report.curves_figure(results, "accuracy", colors=colors),
        "forest": report_page.forest_figure(COMPARISONS, list(SUMMARY.index), "scratch", "accuracy", 0.95, 0.01, False,
                                            colors),
        "training": report_page.training_figure({"maml": history, "fomaml": history, "metasgd": history}, colors),
    }
    seen = {name: _colors_by_label(fig) for name, fig in figures.items()}
    for name, by_label in seen.items():
        assert by_label, name
        for label, color in by_label.items():
            assert to_hex(color) == colors[label], (name, label)
    assert len(set(colors.values())) == len(colors) == 5  # metasgd (diverged) has its own, after the scored methods
    assert seen["summary"]["maml"] == seen["forest"]["maml"] == seen["training"]["maml"] == seen["curves"]["maml"]


def _colors_by_label(fig) -> dict[str, str]:
    from matplotlib.colors import to_hex

    ax = fig.axes[0]
    found = {c.get_label(): to_hex(c.lines[0].get_color()) for c in ax.containers}  # error bars
    found |= {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()
              if not line.get_label().startswith("_")}  # plotted lines (an error bar's own lines are "_child")
    return found


def test_forest_plot_has_one_row_per_pair_with_the_reference_and_signs_method_minus_reference():
    gaps = report_page.reference_gaps(COMPARISONS, list(SUMMARY.index), "pretrain_finetune")
    assert list(gaps["method"]) == ["maml", "fomaml", "scratch"]
    scratch = gaps.set_index("method").loc["scratch"]  # stored as pretrain_finetune - scratch: flipped
    assert (scratch["mean_diff"], scratch["ci_low"], scratch["ci_high"]) == (-0.20, -0.25, -0.15)

    fig = report_page.forest_figure(COMPARISONS, list(SUMMARY.index), "pretrain_finetune", "accuracy", 0.95, 0.01,
                                    False, report.method_colors(SUMMARY.index))
    ax = fig.axes[0]
    assert len(ax.containers) == 3
    assert [t.get_text() for t in ax.get_yticklabels()] == ["maml", "fomaml", "scratch"]
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["p = 0.0031 *", "p = 0.004 *", "p = 3e-08 *"]


def test_summary_figure_goes_logarithmic_when_intervals_span_decades():
    mse = SUMMARY.assign(mean=[0.07, 0.16, 1.6, 4.2], ci_low=[0.06, 0.14, 1.4, 3.8], ci_high=[0.08, 0.18, 1.8, 4.6])
    assert report.summary_figure(mse, "mse").axes[0].get_xscale() == "log"
    assert report.summary_figure(SUMMARY, "accuracy").axes[0].get_xscale() == "linear"


def test_validation_html_lists_the_failing_expectation_and_the_cleaning_counts():
    from flows.validation import ValidationFailed, validate

    frame = pd.DataFrame({"task_id": [1, 2, 3], "x": [0.1, 7.5, 0.3]})
    with pytest.raises(ValidationFailed) as failed:
        validate("tiny", {"points": (frame, lambda gx: [
            gx.expectations.ExpectColumnValuesToNotBeNull(column="x"),
            gx.expectations.ExpectColumnValuesToBeBetween(column="x", min_value=-5, max_value=5)])})
    result = json.loads(json.dumps(failed.value.report, default=str))  # as the task_sets entry stores it
    result["cleaning"] = [{"what": "duplicates_dropped", "count": 2, "examples": "['a', 'b']"}]

    page = report_page.validation_html(result, "tiny")
    rows = report_page.expectation_rows(result)
    assert list(rows["success"]) == [True, False]
    table = page[page.index("<h2>Expectations</h2>"):]
    failing = table[table.index("column_values_to_be_between"):]
    assert failing.index(">x<") < failing.index("min_value=-5") < failing.index("1 of 3 unexpected, e.g. 7.5") \
        < failing.index("FAIL") < failing.index("</tr>")
    assert "1 of 2 expectations" in page
    assert "<li class='fail'>points: expect_column_values_to_be_between(x) unexpected_count=1" in page
    assert "<td>duplicates_dropped</td><td>2</td>" in page
    short = report_page.validation_summary(result, "validation.html")
    assert "FAILED" in short and "duplicates_dropped 2" in short and "href='validation.html'" in short


def test_study_report_opens_with_the_verdict_and_links_the_validation_page(tmp_path):
    from flows.cache import StageCache
    from flows.config import StudyConfig

    cfg = StudyConfig(name="hand", significance={"confidence": 0.9, "alpha": 0.05})
    sig, tasks = tmp_path / "significance" / "s1", tmp_path / "task_sets" / "t1"
    sig.mkdir(parents=True)
    tasks.mkdir(parents=True)
    mse = SUMMARY.assign(mean=SUMMARY["mean"][::-1].to_numpy()).reset_index()  # any numbers: a hand-made entry
    mse.to_parquet(sig / "summary.parquet")
    COMPARISONS.to_parquet(sig / "comparisons.parquet")
    DIVERGED.to_parquet(sig / "diverged.parquet")
    (tasks / "validation.json").write_text(json.dumps({"success": True, "failures": [], "results": {}}))

    out = report_page.study_report(cfg, StageCache(tmp_path), {"significance": "s1", "task_sets": "t1"}, {},
                                   tmp_path / "reports" / "r" / "report.html", "RUN")
    html = out.read_text()
    body = html[html.index("<body>"):]
    assert body.index("<p class='verdict'><b>maml</b> scores best") < body.index("<dl class='facts'>") \
        < body.index("Results: meta-test mse") < body.index("Paired differences to scratch")
    assert "90% CI" in body and "at &alpha; = 0.05" in body and "metasgd (meta_train)" in body
    assert "href='validation.html'" in html and (out.parent / "validation.html").is_file()
    assert "<div class='scroll'><table>" in html and "http://" not in html and "https://" not in html


def test_progress_is_silent_without_a_terminal(capfd):
    bar = terminal.Bar("meta-training maml", 10)
    bar.update(5)
    bar.finish()
    progress = terminal.Progress("evaluation", 3, every=0)  # outside a flow run: no artifact either
    for done in range(1, 4):
        progress.update(done)
    progress.finish()
    assert capfd.readouterr() == ("", "")
    assert terminal.Bar._display is None and bar.task is None


def test_progress_draws_a_bar_on_a_terminal_and_stops_at_the_total(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, err = Tty(), Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no Prefect console: the bar makes its own
    bar = terminal.Bar("meta-training maml", 4)
    assert terminal.Bar._display is not None
    for done in range(1, 5):
        bar.update(done)
    assert terminal.Bar._display is None  # finished at the total: the display is stopped
    bar.update(4)  # later updates are ignored
    assert "meta-training maml" in err.getvalue() and "4/4" in err.getvalue() and out.getvalue() == ""


def test_the_facts_say_where_fixed_meta_test_episodes_come_from():
    """With a fixed episode file, n_query is meta-training's and meta-val's: the report names the file as the
    meta-test episodes' source instead of implying the config's queries per class."""
    import types

    from flows.config import StudyConfig
    from flows.report_page import study_facts

    family = types.SimpleNamespace(metric="accuracy", lower_is_better=False)
    summary = pd.DataFrame({"n": [10, 10]})
    fixed = StudyConfig.model_validate({"family": {"kind": "omniglot", "test_episodes": "episodes/good.csv"},
                                        "model": {"kind": "conv4"}})
    text = study_facts(fixed, family, summary)
    assert "meta-test: the fixed episode file episodes/good.csv" in text and "10, from episodes/good.csv" in text
    sampled = study_facts(fixed.model_copy(update={"family": fixed.family.model_copy(update={"test_episodes": None})}),
                          family, summary)
    assert "fixed episode file" not in sampled and "15 queries per class</dd>" in sampled


def test_training_that_is_not_what_the_config_asks_for_is_said(tmp_path):
    """A budget stopped short, or the initial state kept (no validated state beat iteration 0): each gets a note
    with what it means; a training that improved on its start gets none."""
    from flows.cache import StageCache
    from flows.config import StudyConfig

    cache, cfg = StageCache(tmp_path), StudyConfig.model_validate({"meta_train": {"iterations": 300}})
    metas = {"maml": {"stop_reason": "budget", "iterations_total": 40, "best_iteration": 40,
                      "train_seconds_total": 90.0},
             "fomaml": {"stop_reason": "iterations", "iterations_total": 300, "best_iteration": 0},
             "reptile": {"stop_reason": "iterations", "iterations_total": 300, "best_iteration": 250},
             "metasgd": {"stop_reason": "budget", "iterations_total": 7, "best_iteration": 7,
                         "train_seconds_total": 3.2}}
    for label, meta in metas.items():
        with cache.writing("meta_train", label, meta) as out:
            (out / "state.pt").write_bytes(b"x")
    notes = report.unfinished_training(cache, cfg, {label: label for label in metas})
    assert notes == {
        "maml": "meta-training stopped by the time budget at iteration 40 of 300 after 1.5 min of training in all "
                "(--budget-minutes N goes on from its checkpoint)",
        "fomaml": "kept its initial state: no meta-val loss in 300 iterations was below iteration 0's, so its "
                  "scores are the untrained start's",
        "metasgd": "meta-training stopped by the time budget at iteration 7 of 300 after 3 s of training in all "
                   "(--budget-minutes N goes on from its checkpoint)"}
    assert report.unfinished_lines(notes)[1].startswith("~ fomaml: kept its initial state")
    from flows.cli import _unfinished

    assert _unfinished(report.unfinished_tag(notes)) == notes  # export and compare read the tag back, note by note


def test_the_class_split_is_listed_and_an_overlap_is_flagged(tmp_path):
    from flows.report import class_split

    class Family:
        class_column = "label"

    pd.DataFrame({"split": ["meta_test", "meta_train", "meta_train", "meta_val"],
                  "label": ["d", "a", "b", "c"]}).to_parquet(tmp_path / "classes.parquet")
    split = class_split(Family(), tmp_path)
    assert split.to_dict("list") == {"split": ["meta_train", "meta_train", "meta_val", "meta_test"],
                                     "class": ["a", "b", "c", "d"]}
    page = report_page.classes_html(split, shown=1)
    assert "Classes: meta-train 2, meta-val 1, meta-test 1 (in no two splits)" in page and "a and 1 more" in page
    leaked = pd.concat([split, pd.DataFrame({"split": ["meta_test"], "class": ["a"]})], ignore_index=True)
    assert "shared by splits: a" in report_page.classes_html(leaked)
    assert class_split(object(), tmp_path) is None and report_page.classes_html(None) == ""


def test_results_text_says_in_how_many_seeds_a_method_beat_the_reference():
    import pandas as pd

    from flows.report import results_text

    summary = pd.DataFrame({"mean": [0.8, 0.72], "ci_half": [0.01, 0.01], "n": [600, 600]},
                           index=pd.Index(["maml", "proto"], name="method"))
    comparisons = pd.DataFrame({"method_a": ["maml"], "method_b": ["proto"], "p_ttest_holm": [1e-5],
                                "p_wilcoxon_holm": [1e-4]})
    seeds = pd.DataFrame({"method_a": ["maml"], "method_b": ["proto"], "n_seeds": [3], "seeds_a_better": [2],
                          "seeds_b_better": [1], "mean_diff": [0.08], "ci_low": [-0.1], "ci_high": [0.3],
                          "p_seeds": [0.31]})
    text = results_text(summary, comparisons, "accuracy", "proto", seeds=seeds).splitlines()
    assert text[0].endswith("better in seeds, p over seeds")
    assert text[1].startswith("maml") and text[1].endswith("1.00e-04*  2/3 seeds, p 0.31")
    assert text[2].startswith("proto") and text[2].endswith("-")
    assert "another seed would agree" in text[-1]
    assert "seeds" not in results_text(summary, comparisons, "accuracy", "proto")  # one seed: no column
    from flows.report_page import seeds_table

    spread = pd.DataFrame({"method": ["maml"] * 3, "seed": [0, 1, 2], "metric": "accuracy", "value": [0.8, 0.7, 0.9]})
    html = seeds_table(spread, {"maml": "#123456"}, seeds, "proto")
    assert "vs proto: better in seeds, p over seeds" in html and "<td>2/3 seeds, p 0.31</td>" in html
    assert "better in seeds" not in seeds_table(spread, {"maml": "#123456"})


def test_with_seeds_the_verdict_says_in_how_many_seeds_each_gap_held():
    seeds = pd.DataFrame({"method_a": ["maml", "pretrain_finetune"], "method_b": ["fomaml", "maml"], "n_seeds": [3, 3],
                          "seeds_a_better": [1, 2], "seeds_b_better": [2, 1], "mean_diff": [0.02, -0.1],
                          "ci_low": [-0.1, -0.3], "ci_high": [0.14, 0.1], "p_seeds": [0.7, 0.2]})
    answer = study_answer(SUMMARY, COMPARISONS, "accuracy", {"maml", "fomaml"}, 0.95, 0.05, seeds)
    sentence = answer.sentence()
    assert "Holm p = 0.21, not significant at alpha = 0.05. Better in 1 of 3 seeds (t-test over the seeds' means " \
           "p = 0.7)." in sentence
    assert "significant at alpha = 0.05. Better in 1 of 3 seeds (t-test over the seeds' means p = 0.2)." in sentence
    assert answer.metrics()["best_vs_best_baseline_seeds_better"] == 1
    assert "Better in 1 of 3 seeds" in report_page.verdict_html(answer, False, DIVERGED, 50)
    assert "seeds" not in study_answer(SUMMARY, COMPARISONS, "accuracy", {"maml", "fomaml"}, 0.95, 0.05).sentence()


def test_heatmaps_name_a_distance_a_distance(tmp_path):
    """A euclidean matrix is a distance (0 on the diagonal): named so, its colours reversed so that close tasks take
    the colour they take in a cosine similarity."""
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from flows import report
    from pathlib import Path

    from flows.report_page import heatmap_caption
    from flows.stages.embeddings import build_embeddings

    assert heatmap_caption(Path("similarity_euclidean.png")) == "meta-test tasks: euclidean distance"
    assert heatmap_caption(Path("similarity_cosine.png")) == "meta-test tasks: cosine similarity"
    features = pd.DataFrame({"split": ["meta_test"] * 3, "a": [0.0, 1.0, 3.0], "b": [1.0, 0.0, 2.0]})
    family = mock.Mock(features=lambda tables: features)
    with mock.patch.object(report, "plot_heatmap") as plot:
        build_embeddings(family, None, ("cosine", "euclidean"), 3, tmp_path)
    (cosine, euclidean) = plot.call_args_list
    assert cosine.args[1] == "the first 3 meta-test tasks: cosine similarity" and not cosine.kwargs["distance"]
    assert euclidean.args[1] == "the first 3 meta-test tasks: euclidean distance" and euclidean.kwargs["distance"]


def test_a_fold_studys_verdict_says_in_how_many_folds_each_gap_held():
    folds = pd.DataFrame({"method_a": ["maml"], "method_b": ["fomaml"], "n_folds": [5], "folds_a_better": [4],
                          "folds_b_better": [1], "mean_diff": [0.02], "ci_low": [-0.01], "ci_high": [0.05],
                          "p_folds": [0.12]})
    answer = study_answer(SUMMARY, COMPARISONS, "accuracy", {"maml", "fomaml"}, 0.95, 0.05, folds, unit="fold")
    assert "Better in 4 of 5 folds (t-test over the folds' means p = 0.12)." in answer.sentence()
    assert answer.metrics()["best_vs_runner_up_folds_better"] == 4


def test_a_seed_that_diverged_is_named_in_the_results():
    from flows.report import results_text

    diverged = pd.DataFrame([{"method": "maml", "stage": "meta_train", "reason": "non-finite loss", "seed": s}
                             for s in (1.0, 2.0)])
    lines = results_text(SUMMARY, COMPARISONS, "accuracy", "scratch", diverged=diverged).splitlines()
    assert [line.split(" DIVERGED in ")[1] for line in lines if "DIVERGED" in line] == [
        "meta_train (seed 1): non-finite loss", "meta_train (seed 2): non-finite loss"]
    assert "DIVERGED in meta_train: non-finite" in results_text(SUMMARY, COMPARISONS, "accuracy", "scratch",
                                                                diverged=DIVERGED)  # no seeds: as before
