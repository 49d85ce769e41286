"""The embedded default: project-local Prefect home and MLflow store, telemetry off.

Call `configure()` before Prefect is imported; values already in the environment win, so
`PREFECT_API_URL` and `MLFLOW_TRACKING_URI` point the same code at servers.
"""
from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

# Prefect's temporary server checks its database's migrations and registers the block types at every start
# (about 0.9 s of its 3.8 s CPU start here); both are needed once per database and Prefect version
SET_UP = "metapeft-database.json"  # in PREFECT_HOME: the Prefect version that set up its default database


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


def _set_up_record() -> tuple[Path, dict] | None:
    """(PREFECT_HOME's record file, what it should hold) for the default SQLite database; None when the
    database is configured elsewhere (a server's own, or a URL)."""
    if any(os.environ.get(f"PREFECT_{part}_DATABASE_CONNECTION_URL") for part in ("SERVER", "API")):
        return None
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    return home / SET_UP, {"prefect": version("prefect"), "database": str(home / "prefect.db")}


def database_set_up() -> bool:
    """True when this Prefect version has migrated the default database, which still exists, and registered
    its block types: a temporary server may skip both (`record_database_set_up` wrote the record)."""
    found = _set_up_record()
    if found is None:
        return False
    path, expected = found
    try:
        return json.loads(path.read_text()) == expected and Path(expected["database"]).is_file()
    except (OSError, ValueError):
        return False


SET_UP_SETTINGS = {  # Prefect setting -> its environment variables (set by a user, they win)
    "server.database.migrate_on_start": ("PREFECT_SERVER_DATABASE_MIGRATE_ON_START",
                                         "PREFECT_API_DATABASE_MIGRATE_ON_START"),
    "server.register_blocks_on_start": ("PREFECT_SERVER_REGISTER_BLOCKS_ON_START",
                                        "PREFECT_API_BLOCKS_REGISTER_ON_START"),
}


def temporary_server_settings() -> dict[str, bool]:
    """Prefect settings for the temporary server this process starts (`prefect.settings.temporary_settings`
    updates): migrations and block registration off once `database_set_up`, unless set in the environment.
    Only that server gets them: a server with another database (prefect_test_harness's) still sets it up."""
    if not database_set_up():
        return {}
    return {name: False for name, env in SET_UP_SETTINGS.items() if not any(v in os.environ for v in env)}


def record_database_set_up() -> None:
    """After a temporary server started with migrations and block registration on (nothing in the environment
    turned them off): the next starts skip them. A Prefect upgrade (another version), a deleted database or a
    configured one brings them back."""
    off = any(os.environ.get(v, "").lower() in ("false", "0") for env in SET_UP_SETTINGS.values() for v in env)
    found = _set_up_record()
    if found is not None and not off and Path(found[1]["database"]).is_file():
        from components.storage import write_atomic  # components/__init__ imports torch: not at CLI start

        write_atomic(found[0], lambda tmp: tmp.write_text(json.dumps(found[1])))
