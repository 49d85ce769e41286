"""The deployments that `deployments/prefect.yaml` names, served from this process (`flow.serve`).

prefect.yaml is the one place for schedules and parameters: `prefect deploy` reads it for a work pool
and worker, and `serve` reads the same entries for the no-infrastructure case, where this process polls
the Prefect server (PREFECT_API_URL, which must be set and answer: `server_url`) and runs each scheduled or
triggered flow run itself. Each entry's `entrypoint` (module:flow) names its flow: meta_pipeline, or
transfer_study for the transfer configs.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import yaml

PREFECT_FILE = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


def deployments(path: Path = PREFECT_FILE) -> dict[str, dict]:
    """name -> {parameters, schedules, description, tags} of every deployment in a prefect.yaml."""
    entries = (yaml.safe_load(Path(path).read_text()) or {}).get("deployments") or []
    if not entries:
        raise ValueError(f"{path}: no deployments")
    return {d["name"]: d for d in entries}


def entrypoint_flow(entrypoint: str):
    """The flow an entry's `module:flow` entrypoint names."""
    module, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(module), name)


def chosen(names: list[str] | None = None, path: Path = PREFECT_FILE) -> dict[str, dict]:
    """The named entries of a prefect.yaml (all when names is empty); ValueError names an unknown one."""
    known = deployments(path)
    if unknown := sorted(set(names or ()) - set(known)):
        raise ValueError(f"{path}: no deployment named {', '.join(unknown)}; known: {', '.join(known)}")
    return {name: known[name] for name in names or known}


def to_deployments(names: list[str] | None = None, path: Path = PREFECT_FILE) -> list:
    """RunnerDeployments of the named deployments' flows (all when names is empty)."""
    from prefect.schedules import Cron

    out = []
    for name, entry in chosen(names, path).items():
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in entry.get("schedules") or []]
        out.append(entrypoint_flow(entry["entrypoint"]).to_deployment(
            name=name, parameters=entry.get("parameters") or {}, description=entry.get("description"),
            tags=entry.get("tags"), schedules=schedules))
    return out


def serve(names: list[str] | None = None, path: Path = PREFECT_FILE) -> None:
    """Serve the named deployments (all when empty) until interrupted: the process is the worker.

    Checked before anything starts: the file and names (ValueError), and the server (`server_url`)."""
    from prefect import serve as prefect_serve

    chosen(names, path)
    server_url()
    prefect_serve(*to_deployments(names, path))


_START = "start one with `prefect server start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api"


def server_url() -> str:
    """PREFECT_API_URL, once the Prefect server there answers its health check.

    ValueError when it is unset: Prefect would serve against a temporary server of this process, whose runs
    nothing outside it can trigger. ConnectionError when no server answers there.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if not (url := PREFECT_API_URL.value()):
        raise ValueError(f"PREFECT_API_URL is not set: serving needs a Prefect server to take runs from; {_START}")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConnectionError(f"PREFECT_API_URL={url}: no Prefect server answers there ({reason}); {_START}")
    return url
