"""What MLflow and Prefect users look for, checked through their own clients: input datasets with digests, a
registered model that adapts on a support set, provenance tags, curves logged while training, the parameters
that apply, one parent run for a cache-only rerun, artifacts, readable flow-run names and Cached states."""
import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.tracking import default_uri
from test_pipeline import METHODS, runs_of, write_config

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")


def config(tmp_path, **sections):
    from flows.config import load_config

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(sections))
    return load_config(path)


def test_runs_get_only_the_settings_that_apply(tmp_path):
    from flows.tracking import baseline_params, study_params, unit_params

    sinusoid = config(tmp_path, meta_train={"algorithms": ["maml", "reptile"], "overrides": {"reptile": {"inner_steps": 5}}})
    params = study_params(sinusoid)
    assert "model.sizes" in params and not any(k.startswith(("model.lora", "model.hidden", "model.top")) for k in params)
    assert "meta_train.metasgd_lr_range" not in params and not any(k.startswith("baselines.") for k in params)
    assert params["meta_train.overrides.reptile.inner_steps"] == 5 and "transfer" not in params
    assert unit_params(sinusoid, "reptile", 0)["inner_steps"] == 5 and unit_params(sinusoid, "maml", 0)["inner_steps"] == 1
    assert "metasgd_lr_range" in unit_params(config(tmp_path), "metasgd", 0)
    assert "metasgd_lr_range" not in unit_params(config(tmp_path), "maml", 0)
    assert set(baseline_params(sinusoid, "scratch")) == {"baselines.scratch_lr", "evaluate.steps", "evaluate.score_every",
                                                         "seed", "model.kind", "model.adapted", "model.sizes"}
    omniglot = {"kind": "omniglot", "n_way": 3}
    full = unit_params(config(tmp_path, family=omniglot, model={"kind": "conv4"}), "maml", 1)
    lora = unit_params(config(tmp_path, family=omniglot, model={"kind": "conv4", "adapted": "lora"}), "maml", 1)
    assert "model.hidden" in full and "model.lora_r" not in full and "model.sizes" not in full
    assert lora["model.lora_r"] == 4 and lora["seed"] == 1


def test_the_answer_names_the_best_method_and_its_gaps():
    from flows.answer import study_answer

    summary = pd.DataFrame({"method": ["maml", "pretrain_finetune", "scratch"], "mean": [0.9, 0.85, 0.6],
                            "ci_low": [0.88, 0.83, 0.55], "ci_high": [0.92, 0.87, 0.65]}).set_index("method")
    comparisons = pd.DataFrame({"method_a": ["maml", "maml", "pretrain_finetune"],
                                "method_b": ["pretrain_finetune", "scratch", "scratch"], "mean_diff": [0.05, 0.3, 0.25],
                                "ci_low": [0.02, 0.25, 0.2], "ci_high": [0.08, 0.35, 0.3],
                                "p_ttest_holm": [0.004, 1e-9, 1e-8], "p_wilcoxon_holm": [0.006, 1e-9, 1e-8]})
    answer = study_answer(summary, comparisons, "accuracy", {"maml"}, 0.95, 0.01)
    assert (answer.best, answer.runner_up.other, answer.baseline.other) == ("maml", "pretrain_finetune",
                                                                            "pretrain_finetune")
    assert answer.metrics()["best_meta_test_accuracy"] == 0.9 and answer.metrics()["best_vs_runner_up_diff"] == 0.05
    assert answer.tags()["metapeft.best_method"] == "maml"
    assert "runner-up and best baseline, pretrain_finetune: +0.05" in answer.sentence()
    assert "significant at alpha = 0.01" in answer.sentence() and "not significant" not in answer.sentence()
    assert "p = 0.006" in answer.sentence()  # both tests: the larger Holm p is the verdict's
    alone = study_answer(summary.loc[["scratch"]], comparisons.iloc[:0], "accuracy", {"maml"}, 0.95, 0.01)
    assert alone.runner_up is None and alone.baseline is None


def test_deployments_pull_step_enters_metapeft_home_when_the_run_starts(tmp_path, monkeypatch):
    """The step Prefect runs on the worker (an importable function and its keyword arguments), called as it would."""
    (pull,) = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["pull"]
    ((name, kwargs),) = pull.items()
    module, _, function = name.rpartition(".")
    step = getattr(importlib.import_module(module), function)
    monkeypatch.chdir(REPO)  # restored after the test
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path))
    assert step(**kwargs) == {"directory": str(tmp_path.resolve())} and Path.cwd() == tmp_path.resolve()
    monkeypatch.delenv("METAPEFT_HOME")
    with pytest.raises(RuntimeError, match="METAPEFT_HOME"):
        step(**kwargs)


@pytest.mark.slow  # 5 s: an MLflow store, twice
def test_a_moved_project_keeps_its_artifacts(tmp_path, monkeypatch):
    from flows.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store, whatever ran before

    old, new = tmp_path / "old", tmp_path / "new"
    tracker = Tracker(old, "moving")
    run_id = tracker.start_run("before")
    (old / "note.txt").write_text("hello")
    tracker.log_artifact(run_id, old / "note.txt")
    tracker.end_run(run_id)
    shutil.move(old, new)

    moved = Tracker(new, "moving")
    assert moved.moved == (old / "mlruns" / "artifacts").resolve().as_uri()
    assert moved.client.get_experiment(moved.experiment_id).artifact_location == moved.artifact_location
    assert moved.client.get_run(run_id).info.artifact_uri.startswith((new / "mlruns" / "artifacts").as_uri())
    assert Path(moved.client.download_artifacts(run_id, "note.txt", str(tmp_path))).read_text() == "hello"
    assert Tracker(new, "moving").moved is None


@pytest.mark.slow  # about 45 s: the tiny study twice, a model loaded
def test_tiny_study_as_mlflow_and_prefect_users_see_it(prefect_harness, project):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId)

    from flows.cache import StageCache
    from flows.config import load_config
    from flows.pipeline import config_hash, meta_pipeline

    path = write_config(project)
    state = meta_pipeline(config_path=path, return_state=True)
    first = state.result()
    client, parent, children = runs_of(project, first["run_id"])

    files = StageCache(project / "data").manifest("task_sets", first["keys"]["task_sets"])["files"]
    digest = {s: files[f"{s}.parquet"][:16] for s in ("meta_train", "meta_val", "meta_test")}
    assert len(set(digest.values())) == 3  # each table its own content digest
    for run in (parent, *children.values()):  # every run: the task sets, each with its digest and its split
        inputs = {(i.dataset.name, i.dataset.digest): {t.value for t in i.tags} for i in run.inputs.dataset_inputs}
        assert inputs == {(s, digest[s]): {s} for s in ("meta_train", "meta_val", "meta_test")}

    tags = parent.data.tags
    assert {"mlflow.source.name", "mlflow.source.type", "mlflow.user"} <= set(tags)
    if (REPO / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40 and tags["metapeft.git.dirty"] in ("true", "false")

    maml = children["maml"].info.run_id
    val = client.get_metric_history(maml, "val_loss")
    train = client.get_metric_history(maml, "train_loss")
    assert [m.step for m in val] == [0, 10, 20] and [m.step for m in train] == list(range(1, 21))
    assert all(a.timestamp < b.timestamp for a, b in zip(val, val[1:]))  # logged as measured, not in one batch
    assert len({m.timestamp for m in train}) > 1 and "system/cpu_utilization_percentage" in children["maml"].data.metrics

    ordered = sorted(children.values(), key=lambda r: r.info.start_time)  # opened when their work starts
    assert [r.info.run_name for r in ordered] == [*ALGORITHMS, "scratch", "pretrain_finetune"]
    assert all(a.info.end_time <= b.info.start_time for a, b in zip(ordered, ordered[1:]))

    params = {name: run.data.params for name, run in children.items()}
    assert set(params["scratch"]) == {"baselines.scratch_lr", "evaluate.steps", "evaluate.score_every", "seed",
                                      "model.kind", "model.adapted", "model.sizes"}
    assert {"baselines.pretrain_iterations", "baselines.finetune_lr"} <= set(params["pretrain_finetune"])
    assert "metasgd_lr_range" in params["metasgd"] and "metasgd_lr_range" not in params["maml"]
    assert not any("lora" in k for k in parent.data.params) and "baselines.scratch_lr" in parent.data.params
    assert tags["metapeft.best_method"] in METHODS and "best_meta_test_mse_ci_low" in parent.data.metrics

    (version,) = client.search_model_versions("name = 'tiny-maml'")
    assert version.run_id == maml and children["maml"].data.tags["metapeft.model_version"] == str(version.version)
    assert version.tags["metapeft.stop_reason"] in ("iterations", "early_stopping") and \
        version.tags["metapeft.iterations"] == str(int(children["maml"].data.metrics["meta_train_iterations"]))
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the pipeline left no default store behind for the next study
    with default_uri(client.tracking_uri):
        model = mlflow.pyfunc.load_model("models:/tiny-maml/1")
    points = pd.read_parquet(StageCache(project / "data").path("task_sets", first["keys"]["task_sets"])
                             / "meta_test.parquet")
    task = points[points["task_id"] == points["task_id"].iloc[0]]
    support = task[task["role"] == "support"]
    given = {"x_spt": support["x"].to_numpy(), "y_spt": support["y"].to_numpy(), "x_qry": support["x"].to_numpy()}

    def support_mse(steps: int) -> float:
        prediction = model.predict(given, params={"steps": steps})["prediction"].to_numpy()
        return float(((prediction - support["y"].to_numpy()) ** 2).mean())

    assert support_mse(10) < support_mse(0)  # it adapts on the support set it is given
    for params, bad, message in (({"steps": -3}, {}, "params.steps: need >= 0"),
                                 ({}, {"y_spt": np.full(len(support), np.nan)}, "y_spt: non-finite"),
                                 ({}, {"x_qry": np.ones((3, 2))}, r"x_qry: need shape \(points, 1\)")):
        with pytest.raises(Exception, match=message):  # named, not a torch shape error or nan predictions
            model.predict({**given, **bad}, params=params or None)

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(state.state_details.flow_run_id)
        assert flow_run.name == f"tiny-{config_hash(load_config(path))}"
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert {a.key for a in artifacts if a.type in ("table", "markdown")} == {"tiny-results", "tiny-verdict"}
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == len(ALGORITHMS) + 2 and all(float(a.data) == 100 for a in progress)

    before = len(client.search_runs([parent.info.experiment_id]))
    state = meta_pipeline(config_path=path, return_state=True)
    second = state.result()
    _, rerun, nested = runs_of(project, second["run_id"])
    assert nested == {} and len(client.search_runs([parent.info.experiment_id])) == before + 1  # one parent run
    assert {m: rerun.data.tags[f"metapeft.run.{m}"] for m in METHODS} == {m: r.info.run_id for m, r in children.items()}
    assert rerun.data.tags["metapeft.trained_in.maml"] == maml
    assert rerun.data.tags["metapeft.model.maml"] == parent.data.tags["metapeft.model.maml"] == "models:/tiny-maml/1"
    assert rerun.data.tags["metapeft.results_parent"] == first["run_id"]
    assert rerun.data.tags["metapeft.best_method"] == tags["metapeft.best_method"]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    assert task_runs and {t.state.name for t in task_runs} == {"Cached"}

    forced = meta_pipeline(config_path=path, force=["meta_train"])  # retrained: the same weights, not a new version
    _, _, retrained = runs_of(project, forced["run_id"])
    assert retrained["maml"].data.tags["metapeft.model_version"] == "1"
    assert client.get_run(forced["run_id"]).data.tags["metapeft.model.maml"] == "models:/tiny-maml/1"
    assert len(client.search_model_versions("name = 'tiny-maml'")) == 1
