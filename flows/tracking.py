"""MLflow tracking through an explicit client and explicit run ids.

MLflow's active run is thread- and process-local, so nothing here relies on it: the pipeline
creates one parent run and passes its id to every stage, which opens nested runs under it.
`mlflow` is imported lazily (about a second).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(root: Path) -> str:
    """$MLFLOW_TRACKING_URI when set (a server), else SQLite inside the project (MLflow 3.17 has no file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


class Tracker:
    def __init__(self, root: Path, experiment: str, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or default_tracking_uri(root)
        (root / "mlruns").mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment, (root / "mlruns" / "artifacts").resolve().as_uri())

    def _experiment(self, name: str, artifact_location: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created meanwhile by a concurrent run
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_curves(run_id, ((k, step, v) for k, v in metrics.items()))

    def log_curves(self, run_id: str, points: Iterable[tuple[str, int, float]]) -> None:
        """Log many (key, step, value) points in batches (one synchronous call each costs ~10 ms)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(s)) for k, s, v in points if math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for logging a config as params."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
