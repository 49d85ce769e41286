"""The MLflow UI, the Prefect UI and the HTML report over a pipeline run, checked once in a real headless
browser (not in CI).

Starts `prefect server start --host 127.0.0.1` on a free port (its home in the project), runs a tiny
sinusoid study (tests/test_pipeline.py's TINY) against it into a temporary project (or takes --project,
an existing one: its flow runs are in its .prefect/ database), then starts `metapeft ui` on a free
loopback port, finds the runs over both REST APIs, and screenshots with Debian's `chromium`:

    experiment.png      MLflow: the experiment's runs table, the parent run expanded to its nested runs
    compare.png         MLflow: compare-runs for the nested runs (parameters and metrics side by side)
    chart.png           MLflow: the experiment page in chart mode (meta_test_mse of every run)
    run.png             MLflow: a meta-learner's run page (its parameters, input datasets, logged and
                        registered model, metrics)
    system_metrics.png  MLflow: the same run's system metrics tab (CPU, memory during meta-training)
    prefect_flow_run.png  Prefect: the study's flow run, Artifacts tab (results table, verdict, progress)
    prefect_verdict.png   Prefect: the verdict artifact (markdown: the answer and the results table)
    report.png          the study's HTML report, first screen (verdict, study summary, results)
    validation.png      the Great Expectations validation page beside it

Without chromium it stops after the REST checks, printing the URLs. Both servers are stopped at the end
(Prefect's with SIGTERM).

    python benchmarks/ui_check.py [--project DIR] [--out benchmarks/results/ui]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
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
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-port=0"]
# MLflow's browser preferences (localStorage, JSON values): the "Model training" view, and its assistant panel
# shut (on 127.0.0.1 it opens itself on the first visit and takes a third of the page)
MLFLOW_PREFERENCES = {"mlflow.workflowType_v1": "machine_learning", "mlflow.assistant.panelOpen_v1": False,
                      "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True}


def run_tiny_study(project: Path, env: dict) -> None:
    config = project / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_study()))
    subprocess.run([BIN / "metapeft", "run", "--config", str(config)], cwd=REPO, env=env, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, payload: dict | None = None) -> dict | list:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
    return json.loads(body) if body.lstrip().startswith(("{", "[")) else {"text": body}


def wait_healthy(url: str, server: subprocess.Popen, healthy: str = "OK", timeout: float = 90) -> None:
    """Until GET url answers `healthy` (MLflow's /health: OK, Prefect's /api/health: true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{server.args[:3]} exited with {server.returncode}")
        try:
            if get(url).get("text", "").strip() == healthy:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no answer {healthy!r} from {url} after {timeout} s")


@contextlib.contextmanager
def prefect_server(env: dict):
    """`prefect server start --host 127.0.0.1` on a free port; yields its API URL; SIGTERM at the end."""
    port = free_port()
    env = {**env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}  # the UI's API too
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health", server, "true", timeout=120)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(server, signal.SIGTERM)


@contextlib.contextmanager
def mlflow_ui(project: Path, env: dict):
    """`metapeft ui` on a free port over the project's store; yields its base URL."""
    port = free_port()
    server = subprocess.Popen([BIN / "metapeft", "ui", "--port", str(port)], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(f"{base}/health", server)
        assert "<title>MLflow</title>" in get(base)["text"], f"{base} does not serve MLflow's UI"
        yield base
    finally:
        stop(server, signal.SIGINT)  # its group: `metapeft ui` runs `mlflow ui` as a child (and reaps it)


def stop(server: subprocess.Popen, sig: int) -> None:
    os.killpg(server.pid, sig)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def newest_flow_run(api: str) -> tuple[dict, list[dict]]:
    """The newest meta_pipeline flow run and its artifacts, over Prefect's REST API."""
    runs = get(f"{api}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1,
                                          "flows": {"name": {"any_": ["meta_pipeline"]}}})
    assert isinstance(runs, list) and runs, f"{api}: no meta_pipeline flow run"
    artifacts = get(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    return runs[0], artifacts


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


def page_urls(base: str, experiment: str, children: dict[str, str], learner: str) -> dict[str, str]:
    """The UI's pages (hash routes of MLflow 3's JS app; compare-runs takes JSON lists of run and experiment ids);
    learner: the run id of a meta-learner's nested run."""
    as_json = lambda ids: urllib.parse.quote(json.dumps(ids, separators=(",", ":")))  # noqa: E731
    runs, experiments = as_json(sorted(children.values())), as_json([experiment])
    return {
        "experiment": f"{base}/#/experiments/{experiment}/runs",
        "compare": f"{base}/#/compare-runs?runs={runs}&experiments={experiments}",
        "chart": f"{base}/#/experiments/{experiment}/runs?compareRunsMode=CHART",
        "run": f"{base}/#/experiments/{experiment}/runs/{learner}",
        "system_metrics": f"{base}/#/experiments/{experiment}/runs/{learner}/system-metrics",
    }


def meta_learner_run(base: str, children: dict[str, str]) -> str:
    """A nested run of a meta-learner (tag metapeft.kind), the one with a registered model version first."""
    api = f"{base}/api/2.0/mlflow"
    tags = {name: {t["key"]: t["value"] for t in get(f"{api}/runs/get?run_id={run}")["run"]["data"].get("tags", [])}
            for name, run in children.items()}
    learners = sorted((name for name, t in tags.items() if t.get("metapeft.kind") == "meta_learner"),
                      key=lambda name: ("metapeft.model_version" not in tags[name], name))
    assert learners, f"no meta-learner among the nested runs {sorted(children)}"
    return children[learners[0]]


class Browser:
    """Headless Chromium driven over the DevTools protocol: open a page, wait until it shows a text, screenshot.

    The UIs are JS apps: a fixed delay either wastes time or shoots a spinner, so each page waits for what it
    must show. One profile for all pages, so preferences set on an origin (localStorage) hold for its pages."""

    def __init__(self, binary: str, size: str = "1600,1000"):
        from websockets.sync.client import connect

        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        self.process = subprocess.Popen([binary, *BROWSER_ARGS, f"--window-size={size}",
                                         f"--user-data-dir={self.profile.name}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = Path(self.profile.name) / "DevToolsActivePort", time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{binary} opened no DevTools port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        page = next(t for t in get(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page")
        self.socket, self.calls = connect(page["webSocketDebuggerUrl"], max_size=None), 0
        self.size(*map(int, size.split(",")))  # the page's viewport, whatever the window's frame takes

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive in between: skip them
            answer = json.loads(self.socket.recv(timeout=60))
            if answer.get("id") == self.calls:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, shows: str = "", act: str | None = None, then: str | None = None, timeout: float = 60,
             settle: float = 2.0) -> None:
        """Navigate to url; run the script `act` until it returns true (e.g. click_text: open a tab), if given;
        wait until the page's text contains `shows`, run the script `then` (e.g. scroll_to), wait `settle`
        seconds (charts draw)."""
        for target in ("about:blank", url):  # via a blank page: a new document even where only the #route differs
            self.evaluate("window.__left = true")  # until the new document replaces this one
            self.call("Page.navigate", url=target)
            self.wait(target, "window.__left === undefined", timeout)
        if act:
            self.wait(url, act, timeout)
        self.wait(url, f"document.body.innerText.includes({json.dumps(shows)})", timeout)
        if then:
            self.evaluate(then)
        time.sleep(settle)

    def wait(self, url: str, condition: str, timeout: float) -> None:
        check, deadline = f"document.readyState === 'complete' && ({condition})", time.monotonic() + timeout
        while not self.evaluate(check):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: still not {condition} after {timeout} s")
            time.sleep(0.5)

    def size(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def preferences(self, origin: str, values: dict) -> None:
        self.open(origin, settle=0)
        for key, value in values.items():
            self.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(value))})")

    def screenshot(self, png: Path) -> None:
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"{png} ({png.stat().st_size // 1024} KB): {self.evaluate('location.href')}")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        self.profile.cleanup()


def click_text(text: str) -> str:
    """A script for Browser.open: click the innermost element whose text is `text` (a tab); true once done."""
    return f"(() => {{ const e = {_innermost(text)}; e?.click(); return !!e; }})()"


def scroll_to(text: str) -> str:
    """A script for Browser.open: scroll the innermost element whose text is `text` to the top (also where the
    page scrolls in a panel of its own, as Prefect's does)."""
    return f"{_innermost(text)}?.scrollIntoView({{block: 'start'}})"


def _innermost(text: str) -> str:
    return f"[...document.querySelectorAll('body *')].filter(e => e.innerText?.trim() === {json.dumps(text)}).pop()"


def click_in_row(text: str) -> str:
    """A script for Browser.open: click the first icon button (MLflow's expander) in the table row showing `text`."""
    return (f"(() => {{ const r = [...document.querySelectorAll('[role=row]')].find(r => r.innerText.includes("
            f"{json.dumps(text)})); const b = r?.querySelector('button[class*=icon-only]'); b?.click(); "
            f"return !!b; }})()")


@contextlib.contextmanager
def browser_at(binary: str | None, size: str = "1600,1000"):
    """A Browser, or None without chromium (the pages are then only listed)."""
    if binary is None:
        yield None
        return
    browser = Browser(binary, size)
    try:
        yield browser
    finally:
        browser.close()


def shoot(browser: Browser | None, pages: dict[str, tuple], out: Path) -> dict[str, str]:
    """pages: name -> (url, a text the page shows once rendered[, scripts act and then]); each to out/<name>.png.
    Returns name -> url."""
    for name, (url, shows, *scripts) in pages.items():
        if browser is None:
            continue
        try:
            browser.open(url, shows, *scripts)
        except TimeoutError:  # what it showed instead, for the reader
            browser.screenshot(out / f"{name}.timeout.png")
            print(browser.evaluate("document.body.innerText")[:2000])
            raise
        browser.screenshot(out / f"{name}.png")
    return {name: url for name, (url, *_) in pages.items()}


def main() -> int:
    args = _parser().parse_args()
    out, binary = Path(args.out), next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    urls = {}
    with tempfile.TemporaryDirectory(prefix="metapeft-ui-") as tmp, browser_at(binary) as browser:
        project = Path(args.project).resolve() if args.project else Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}
        env.update(METAPEFT_HOME=str(project), OMP_NUM_THREADS="1", PREFECT_HOME=str(project / ".prefect"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
        with prefect_server(env) as api:
            if not args.project:
                run_tiny_study(project, {**env, "PREFECT_API_URL": api})
            urls |= shoot(browser, prefect_pages(api), out)
        with mlflow_ui(project, env) as base:
            parent, pages = mlflow_pages(base)
            if browser is not None:
                browser.preferences(base, MLFLOW_PREFERENCES)
            urls |= shoot(browser, pages, out)
        reports = project / "reports" / parent
        if browser is not None:
            browser.size(1280, 900)  # a laptop's first screen
        urls |= shoot(browser, {"report": ((reports / "report.html").as_uri(), "scores best"),
                                "validation": ((reports / "validation.html").as_uri(), "expectations")}, out)
    if binary is None:
        print("no chromium on PATH: no screenshots. Pages:")
        print("\n".join(f"  {name}: {url}" for name, url in urls.items()))
        return 2
    return 0


def prefect_pages(api: str) -> dict[str, tuple]:
    """The newest flow run's Artifacts tab (scrolled to the verdict) and its verdict artifact, for shoot."""
    flow_run, artifacts = newest_flow_run(api)
    print(f"Prefect flow run {flow_run['name']} {flow_run['id']} ({flow_run['state_name']}), artifacts: "
          + ", ".join(f"{a['type']}:{a.get('key') or '-'}" for a in artifacts))
    assert {"table", "markdown", "progress"} <= {a["type"] for a in artifacts}, artifacts
    verdict, ui = next(a for a in artifacts if a["type"] == "markdown"), api.removesuffix("/api")
    return {"prefect_flow_run": (f"{ui}/runs/flow-run/{flow_run['id']}", verdict["key"], click_text("Artifacts"),
                                 scroll_to("Artifacts")),  # the tab bar on top, every artifact's card below
            "prefect_verdict": (f"{ui}/artifacts/artifact/{verdict['id']}", "is best")}


def mlflow_pages(base: str) -> tuple[str, dict[str, tuple]]:
    """The newest parent run's id and the MLflow pages to shoot, each with what it shows once rendered."""
    experiment, parent, children = find_runs(base)
    print(f"parent run {parent['info']['run_name']} {parent['info']['run_id']} ({parent['info']['status']}), "
          f"nested: {', '.join(sorted(children))}")
    waits = {"experiment": ("scratch", click_in_row(parent["info"]["run_name"])), "compare": ("scratch",),
             "chart": ("meta_test_mse",), "run": ("Registered models",), "system_metrics": ("cpu_utilization",)}
    urls = page_urls(base, experiment, children, meta_learner_run(base, children))
    return parent["info"]["run_id"], {name: (url, *waits[name]) for name, url in urls.items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", default=None, help="an existing project (METAPEFT_HOME) instead of a tiny run")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ui"))
    return p


if __name__ == "__main__":
    sys.exit(main())
