"""benchmarks/text_protocol.py: the goal, the reduced protocol's studies, the grid's choice and the published numbers,
on hand-made tables (no model runs)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SPEC = importlib.util.spec_from_file_location("text_protocol", ROOT / "benchmarks" / "text_protocol.py")
tp = sys.modules["text_protocol"] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up
SPEC.loader.exec_module(tp)


def comparison(a, b, diff, p_t, p_w, half=0.01):
    """A row of the fold study's comparisons table: method_a is the better mean, so diff >= 0."""
    assert diff >= 0
    return {"method_a": a, "method_b": b, "mean_diff": diff, "ci_low": diff - half, "ci_high": diff + half,
            "n": 3000, "p_ttest": p_t / 2, "p_wilcoxon": p_w / 2, "p_ttest_holm": p_t, "p_wilcoxon_holm": p_w}


# ---------------------------------------------------------------- the goal

@pytest.mark.parametrize("diff, p_t, p_w, met", [
    (0.025, 1e-4, 1e-3, True),
    (0.020, 1e-4, 1e-3, True),  # exactly 2 points is enough
    (0.019, 1e-6, 1e-6, False),  # significant but under 2 points
    (0.030, 1e-4, 0.02, False),  # the Wilcoxon test does not confirm it
    (0.030, 0.01, 1e-4, False),  # p must be below 0.01, not at it
])
def test_the_1shot_goal_needs_two_points_and_both_tests(diff, p_t, p_w, met):
    rows = [comparison("maml", "prototypes", diff, p_t, p_w), comparison("maml", "linear_head", 0.05, 1e-9, 1e-9)]
    out = tp.goal(1, "maml", rows)
    assert out["met"] is met
    assert out["vs"]["prototypes"]["diff"] == pytest.approx(diff)


def test_the_1shot_goal_fails_when_prototypes_is_better():
    out = tp.goal(1, "maml", [comparison("prototypes", "maml", 0.03, 1e-9, 1e-9, half=0.01)])
    p = out["vs"]["prototypes"]
    assert not out["met"]
    assert p["diff"] == pytest.approx(-0.03) and (p["ci_low"], p["ci_high"]) == pytest.approx((-0.04, -0.02))


def test_the_1shot_goal_fails_without_the_pair():  # the best meta-learner or prototypes diverged
    out = tp.goal(1, "maml", [comparison("maml", "linear_head", 0.05, 1e-9, 1e-9)])
    assert not out["met"] and out["vs"]["prototypes"] is None


def test_the_5shot_goal_fails_only_on_a_baseline_significantly_better():
    rows = [comparison("metasgd", "prototypes", 0.001, 0.5, 0.6),
            comparison("linear_head", "metasgd", 0.004, 0.03, 0.2),  # better, not significant: still met
            comparison("metasgd", "lora_finetune", 0.02, 1e-5, 1e-5)]
    assert tp.goal(5, "metasgd", rows)["met"]
    rows[1] = comparison("linear_head", "metasgd", 0.004, 1e-3, 1e-3)
    out = tp.goal(5, "metasgd", rows)
    assert not out["met"] and out["worse_than"] == ["linear_head"]


# ---------------------------------------------------------------- the reduced protocol

SUMMARY_FOLD01 = [{"method": m, "mean": v, "n_folds": 1} for m, v in
                  [("linear_head", 0.90), ("maml", 0.88), ("metasgd", 0.89), ("prototypes", 0.87), ("protonet", 0.86)]]


def test_the_best_meta_learner_ignores_the_baselines_and_breaks_ties_by_name():
    assert tp.best_meta_learner(SUMMARY_FOLD01, ["maml", "metasgd", "protonet"]) == "metasgd"
    tied = SUMMARY_FOLD01 + [{"method": "fomaml", "mean": 0.89, "n_folds": 1}]
    assert tp.best_meta_learner(tied, ["maml", "metasgd", "fomaml"]) == "fomaml"
    with pytest.raises(ValueError, match="no meta-learner"):
        tp.best_meta_learner(SUMMARY_FOLD01, ["anil_maml"])


def test_the_reduced_protocol_runs_fold_01_whole_then_every_fold_for_the_best():
    methods, folds = ["maml", "metasgd", "protonet"], ["01", "02", "03", "04", "05"]
    assert tp.studies(methods, folds, reduced=False) == [{"name": "all-folds", "folds": folds, "algorithms": methods}]
    first = tp.studies(methods, folds, reduced=True)
    assert first == [{"name": "fold-01", "folds": ["01"], "algorithms": methods}]
    best = tp.best_meta_learner(SUMMARY_FOLD01, methods)
    assert tp.studies(methods, folds, True, best)[1] == {"name": "all-folds", "folds": folds, "algorithms": ["metasgd"]}


def test_each_method_is_reported_from_the_study_with_the_most_folds():
    fold01 = {"name": "fold-01", "folds": ["01"], "summary": SUMMARY_FOLD01}
    every = {"name": "all-folds", "folds": ["01", "02", "03"],
             "summary": [{"method": "metasgd", "mean": 0.91, "n_folds": 3}, {"method": "prototypes", "mean": 0.88,
                                                                            "n_folds": 3}]}
    rows = {r["method"]: r for r in tp.method_rows([fold01, every])}
    assert (rows["metasgd"]["n_folds"], rows["metasgd"]["study"]) == (3, "all-folds")
    assert (rows["maml"]["n_folds"], rows["maml"]["folds"]) == (1, ["01"])
    assert [r["method"] for r in tp.method_rows([fold01, every])][:2] == ["metasgd", "linear_head"]


@pytest.mark.parametrize("kwargs, scale", [
    ({}, "full"), ({"reduced": True}, "reduced"), ({"folds": ["01"]}, "partial"), ({"episodes": 100}, "partial"),
    ({"datasets": ["banking77"]}, "partial"), ({"smoke": True}, "smoke"),
])
def test_the_scale_says_whether_the_published_protocol_ran(kwargs, scale):
    args = {"smoke": False, "reduced": False, "datasets": ["banking77", "oos"], "shots": [1, 5],
            "folds": list(tp.FOLDS), "episodes": 600} | kwargs
    assert tp.protocol_scale(**args) == scale


# ---------------------------------------------------------------- the grid

def test_the_grids_give_every_inner_loop_algorithm_the_same_budget():
    sizes = {a: len(tp.grid_candidates(a)) for a in tp.META_LEARNERS}
    assert tp.grid_candidates("protonet") == [{}]  # no inner loop: its config values
    assert {n for a, n in sizes.items() if a != "protonet"} == {4}
    assert {"inner_steps": 3, "fast_lr": 0.1} in tp.grid_candidates("maml")


def test_the_zeroing_trick_is_kept_only_where_it_lowers_the_meta_val_loss():
    grid = {"values": {"inner_steps": 1, "fast_lr": 0.5, "zero_head": True}, "val_loss": 0.40}
    off = {"values": {"inner_steps": 1, "fast_lr": 0.5, "zero_head": False}, "val_loss": 0.38}
    choice = tp.zero_head_choice(grid, off)
    assert choice["zero_head"] is False and choice["values"] == off["values"]
    assert choice["val_loss"] == {"true": 0.40, "false": 0.38}
    assert tp.zero_head_choice(grid, {**off, "val_loss": 0.40})["zero_head"] is True  # a tie keeps the grid's
    assert tp.zero_head_choice(grid, {**off, "val_loss": None})["zero_head"] is True  # flipped diverged
    assert set(tp.ZEROING) <= set(tp.META_LEARNERS)


def test_the_lowest_meta_val_loss_wins_and_ties_go_to_the_cheaper_candidate():
    c = [{"values": {"inner_steps": 3, "fast_lr": 0.5}, "val_loss": 0.40},
         {"values": {"inner_steps": 1, "fast_lr": 0.5}, "val_loss": 0.35},
         {"values": {"inner_steps": 3, "fast_lr": 0.1}, "val_loss": 0.35},
         {"values": {"inner_steps": 1, "fast_lr": 0.1}, "val_loss": None}]  # diverged
    assert tp.choose_candidate(c)["values"] == {"inner_steps": 1, "fast_lr": 0.5}
    assert tp.choose_candidate(list(reversed(c)))["values"] == {"inner_steps": 1, "fast_lr": 0.5}
    c[1]["val_loss"] = 0.36
    assert tp.choose_candidate(c)["values"] == {"inner_steps": 3, "fast_lr": 0.1}
    with pytest.raises(RuntimeError, match="diverged"):
        tp.choose_candidate([{"values": {}, "val_loss": None}, {"values": {}, "val_loss": float("nan")}])


def test_set_values_keep_fold_names_as_strings():
    assert tp.yaml_value(["01", "02"]) == '["01", "02"]'
    assert tp.overrides_of({"folds": ["01"], "meta_train.overrides.maml.fast_lr": 0.5, "x.flag": True}) == \
        {"folds": ["01"], "meta_train": {"overrides": {"maml": {"fast_lr": 0.5}}}, "x": {"flag": True}}


# ---------------------------------------------------------------- the published numbers

def test_the_published_numbers_are_sourced_or_say_what_was_searched():
    pub = tp.PUBLISHED
    assert set(pub) >= {"found", "source", "numbers", "searched"}
    if not pub["found"]:
        assert pub["numbers"] == {} and pub["source"] is None and pub["searched"]
        return
    assert pub["source"]  # the paper's table (or a repository file and commit)
    assert set(pub["numbers"]) == set(tp.DATASETS)
    for shots in pub["numbers"].values():
        assert set(shots) == set(tp.SHOTS)
        for values in shots.values():
            assert set(values) == {"ProtAugment", "Proto"} and all(0 < v <= 100 for v in values.values())


# ---------------------------------------------------------------- the README block

def readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = sys.modules["readme_tables"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def protocol_json(scale: str, goal_met: bool) -> dict:
    vs = {"prototypes": tp.pair([comparison("metasgd", "prototypes", 0.031, 1e-4, 1e-3)], "metasgd", "prototypes")}
    rows = [{"method": "metasgd", "mean": 0.9, "ci_half": 0.01, "n_folds": 5, "folds": list(tp.FOLDS)},
            {"method": "maml", "mean": 0.88, "ci_half": None, "n_folds": 1, "folds": ["01"]},
            {"method": "prototypes", "mean": 0.869, "ci_half": 0.012, "n_folds": 5, "folds": list(tp.FOLDS)}]
    result = {"dataset": "banking77", "shot": 1, "rows": rows, "best_meta_learner": "metasgd", "iterations": 300,
              "chosen": {"metasgd": {"inner_steps": 3, "fast_lr": 0.1}, "maml": {"inner_steps": 1, "fast_lr": 0.5}},
              "goal": {"met": goal_met, "vs": vs, "n_folds": 5, "episodes_per_fold": 600, "at_published_scale": True}}
    settings = {"datasets": ["banking77"], "shots": [1], "folds": list(tp.FOLDS), "episodes": 600, "grid": True}
    return {"scale": scale, "finished": True, "settings": settings, "results": [result], "seconds": 600,
            "published": tp.PUBLISHED, "goal_rule": {"margin": tp.MARGIN, "alpha": tp.ALPHA}}


def test_the_readme_block_says_what_scale_ran_and_whether_the_goal_is_met():
    rt = readme_tables()
    reduced = "\n".join(rt.text_protocol([protocol_json("reduced", True)]))
    assert "reduced protocol" in reduced and "Not run yet" not in reduced
    assert "| BANKING77 1-shot | met | Meta-SGD: +3.10 [+2.10, +4.10], 0.0001 / 0.001 |" in reduced
    assert "88.00 (one fold: no interval)" in reduced and "inner_steps 3, fast_lr 0.1" in reduced
    smoke = "\n".join(rt.text_protocol([protocol_json("smoke", False)]))
    assert smoke.startswith("**Not run yet at the published scale.**") and "| not met |" in smoke
