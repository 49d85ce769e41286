"""What every benchmark script shares: atomic result files (a crash never leaves half a JSON behind), the git
state a result records."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from components.storage import write_atomic


# Published Omniglot accuracies (%, 95% CI where the source gives one) by (n_way, k_shot), for the tables that set
# metapeft's runs beside them. Each number is quoted from the source named in OMNIGLOT_SOURCES, never from memory.
OMNIGLOT_PUBLISHED = {
    (5, 1): {"MAML": (98.7, 0.4), "MAML++": (99.47, None)},
    (5, 5): {"MAML": (99.9, 0.1), "MAML++": (99.85, None)},
    (20, 1): {"MAML": (95.8, 0.3), "MAML++": (97.65, None)},
    (20, 5): {"MAML": (98.9, 0.2), "MAML++": (99.33, None)},
}
OMNIGLOT_SOURCES = {"MAML": "Finn et al., ICML 2017, Table 1, 60,000 meta-iterations",
                    "MAML++": "Antoniou et al., ICLR 2019, as listed on Papers with Code"}


def write_json_atomic(obj: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def git_state() -> dict | None:
    """{"commit", "dirty"} of this checkout (the README's provenance line), None outside a git checkout."""
    from flows.tracking import code_commit

    found = code_commit()
    return {"commit": found[0], "dirty": found[1]} if found else None


FOREIGN = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "METAPEFT_HOME")  # never inherited
ROOT = Path(__file__).resolve().parents[1]


def metapeft(args: list[str], project: Path, log: Path) -> tuple[float, str]:
    """`metapeft run ...` in the project; (wall seconds, its MLflow run id or ""). A failure raises with its log.
    The CLI imports this checkout's code (PYTHONPATH), also when the environment's editable install is another
    checkout's: a long protocol can run from a worktree frozen at one commit, its cache keys unchanged by edits
    (run from the worktree's root, configs' relative paths resolve there: link or copy its data/ and give
    --project an absolute path)."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN} | {
        "METAPEFT_HOME": str(project), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                   os.environ.get("PYTHONPATH")]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "flows.cli", "run", *args]  # this interpreter: a worktree has no .venv
    print(f"  $ {shlex.join(['metapeft', 'run', *args])}  (log {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds, text = time.perf_counter() - start, log.read_text()
    if rc != 0:
        raise RuntimeError(f"metapeft run failed (exit {rc}) after {seconds:.0f} s; log {log}:\n{text[-3000:]}")
    found = re.findall(r"MLflow run ([0-9a-f]{32})", text)
    return seconds, found[-1] if found else ""


def machine_info(threads: int | None) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": threads, "loadavg_start": os.getloadavg()}
