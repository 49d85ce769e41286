"""Malformed input stops the pipeline before training with a named error, logged to MLflow, and loses
nothing already cached; so do an unwritable data folder and a full disk."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

SPLIT_FRACTIONS = [0.5, 0.25, 0.25]


@pytest.fixture
def cached_entry(prefect_harness, seeded_store, project, tiny_config):
    """The task set entry of an earlier study (seed 7), as its run left it: (stage, key, manifest) must survive."""
    from flows.cache import StageCache, write_table
    from flows.config import load_config
    from flows.plan import make_plan

    key = make_plan(load_config(tiny_config(project, name="earlier.yaml", seed=7))).keys["task_sets"]
    with StageCache(project / "data").writing("task_sets", key, {"n_tasks_meta_train": 1}) as out:
        write_table(pd.DataFrame({"task_id": [0], "x": [0.5]}), out, "meta_train")
    return "task_sets", key, (project / "data" / "task_sets" / key / "manifest.json").read_text()


def assert_nothing_lost(project, cached_entry, store, error_type: str | None):
    """The earlier entry is complete and unchanged, no temporary folder is left, training never started,
    and the failed run is FAILED in MLflow with the error named (error_type None: stopped before any run)."""
    from flows.cache import StageCache

    stage, key, manifest = cached_entry
    cache = StageCache(project / "data")
    assert cache.is_complete(stage, key) and (cache.path(stage, key) / "manifest.json").read_text() == manifest
    assert not [p for p in (project / "data").rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not (project / "data" / "meta_train").exists() and not (project / "data" / "checkpoints").exists()
    if error_type is None:
        assert not store.runs(project)  # stopped before the flow, so before any MLflow run
        return None
    runs = store.runs(project)
    assert {r.info.status for r in runs} == {"FAILED"}  # the parent and any nested run made before the stop
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["metapeft.error"].startswith(error_type)
    return parent


# ---------------------------------------------------------------- sinusoid: Great Expectations

def nan_features(points: pd.DataFrame) -> pd.DataFrame:
    return points.assign(x=points["x"].where(points.index % 97 != 5, np.nan))


def task_in_two_splits(points: pd.DataFrame) -> pd.DataFrame:
    moved = (points["task_id"] == points["task_id"].iloc[0]) & (points["role"] == "query")
    return points.assign(split=points["split"].where(~moved, "meta_test"))


@pytest.mark.parametrize("corrupt, expectation", [
    (nan_features, "expect_column_values_to_not_be_null(x)"),
    (task_in_two_splits, "expect_column_values_to_be_between(n_splits)"),
])
def test_malformed_task_sets_fail_validation_before_training(
        monkeypatch, project, cached_entry, tiny_config, store, corrupt, expectation):
    from components.families import sinusoid
    from flows.pipeline import meta_pipeline
    from flows.validation import ValidationFailed

    sample = sinusoid.sample_sinusoid_tasks
    monkeypatch.setattr(sinusoid, "sample_sinusoid_tasks", lambda *a, **k: corrupt(sample(*a, **k)))
    with pytest.raises(ValidationFailed, match=r"expectation\(s\) failed") as err:
        meta_pipeline(config_path=tiny_config(project))
    assert expectation in str(err.value)
    run = assert_nothing_lost(project, cached_entry, store, "ValidationFailed")
    artifacts = [a.path for a in store.client(project).list_artifacts(run.info.run_id, "task_sets")]
    assert artifacts == ["task_sets/validation_failed.json"]
    report = json.loads(Path(store.client(project).download_artifacts(
        run.info.run_id, "task_sets/validation_failed.json", str(project))).read_text())
    assert any(expectation in f for f in report["failures"])


# ---------------------------------------------------------------- text csv: loader and Great Expectations

def intents(n_labels: int = 12, per_label: int = 8) -> pd.DataFrame:
    return pd.DataFrame([{"text": f"please do task {label} in way {i}", "label": f"intent_{label:02d}"}
                         for label in range(n_labels) for i in range(per_label)])


def text_config(project, csv: Path, **family) -> str:
    cfg = {"name": "text-bad", "seed": 0,
           "family": {"kind": "text", "dataset": "csv", "path": str(csv), "n_way": 3, "k_shot": 1, "n_query": 3,
                      "n_val_episodes": 3, "n_test_episodes": 4, "fractions": SPLIT_FRACTIONS, **family},
           "model": {"kind": "minilm", "adapted": "lora", "top_layers": 1, "lora_r": 2},
           "meta_train": {"algorithms": ["maml"], "iterations": 2, "meta_batch_size": 2}}
    path = project / "text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def label_in(split: str) -> str:
    from components.episodes import class_split

    labels = intents()["label"]
    return class_split(labels, dict(zip(("meta_train", "meta_val", "meta_test"), SPLIT_FRACTIONS)), seed=0)[split][0]


def one_utterance_class(split: str):
    def corrupt(rows: pd.DataFrame) -> pd.DataFrame:
        label = label_in(split)
        return rows[(rows["label"] != label) | ~rows.duplicated("label")]
    return corrupt


@pytest.mark.parametrize("corrupt, error, message", [
    (lambda d: d.rename(columns={"label": "intent"}), "ValueError", "no label column 'label'"),
    (lambda d: d.assign(text=d["text"].where(d.index % 10 != 3, "")), "ValueError", "rows with empty text"),
    (lambda d: d.assign(label=d["label"].where(d.index != 4, "")), "ValueError", "rows with no label"),
    (one_utterance_class("meta_train"), "ValueError", "meta_train split: k_shot + n_query: 4 exceeds the examples of 1"),
    (one_utterance_class("meta_test"), "ValueError", "k_shot + n_query: 4 exceeds the examples of 1"),
], ids=["missing-label-column", "empty-text", "missing-label", "empty-train-class", "empty-test-class"])
def test_malformed_text_csv_stops_before_training(project, cached_entry, store, corrupt, error, message):
    from flows.pipeline import meta_pipeline

    csv = project / "intents.csv"
    corrupt(intents()).to_csv(csv, index=False)
    with pytest.raises(Exception) as err:
        meta_pipeline(config_path=text_config(project, csv))
    assert type(err.value).__name__ == error and message in str(err.value)
    if error == "ValueError":
        assert str(csv) in str(err.value) or "k_shot" in str(err.value)  # the file or the field named
    run = assert_nothing_lost(project, cached_entry, store, error)
    assert message in run.data.tags["metapeft.error"]
    assert not (project / "data" / "prefix").exists()  # nor was MiniLM run


# ---------------------------------------------------------------- the data folder cannot be written

def deny_writes(folder: Path, monkeypatch) -> None:
    """Make folder unwritable: chmod where that binds (not root); as root, refuse new paths under it."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)  # the test restores 0o755
        return
    real_mkdir, real_open = os.mkdir, os.open
    inside = lambda p: Path(os.fsdecode(p)).resolve().is_relative_to(folder.resolve())  # noqa: E731

    def mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.exists(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and not os.path.exists(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_unwritable_data_folder_names_it_and_keeps_earlier_entries(
        monkeypatch, project, cached_entry, tiny_config, store, capsys):
    from flows import cli

    data = project / "data"
    deny_writes(data, monkeypatch)
    try:
        rc = cli.main(["run", "--config", tiny_config(project)])
    finally:
        for path in [data, *data.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    message = capsys.readouterr().err
    assert rc == 1
    assert f"cannot write {data / 'task_sets'}" in message and "Permission denied" in message
    assert "untouched" in message
    assert_nothing_lost(project, cached_entry, store, None)  # the CLI builds the task sets before Prefect starts


def test_full_disk_gives_a_clear_error_and_keeps_earlier_entries(
        monkeypatch, project, cached_entry, tiny_config, store, capsys):
    from flows import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)  # as pyarrow reports it: errno set, no file name
    rc = cli.main(["run", "--config", tiny_config(project, name="earlier.yaml", seed=7), "--force", "task_sets"])
    message = capsys.readouterr().err
    assert rc == 1
    assert "stage task_sets: cannot write" in message and "No space left on device" in message
    assert_nothing_lost(project, cached_entry, store, None)  # --force task_sets: rebuilt by the CLI before Prefect
