import pytest

from flows.environment import configure

configure()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (about 7 s to start here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project root: data/ and the MLflow store (mlruns/mlflow.db) live under tmp_path."""
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
