"""Two pipeline runs at once on one fresh project: both finish, one MLflow experiment, each cache entry
computed once (the other run waits on its lock and takes it from the cache), nothing half-written."""
import time

import pytest

pytestmark = pytest.mark.slow


def test_two_runs_at_once_share_the_cache_and_the_experiment(project, pipeline_process, tiny_config, store):
    from flows.cache import MANIFEST, StageCache
    from flows.plan import STAGES

    config = tiny_config(project, meta_train={"algorithms": ["maml"], "iterations": 200, "val_every": 50,
                                              "checkpoint_every": 50, "meta_batch_size": 5})
    procs = [pipeline_process(project, config), pipeline_process(project, config)]
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = [(project / f"run-{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    assert {e.name for e in store.client(project).search_experiments()} <= {"Default", "metapeft"}
    parents = [r for r in store.runs(project) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len({r.info.experiment_id for r in parents}) == 1
    assert {r.info.status for r in store.runs(project)} == {"FINISHED"}
    misses = sum(int(r.data.tags["metapeft.cache_misses"]) for r in parents)
    entries = [m.parent for m in (project / "data").glob(f"*/*/{MANIFEST}")]
    # each computed by one run only (the task sets by the first CLI before its flow started: still its miss)
    assert misses == len([e for e in entries if e.parent.name in (*STAGES, "train_sets")])
    cache = StageCache(project / "data")
    assert all(cache.is_complete(e.parent.name, e.name) for e in entries)
    assert not [p for p in (project / "data").rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]

