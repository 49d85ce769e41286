"""The arithmetic of benchmarks/overhead.py: its timers and its split of the overhead, on made-up rounds."""
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("overhead", Path(__file__).parents[1] / "benchmarks" / "overhead.py")
overhead = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(overhead)


def test_stopwatch_counts_a_nested_call_of_the_same_bucket_once(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 12.0])  # outer call 0..5, then a second top-level call 10..12
    cpu = iter([0.0, 1.0, 3.0, 3.5])
    monkeypatch.setattr(overhead.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(overhead.time, "process_time", lambda: next(cpu))
    watch = overhead.Stopwatch()

    class Tracker:
        def log_curves(self):
            return "curves"

        def log_metrics(self):
            return self.log_curves()

    watch.patch("mlflow", Tracker, "log_metrics", "log_curves", "not_a_method")
    assert Tracker().log_metrics() == "curves"  # log_curves inside log_metrics: no clock reads of its own
    assert Tracker().log_curves() == "curves"
    assert watch.seconds == {"mlflow": 7.0}
    assert watch.cpu_seconds == {"mlflow": 1.5}


def side(wall, server_process_cpu=0.0, **buckets):
    """Made-up timings: CPU is half of wall everywhere, plus the Prefect server process's CPU."""
    cpu = {name: s / 2 for name, s in buckets.items()} | {"prefect_server_process": server_process_cpu}
    return {"wall_s": wall, "buckets": buckets, "cpu_s": wall / 2, "cpu_buckets": cpu}


def test_summarize_splits_the_overhead_of_the_median_times():
    rounds = [
        {"pipeline": side(100, 3.0, **{"import": 6, "prefect_server_import": 1, "prefect_server_start": 8,
                                       "prefect_server_stop": 1, "gx_validation": 3, "mlflow": 4, "compute": 83}),
         "bare": side(80, **{"import": 2, "compute": 76})},
        {"pipeline": side(120, 3.0, **{"import": 6, "prefect_server_import": 1, "prefect_server_start": 10,
                                       "prefect_server_stop": 1, "gx_validation": 3, "mlflow": 6, "compute": 93}),
         "bare": side(90, **{"import": 2, "compute": 80})},
    ]
    s = overhead.summarize(rounds)
    assert s["total_s"] == {"pipeline": 110, "bare": 85}
    assert s["overhead_s"] == 25
    assert s["share"] == pytest.approx(25 / 110)
    assert s["share_per_round"] == pytest.approx([0.2, 0.25])
    assert s["share_of_bare"] == pytest.approx(25 / 85)
    assert s["overhead_parts_s"] == {"prefect_server": 11, "prefect_import": 4, "gx_validation": 3,
                                     "mlflow": 5, "prefect_engine_and_rest": 2}
    assert s["compute_s"] == {"pipeline": 85, "bare": 78}  # the pipeline's compute includes GX: taken out

    cpu = overhead.summarize(rounds, "cpu")  # every figure halved, plus the server process's 3 s
    assert cpu["overhead_s"] == 12.5
    assert cpu["overhead_parts_s"] == {"prefect_server": 8.5, "prefect_import": 2, "gx_validation": 1.5,
                                       "mlflow": 2.5, "prefect_engine_and_rest": -2}


def test_summarize_after_takes_medians_and_the_cached_share_of_the_cold_run():
    rounds = [{"pipeline": {"wall_s": w}, "after": {name: {"wall_s": a, "cpu_s": a / 2} for name in overhead.AFTER_COLD}}
              for w, a in ((100, 4.0), (80, 2.0), (120, 9.0))]
    s = overhead.summarize_after(rounds)
    assert s["cached_rerun"] == {"wall_s": 4.0, "cpu_s": 2.0} and s["stages"]["wall_s"] == 4.0
    assert s["cold_run_wall_s"] == 100 and s["cached_rerun_share_of_cold"] == pytest.approx(0.04)


def test_tracker_methods_are_every_public_method_and_init():
    class Tracker:
        def __init__(self): ...
        def start_run(self): ...
        def _private(self): ...
        uri = "sqlite://"

        @property
        def client(self): ...

    assert overhead.tracker_methods(Tracker) == ("__init__", "start_run")
