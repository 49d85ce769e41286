"""Nothing stale, ever: edited input data and continued budgets, through the pipeline and `metapeft stages`."""
import contextlib
import io
import json

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow


def intents(renamed: bool = False) -> pd.DataFrame:
    rows = [{"text": f"please do task {c} in way {i}", "label": f"intent_{c:02d}"} for c in range(12) for i in range(8)]
    table = pd.DataFrame(rows)
    if renamed:  # one intent renamed, seven utterances reworded, in place
        table.loc[table["label"] == "intent_04", "label"] = "intent_renamed"
        table.loc[:6, "text"] = [f"could you kindly do task 0, version {i}" for i in range(7)]
    return table


def stages_output(config: str) -> dict[str, str]:
    from flows import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["stages", "--config", config]) == 0
    return {line.split()[0]: line for line in out.getvalue().splitlines()}


def test_an_edited_csv_is_seen_by_stages_and_recomputes_the_task_sets(prefect_harness, project):
    from flows.pipeline import meta_pipeline

    csv = project / "intents.csv"
    intents().to_csv(csv, index=False)
    config = project / "text.yaml"
    config.write_text(yaml.safe_dump({
        "name": "csv", "family": {"kind": "text", "dataset": "csv", "path": str(csv), "n_way": 3, "k_shot": 1,
                                  "n_query": 3, "n_val_episodes": 3, "n_test_episodes": 4, "fractions": [0.5, 0.25, 0.25]},
        "model": {"kind": "minilm", "adapted": "lora", "top_layers": 1, "lora_r": 2}}))
    first = meta_pipeline(config_path=str(config), stages=["task_sets"])
    assert "cached" in stages_output(str(config))["task_sets"]

    intents(renamed=True).to_csv(csv, index=False)
    line = stages_output(str(config))["task_sets"]
    assert "stale" in line and "intents.csv" in line and first["keys"]["task_sets"] in line
    second = meta_pipeline(config_path=str(config), stages=["task_sets"])
    assert second["keys"]["task_sets"] != first["keys"]["task_sets"]
    assert not any(second["hits"].values())
    utterances = pd.read_parquet(project / "data" / "task_sets" / second["keys"]["task_sets"] / "utterances.parquet")
    assert "intent_renamed" in set(utterances["label"]) and "intent_04" not in set(utterances["label"])
    assert "cached" in stages_output(str(config))["task_sets"]


def test_a_larger_budget_continues_from_the_checkpoint(prefect_harness, project):
    from flows.cache import StageCache
    from flows.config import load_config
    from flows.pipeline import meta_pipeline
    from flows.plan import make_plan

    config = project / "budget.yaml"
    config.write_text(yaml.safe_dump({
        "name": "budget", "family": {"n_tasks": {"meta_train": 200, "meta_val": 20, "meta_test": 40}},
        "meta_train": {"algorithms": ["maml"], "iterations": 10**6, "val_every": 50, "checkpoint_every": 50,
                       "meta_batch_size": 5},
        "evaluate": {"steps": 2}, "baselines": {"pretrain_iterations": 10}, "runtime": {"threads": 1}}))
    plan = make_plan(load_config(config))
    cache, key = StageCache(project / "data"), plan.algorithm_keys["maml"]

    meta_pipeline(config_path=str(config), overrides={"meta_train": {"budget_minutes": 0.03}})
    first = cache.manifest("meta_train", key)["meta"]
    assert first["stop_reason"] == "budget" and first["iterations_total"] > 0
    assert plan.status(cache, "evaluate", plan.keys["evaluate"]) == "cached"
    assert "unfinished" in stages_output(str(config))["meta_train[maml]"]

    second_run = meta_pipeline(config_path=str(config), stages=["meta_train"],
                               overrides={"meta_train": {"budget_minutes": 0.06}})
    assert second_run["keys"]["meta_train"] == plan.keys["meta_train"]  # the budget is not part of the key
    second = cache.manifest("meta_train", key)["meta"]
    assert second["iterations_total"] > first["iterations_total"]
    assert second["iterations_run"] == second["iterations_total"] - first["iterations_total"]  # went on, not anew
    history = pd.read_parquet(cache.path("meta_train", key) / "history.parquet")
    assert history["iteration"].min() == 0 and history["iteration"].max() == second["iterations_total"]
    assert len(list((project / "data" / "checkpoints").iterdir())) == 1  # one trajectory, one folder
    # the evaluation of the earlier state is stale now, though its key is the same
    assert plan.status(cache, "evaluate", plan.keys["evaluate"]) == "stale"
    assert "stale" in stages_output(str(config))["evaluate"]
    rerun = meta_pipeline(config_path=str(config), overrides={"meta_train": {"budget_minutes": 0.03}})
    assert rerun["hits"][f"evaluate/{plan.keys['evaluate']}"] is False
    assert json.loads((cache.path("meta_train", key) / "manifest.json").read_text())["meta"]["iterations_total"] \
        > second["iterations_total"]  # a budgeted rerun keeps going: each run adds its budget
