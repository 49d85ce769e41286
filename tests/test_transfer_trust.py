"""What the transfer study must tell its reader: training a budget cut short, the embedding it ranked sources by,
targets left out of a mean, sources by name; and the config / data errors it must refuse before it starts."""
import copy

import numpy as np
import pandas as pd
import pytest
import yaml

from test_transfer_flow import GROUPS, OMNIGLOT, TINY


def tiny(tmp_path, name="transfer.yaml", **transfer):
    """TINY with `transfer` changes (None: the key left out), written to tmp_path; its path."""
    raw = copy.deepcopy(TINY)
    raw["transfer"].update(transfer)
    raw["transfer"] = {k: v for k, v in raw["transfer"].items() if v is not None}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_transfer_config_refuses_seeds(tmp_path):
    from flows.config import ConfigError, load_config

    raw = {**TINY, "seeds": [0, 1, 2]}
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="seeds: a transfer study uses `seed`"):
        load_config(path)


def test_sources_are_keyed_by_group_name_without_the_budget(tmp_path):
    from flows.config import load_config
    from flows.transfer_stages import make_transfer_plan

    plain = make_transfer_plan(load_config(tiny(tmp_path)))
    assert list(plain.source_keys) == [*GROUPS, "pooled"]  # config order, by name (not sorted "source0..")
    budgeted = make_transfer_plan(load_config(tiny(tmp_path, "budget.yaml", budget_minutes=3)))
    assert budgeted.source_keys == plain.source_keys  # a larger budget continues the same training
    first = make_transfer_plan(load_config(tiny(tmp_path, "first.yaml", groups=None, n_groups=3)))
    assert list(first.source_keys) == ["Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "pooled"]


def test_within_target_mean_says_how_many_targets_it_is_over():
    from components.transfer import within_target_mean
    from flows.transfer_stages import rho_text

    within = pd.DataFrame({"embedding": "features", "metric": "cosine", "target": list("abcd"),
                           "rho": [-0.5, np.nan, 0.5, np.nan], "n_sources": 3})
    within = pd.concat([within, within.assign(metric="euclidean", rho=[0.2, 0.4, 0.6, 0.8])], ignore_index=True)
    mean = within_target_mean(within).set_index("metric")
    assert mean.loc["cosine", "rho_within_target"] == 0.0 and mean.loc["euclidean", "rho_within_target"] == 0.5
    assert mean.loc["cosine", ["n_targets_defined", "n_targets"]].tolist() == [2, 4]
    rho = pd.DataFrame({"embedding": "features", "metric": ["cosine", "euclidean"], "rho": [-0.3, -0.1],
                        "ci_low": [-0.5, -0.4], "ci_high": [-0.1, 0.2], "n_pairs": 12}).merge(mean.reset_index())
    cosine, euclidean = rho_text(rho).splitlines()[1:]
    assert cosine.endswith("0.000  mean over 2 of 4 targets; 2 undefined (constant ranks)")
    assert euclidean.endswith("0.500")  # every target defined: nothing to say


def test_nearest_task_header_names_the_embedding_used(tmp_path):
    from flows.config import load_config
    from flows.transfer_stages import nearest_choice, nearest_title

    cfg = load_config(tiny(tmp_path, embeddings=["features", "encoder"]))
    assert nearest_choice(cfg) == ("features", "cosine")
    assert nearest_title(cfg) == "nearest-task initialisation (features, cosine distance)"
    assert nearest_title(load_config(tiny(tmp_path, "all.yaml"))) == \
        "nearest-task initialisation (Task2Vec, normalized cosine distance)"


@pytest.mark.parametrize("change, error, message", [
    ({"groups": ["Latin", "Greek", "Klingon"]}, ValueError, r"^transfer\.groups: \['Klingon'\] are not groups of"),
    ({"groups": None, "n_groups": 40}, ValueError, r"^transfer\.n_groups: 40, but .* has only 30 groups"),
    ({"test_fraction": 0.9}, ValueError, r"^transfer\.test_fraction: 0\.9 holds out"),
])
def test_check_transfer_names_the_field(tmp_path, change, error, message):
    from flows.config import load_config
    from flows.transfer import check_transfer

    with pytest.raises(error, match=message):
        check_transfer(load_config(tiny(tmp_path, **change)))


def test_check_transfer_names_a_missing_or_truncated_file(tmp_path):
    from flows.config import load_config
    from flows.transfer import check_transfer

    folder = tmp_path / "omniglot"
    raw = {**TINY, "family": {**TINY["family"], "path": str(folder)}}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(FileNotFoundError, match="images_background.zip not found"):
        check_transfer(load_config(path))
    folder.mkdir()
    for name in ("images_background.zip", "images_evaluation.zip"):
        (folder / name).write_bytes((OMNIGLOT / name).read_bytes()[:50_000])  # a download cut short
    with pytest.raises(ValueError, match=r"images_\w+\.zip: damaged zip archive"):
        check_transfer(load_config(path))


@pytest.mark.slow
def test_a_run_left_running_by_a_killed_study_is_marked_killed(prefect_harness, project):
    from mlflow.tracking import MlflowClient

    from flows.config import load_config
    from flows.tracking import Tracker, process_tags
    from flows.transfer import transfer_study

    path = tiny(project)
    tracker = Tracker(project, load_config(path).runtime.experiment)
    killed = tracker.start_run("killed", tags={**process_tags(), "metapeft.pid_start": "1"})  # its pid recycled
    out = transfer_study(config_path=str(path))
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(out["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_a_budget_stopped_study_says_so_and_a_rerun_continues_it(prefect_harness, project):
    """A tiny budget stops every source at iteration 0: the results and the parent's tag say so; the same
    config without the budget (the same keys) continues them to their iterations."""
    from mlflow.tracking import MlflowClient

    from flows.cache import StageCache
    from flows.transfer import transfer_study

    client, cache = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"), StageCache(project / "data")
    first = transfer_study(config_path=str(tiny(project, "budget.yaml", budget_minutes=1e-6)))
    lines = [line for line in first["results"].splitlines() if line.startswith("~ ")]
    assert lines == [f"~ source {s}: meta-training stopped by the time budget at iteration 0 of {n} (a rerun goes "
                     f"on from its checkpoint)" for s, n in [*((g, 2) for g in GROUPS), ("pooled", 3)]]
    tag = client.get_run(first["run_id"]).data.tags.get("metapeft.unfinished", "")
    assert "source Braille: meta-training stopped by the time budget at iteration 0 of 2" in tag

    second = transfer_study(config_path=str(tiny(project)))
    assert second["source_keys"] == first["source_keys"]
    metas = {s: cache.manifest("transfer_train", k)["meta"] for s, k in second["source_keys"].items()}
    assert {s: (m["stop_reason"], m["iterations_total"]) for s, m in metas.items()} == \
        {**{g: ("iterations", 2) for g in GROUPS}, "pooled": ("iterations", 3)}
    assert not any(second["hits"][f"transfer_train/{k}"] for k in second["source_keys"].values())
    assert "stopped by the time budget" not in second["results"]  # 2-3 iterations may keep the initial state: said
    assert "time budget" not in client.get_run(second["run_id"]).data.tags.get("metapeft.unfinished", "")


@pytest.mark.slow
def test_force_transfer_train_retrains_from_the_shared_initialisation(prefect_harness, project):
    from flows.cache import StageCache
    from flows.transfer import transfer_study

    path, cache = tiny(project), StageCache(project / "data")
    transfer_study(config_path=str(path))
    forced = transfer_study(config_path=str(path), force=["transfer_train"])
    runs = {s: cache.manifest("transfer_train", k)["meta"].get("iterations_run")
            for s, k in forced["source_keys"].items()}
    assert runs == {**{g: 2 for g in GROUPS}, "pooled": 3}  # every iteration run again, none taken from a checkpoint


def test_a_source_start_that_kept_its_initial_state_is_said_as_such(tmp_path):
    """A source training whose meta-val loss never fell below iteration 0's kept the shared initialisation: it
    scores as scratch, so its row is noted, as the pipeline notes such a training; a budget-stopped one keeps its
    budget note; a trained one has none."""
    from flows.cache import StageCache
    from flows.config import load_config
    from flows.transfer_stages import start_notes

    cfg, cache = load_config(tiny(tmp_path)), StageCache(tmp_path / "data")
    metas = {"Braille": {"best_iteration": 0, "iterations_total": 2, "stop_reason": "iterations"},
             "Greek": {"best_iteration": 2, "iterations_total": 2, "stop_reason": "iterations"},
             "Latin": {"best_iteration": 0, "iterations_total": 0, "stop_reason": "budget"}}
    for source, meta in metas.items():
        with cache.writing("transfer_train", source.lower(), meta) as out:
            (out / "state.pt").write_bytes(b"x")
    notes = start_notes(cfg, cache, {s: s.lower() for s in metas})
    assert notes["source Braille"].startswith("kept its initial state: no meta-val loss in 2 iterations")
    assert "source Greek" not in notes and notes["source Latin"].startswith("meta-training stopped by the time budget")
