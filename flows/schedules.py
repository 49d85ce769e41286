"""The deployments that `deployments/prefect.yaml` names, served from this process (`flow.serve`).

prefect.yaml is the one place for schedules and parameters: `prefect deploy` reads it for a work pool
and worker, and `serve` reads the same entries for the no-infrastructure case, where this process polls
the Prefect server (PREFECT_API_URL) and runs each scheduled or triggered flow run itself. Each entry's
`entrypoint` (module:flow) names its flow: meta_pipeline, or transfer_study for the transfer configs.
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


def to_deployments(names: list[str] | None = None, path: Path = PREFECT_FILE) -> list:
    """RunnerDeployments of the named deployments' flows (all when names is empty)."""
    from prefect.schedules import Cron

    known = deployments(path)
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ValueError(f"{path}: no deployment named {', '.join(unknown)}; known: {', '.join(known)}")
    out = []
    for name in names or known:
        entry = known[name]
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in entry.get("schedules") or []]
        out.append(entrypoint_flow(entry["entrypoint"]).to_deployment(
            name=name, parameters=entry.get("parameters") or {}, description=entry.get("description"),
            tags=entry.get("tags"), schedules=schedules))
    return out


def serve(names: list[str] | None = None, path: Path = PREFECT_FILE) -> None:
    """Serve the named deployments (all when empty) until interrupted: the process is the worker."""
    from prefect import serve as prefect_serve

    prefect_serve(*to_deployments(names, path))
