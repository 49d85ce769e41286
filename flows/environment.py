"""The embedded default: project-local Prefect home and MLflow store, telemetry off.

Call `configure()` before Prefect is imported; values already in the environment win, so
`PREFECT_API_URL` and `MLFLOW_TRACKING_URI` point the same code at servers.
"""
from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """$METAPEFT_HOME, else the current directory: where data/, mlruns/ and .prefect/ live."""
    return Path(os.environ.get("METAPEFT_HOME") or Path.cwd()).resolve()


def enter_project() -> dict[str, str]:
    """A Prefect pull step (deployments/prefect.yaml): change into $METAPEFT_HOME, read on the worker when the
    flow run starts. Prefect's own `{{ $NAME }}` placeholders are filled in by `prefect deploy`, which would
    bake the deploying machine's folder into every deployment."""
    root = os.environ.get("METAPEFT_HOME")
    if not root or not Path(root).is_dir():
        raise RuntimeError(f"METAPEFT_HOME: set it to the project root where the Prefect worker starts "
                           f"(the flow runs there); got {root!r}")
    os.chdir(root)
    return {"directory": str(Path(root).resolve())}


def configure(root: Path | None = None) -> Path:
    root = root or project_root()
    defaults = {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",  # MLflow accepts only "true"
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per model file logged, in every flow log
        "GX_ANALYTICS_ENABLED": "false",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    return root
