"""The embedded default's Prefect home: a temporary server sets its database up once per Prefect version."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from flows import environment
from flows.versions import ROOT

SET_UP_VARS = [v for names in environment.SET_UP_SETTINGS.values() for v in names]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for name in [*SET_UP_VARS, "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"]:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_set_up_is_recorded_per_prefect_version_and_database(home, monkeypatch):
    assert environment.temporary_server_settings() == {}
    environment.record_database_set_up()  # no database yet: nothing was set up
    assert not (home / environment.SET_UP).exists()
    (home / "prefect.db").write_bytes(b"")
    environment.record_database_set_up()
    assert environment.temporary_server_settings() == {"server.database.migrate_on_start": False,
                                                       "server.register_blocks_on_start": False}
    record = json.loads((home / environment.SET_UP).read_text())
    (home / environment.SET_UP).write_text(json.dumps({**record, "prefect": "3.0.0"}))  # an upgrade: set up again
    assert environment.temporary_server_settings() == {}
    (home / environment.SET_UP).write_text(json.dumps(record))
    monkeypatch.setenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "true")  # the user's setting wins
    assert environment.temporary_server_settings() == {"server.database.migrate_on_start": False}
    monkeypatch.delenv("PREFECT_SERVER_REGISTER_BLOCKS_ON_START")
    (home / "prefect.db").unlink()  # a deleted database is created and migrated again
    assert environment.temporary_server_settings() == {}


def test_nothing_is_recorded_for_a_configured_database_or_when_set_up_was_off(home, monkeypatch):
    (home / "prefect.db").write_bytes(b"")
    monkeypatch.setenv("PREFECT_API_DATABASE_MIGRATE_ON_START", "false")  # this start did not migrate
    environment.record_database_set_up()
    assert not (home / environment.SET_UP).exists()
    monkeypatch.delenv("PREFECT_API_DATABASE_MIGRATE_ON_START")
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    environment.record_database_set_up()
    assert not (home / environment.SET_UP).exists()
    assert environment.temporary_server_settings() == {}


def test_the_second_temporary_server_skips_the_set_up_and_serves_flows(tmp_path):
    """Two processes start the CLI's temporary server in one project: the first migrates and records, the second
    gets migrations and block registration off (in its own environment) and still runs a flow."""
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from flows.environment import configure
        configure(Path(sys.argv[1]))
        from prefect import flow
        from prefect.server.api.server import SubprocessASGIServer
        from flows.cli import _start_prefect_server
        _start_prefect_server()()
        server = SubprocessASGIServer()
        env = dict(v.split("=", 1) for v in Path(f"/proc/{server.server_process.pid}/environ").read_text()
                   .split("\\0") if "=" in v)

        @flow
        def add(a: int) -> int:
            return a + 1

        print(json.dumps({"result": add(1), "migrate": env.get("PREFECT_SERVER_DATABASE_MIGRATE_ON_START", "").lower(),
                          "blocks": env.get("PREFECT_SERVER_REGISTER_BLOCKS_ON_START", "").lower()}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env, check=True,
                                      capture_output=True, text=True, timeout=240).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    assert runs[0] == {"result": 2, "migrate": "", "blocks": ""}
    assert runs[1] == {"result": 2, "migrate": "false", "blocks": "false"}
