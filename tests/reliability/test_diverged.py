"""Divergence is a result, said as such: the method is marked, nothing non-finite is cached, the rest finish."""
import math

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow


def test_a_diverging_algorithm_and_baseline_are_marked_and_the_others_finish(prefect_harness, seeded_store, project,
                                                                            store):
    from flows.pipeline import meta_pipeline

    config = project / "diverge.yaml"
    config.write_text(yaml.safe_dump({
        "name": "diverge", "family": {"n_tasks": {"meta_train": 200, "meta_val": 20, "meta_test": 40}},
        "meta_train": {"algorithms": ["maml", "fomaml"], "iterations": 6, "val_every": 3, "meta_batch_size": 5,
                       "overrides": {"maml": {"fast_lr": 5.0}}},
        "evaluate": {"steps": 10}, "baselines": {"pretrain_iterations": 20, "scratch_lr": 1000.0},
        "embedding": {"n_similarity_tasks": 5}, "runtime": {"threads": 1}}))
    first = meta_pipeline(config_path=str(config))
    text = first["results"]
    assert "fomaml" in text and "pretrain_finetune" in text
    maml = next(line for line in text.splitlines() if line.startswith("maml"))
    scratch = next(line for line in text.splitlines() if line.startswith("scratch"))
    assert "DIVERGED" in maml and "fast_lr 5" in maml and ("step" in maml or "iteration" in maml)
    assert "DIVERGED in baselines" in scratch and "baselines.scratch_lr 1000" in scratch

    data = project / "data"
    for stage in ("evaluate", "baselines", "evaluate_parts"):  # nothing non-finite cached as a result
        for table in data.glob(f"{stage}/*/results.parquet"):
            values = pd.read_parquet(table)["value"]
            assert values.map(math.isfinite).all(), table
    summary = pd.read_parquet(next(data.glob("significance/*/summary.parquet")))
    assert set(summary["method"]) == {"fomaml", "pretrain_finetune"}

    client = store.client(project)
    runs = {r.info.run_name: r for r in store.runs(project)
            if r.data.tags.get("mlflow.parentRunId") == first["run_id"]}
    assert "fast_lr 5" in runs["maml"].data.tags["metapeft.diverged"]
    assert runs["scratch"].data.tags["metapeft.stop_reason"] == "diverged"
    assert "meta_test_mse" in runs["fomaml"].data.metrics and "meta_test_mse" not in runs["maml"].data.metrics
    assert client.get_run(first["run_id"]).info.status == "FINISHED"

    again = meta_pipeline(config_path=str(config))  # the rerun serves the same verdict from the cache
    assert all(again["hits"].values()) and again["results"] == text
