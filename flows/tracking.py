"""MLflow tracking through an explicit client and explicit run ids.

MLflow's active run is thread- and process-local, so nothing here relies on it: the pipeline
creates one parent run and passes its id to every stage, which opens nested runs under it.
`mlflow` is imported lazily (about a second).

A process killed with SIGKILL cannot end its runs, so every run records the host and process that
own it (`metapeft.host`, `metapeft.pid`, `metapeft.pid_start`); `end_stale_runs`, called when a
pipeline starts, marks this host's RUNNING runs whose process is gone as KILLED.
"""
from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Mapping

from flows.cache import file_lock

PARENT_TAG = "mlflow.parentRunId"


def artifact_location(root: Path, uri: str) -> str | None:
    """Where a new experiment's artifacts go: the tracking server's own store (None) when there is a server,
    since other machines log there too; else mlruns/artifacts beside the SQLite file."""
    if uri.startswith(("http://", "https://")):
        return None
    return (root / "mlruns" / "artifacts").resolve().as_uri()


def default_tracking_uri(root: Path) -> str:
    """$MLFLOW_TRACKING_URI when set (a server), else SQLite inside the project (MLflow 3.17 has no file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


class Tracker:
    def __init__(self, root: Path, experiment: str, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri, self.restored = tracking_uri or default_tracking_uri(root), None
        (root / "mlruns").mkdir(parents=True, exist_ok=True)
        with file_lock(root / "mlruns" / ".tracking.lock"):  # two runs at once: one creates the SQLite schema
            self.client = MlflowClient(tracking_uri=self.uri)  # (MLflow migrates the store here)
            self.experiment_id = self._experiment(experiment, artifact_location(root, self.uri))

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        """The experiment's id, created if missing; one deleted in the UI (kept in MLflow's trash) is restored,
        and `restored` names it so the pipeline can say so."""
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
            self.restored = (f"MLflow experiment {name!r} (runtime.experiment) had been deleted; restored it with its "
                             f"runs. To start afresh instead, set runtime.experiment to a new name")
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
        all_tags = {"mlflow.runName": name, **process_tags(), **(tags or {})}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_stale_runs(self) -> list[str]:
        """Mark KILLED this host's RUNNING runs whose owning process is gone (SIGKILL, power loss); their ids."""
        host = socket.gethostname().replace("'", "")
        runs = self.client.search_runs([self.experiment_id], max_results=1000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`metapeft.host` = '{host}'"))
        stale = [r for r in runs
                 if not _process_alive(r.data.tags.get("metapeft.pid"), r.data.tags.get("metapeft.pid_start"))]
        for r in stale:
            pid = r.data.tags["metapeft.pid"]
            self.set_tags(r.info.run_id, {"metapeft.ended_by": f"stale-run check: process {pid} on {host} is gone"})
            self.client.set_terminated(r.info.run_id, status="KILLED")
        return [r.info.run_id for r in stale]

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


def process_tags() -> dict[str, str]:
    """Who owns a run: host, pid, and the pid's start time (a recycled pid then does not look alive)."""
    stat = _proc_stat(os.getpid())
    return {"metapeft.host": socket.gethostname(), "metapeft.pid": str(os.getpid()),
            "metapeft.pid_start": stat[19] if stat else ""}


def _proc_stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat fields from the state on (state, ppid, ..., [19] start time in ticks); None if absent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_alive(pid: str | None, start: str | None) -> bool:
    if not pid:
        return True  # not ours to judge: a run started by other code
    if not Path("/proc/self/stat").exists():  # no procfs: only ask whether the pid exists
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in "ZX" and (not start or stat[19] == start)  # Z: killed, not reaped


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for logging a config as params."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
