"""Seeds, the Dask hand-off and the deployment file, without servers (the end-to-end checks: test_servers.py)."""
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.config import ConfigError, load_config
from flows.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, **sections):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"meta_train": {"algorithms": ["maml", "reptile"]}, **sections}))
    return load_config(path)


def test_seeds_make_one_unit_per_algorithm_and_seed(tmp_path):
    single, seeded = make_plan(config(tmp_path)), make_plan(config(tmp_path, seeds=[0, 1]))
    assert single.units == {"maml": ("maml", 0), "reptile": ("reptile", 0)}
    assert list(seeded.units) == ["maml/seed0", "maml/seed1", "reptile/seed0", "reptile/seed1"]
    assert seeded.algorithm_keys["maml/seed0"] == single.algorithm_keys["maml"]  # seed 0 trains the same
    assert seeded.algorithm_keys["maml/seed1"] != single.algorithm_keys["maml"]
    assert seeded.keys["task_sets"] == single.keys["task_sets"] and seeded.keys["baselines"] == single.keys["baselines"]
    assert seeded.keys["evaluate"] != single.keys["evaluate"]


def test_runtime_section_leaves_the_keys_alone(tmp_path):
    dask = config(tmp_path, runtime={"runner": "dask", "dask_workers": 3})
    assert make_plan(dask).keys == make_plan(config(tmp_path)).keys


@pytest.mark.parametrize("sections, field", [({"seeds": [1, 1]}, "seeds"), ({"seeds": []}, "seeds"),
                                             ({"seeds": [0, -1]}, "seeds: need non-negative"), ({"seed": -1}, "seed"),
                                             ({"runtime": {"dask_address": "tcp://127.0.0.1:8786"}}, "dask_address"),
                                             ({"runtime": {"runner": "ray"}}, "runtime.runner")])
def test_bad_scaleout_settings_name_the_field(tmp_path, sections, field):
    with pytest.raises(ConfigError, match=field):
        config(tmp_path, **sections)


def test_across_seeds_averages_each_episode_over_seeds():
    from components.significance import across_seeds, seed_spread

    rows = pd.DataFrame({"episode": [0, 1, 0, 1, 0, 1], "method": ["maml"] * 4 + ["scratch"] * 2,
                         "steps": 1, "metric": "mse", "value": [1.0, 2.0, 3.0, 6.0, 5.0, 7.0],
                         "seed": [0, 0, 1, 1, None, None]})
    mean = across_seeds(rows).set_index(["method", "episode"])["value"]
    assert mean.to_dict() == {("maml", 0): 2.0, ("maml", 1): 4.0, ("scratch", 0): 5.0, ("scratch", 1): 7.0}
    assert seed_spread(rows).set_index("seed")["value"].to_dict() == {0: 1.5, 1: 4.5}
    single = rows.iloc[:2].drop(columns="seed")
    pd.testing.assert_frame_equal(across_seeds(single), single)


def test_significance_of_a_seeded_study_tests_each_pair_over_the_seeds(tmp_path):
    """The stage writes seed_pairs (maml's seeds against scratch's one mean) beside the episode tests; without
    several seeds it writes none."""
    from flows.report import cached_results_text
    from flows.stages.significance import compare

    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"episode": e, "method": m, "steps": 1, "metric": "mse", "seed": s, "value": v + rng.normal()}
                         for e in range(20) for m, s, v in (("maml", 0, 1.0), ("maml", 1, 2.0), ("maml", 2, 9.0),
                                                            ("scratch", None, 5.0))])
    diverged = pd.DataFrame(columns=["method", "stage", "reason"])
    compare(rows, diverged, "mse", True, 0.95, 0.01, tmp_path)
    (pair,) = pd.read_parquet(tmp_path / "seed_pairs.parquet").to_dict("records")
    assert {pair["method_a"], pair["method_b"]} == {"maml", "scratch"} and pair["n_seeds"] == 3
    maml_better = pair["seeds_a_better"] if pair["method_a"] == "maml" else pair["seeds_b_better"]
    assert maml_better == 2  # seeds 0 and 1 beat scratch's 5.0, seed 2 does not
    assert "2/3 seeds" in cached_results_text(tmp_path, "mse", "scratch", 0.01, 0.95)
    one = tmp_path / "one"
    one.mkdir()
    compare(rows[rows["seed"].isin([0]) | rows["seed"].isna()], diverged, "mse", True, 0.95, 0.01, one)
    assert not (one / "seed_pairs.parquet").exists() and "seeds" not in cached_results_text(one, "mse", "scratch",
                                                                                             0.01, 0.95)


@pytest.mark.slow  # 10 s: imports the flow module and creates an MLflow SQLite store
def test_run_crosses_to_a_worker_without_its_mlflow_client(project):
    """A Dask worker gets the Run pickled: the Tracker goes as its URI and is rebuilt on the same experiment."""
    from flows.pipeline import Run
    from flows.tracking import Tracker

    cfg = config(project)
    tracker = Tracker(project, cfg.runtime.experiment)
    run = Run(cfg, project, make_plan(cfg), tracker, "parent", method_runs={"maml": "child"})
    copy = pickle.loads(pickle.dumps(run))
    assert copy.tracker is not tracker and copy.tracker.uri == tracker.uri
    assert copy.tracker.experiment_id == tracker.experiment_id
    assert (copy.plan, copy.method_runs, copy.cfg) == (run.plan, run.method_runs, run.cfg)


def test_every_study_config_has_a_scheduled_deployment():
    from flows.schedules import deployments, to_deployments

    import yaml

    found = deployments()
    def entrypoint(cfg: dict) -> str:
        return ("flows.transfer:transfer_study" if "transfer" in cfg else "flows.folds:fold_study" if "folds" in cfg
                else "flows.pipeline:meta_pipeline")

    flows = {p.stem: entrypoint(yaml.safe_load(p.read_text())) for p in (REPO / "configs").glob("*.yaml")}
    assert {Path(d["parameters"]["config_path"]).stem: d["entrypoint"] for d in found.values()} == flows
    assert all((REPO / d["parameters"]["config_path"]).is_file() and d["schedules"][0]["cron"] for d in found.values())
    assert all(d["work_pool"]["name"] == "metapeft" for d in found.values())
    quick, transfer = to_deployments(["quick", "transfer-omniglot"])
    assert quick.parameters == {"config_path": "configs/quick.yaml"} and quick.schedules[0].schedule.cron == "0 2 * * *"
    assert transfer.flow_name == "transfer_study"
    with pytest.raises(ValueError, match="no deployment named nope"):
        to_deployments(["nope"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nothing_served(project, monkeypatch):
    """`prefect.serve` replaced by a failure: serving must not start, with or without a server."""
    import prefect

    def served(*deployments, **kw):
        raise AssertionError(f"served {len(deployments)} deployments")

    monkeypatch.setattr(prefect, "serve", served)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.mark.parametrize("url, status, said", [
    (None, 2, "PREFECT_API_URL is not set"),
    ("http://127.0.0.1:{port}/api", 1, "PREFECT_API_URL=http://127.0.0.1:{port}/api: no Prefect server answers"),
])
def test_serve_needs_a_prefect_server_and_says_so_in_one_line(nothing_served, capsys, url, status, said):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import cli

    port = free_port()  # nothing listens there
    settings = {"updates": {PREFECT_API_URL: url.format(port=port)}} if url else {"restore_defaults": {PREFECT_API_URL}}
    with temporary_settings(**settings):
        assert cli.main(["serve", "quick"]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert said.format(port=port) in err and "prefect server start --host 127.0.0.1" in err


def test_an_unreachable_dask_scheduler_is_named_within_seconds(tmp_path):
    from flows.pipeline import task_runner

    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = config(tmp_path, runtime={"runner": "dask", "dask_address": address})
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"runtime.dask_address: no Dask scheduler answers at {address} "):
        with task_runner(cfg, tmp_path):
            pass
    assert time.monotonic() - start < 10
