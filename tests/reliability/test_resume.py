"""A pipeline killed with SIGKILL during meta-training resumes from its checkpoint and ends where an
uninterrupted run ends; the killed run's MLflow runs end KILLED on the next start."""
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

ITERATIONS = 400  # about 1 s of meta-training on an idle core: 20 checkpoints, each a chance to be killed
LONG = {"algorithms": ["maml"], "iterations": ITERATIONS, "val_every": 20, "checkpoint_every": 20,
        "meta_batch_size": 10}


def wait_for(predicate, timeout: float, proc=None, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the pipeline exited (rc {proc.returncode}) before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s")
        time.sleep(poll)


def test_sigkill_during_meta_training_resumes_to_the_same_numbers(
        tmp_path, monkeypatch, prefect_harness, pipeline_process, tiny_config, store):
    from flows.pipeline import meta_pipeline

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir(), reference.mkdir()
    config = tiny_config(tmp_path, name="resume.yaml", meta_train=LONG)

    proc = pipeline_process(killed, config)
    checkpoints = killed / "data" / "checkpoints"
    wait_for(lambda: any(checkpoints.glob("*/checkpoint.pt")), timeout=120, proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = next(checkpoints.glob("*/checkpoint.pt"))
    killed_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 0 < killed_at < ITERATIONS
    assert list((killed / "data" / "meta_train").glob(".*.tmp-*"))  # its half-written entry, never renamed in
    crashed = {r.info.run_id for r in store.runs(killed)}  # the parent, and nested runs made so far
    assert {r.info.status for r in store.runs(killed)} == {"RUNNING"}  # nobody could end them

    monkeypatch.setenv("METAPEFT_HOME", str(killed))
    resumed = meta_pipeline(config_path=config)
    monkeypatch.setenv("METAPEFT_HOME", str(reference))
    straight = meta_pipeline(config_path=config)

    runs = {r.info.run_id: r for r in store.runs(killed)}
    assert {runs[i].info.status for i in crashed} == {"KILLED"}
    assert all("is gone" in runs[i].data.tags["metapeft.ended_by"] for i in crashed)
    assert {r.info.status for i, r in runs.items() if i not in crashed} == {"FINISHED"}
    maml = next(r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == resumed["run_id"]
                and r.info.run_name == "maml")
    assert maml.data.metrics["meta_train_iterations_this_run"] == ITERATIONS - killed_at
    assert maml.data.metrics["meta_train_iterations"] == ITERATIONS
    assert resumed["keys"] == straight["keys"]

    killed_entries, reference_entries = entries(killed), entries(reference)
    assert killed_entries.keys() == reference_entries.keys()
    pd.testing.assert_frame_equal(pd.read_parquet(killed_entries["meta_train"] / "history.parquet"),
                                  pd.read_parquet(reference_entries["meta_train"] / "history.parquet"),
                                  rtol=1e-6, atol=1e-8)
    ours, theirs = (torch.load(e["meta_train"] / "state.pt", weights_only=True)
                    for e in (killed_entries, reference_entries))
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    ours, theirs = (pd.read_parquet(e["evaluate"] / "results.parquet") for e in (killed_entries, reference_entries))
    np.testing.assert_allclose(ours["value"], theirs["value"], rtol=1e-5, atol=1e-7)
    assert not list((killed / "data" / "meta_train").glob(".*.tmp-*"))  # the killed writer's folder was cleared


def entries(project):
    """stage -> its one cache entry in project (each test project holds one study)."""
    found = {}
    for stage in ("meta_train", "evaluate"):
        [found[stage]] = [p for p in (project / "data" / stage).iterdir() if not p.name.startswith(".")]
    return found
