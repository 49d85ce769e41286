"""MLflow tracking through an explicit client and explicit run ids.

MLflow's active run is thread- and process-local, so nothing here relies on it: the pipeline
creates one parent run and passes its id to every stage, which opens nested runs under it.
`mlflow` is imported lazily (about a second).

A process killed with SIGKILL cannot end its runs, so every run records the host and process that
own it (`metapeft.host`, `metapeft.pid`, `metapeft.pid_start`); `end_stale_runs`, called when a
pipeline starts, marks this host's RUNNING runs whose process is gone as KILLED.

Besides metrics and artifacts a run gets what MLflow's own `start_run` and `log_model` would give it:
provenance tags (source, user, git commit of this code), its input datasets (`task_set_inputs`), system
metrics while it computes (`system_metrics`), curves logged while they are measured (`CurveLog`) and, for a
meta-learned start, a registered pyfunc model (`log_model`, flows/model.py). Which settings a run's params
show is decided here too: only those that apply to the study's model, algorithm or baseline.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from flows.cache import file_lock

PARENT_TAG = "mlflow.parentRunId"
ARTIFACTS = Path("mlruns") / "artifacts"  # the experiments' artifact folder, relative to the project root


def artifact_location(root: Path, uri: str) -> str | None:
    """Where a new experiment's artifacts go: the tracking server's own store (None) when there is a server,
    since other machines log there too; else mlruns/artifacts beside the SQLite file.

    MLflow stores a local location as an absolute URI; `Tracker` moves it along when the project moves."""
    if uri.startswith(("http://", "https://")):
        return None
    return (root / ARTIFACTS).resolve().as_uri()


def default_tracking_uri(root: Path) -> str:
    """$MLFLOW_TRACKING_URI when set (a server), else SQLite inside the project (MLflow 3.17 has no file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}"


class Tracker:
    def __init__(self, root: Path, experiment: str, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri, self.restored, self.moved = tracking_uri or default_tracking_uri(root), None, None
        (root / "mlruns").mkdir(parents=True, exist_ok=True)
        with file_lock(root / "mlruns" / ".tracking.lock"):  # two runs at once: one creates the SQLite schema
            self.client = MlflowClient(tracking_uri=self.uri)  # (MLflow migrates the store here)
            self.artifact_location = artifact_location(root, self.uri)
            if self.uri == default_tracking_uri(root):
                self.moved = relocate_artifacts(root / "mlruns" / "mlflow.db", self.artifact_location)
            self.experiment_id = self._experiment(experiment, self.artifact_location)

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
        """A new RUNNING run with the provenance tags of `mlflow.start_run`; nested under parent_id if given."""
        all_tags = {"mlflow.runName": name, **context_tags(), **process_tags(), **(tags or {})}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def is_running(self, run_id: str) -> bool:
        return self.client.get_run(run_id).info.status == "RUNNING"

    def running_children(self, parent_id: str) -> list[str]:
        """The nested runs of parent_id still RUNNING (opened by this process or by a Dask worker)."""
        runs = self.client.search_runs([self.experiment_id], max_results=1000, filter_string=(
            f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'"))
        return [r.info.run_id for r in runs]

    def find_run(self, tags: Mapping[str, str]) -> str | None:
        """The oldest finished run of this experiment carrying all of tags (the one that computed an entry)."""
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], f"{where} and attributes.status = 'FINISHED'",
                                       max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def log_inputs(self, run_id: str, inputs: Iterable) -> None:
        """Datasets (mlflow.entities.DatasetInput, from `task_set_inputs`) the run read."""
        if inputs:
            self.client.log_inputs(run_id, datasets=list(inputs))

    @contextlib.contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) of this machine into the run,
        sampled every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10; a sample costs about 4 ms of
        CPU here, 0.04% of a core), plus the samples of a last, partial interval.
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off."""
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() == "false":
            yield
            return
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # 4 INFO lines per run otherwise
        monitor = SystemMetricsMonitor(run_id, tracking_uri=self.uri)
        monitor.collect_metrics()  # psutil's first CPU reading is always 0: take it before the work starts
        for m in monitor.monitors:
            m.clear_metrics()
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            if left := monitor.aggregate_metrics():  # a run shorter than one interval still gets a sample
                monitor.publish_metrics(left)
                monitor.mlflow_logger.flush()

    def log_model(self, run_id: str, code: Path, artifacts: Mapping[str, Path], registered_name: str, signature=None,
                  tags: Mapping[str, str] | None = None) -> str:
        """Log a pyfunc model (code: its "models from code" file) as the run's output model and register it as a
        new version of registered_name; returns the version. The experiment is given (MLflow would otherwise
        take its default one), requirements too (inferring them runs the model in a subprocess: seconds)."""
        import warnings

        import mlflow
        import mlflow.pyfunc
        from mlflow.models import Model

        logged = self.client.create_logged_model(self.experiment_id, name="model", source_run_id=run_id,
                                                 tags={k: str(v) for k, v in (tags or {}).items()})
        # no type hints, no input example: a task is a dict of arrays (flows/model.py); log_model finalises and
        # registers through MLflow's default client, pointed at this store only for the call
        with warnings.catch_warnings(), default_uri(self.uri):
            warnings.simplefilter("ignore", UserWarning)
            info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=logged.model_id, python_model=str(code),
                             artifacts={k: str(v) for k, v in artifacts.items()}, signature=signature,
                             pip_requirements=model_requirements(), registered_model_name=registered_name,
                             await_registration_for=0)
        version = str(info.registered_model_version)
        for k, v in (tags or {}).items():
            self.client.set_model_version_tag(registered_name, version, k, str(v))
        return version

    def model_version(self, registered_name: str, tags: Mapping[str, str]) -> str | None:
        """The newest version of registered_name carrying all of tags (a tag given as None: one the version does not
        carry); None without one (or without the model)."""
        try:
            found = [v for v in self.client.search_model_versions(f"name = '{registered_name}'")
                     if all(v.tags.get(k) == (None if t is None else str(t)) for k, t in tags.items())]
        except Exception:  # MlflowException: no such registered model yet
            return None
        return str(max(int(v.version) for v in found)) if found else None

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
        """Log many (key, step, value) points in batches (one synchronous call each costs ~10 ms), stamped now.
        Curves measured over time go through `CurveLog`, which stamps each point when it is measured."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.log_points(run_id, [Metric(k, float(v), now, int(s)) for k, s, v in points])

    def log_points(self, run_id: str, items: list) -> None:
        """mlflow.entities.Metric points (non-finite ones left out), 1000 a batch."""
        items = [m for m in items if math.isfinite(m.value)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_config(self, run_id: str, settings: dict) -> None:
        """The validated config a run ran with (--set overrides applied), as its artifact config.json: `report`,
        `export` and `compare` read it, not the config file, which may change or move."""
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            stored = Path(tmp) / "config.json"
            stored.write_text(json.dumps(settings, indent=2) + "\n")
            self.log_artifact(run_id, stored)


class CurveLog:
    """Points of a run's curves, each stamped when it was measured, sent in batches: at `flush` (call it at
    each validation) and whenever `every` seconds have passed since the last batch, so a run can be watched."""

    def __init__(self, tracker: Tracker, run_id: str, every: float = 10.0):
        self.tracker, self.run_id, self.every = tracker, run_id, every
        self.points: list = []
        self.sent = time.monotonic()

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.points += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if time.monotonic() - self.sent >= self.every:
            self.flush()

    def flush(self) -> None:
        points, self.points, self.sent = self.points, [], time.monotonic()
        self.tracker.log_points(self.run_id, points)


@functools.lru_cache(maxsize=1)
def context_tags() -> dict[str, str]:
    """The tags `mlflow.start_run` would set (user, source name and type, git), with the git commit, branch and
    remote of the repository holding this code (not of the script that started the process), and
    metapeft.git.dirty: whether tracked files differ from that commit."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    code = str(Path(__file__).resolve().parent)
    tags = {k: v for k, v in resolve_tags().items() if k != PARENT_TAG}
    if commit := get_git_commit(code):
        tags.update({"mlflow.source.git.commit": commit, "metapeft.git.dirty": str(_git_dirty(code)).lower()})
        tags.update({k: v for k, v in (("mlflow.source.git.branch", get_git_branch(code)),
                                       ("mlflow.source.git.repoURL", get_git_repo_url(code))) if v})
    return tags


def _git_dirty(path: str) -> bool:
    import git

    return git.Repo(path, search_parent_directories=True).is_dirty(untracked_files=False)


def code_commit() -> tuple[str, bool] | None:
    """(commit, dirty) of the repository holding this code, as context_tags records them; None outside git.
    Without MLflow (the report page of a run that does not import it)."""
    import git

    try:
        repo = git.Repo(Path(__file__).resolve().parent, search_parent_directories=True)
        return repo.head.commit.hexsha, repo.is_dirty(untracked_files=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError):  # ValueError: no commit yet
        return None


def model_requirements() -> list[str]:
    """The pyfunc model's pip requirements, pinned to this environment (the metapeft package itself must be
    installed where the model loads: it rebuilds the learner from the project's code)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "torch", "numpy", "pandas", "pydantic", "pyyaml")]


def relocate_artifacts(db: Path, location: str | None) -> str | None:
    """After the project moved: point the experiments, runs, logged models and model versions whose artifacts
    were in another project's mlruns/artifacts at this one's (location); returns the old location, or None.

    MLflow keeps a local artifact location as an absolute URI and has no call to change it, so this rewrites
    the prefix in the SQLite store (the project's own, under the tracking lock)."""
    if location is None or not db.is_file():
        return None
    columns = {"experiments": ("artifact_location",), "runs": ("artifact_uri",), "logged_models": ("artifact_location",),
               "model_versions": ("source", "storage_location")}
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        tables = {name for (name,) in con.execute("select name from sqlite_master where type = 'table'")}
        suffix = "/" + ARTIFACTS.as_posix()
        olds = {old for (old,) in con.execute("select distinct artifact_location from experiments "
                                              "where artifact_location like ?", (f"file://%{suffix}",))}
        olds.discard(location)
        for old in olds:
            for table, cols in columns.items():
                for col in cols if table in tables else ():
                    con.execute(f"update {table} set {col} = ? || substr({col}, ?) "
                                f"where {col} = ? or substr({col}, 1, ?) = ?",
                                (location, len(old) + 1, old, len(old) + 1, old + "/"))
    return ", ".join(sorted(olds)) or None


@functools.lru_cache(maxsize=4)
def task_set_inputs(entry: Path, digest: str, root: Path) -> tuple:
    """The task-set tables of a cache entry as MLflow dataset inputs: name = the table, digest = the table's own
    content digest (its sha256 in the entry's manifest; `digest`, the entry's, when the manifest lacks it),
    source = the Parquet file relative to the project, context = the split
    the table belongs to (meta_train, meta_val, meta_test) or "all" (items and classes of every split).
    Only the Parquet footers are read: the schema from an empty frame, the row count from the metadata."""
    import json
    import warnings

    import mlflow.data
    import pyarrow.parquet as pq
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    files = json.loads((entry / "manifest.json").read_text()).get("files", {}) if (entry / "manifest.json").exists() \
        else {}
    inputs = []
    for file in sorted(entry.glob("*.parquet")):
        split = next((s for s in ("meta_train", "meta_val", "meta_test") if file.stem.endswith(s)), "all")
        source = file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
        footer = pq.ParquetFile(file)
        with warnings.catch_warnings():  # MLflow's local source is registered twice ("" and file:), and the
            warnings.simplefilter("ignore", UserWarning)  # schema hints that int columns cannot hold missing values
            dataset = mlflow.data.from_pandas(footer.schema_arrow.empty_table().to_pandas(), source=source,
                                              name=file.stem, digest=files.get(file.name, digest)[:16]).to_dict()
        rows, columns = footer.metadata.num_rows, len(footer.schema_arrow)
        entity = Dataset(**{**dataset, "profile": json.dumps({"num_rows": rows, "num_elements": rows * columns})})
        inputs.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    return tuple(inputs)


@contextlib.contextmanager
def default_uri(uri: str):
    """MLflow's default tracking URI set to uri for the block, then put back as it was: mlflow.set_tracking_uri
    also writes $MLFLOW_TRACKING_URI, so left set it would send the next study in this process (another
    project, a test) to this store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_env, saved = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


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


# The baselines settings each baseline reads (components/families/*.py, baseline_runs); a baseline not listed
# gets them all. prototypes and linear_head work on frozen sentence embeddings, not the study's network.
BASELINE_SETTINGS = {"scratch": ("scratch_lr",),
                     "pretrain_finetune": ("pretrain_iterations", "pretrain_lr", "pretrain_batch_size", "finetune_lr"),
                     "prototypes": (), "linear_head": ("head_lr",), "lora_finetune": ("finetune_lr",)}
WITHOUT_MODEL = ("prototypes", "linear_head")


def model_params(cfg) -> dict[str, object]:
    """The model section's fields that its kind reads (no LoRA rank on an MLP, none of LoRA without adapted: lora)."""
    from flows.config import LORA_FIELDS, MODEL_FIELDS

    m = cfg.model
    return {k: v for k, v in m.model_dump().items()
            if m.kind in MODEL_FIELDS.get(k, (m.kind,)) and (k not in LORA_FIELDS or m.adapted == "lora")}


def study_params(cfg) -> dict[str, object]:
    """The parent run's params: the config without unset options, the model fields its kind does not read,
    Meta-SGD's rate range without Meta-SGD, task chunks without task_batched, and the baselines section
    (each baseline's run, and the parent once baselines ran, get the settings they read: `baseline_params`)."""
    dump = cfg.model_dump(exclude={"baselines"})
    dump["model"] = model_params(cfg)
    dump["meta_train"] = _meta_train_settings(dump["meta_train"], set(cfg.meta_train.algorithms))
    return {k: v for k, v in flatten(dump).items() if v is not None}


def unit_params(cfg, algorithm: str, seed: int) -> dict[str, object]:
    """A meta-learner run's params: its algorithm's meta_train settings (overrides applied), the model, the seed."""
    section = _meta_train_settings(cfg.meta_train.for_algorithm(algorithm), {algorithm})
    return {**{k: v for k, v in section.items() if v is not None},
            **{f"model.{k}": v for k, v in model_params(cfg).items()}, "seed": seed}


def _meta_train_settings(section: dict, algorithms: set[str]) -> dict:
    drop = set() if "metasgd" in algorithms else {"metasgd_lr_range"}
    drop |= {"vectorize"} if section["task_batched"] else {"task_chunk", "query_chunk"}
    return {k: v for k, v in section.items() if k not in drop}


def baseline_params(cfg, method: str) -> dict[str, object]:
    """A baseline run's params: the baselines settings it reads, the test-time steps, the seed, the model."""
    fields = BASELINE_SETTINGS.get(method, tuple(type(cfg.baselines).model_fields))
    model = {} if method in WITHOUT_MODEL else {f"model.{k}": v for k, v in model_params(cfg).items()}
    return {**{f"baselines.{k}": getattr(cfg.baselines, k) for k in fields}, "evaluate.steps": cfg.evaluate.steps,
            "evaluate.score_every": cfg.evaluate.score_every, "seed": cfg.seed, **model}
