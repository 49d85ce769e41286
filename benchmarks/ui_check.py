"""The MLflow UI over a pipeline run, checked once in a real headless browser (not in CI).

Runs a tiny sinusoid study (tests/test_pipeline.py's TINY) into a temporary project (or takes
--project, an existing one), starts `metapeft ui` on a free loopback port, finds the parent run and
its nested runs over MLflow's REST API, and screenshots with Debian's `chromium`:

    experiment.png  the experiment's runs table, the parent run expanded to its nested runs
    compare.png     MLflow's compare-runs page for the nested runs (parameters and metrics side by side)
    chart.png       the experiment page in chart mode (meta_test_mse of every run)

Without chromium it stops after the REST check, printing the URLs. The UI server is stopped at the end.

    python benchmarks/ui_check.py [--project DIR] [--out benchmarks/results/ui]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny_study() -> dict:
    """tests/test_pipeline.py's TINY study (over configs/quick.yaml's defaults), read from there: one copy."""
    spec = importlib.util.spec_from_file_location("test_pipeline", REPO / "tests" / "test_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TINY


SERVER_VARIABLES = ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")  # the project's own stores
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000",
                "--virtual-time-budget=15000"]  # the UI is a JS app: let it fetch and render before the shot


def run_tiny_study(project: Path, env: dict) -> None:
    config = project / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_study()))
    subprocess.run([BIN / "metapeft", "run", "--config", str(config)], cwd=REPO, env=env, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
    return json.loads(body) if body.lstrip().startswith("{") else {"text": body}


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"metapeft ui exited with {server.returncode}")
        try:
            if get(f"{base}/health").get("text", "").strip() == "OK":
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no MLflow UI at {base} after {timeout} s")


def find_runs(base: str) -> tuple[str, dict, dict[str, str]]:
    """The experiment id, the newest parent run and its nested runs (name -> id), over the REST API."""
    api = f"{base}/api/2.0/mlflow"
    experiment = get(f"{api}/experiments/get-by-name?experiment_name=metapeft")["experiment"]["experiment_id"]
    runs = get(f"{api}/runs/search", {"experiment_ids": [experiment], "max_results": 100})["runs"]
    tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}  # noqa: E731
    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    parent = max(parents, key=lambda r: r["info"]["start_time"])
    children = {r["info"]["run_name"]: r["info"]["run_id"] for r in runs
                if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]}
    assert children, f"parent run {parent['info']['run_id']} has no nested runs"
    return experiment, parent, children


def page_urls(base: str, experiment: str, children: dict[str, str]) -> dict[str, str]:
    """The UI's pages (hash routes of MLflow 3's JS app; compare-runs takes JSON lists of run and experiment ids)."""
    as_json = lambda ids: urllib.parse.quote(json.dumps(ids, separators=(",", ":")))  # noqa: E731
    runs, experiments = as_json(sorted(children.values())), as_json([experiment])
    return {
        "experiment": f"{base}/#/experiments/{experiment}/runs",
        "compare": f"{base}/#/compare-runs?runs={runs}&experiments={experiments}",
        "chart": f"{base}/#/experiments/{experiment}/runs?compareRunsMode=CHART",
    }


def screenshot(browser: str, url: str, png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run([browser, *BROWSER_ARGS, f"--user-data-dir={profile}", f"--screenshot={png}", url],
                       check=True, capture_output=True, timeout=120)
    print(f"{png} ({png.stat().st_size // 1024} KB): {url}")


def main() -> int:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="metapeft-ui-") as tmp:
        project = Path(args.project).resolve() if args.project else Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}
        env.update(METAPEFT_HOME=str(project), OMP_NUM_THREADS="1")
        if not args.project:
            run_tiny_study(project, env)
        port = free_port()
        server = subprocess.Popen([BIN / "metapeft", "ui", "--port", str(port)], cwd=project, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, server)
            assert "<title>MLflow</title>" in get(base)["text"], f"{base} does not serve MLflow's UI"
            experiment, parent, children = find_runs(base)
            print(f"parent run {parent['info']['run_name']} {parent['info']['run_id']} "
                  f"({parent['info']['status']}), nested: {', '.join(sorted(children))}")
            urls = page_urls(base, experiment, children)
            browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
            if browser is None:
                print("no chromium on PATH: no screenshots. Pages:")
                print("\n".join(f"  {name}: {url}" for name, url in urls.items()))
                return 2
            for name, url in urls.items():
                screenshot(browser, url, Path(args.out) / f"{name}.png")
        finally:
            os.killpg(server.pid, signal.SIGINT)  # its group: `metapeft ui` runs `mlflow ui` as a child (and reaps it)
            server.wait(timeout=30)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", default=None, help="an existing project (METAPEFT_HOME) instead of a tiny run")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ui"))
    return p


if __name__ == "__main__":
    sys.exit(main())
