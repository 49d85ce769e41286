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


@pytest.fixture(scope="session")
def random_episodes():
    """make(n_tasks, n_way, n_query, channels) -> an EpisodeBatch of random 28 x 28 images in [0, 1], float64:
    1 shot per class, n_query queries per class, seeded."""
    import torch

    from components.episodes import EpisodeBatch

    def make(n_tasks: int, n_way: int, n_query: int, channels: int = 1) -> EpisodeBatch:
        g = torch.Generator().manual_seed(1)
        labels = torch.arange(n_way)
        return EpisodeBatch(torch.rand(n_tasks, n_way, channels, 28, 28, generator=g, dtype=torch.float64),
                            labels.expand(n_tasks, n_way),
                            torch.rand(n_tasks, n_way * n_query, channels, 28, 28, generator=g, dtype=torch.float64),
                            labels.repeat_interleave(n_query).expand(n_tasks, -1))

    return make


@pytest.fixture(scope="session")
def tiny_conv4_study():
    """study(name, family, algorithms, **meta_train) -> a conv4 study config small enough for a test: 8 filters,
    2-step evaluation, 3 pre-training iterations."""
    return _tiny_conv4_study


def _tiny_conv4_study(name: str, family: dict, algorithms: list[str], **meta_train) -> dict:
    return {
        "name": name, "family": family, "model": {"kind": "conv4", "hidden": 8},
        "meta_train": {"algorithms": algorithms, "fast_lr": 0.4, "meta_batch_size": 2, "vectorize": False,
                       **meta_train},
        "evaluate": {"steps": 2, "chunk": 6},
        "baselines": {"scratch_lr": 0.4, "finetune_lr": 0.4, "pretrain_iterations": 3, "pretrain_batch_size": 8},
        "embedding": {"n_similarity_tasks": 4},
        "runtime": {"threads": 1},
    }
