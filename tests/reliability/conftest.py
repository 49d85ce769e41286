"""Shared pieces of the reliability tests: a tiny sinusoid study, pipeline subprocesses, the MLflow store."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "name": "tiny",
    "family": {"n_tasks": {"meta_train": 200, "meta_val": 20, "meta_test": 40}},
    "meta_train": {"algorithms": ["maml"], "iterations": 20, "val_every": 10, "checkpoint_every": 10,
                   "meta_batch_size": 5},
    "evaluate": {"steps": 3},
    "baselines": {"pretrain_iterations": 20},
    "embedding": {"n_similarity_tasks": 5},
    "runtime": {"threads": 1},
}


@pytest.fixture
def tiny_config():
    """write(folder, **sections) -> path of a tiny sinusoid study config (sections replace TINY's)."""
    def write(folder: Path, name: str = "tiny.yaml", **sections) -> str:
        path = Path(folder) / name
        path.write_text(yaml.safe_dump({**TINY, **sections}))
        return str(path)

    return write


@pytest.fixture
def pipeline_process(prefect_harness):
    """start(project, config) -> a `metapeft run` subprocess on that project, against the test Prefect server.

    The server is shared (as with PREFECT_API_URL in production); each process has its own MLflow client,
    cache and Python state, like a second terminal.
    """
    from prefect.settings import PREFECT_API_URL

    started = []

    def start(project: Path, config: str, *args: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
        env.update(METAPEFT_HOME=str(project), PREFECT_API_URL=PREFECT_API_URL.value(), OMP_NUM_THREADS="1",
                   PREFECT_HOME=str(project / ".prefect"))
        log = open(project / f"run-{len(started)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", config, *args], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log))
        return proc

    yield start
    for proc, log in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    (project / "mlruns").mkdir(exist_ok=True)
    return MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


def pipeline_runs(project: Path) -> list:
    """Every run in the project's store (parents and nested), all experiments."""
    client = mlflow_client(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite file with its schema created (creating it costs about 4 s a project here)."""
    folder = tmp_path_factory.mktemp("empty-store")
    mlflow_client(folder).search_experiments()
    return folder / "mlruns" / "mlflow.db"


@pytest.fixture
def seeded_store(project, empty_store) -> Path:
    """The project with a ready MLflow store, for tests that are not about creating one."""
    import shutil

    (project / "mlruns").mkdir(exist_ok=True)
    shutil.copy(empty_store, project / "mlruns" / "mlflow.db")
    return project


@pytest.fixture
def store():
    """The helpers above, as a fixture (a test file cannot import this conftest by name)."""
    class Store:
        client = staticmethod(mlflow_client)
        runs = staticmethod(pipeline_runs)

    return Store
