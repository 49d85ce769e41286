"""The transfer study end to end: a tiny Omniglot study under the temporary Prefect server and MLflow store."""
import contextlib
import io
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
GROUPS = ["Braille", "Greek", "Latin", "Futurama"]
TINY = {
    "name": "transfer-tiny",
    "family": {"kind": "omniglot", "path": str(OMNIGLOT), "n_way": 3, "k_shot": 1, "n_query": 2},
    "model": {"kind": "conv4", "hidden": 8, "adapted": "full"},
    "meta_train": {"fast_lr": 0.4, "meta_batch_size": 2, "vectorize": False, "metasgd_lr_range": [0.001, 1.0]},
    "evaluate": {"steps": 2, "chunk": 8},
    "transfer": {"groups": GROUPS, "iterations": 2, "pooled_iterations": 3, "val_episodes": 2, "test_episodes": 4,
                 "embed_episodes": 3, "task2vec_samples": 2, "encoder_steps": 5, "encoder_hidden": 8,
                 "encoder_dim": 4, "n_boot": 200},
    "runtime": {"threads": 1},
}


TRANSFER_NAMES = {"task2vec": "Task2Vec", "encoder": "encoder", "features": "features"}


def test_transfer_study_runs_then_hits_the_cache(prefect_harness, project):
    from mlflow.tracking import MlflowClient

    from flows.cache import StageCache
    from flows.transfer import transfer_study

    path = project / "transfer.yaml"
    path.write_text(yaml.safe_dump(TINY))
    first = transfer_study(config_path=str(path))
    assert not any(first["hits"].values())
    cache = StageCache(project / "data")
    rho = cache.read_table("transfer_correlation", first["keys"]["transfer_correlation"], "rho")
    expected = {(e, m) for e, metrics in (("task2vec", ("normalized_cosine", "cosine", "euclidean", "manhattan")),
                                          ("encoder", ("cosine", "euclidean", "manhattan")),
                                          ("features", ("cosine", "euclidean", "manhattan"))) for m in metrics}
    assert set(zip(rho["embedding"], rho["metric"])) == expected
    finite = rho.dropna(subset=["rho"])
    assert ((finite["ci_low"] <= finite["rho"]) & (finite["rho"] <= finite["ci_high"])).all()
    assert (rho["n_pairs"] == len(GROUPS) * (len(GROUPS) - 1)).all() and "rho_within_target" in rho
    gains = cache.read_table("transfer_matrix", first["keys"]["transfer_matrix"], "gains").set_index("source")
    assert gains.shape == (len(GROUPS), len(GROUPS)) and set(gains.index) == set(gains.columns) == set(GROUPS)
    scores = cache.read_table("transfer_matrix", first["keys"]["transfer_matrix"], "scores")
    assert len(scores) == (len(GROUPS) + 2) * len(GROUPS) * 4  # (groups + pooled + scratch) x targets x episodes
    nearest = cache.read_table("nearest_task", first["keys"]["nearest_task"], "nearest")
    assert (nearest["source"] != nearest["target"]).all() and set(nearest["target"]) == set(GROUPS)
    comparisons = cache.read_table("nearest_task", first["keys"]["nearest_task"], "comparisons")
    assert {"p_ttest_holm", "p_wilcoxon_holm"} <= set(comparisons.columns) and len(comparisons) == 3
    assert "task2vec" in first["results"] and "nearest_task" in first["results"]

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    parent = client.get_run(first["run_id"])
    assert parent.info.status == "FINISHED"
    assert {"rho_task2vec_normalized_cosine", "rho_task2vec_normalized_cosine_ci_low"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "transfer")}
    assert {"transfer/rho.png", "transfer/transfer_matrix.png", "transfer/encoder.pt",
            "transfer/distance_task2vec_normalized_cosine.png"} <= artifacts

    from benchmarks.readme_tables import transfer as transfer_table
    from benchmarks.transfer import study_record

    record = study_record(path, project, set())  # what benchmarks/transfer.py writes, and the README's table of it
    assert record["entries"] == {"total": len(first["hits"]), "computed": len(first["hits"])}
    assert set(record["stage_seconds"]) >= {"transfer_train", "transfer_matrix"} and set(record["groups"]) == set(GROUPS)
    table = transfer_table([{**record, "smoke": False, "first_run_seconds": 12.0, "cached_rerun_seconds": 1.5,
                             "machine": {"loadavg_start": [1.0], "loadavg_end": [1.0]}}])
    shown = {tuple(cells[:2]): cells[2] for line in table[2:] if line.startswith("| ")
             for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for r in rho.itertuples():  # every rho of the study, with its interval, bold when it excludes 0
        text = f"{r.rho:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
        assert shown[(TRANSFER_NAMES[r.embedding], r.metric.replace("_", " "))] in (text, f"**{text}**")
    assert "cold): 12 s" in table[-1] and f"{len(GROUPS)} groups" in table[-1]

    second = transfer_study(config_path=str(path))
    assert second["hits"] and all(second["hits"].values())
    assert second["results"] == first["results"]
    from flows import cli

    with contextlib.redirect_stdout(io.StringIO()) as shown:  # `stages` lists the transfer study's own entries
        assert cli.main(["stages", "--config", str(path)]) == 0
    listed = dict(line.split(None, 1) for line in shown.getvalue().splitlines())
    assert {name.split("[")[0] for name in listed} == {"transfer_sets", "transfer_train", "transfer_matrix",
                                                       "transfer_embeddings", "transfer_encoder",
                                                       "transfer_correlation", "nearest_task"}
    assert all(state.endswith("cached") for state in listed.values()) and "transfer_train[pooled]" in listed
    experiment = client.get_run(first["run_id"]).info.experiment_id
    runs = len(client.search_runs([experiment]))
    with contextlib.redirect_stdout(io.StringIO()) as shown:  # fully cached: nothing started, the results said
        assert cli.main(["run", "--config", str(path)]) == 0
    assert f"nothing to run, no new Prefect or MLflow run; the results of MLflow run {first['run_id']}" \
        in shown.getvalue() and first["results"] in shown.getvalue()
    assert len(client.search_runs([experiment])) == runs
    again = cache.read_table("transfer_correlation", second["keys"]["transfer_correlation"], "rho")
    pd.testing.assert_frame_equal(again, rho)

    import shutil

    import torch

    group = next(s for s in first["source_keys"] if s != "pooled")  # one source's start rewritten under its key
    key = first["source_keys"][group]
    old = cache.path("transfer_train", key)
    reads = [("transfer_sets", first["keys"]["transfer_sets"])]  # what the stage records: the entry stays cached
    with cache.writing("transfer_train", key, cache.manifest("transfer_train", key)["meta"], reads) as out:
        for file in old.iterdir():
            if file.name != "manifest.json":
                shutil.copy(file, out / file.name)
        state = torch.load(out / "state.pt")
        state["params"] = {name: value + 0.01 for name, value in state["params"].items()}
        torch.save(state, out / "state.pt")
    with contextlib.redirect_stdout(io.StringIO()) as shown:  # what a run would do now, nothing started
        assert cli.main(["run", "--config", str(path), "--dry-run"]) == 0
    *planned, total = shown.getvalue().splitlines()
    fates = dict(line.split(None, 1) for line in planned)
    assert fates["transfer_matrix"].endswith("compute (stale)") and fates[f"transfer_train[{group}]"].endswith(
        "  cache") and fates["nearest_task"].endswith("  cache, or compute if an entry it reads changes")
    assert total.startswith("dry run: 1 to compute, ") and len(client.search_runs([experiment])) == runs
    third = transfer_study(config_path=str(path))
    recomputed = {entry.split("/")[0] for entry, hit in third["hits"].items() if not hit}
    assert recomputed == {"transfer_matrix", "transfer_correlation", "nearest_task"}  # not the pooled start's


def test_transfer_section_is_checked(tmp_path):
    from flows.config import ConfigError, load_config

    bad = {**TINY, "transfer": {**TINY["transfer"], "metrics": {"encoder": ["normalized_cosine"]}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="metrics.encoder"):
        load_config(path)


def domain_csv(tmp_path, n_domains=3, per_domain=6, per_intent=8):
    """CLINC150 intents with their domains as a user's text,label,domain CSV: the first few of each domain."""
    import json

    data = json.loads((OMNIGLOT.parent / "clinc150" / "data_full.json").read_text())
    domains = json.loads((OMNIGLOT.parent / "clinc150" / "domains.json").read_text())
    domain_of = {i: d for d, intents in sorted(domains.items())[:n_domains] for i in sorted(intents)[:per_domain]}
    rows = pd.DataFrame(data["train"], columns=["text", "label"])
    rows = rows[rows["label"].isin(domain_of)].groupby("label").head(per_intent)
    path = tmp_path / "domains.csv"
    rows.assign(domain=rows["label"].map(domain_of)).to_csv(path, index=False)
    return path


def test_text_transfer_study_runs(prefect_harness, project):
    """CLINC150-style domains: LoRA MAML per domain, the frozen MiniLM top as the Task2Vec probe."""
    from flows.cache import StageCache
    from flows.transfer import transfer_study

    cfg = {
        "name": "transfer-text-tiny",
        "family": {"kind": "text", "dataset": "csv", "path": str(domain_csv(project)), "domain_col": "domain",
                   "n_way": 2, "k_shot": 1, "n_query": 2, "max_length": 12},
        "model": {"kind": "minilm", "adapted": "lora", "top_layers": 1, "lora_r": 2},
        "meta_train": {"fast_lr": 0.1, "meta_batch_size": 2},
        "evaluate": {"steps": 1, "chunk": 4},
        "transfer": {"iterations": 1, "pooled_iterations": 1, "n_groups": 3, "val_episodes": 1, "test_episodes": 3,
                     "embed_episodes": 2, "embed_shots": 2, "task2vec_samples": 1, "task2vec_chunk": 2,
                     "encoder_steps": 3, "encoder_hidden": 8, "encoder_dim": 4, "n_boot": 100},
        "runtime": {"threads": 1},
    }
    path = project / "text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = transfer_study(config_path=str(path))
    rho = StageCache(project / "data").read_table("transfer_correlation", out["keys"]["transfer_correlation"], "rho")
    assert len(rho) == 10 and (rho["n_pairs"] == 6).all()
    assert "prefix" in {entry.split("/")[0] for entry in out["hits"]}


def test_cli_runs_a_transfer_config_whole(tmp_path):
    from flows.cli import main

    path = tmp_path / "transfer.yaml"
    path.write_text(yaml.safe_dump(TINY))
    assert main(["run", "--config", str(path), "--stage", "evaluate"]) == 2
    assert main(["run", "--config", str(path), "--force", "meta_train"]) == 2
