"""Server mode and scale-out: a real Prefect server and MLflow tracking server on loopback, a deployment
run by a process worker, and the tiny study on a 2-worker Dask LocalCluster."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pipeline import TINY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list, log: Path, **kw) -> subprocess.Popen:
    """A server or worker in its own process group, so that stopping it stops its children too."""
    return subprocess.Popen([str(c) for c in cmd], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, then wait (SIGKILL only if it ignores that for 30 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def rest(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """`prefect server start` and `mlflow server` (SQLite behind it) on 127.0.0.1, free ports; stopped at the end."""
    home = tmp_path_factory.mktemp("servers")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(QUIET, PREFECT_HOME=str(home / "prefect"))
    prefect_port, mlflow_port = free_port(), free_port()
    prefect = start([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", prefect_port],
                    home / "prefect.log", env=env)
    mlflow = start([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", mlflow_port, "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                    "--artifacts-destination", home / "mlartifacts"], home / "mlflow.log", env=env, cwd=home)
    try:
        wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", prefect, home / "prefect.log")
        wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", mlflow, home / "mlflow.log")
        yield {"prefect": f"http://127.0.0.1:{prefect_port}/api", "mlflow": f"http://127.0.0.1:{mlflow_port}",
               "env": env}
    finally:
        if "prefect.logging.handlers" in sys.modules:  # this process's pending task-run logs, while the server is up
            sys.modules["prefect.logging.handlers"].APILogHandler().flush()
        stop(prefect)
        stop(mlflow)
    assert prefect.returncode is not None and mlflow.returncode is not None


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **sections}))
    return path


def test_deployment_runs_on_a_worker_then_served_against_both_servers(servers, tmp_path):
    """deployments/prefect.yaml deployed to a process pool, triggered by `prefect deployment run`, run by a
    worker; the finished parent run and its nested runs are read back over MLflow's REST API. Then the same
    deployment served by `metapeft serve` runs again, all from the cache."""
    config = write_config(tmp_path / "quick.yaml", name="quick-tiny")
    env = {**servers["env"], "PREFECT_API_URL": servers["prefect"], "MLFLOW_TRACKING_URI": servers["mlflow"],
           "METAPEFT_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".prefect"),
           "PREFECT_WORKER_QUERY_SECONDS": "1"}

    def prefect(*args: str) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    prefect("work-pool", "create", "metapeft", "--type", "process")
    prefect("--no-prompt", "deploy", "--name", "quick", "--prefect-file", "deployments/prefect.yaml")
    worker = start([BIN / "prefect", "worker", "start", "--pool", "metapeft"], tmp_path / "worker.log",
                   cwd=REPO, env=env)
    try:
        out = prefect("deployment", "run", "meta_pipeline/quick", "--params", json.dumps({"config_path": str(config)}),
                      "--watch", "--watch-interval", "2", "--watch-timeout", "200")
    finally:
        stop(worker)
    assert "finished successfully in 'Completed'" in out, out + (tmp_path / "worker.log").read_text()[-3000:]

    api = f"{servers['mlflow']}/api/2.0/mlflow"
    experiment = rest(f"{api}/experiments/get-by-name?experiment_name=metapeft")["experiment"]["experiment_id"]
    runs = rest(f"{api}/runs/search", {"experiment_ids": [experiment], "max_results": 100})["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [r for r in runs if r["info"]["run_name"] == "quick-tiny"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    parent_id = parents[0]["info"]["run_id"]
    children = {r["info"]["run_name"]: r for r in runs
                if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"maml", "fomaml", "reptile", "metasgd", "scratch", "pretrain_finetune"}
    for child in children.values():
        assert child["info"]["status"] == "FINISHED"
        assert "meta_test_mse" in {m["key"] for m in child["data"]["metrics"]}
    artifacts = rest(f"{api}/artifacts/list?run_id={parent_id}&path=significance")
    assert "significance/summary.parquet" in {f["path"] for f in artifacts.get("files", [])}
    assert (tmp_path / "data" / "significance").is_dir()  # the cache went to METAPEFT_HOME, not the repo

    prefect("deployment", "delete", "meta_pipeline/quick")  # served over a pool deployment, its runs crash
    serving = start([BIN / "metapeft", "serve", "quick"], tmp_path / "serve.log", cwd=REPO,
                    env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
    try:  # the same deployment, now served by that process instead of the pool's worker
        deadline = time.monotonic() + 60
        while "being served" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        out = prefect("deployment", "run", "meta_pipeline/quick", "--params", json.dumps({"config_path": str(config)}),
                      "--watch", "--watch-interval", "2", "--watch-timeout", "120")
    finally:
        stop(serving)
    assert "finished successfully in 'Completed'" in out, out + (tmp_path / "serve.log").read_text()[-3000:]
    runs = rest(f"{api}/runs/search", {"experiment_ids": [experiment], "max_results": 100,
                                       "filter": "attributes.run_name = 'quick-tiny'", "order_by": ["start_time DESC"]})
    served = runs["runs"][0]
    assert len(runs["runs"]) == 2 and served["info"]["status"] == "FINISHED"
    assert {t["key"]: t["value"] for t in served["data"]["tags"]}["metapeft.cache_misses"] == "0"


def test_dask_local_cluster_gives_the_sequential_results(servers, project, monkeypatch):
    """Two seeds per algorithm fanned out on 2 Dask worker processes: same keys, same per-task results."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import pipeline
    from flows.cache import StageCache
    from flows.pipeline import meta_pipeline
    from test_pipeline import misses, runs_of

    runners, fan_out = [], pipeline.fan_out
    monkeypatch.setattr(pipeline, "fan_out", lambda runner, *args: runners.append(type(runner).__name__)
                        or fan_out(runner, *args))

    sequential = write_config(project / "seq.yaml", seeds=[0, 1], runtime={"threads": 1, "data_dir": "data-seq"})
    dask = write_config(project / "dask.yaml", seeds=[0, 1], runtime={
        "threads": 1, "data_dir": "data-dask", "runner": "dask", "dask_workers": 2})
    with temporary_settings(updates={PREFECT_API_URL: servers["prefect"]}):
        first = meta_pipeline(config_path=str(sequential))
        second = meta_pipeline(config_path=str(dask))

    assert runners == ["NoneType", "NoneType", "DaskTaskRunner", "DaskTaskRunner"]  # meta_train, evaluate
    assert first["keys"] == second["keys"] and set(first["hits"]) == set(second["hits"])
    assert misses(second) == {"task_sets", "train_sets", "embeddings", "meta_train", "evaluate", "baselines",
                              "significance"}
    seq, par = StageCache(project / "data-seq"), StageCache(project / "data-dask")
    for entry in second["hits"]:
        stage, key = entry.split("/")
        if stage in ("meta_train", "evaluate", "baselines"):
            name = "history" if stage == "meta_train" else "results"
            pd.testing.assert_frame_equal(seq.read_table(stage, key, name), par.read_table(stage, key, name))
    results = par.read_table("evaluate", second["keys"]["evaluate"], "results")
    assert set(zip(results["method"], results["seed"])) == {(a, s) for a in ("maml", "fomaml", "reptile", "metasgd")
                                                           for s in (0, 1)}
    pd.testing.assert_frame_equal(*(cache.read_table("significance", first["keys"]["significance"], "summary")
                                    for cache in (seq, par)))

    _, parent, children = runs_of(project, second["run_id"])
    assert parent.info.status == "FINISHED"
    assert {"maml/seed0", "maml/seed1", "maml", "scratch"} <= set(children)
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert children["maml/seed1"].data.params["seed"] == "1"
    assert "meta_test_mse" in children["maml/seed1"].data.metrics and "meta_test_mse" in children["maml"].data.metrics
