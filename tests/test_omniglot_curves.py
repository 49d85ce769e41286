"""benchmarks/omniglot.py --curves: the snapshot schedule, the curve rows and the figure, on made-up runs
(no training)."""
import types

import numpy as np
import pytest
from scipy import stats

from benchmarks import omniglot
from benchmarks.omniglot import curve_points, curve_rows, curve_table, plot_curves, points_due, train


def test_points_are_equally_spaced_and_end_at_the_budget():
    assert curve_points(60.0, 4) == [15.0, 30.0, 45.0, 60.0]
    assert curve_points(12.0, 1) == [12.0]
    for n, budget in ((0, 60.0), (3, 0.0)):
        with pytest.raises(ValueError, match="--points"):
            curve_points(budget, n)


def test_points_due_once_each_even_when_an_iteration_overshoots_several():
    points = [10.0, 20.0, 30.0, 40.0]
    assert list(points_due(points, 0, 9.9)) == []
    assert list(points_due(points, 0, 10.0)) == [0]  # a point reached exactly is due
    assert list(points_due(points, 1, 35.0)) == [1, 2]  # one iteration ran past 20 and 30
    assert list(points_due(points, 3, 35.0)) == []  # already taken: never twice
    assert list(points_due(points, 3, 99.0)) == [3]
    assert list(points_due(points, 4, 99.0)) == []


class FakeClock:
    """time.perf_counter that stands still until a fake step or snapshot moves it on."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_train_takes_one_snapshot_per_point_with_the_clock_stopped(monkeypatch):
    clock = FakeClock()
    durations = iter([4.0, 13.0, 2.0, 9.0, 100.0])  # seconds of the meta-iterations
    monkeypatch.setattr(omniglot.time, "perf_counter", clock)
    monkeypatch.setattr(omniglot, "class_pools", lambda data: (None, None))
    monkeypatch.setattr(omniglot, "sample_episodes", lambda *a, **k: (None, None))
    monkeypatch.setattr(omniglot.os, "getloadavg", lambda: (0.0, 0.0, 0.0))

    def step(batch, iteration):
        clock.now += next(durations)
        return float(iteration)

    def snapshot():
        clock.now += 50.0  # a slow copy: must not count against the budget
        return {"copy": clock.now}

    args = types.SimpleNamespace(data=None, ways=5, shots=1, seed=0, budget_minutes=0.5, max_iterations=10**9)
    run = train(args, step, snapshot, curve_points(30.0, 3))  # points 10, 20, 30 s of training
    # training clock at the ends of the iterations: 4, 17 (point 10 due), 19, 28 (point 20), 128 (point 30); the
    # copies' 50 s each are not in it
    got = [(s["point_seconds"], s["seconds"], s["iterations"]) for s in run["snapshots"]]
    assert got == [(10.0, 17.0, 2), (20.0, 28.0, 4), (30.0, 128.0, 5)]
    assert run["iterations"] == 5 and run["paused_seconds"] == 150.0 and run["train_seconds"] == 128.0
    assert run["snapshots"][1]["state"] is not run["snapshots"][2]["state"]


def test_each_point_records_the_load_sampled_since_the_last(monkeypatch):
    """The 1-minute load is sampled every LOAD_EVERY s of the wall clock (copies included): each point keeps the
    mean and max of its stretch's samples, or the load at the point when its stretch had none."""
    clock, loads = FakeClock(), iter([1.0, 2.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    durations = iter([4.0, 17.0, 12.0, 9.0, 30.0])
    monkeypatch.setattr(omniglot.time, "perf_counter", clock)
    monkeypatch.setattr(omniglot, "class_pools", lambda data: (None, None))
    monkeypatch.setattr(omniglot, "sample_episodes", lambda *a, **k: (None, None))
    monkeypatch.setattr(omniglot.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))

    def step(batch, iteration):
        clock.now += next(durations)
        return 0.0

    def snapshot():
        clock.now += 50.0
        return {}

    args = types.SimpleNamespace(data=None, ways=5, shots=1, seed=0, budget_minutes=1.0, max_iterations=10**9)
    run = train(args, step, snapshot, curve_points(60.0, 3))  # points 20, 40, 60 s
    # wall clock at the loop starts: 0, 4 (then point 20: no sample in its stretch, the load then: 2.0), 71 (a
    # sample: 3.0), 83 (5.0; then point 40), 142 (7.0; then point 60)
    assert [(s["load_mean"], s["load_max"]) for s in run["snapshots"]] == [(2.0, 2.0), (4.0, 5.0), (7.0, 7.0)]


def test_an_iteration_past_several_points_shares_one_copy(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(omniglot.time, "perf_counter", clock)
    monkeypatch.setattr(omniglot, "class_pools", lambda data: (None, None))
    monkeypatch.setattr(omniglot, "sample_episodes", lambda *a, **k: (None, None))
    copies = []

    def step(batch, iteration):
        clock.now += 25.0  # one iteration runs past three of the four points
        return 0.0

    def snapshot():
        copies.append(clock.now)
        return len(copies)

    args = types.SimpleNamespace(data=None, ways=5, shots=1, seed=0, budget_minutes=0.5, max_iterations=10**9)
    run = train(args, step, snapshot, curve_points(30.0, 4))  # 7.5, 15, 22.5, 30
    assert [s["state"] for s in run["snapshots"]] == [1, 1, 1, 2] and len(copies) == 2
    assert [s["point_seconds"] for s in run["snapshots"]] == [7.5, 15.0, 22.5, 30.0]
    assert [s["iterations"] for s in run["snapshots"]] == [1, 1, 1, 2]


SNAPSHOTS = [{"point_seconds": 10.0, "seconds": 11.5, "iterations": 3, "accuracy": [0.2, 0.4, 0.6]},
             {"point_seconds": 20.0, "seconds": 20.5, "iterations": 7, "accuracy": [1.0, 1.0, 1.0]}]


def test_curve_rows_mean_and_t_interval_in_percent():
    rows = curve_rows(SNAPSHOTS)
    assert [(r["point_seconds"], r["seconds"], r["iterations"]) for r in rows] == [(10.0, 11.5, 3), (20.0, 20.5, 7)]
    assert rows[0]["accuracy"] == pytest.approx(40.0)
    # sd of (20, 40, 60) is 20: half-width t_{0.975, 2} * 20 / sqrt(3)
    assert rows[0]["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 20 / np.sqrt(3))
    assert rows[1]["accuracy"] == pytest.approx(100.0) and rows[1]["ci95"] == 0.0


def test_curve_table_is_tidy_per_episode():
    table = curve_table({"maml": {"snapshots": SNAPSHOTS}, "l2l_maml": {"snapshots": SNAPSHOTS[:1]}})
    assert list(table.columns) == ["episode", "method", "point_seconds", "seconds", "iterations", "metric", "value"]
    assert len(table) == 3 + 3 + 3
    assert table.query("method == 'maml' and point_seconds == 10.0")["value"].tolist() == pytest.approx([20, 40, 60])
    assert table.query("method == 'l2l_maml'")["episode"].tolist() == [0, 1, 2]


def test_plot_writes_a_png(tmp_path):
    curves = {"maml": curve_rows(SNAPSHOTS), "l2l_maml": curve_rows(SNAPSHOTS[:1])}
    path = tmp_path / "curves.png"
    plot_curves(curves, "made up", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_recipes_are_accepted_and_unknown_names_refused():
    args = omniglot.parse_args(["--curves", "--smoke", "--algorithms", "maml,maml++,l2l_maml"])
    assert args.algorithms == ["maml", "maml++", "l2l_maml"]
    assert (args.budget_minutes, args.points, args.curve_episodes, args.max_iterations) == (0.2, 3, 10, 10**9)
    assert "--curves" in args.passthrough and args.curves_out.name == "omniglot-curves-5w1s-smoke.json"
    with pytest.raises(SystemExit, match="maml--"):
        omniglot.parse_args(["--curves", "--algorithms", "maml--"])
    with pytest.raises(SystemExit, match="--max-iterations"):
        omniglot.parse_args(["--curves", "--budget-minutes", "1", "--max-iterations", "2"])
    with pytest.raises(SystemExit, match="--curve-episodes"):
        omniglot.parse_args(["--curves", "--episodes", "20", "--curve-episodes", "50"])


def test_add_joins_another_sessions_curves_and_refuses_other_settings(tmp_path, monkeypatch):
    """--add: a second run's curves join the first's JSON and per-episode table; other settings or an algorithm
    already there stop it before any training."""
    import json

    import pandas as pd

    out = tmp_path / "curves.json"
    monkeypatch.setattr(omniglot, "cached_table", lambda data: None)
    monkeypatch.setattr(omniglot, "machine_info", lambda args: {"loadavg_start": (0.0, 0.0, 0.0)})

    def fake_run(args, algorithm):
        acc = [0.5 + i / 100 for i in range(10)]
        return {"algorithm": algorithm, "iterations": 3, "loadavg_start": [0, 0, 0], "loadavg_end": [0, 0, 0],
                "snapshots": [{"point_seconds": 6.0, "seconds": 6.1, "iterations": 3, "accuracy": acc}]}

    monkeypatch.setattr(omniglot, "run_worker", fake_run)
    first = omniglot.parse_args(["--curves", "--smoke", "--algorithms", "maml", "--out", str(out)])
    omniglot.curves_benchmark(first)
    second = omniglot.parse_args(["--curves", "--smoke", "--algorithms", "l2l_maml", "--out", str(out), "--add"])
    omniglot.curves_benchmark(second)
    data = json.loads(out.read_text())
    assert set(data["curves"]) == set(data["runs"]) == {"maml", "l2l_maml"} and " ; " in data["command"]
    assert len(data["git"]["commit"]) == 40 and all(len(r["git"]["commit"]) == 40 for r in data["runs"].values())
    assert set(pd.read_parquet(out.with_suffix(".episodes.parquet"))["method"]) == {"maml", "l2l_maml"}
    for argv, said in ((["--algorithms", "maml"], "already has ['maml']"),
                       (["--algorithms", "metasgd", "--seed", "1"], "other settings: seed 0 there, 1 here")):
        with pytest.raises(SystemExit, match=said.replace("[", r"\[").replace("]", r"\]")):
            omniglot.curves_benchmark(omniglot.parse_args(["--curves", "--smoke", "--out", str(out), "--add",
                                                           *argv]))
    with pytest.raises(SystemExit, match="only with --curves"):
        omniglot.parse_args(["--smoke", "--add"])


def test_curves_are_logged_to_mlflow_once_each_against_iterations_and_training_seconds(tmp_path, monkeypatch):
    """--log-mlflow: one MLflow run per curve, its points at step = iterations and at step = training seconds,
    stamped start + training seconds; logging the same JSON again adds no run; a changed curve is a new run."""
    import json

    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [{"point_seconds": 60.0, "seconds": 61.5, "iterations": 40, "accuracy": 90.0, "ci95": 1.5},
            {"point_seconds": 120.0, "seconds": 120.25, "iterations": 95, "accuracy": 93.5, "ci95": 1.0}]
    out = {"settings": {"ways": 5, "shots": 1, "recipes": {"protomaml": {"algorithm": "protomaml"}}},
           "smoke": False, "command": "python benchmarks/omniglot.py --curves", "machine": {"threads": 2},
           "curves": {"protomaml": rows, "l2l_maml": rows[:1]},
           "runs": {"protomaml": {"iterations": 95, "tasks_per_s": 50.0, "git": {"commit": "a" * 40, "dirty": False}},
                    "l2l_maml": {"iterations": 40}}}
    path = tmp_path / "curves.json"
    path.write_text(json.dumps(out))
    ids = omniglot.log_curves_mlflow(out, path, root=tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(ids["protomaml"])
    assert run.data.params["recipe.algorithm"] == "protomaml" and run.data.params["ways"] == "5"
    assert run.data.tags["metapeft.trained_at_commit"] == "a" * 40
    assert client.get_run(ids["l2l_maml"]).data.tags["metapeft.trained_at_commit"] == "not recorded"
    history = sorted(client.get_metric_history(ids["protomaml"], "test_accuracy"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(40, 90.0), (95, 93.5)]
    assert [m.timestamp - run.info.start_time for m in history] == [61500, 120250]
    by_second = client.get_metric_history(ids["protomaml"], "test_accuracy_by_second")
    assert sorted((m.step, m.value) for m in by_second) == [(60, 90.0), (120, 93.5)]
    assert {a.path for a in client.list_artifacts(ids["protomaml"])} == {"curves.json"}
    assert omniglot.log_curves_mlflow(out, path, root=tmp_path) == ids  # logged once
    out["comparisons"] = [{"algorithm": "protomaml", "reference": "l2l_maml", "point_seconds": 60.0, "n": 600,
                           "mean_diff": 2.5, "ci_low": 2.0, "ci_high": 3.0, "p_ttest": 1e-9, "p_wilcoxon": 1e-8}]
    assert omniglot.log_curves_mlflow(out, path, root=tmp_path) == ids  # the found run gets the comparison
    assert omniglot.log_curves_mlflow(out, path, root=tmp_path) == ids
    versus = client.get_metric_history(ids["protomaml"], "accuracy_minus_l2l_maml_by_second")
    assert [(m.step, m.value) for m in versus] == [(60, 2.5)]  # once
    out["curves"]["l2l_maml"] = rows  # a longer curve (e.g. rerun) is a new run
    again = omniglot.log_curves_mlflow(out, path, root=tmp_path)
    assert again["protomaml"] == ids["protomaml"] and again["l2l_maml"] != ids["l2l_maml"]
    experiment = client.get_experiment_by_name(omniglot.MLFLOW_EXPERIMENT)
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_log_mlflow_option_needs_the_json(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        omniglot.main(["--log-mlflow", "--out", str(tmp_path / "none.json")])
    assert omniglot.parse_args(["--curves", "--smoke"]).mlflow is False
    assert omniglot.parse_args(["--curves", "--budget-minutes", "1"]).mlflow is True


def test_each_algorithm_is_compared_with_learn2learn_at_every_point_on_the_same_episodes():
    """curve_comparisons pairs episodes by number at each point: the difference, its t-interval and both p."""
    from components.significance import paired_comparison

    rng = np.random.default_rng(0)
    l2l = rng.uniform(0.6, 1.0, size=(2, 30))
    ours = np.clip(l2l + rng.normal(0.05, 0.05, size=l2l.shape), 0, 1)
    runs = {a: {"snapshots": [{"point_seconds": 60.0 * (i + 1), "seconds": 60.0 * (i + 1) + 1, "iterations": 10 * i,
                               "accuracy": acc[i].tolist()} for i in range(2)]} for a, acc in
            (("l2l_maml", l2l), ("protomaml", ours))}
    table = curve_table(runs).sample(frac=1.0, random_state=0)  # row order must not matter
    rows = omniglot.curve_comparisons(table)
    assert [(r["algorithm"], r["point_seconds"]) for r in rows] == [("protomaml", 60.0), ("protomaml", 120.0)]
    for i, r in enumerate(rows):
        expected = paired_comparison(100 * ours[i], 100 * l2l[i])
        assert r["n"] == 30 and r["mean_diff"] == pytest.approx(expected["mean_diff"])
        assert (r["ci_low"], r["ci_high"], r["p_wilcoxon"]) == pytest.approx(
            (expected["ci_low"], expected["ci_high"], expected["p_wilcoxon"]))
    assert omniglot.curve_comparisons(curve_table({"protomaml": runs["protomaml"]})) == []


def test_a_recipe_is_compared_with_the_algorithm_it_sets_options_on():
    """all_comparisons: every algorithm against learn2learn's MAML, and Proto-MAML against metapeft's MAML (what the
    prototype head adds), each paired on the same episodes; the README table gets a column per pair."""
    from benchmarks import readme_tables

    rng = np.random.default_rng(1)
    base = rng.uniform(0.6, 1.0, size=(2, 30))
    scores = {"l2l_maml": base, "maml": np.clip(base + 0.02, 0, 1), "protomaml": np.clip(base + 0.05, 0, 1)}
    runs = {a: {"snapshots": [{"point_seconds": 60.0 * (i + 1), "seconds": 60.0 * (i + 1) + 1, "iterations": 10 * i,
                               "accuracy": acc[i].tolist()} for i in range(2)]} for a, acc in scores.items()}
    rows = omniglot.all_comparisons(curve_table(runs))
    pairs = {(r["algorithm"], r["reference"]) for r in rows}
    assert pairs == {("maml", "l2l_maml"), ("protomaml", "l2l_maml"), ("protomaml", "maml")}
    head = next(r for r in rows if (r["algorithm"], r["reference"], r["point_seconds"]) == ("protomaml", "maml", 60.0))
    assert head["mean_diff"] == pytest.approx(100 * (scores["protomaml"][0] - scores["maml"][0]).mean())
    assert omniglot.all_comparisons(curve_table({a: runs[a] for a in ("maml", "protomaml")})) == [
        r for r in rows if r["reference"] == "maml"]  # without learn2learn: the option's comparison alone

    curves = {a: [{"point_seconds": s["point_seconds"], "seconds": s["seconds"], "iterations": s["iterations"],
                   "accuracy": 100 * float(np.mean(s["accuracy"])), "ci95": 1.0} for s in r["snapshots"]]
              for a, r in runs.items()}
    data = {"settings": {"ways": 5, "shots": 1, "curve_episodes": 30, "budget_minutes": 2}, "smoke": True,
            "curves": curves, "comparisons": rows,
            "runs": {a: {"loadavg_start": [1.0], "loadavg_end": [1.0]} for a in runs}}
    lines = readme_tables.omniglot_curves([data])
    accuracy, differences = (line for line in lines if line.startswith("| training time"))
    assert "metapeft Proto-MAML" in accuracy and " - " not in accuracy  # accuracies and differences: two tables
    assert "| metapeft Proto-MAML - metapeft MAML (2nd order) |" in differences
    assert "| metapeft Proto-MAML - learn2learn MAML |" in differences


def test_the_maml_plus_plus_ablation_pairs_each_option_with_its_absence():
    """MAML++ against MAML++ less one option is what that option adds (with minus without); a recipe less an option
    differs from MAML++ in that option alone."""
    from benchmarks.omniglot import RECIPES

    for option, off in (("lslr", False), ("msl", 0), ("bn", False)):
        differ = {k for k in RECIPES["maml++"] if RECIPES["maml++"][k] != RECIPES[f"maml++/no-{option}"][k]}
        assert len(differ) == 1 and RECIPES[f"maml++/no-{option}"][differ.pop()] == off
    rng = np.random.default_rng(2)
    base = rng.uniform(0.6, 1.0, size=(1, 20))
    scores = {"maml++": np.clip(base + 0.03, 0, 1), "maml++/no-lslr": base}
    runs = {a: {"snapshots": [{"point_seconds": 60.0, "seconds": 61.0, "iterations": 5, "accuracy": acc[0].tolist()}]}
            for a, acc in scores.items()}
    (row,) = omniglot.all_comparisons(curve_table(runs))
    assert (row["algorithm"], row["reference"]) == ("maml++", "maml++/no-lslr")
    assert row["mean_diff"] == pytest.approx(100 * (scores["maml++"] - base).mean()) and row["mean_diff"] > 0
