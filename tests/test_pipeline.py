"""The whole pipeline under a temporary Prefect server and a temporary MLflow store."""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "family": {"n_tasks": {"meta_train": 200, "meta_val": 20, "meta_test": 40}},
    "meta_train": {"iterations": 20, "val_every": 10, "checkpoint_every": 10, "meta_batch_size": 5},
    "evaluate": {"steps": 3},
    "baselines": {"pretrain_iterations": 20},
    "embedding": {"n_similarity_tasks": 5},
    "runtime": {"threads": 1},
}
METHODS = {"maml", "fomaml", "reptile", "metasgd", "scratch", "pretrain_finetune"}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_config(project, **sections):
    cfg = {**TINY, **sections}
    path = project / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def misses(out):
    return {entry.split("/")[0] for entry, hit in out["hits"].items() if not hit}


def runs_of(project, parent_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return client, parent, {r.info.run_name: r for r in children}


def test_pipeline_runs_then_hits_the_cache(prefect_harness, project):
    from flows.pipeline import meta_pipeline

    config = write_config(project)
    first = meta_pipeline(config_path=config)
    assert misses(first) == {"task_sets", "train_sets", "embeddings", "meta_train", "evaluate", "baselines",
                             "significance"}
    assert "maml" in first["results"] and "scratch" in first["results"]

    client, parent, children = runs_of(project, first["run_id"])
    assert parent.info.status == "FINISHED"
    assert set(children) == METHODS
    for run in children.values():
        assert {"meta_test_mse", "meta_test_mse_ci95"} <= set(run.data.metrics)
        assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(children["maml"].info.run_id, "val_loss")) == 3  # iterations 0, 10, 20
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "significance")}
    assert "significance/comparisons.parquet" in artifacts

    second = meta_pipeline(config_path=config)
    assert misses(second) == set()
    _, rerun, nested = runs_of(project, second["run_id"])  # one parent run, pointing to the runs that computed
    assert nested == {} and {rerun.data.tags[f"metapeft.run.{m}"] for m in METHODS} == {
        r.info.run_id for r in children.values()}

    alone = meta_pipeline(config_path=config, stages=["evaluate"])
    assert set(alone["hits"]) == {f"evaluate/{first['keys']['evaluate']}"} and misses(alone) == {"evaluate"}

    edited = meta_pipeline(config_path=write_config(project, evaluate={"steps": 4}))
    assert misses(edited) == {"evaluate", "baselines", "significance"}

    # another test protocol (more meta-test tasks) keeps the meta-training: only what reads the test tasks reruns
    more = write_config(project, family={"n_tasks": {**TINY["family"]["n_tasks"], "meta_test": 50}})
    retested = meta_pipeline(config_path=more)
    assert misses(retested) == {"task_sets", "embeddings", "evaluate", "baselines", "significance"}
    assert retested["keys"]["train_sets"] == first["keys"]["train_sets"]
    from flows.cache import RESULTS, StageCache

    scored = StageCache(project / "data").read_table("evaluate", retested["keys"]["evaluate"], RESULTS)
    assert scored.groupby("method")["episode"].nunique().to_dict() == {m: 50 for m in METHODS - {
        "scratch", "pretrain_finetune"}}


def test_training_a_budget_stopped_short_is_marked_wherever_the_results_are(prefect_harness, project, capsys):
    """A wall-clock budget that stops meta-training before its iterations must not look like a finished run: the
    results text, the report page and the parent run (what `metapeft runs` shows) say where it stopped."""
    from flows.pipeline import meta_pipeline

    config = write_config(project, meta_train={**TINY["meta_train"], "algorithms": ["maml", "fomaml"],
                                               "iterations": 10**6, "budget_minutes": 0.001})
    out = meta_pipeline(config_path=config)
    _, parent, children = runs_of(project, out["run_id"])
    for method in ("maml", "fomaml"):
        stopped = int(children[method].data.metrics["meta_train_iterations"])
        note = f"{method}: meta-training stopped by the time budget at iteration {stopped} of 1000000"
        assert f"~ {note}" in out["results"] and note in parent.data.tags["metapeft.unfinished"]
        assert note in (project / "reports" / out["run_id"] / "report.html").read_text()
    assert next(line for line in out["results"].splitlines() if line.startswith("maml")).startswith("maml ~")
    assert not next(line for line in out["results"].splitlines() if line.startswith("scratch")).startswith("scratch ~")
    from flows import cli

    capsys.readouterr()
    assert cli.main(["export", out["run_id"], "--format", "json"]) == 0
    before = json.loads(capsys.readouterr().out)
    exported = {r["method"]: r["unfinished"] for r in before}
    assert exported["maml"].startswith("meta-training stopped by the time budget at iteration ")
    assert exported["scratch"] == ""

    going_on = meta_pipeline(config_path=config)  # a rerun continues the training: entries rewritten, same keys
    assert going_on["keys"] == out["keys"] and {"meta_train", "significance"} <= misses(going_on)
    _, _, again = runs_of(project, going_on["run_id"])
    first, total = (r["maml"].data.metrics["meta_train_seconds_total"] for r in (children, again))
    assert total > first > 0  # the training's seconds across both runs
    assert " s of training in all" in going_on["results"]  # (under a minute: in seconds)
    capsys.readouterr()
    assert cli.main(["compare", out["run_id"], going_on["run_id"]]) == 0
    compared = capsys.readouterr().out
    assert "~ A maml: meta-training stopped by the time budget" in compared
    assert "~ B maml: meta-training stopped by the time budget" in compared
    assert next(line for line in compared.splitlines() if line.startswith("maml ")).count(" ~") == 2
    assert cli.main(["report", out["run_id"]]) == 1  # the cache now holds the later run's results
    assert f"now holds the results of run {going_on['run_id']}" in capsys.readouterr().err
    assert cli.main(["report", going_on["run_id"]]) == 0
    capsys.readouterr()
    assert cli.main(["export", out["run_id"], "--format", "json"]) == 0  # its own logged tables, still its own
    assert json.loads(capsys.readouterr().out) == before

    finished = meta_pipeline(config_path=write_config(project, name="tiny_done"))
    assert "~" not in finished["results"]
    assert "metapeft.unfinished" not in runs_of(project, finished["run_id"])[1].data.tags


def test_stage_alone_without_upstream_names_it(prefect_harness, project):
    from flows.pipeline import MissingUpstream, meta_pipeline

    with pytest.raises(MissingUpstream, match="'task_sets'"):
        meta_pipeline(config_path=write_config(project), stages=["evaluate"])


def test_omniglot_study_runs_end_to_end(prefect_harness, project, tiny_conv4_study):
    """The same flow on the image family: accuracy, conv4, pre-trained classifier baseline."""
    from pathlib import Path

    from flows.pipeline import meta_pipeline

    omniglot = Path(__file__).parents[2] / "shared" / "data" / "omniglot"
    cfg = tiny_conv4_study("omni-tiny", {"kind": "omniglot", "path": str(omniglot), "n_way": 3, "k_shot": 1,
                                         "n_query": 2, "n_val_episodes": 4, "n_test_episodes": 12},
                           ["maml", "metasgd"], iterations=4, val_every=2, checkpoint_every=2,
                           metasgd_lr_range=[0.001, 1.0])
    cfg["model"]["adapted"] = "head"
    path = project / "omni.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = meta_pipeline(config_path=str(path))
    assert "accuracy" in out["results"]
    _, parent, children = runs_of(project, out["run_id"])
    assert set(children) == {"maml", "metasgd", "scratch", "pretrain_finetune"}
    for run in children.values():
        assert 0 <= run.data.metrics["meta_test_accuracy"] <= 1
        assert "meta_test_accuracy_ci95" in run.data.metrics
    logged = list(project.glob(f"mlruns/artifacts/**/{out['run_id']}/artifacts/task_sets/classes.csv"))
    split = pd.read_csv(logged[0])  # which characters each meta-split holds, where a user looks: MLflow, the report
    assert list(split.columns) == ["split", "class"] and split.groupby("class")["split"].nunique().max() == 1
    assert set(split["split"]) == {"meta_train", "meta_val", "meta_test"}
    page = (project / "reports" / out["run_id"] / "report.html").read_text()
    counts = split["split"].value_counts()
    assert (f"Classes: meta-train {counts['meta_train']}, meta-val {counts['meta_val']}, meta-test "
            f"{counts['meta_test']} (in no two splits)") in page


def intent_csv(tmp_path, n_intents=12, per_intent=12):
    """A user's own intents as text,label CSV: the first n_intents CLINC150 intents."""
    import json

    import pandas as pd

    data = json.loads((DATA / "clinc150" / "data_full.json").read_text())
    rows = pd.DataFrame(data["train"], columns=["text", "label"])
    keep = sorted(rows["label"].unique())[:n_intents]
    rows = rows[rows["label"].isin(keep)].groupby("label").head(per_intent)
    path = tmp_path / "intents.csv"
    rows.to_csv(path, index=False)
    return path


def test_text_lora_study_runs_end_to_end_and_shares_the_prefix(prefect_harness, project):
    """The text family: cached MiniLM prefix, LoRA meta-learners, the three text baselines, accuracy."""
    from flows.pipeline import meta_pipeline

    cfg = {
        "name": "text-tiny",
        "family": {"kind": "text", "dataset": "csv", "path": str(intent_csv(project)), "n_way": 3, "k_shot": 1,
                   "n_query": 3, "n_val_episodes": 3, "n_test_episodes": 8, "fractions": [0.5, 0.25, 0.25],
                   "max_length": 16},
        "model": {"kind": "minilm", "adapted": "lora", "top_layers": 1, "lora_r": 2},
        "meta_train": {"algorithms": ["maml", "reptile"], "fast_lr": 0.1, "meta_batch_size": 2, "iterations": 3,
                       "val_every": 3, "checkpoint_every": 3},
        "evaluate": {"steps": 2, "chunk": 4},
        "embedding": {"n_similarity_tasks": 4},
        "runtime": {"threads": 1},
    }
    path = project / "text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = meta_pipeline(config_path=str(path))
    assert misses(first) >= {"task_sets", "prefix", "embeddings", "meta_train", "evaluate", "baselines"}
    _, parent, children = runs_of(project, first["run_id"])
    assert set(children) == {"maml", "reptile", "prototypes", "linear_head", "lora_finetune"}
    for run in children.values():
        assert 0 <= run.data.metrics["meta_test_accuracy"] <= 1
    assert parent.data.metrics["prefix_n_utterances"] == 12 * 12

    cfg["family"]["k_shot"] = 2  # new episodes, same utterances: the prefix is reused
    path.write_text(yaml.safe_dump(cfg))
    second = meta_pipeline(config_path=str(path))
    assert "prefix" not in misses(second) and "task_sets" in misses(second)
    assert second["keys"]["prefix"] == first["keys"]["prefix"]
