"""The quick study (configs/quick.yaml), cold, through the pipeline: its table, and whether it reproduces.

Three cold runs, each `metapeft run` in its own process and its own empty project (METAPEFT_HOME): two at
runtime.threads 1 and one at 2 threads (a copy of the config with `threads: 2`; the run's keys do not
change). The first run gives the table (mean meta-test MSE, t-based CI half-width, Holm-corrected p of
the paired t-test against scratch, read from the significance entry). The evaluate and baselines results
of the other two are compared with the first's, byte for byte (the sha256 of each Parquet file) and value
for value. Writes benchmarks/results/quick.json with the commit, the machine and the load;
`benchmarks/readme_tables.py` turns it into the README's table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quick.py      # about 3 x 3 minutes on a quiet machine
    .venv/bin/python benchmarks/quick.py --iterations 20 --out /tmp/quick-smoke.json   # checks the script
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json_atomic  # noqa: E402

DRIVER = ("benchmarks/quick.py", "benchmarks/common.py")  # copied into the export: they run, not the pipeline
REFERENCE = "scratch"  # every method's p is of the paired test against it
RESULT_STAGES = ("evaluate", "baselines")  # the tables compared across runs
RUNS = (("cold-1", 1), ("cold-2", 1), ("threads-2", 2))  # (name, runtime.threads); the first gives the table
# the environment a run must not inherit: it would point the run at another project, store or server
FOREIGN = ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "METAPEFT_HOME")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def git_state(rev: str, worktree: bool) -> dict:
    """The commit, and whether the code that runs differs from it (only the working tree can)."""
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", f"{rev}^{{commit}}").strip(),
            "code": "working tree" if worktree else f"git archive {rev} (a clean export)",
            "dirty": worktree and bool(changed), "working_tree_changes": changed}


def export(commit: str, folder: Path) -> Path:
    """The commit's files in folder/tree, with this benchmark's driver files from the working tree."""
    tree = folder / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    for name in DRIVER:
        shutil.copy2(ROOT / name, tree / name)
    return tree


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}


def study_config(source: Path, folder: Path, threads: int, iterations: int | None) -> Path:
    """A copy of the config in folder with runtime.threads set (and, for a smoke run, fewer iterations)."""
    raw = yaml.safe_load(source.read_text())
    raw.setdefault("runtime", {})["threads"] = threads
    if iterations:
        raw["meta_train"].update(iterations=iterations, val_every=max(1, iterations // 2),
                                 checkpoint_every=iterations)
        raw["baselines"]["pretrain_iterations"] = iterations
    path = folder / source.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cold_run(name: str, config: Path, project: Path, threads: int) -> dict:
    """`metapeft run` in a fresh project; its significance summary and its results tables."""
    from flows.cache import RESULTS, StageCache
    from flows.config import load_config
    from flows.plan import make_plan

    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(METAPEFT_HOME=str(project), PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log, load_start, start = project / "run.log", os.getloadavg(), time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"run {name}: metapeft run exited {rc}; the end of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    cfg = load_config(config)
    plan, cache = make_plan(cfg), StageCache(project / cfg.runtime.data_dir)
    key = plan.keys["significance"]
    return {"name": name, "threads": cfg.runtime.threads, "seconds": seconds, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "keys": {s: plan.keys[s] for s in (*RESULT_STAGES, "significance")},
            "summary": cache.read_table("significance", key, "summary"),
            "comparisons": cache.read_table("significance", key, "comparisons"),
            "results": {s: cache.read_table(s, plan.keys[s], RESULTS) for s in RESULT_STAGES},
            "sha256": {s: cache.manifest(s, plan.keys[s])["files"][f"{RESULTS}.parquet"] for s in RESULT_STAGES}}


def p_vs(comparisons: pd.DataFrame, method: str, column: str) -> float | None:
    """The Holm-adjusted p of the pair (method, REFERENCE), whichever order the table holds it in."""
    pair = comparisons[((comparisons.method_a == method) & (comparisons.method_b == REFERENCE))
                       | ((comparisons.method_a == REFERENCE) & (comparisons.method_b == method))]
    return None if pair.empty else float(pair[column].iloc[0])


def summary_rows(run: dict) -> list[dict]:
    """One row per method, best first: n, mean, CI half-width, p_holm (t and Wilcoxon) against scratch."""
    return [{"method": row.method, "n": int(row.n), "mean": float(row.mean), "ci_half": float(row.ci_half),
             "p_holm_vs_scratch": p_vs(run["comparisons"], row.method, "p_ttest_holm"),
             "p_wilcoxon_holm_vs_scratch": p_vs(run["comparisons"], row.method, "p_wilcoxon_holm")}
            for row in run["summary"].itertuples()]


def value_diff(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """Rows (episode, method, steps, metric) matched, then the largest |a - b| of their values."""
    keys = [c for c in a.columns if c != "value"]
    a, b = (t.sort_values(keys, kind="stable").reset_index(drop=True) for t in (a, b))
    if len(a) != len(b) or not a[keys].equals(b[keys]):
        return {"rows_match": False, "rows": [len(a), len(b)]}
    diff = (a["value"] - b["value"]).abs()
    rel = diff / a["value"].abs().where(a["value"] != 0)
    return {"rows_match": True, "rows": len(a), "values_differing": int((diff != 0).sum()),
            "max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max(skipna=True) or 0.0)}


def compare_runs(a: dict, b: dict) -> dict:
    """Whether two runs' results tables are the same bytes, and how far apart their values are."""
    tables = {s: {"sha256": [a["sha256"][s], b["sha256"][s]], "same_bytes": a["sha256"][s] == b["sha256"][s],
                  **value_diff(a["results"][s], b["results"][s])} for s in RESULT_STAGES}
    means = a["summary"].set_index("method")["mean"] - b["summary"].set_index("method")["mean"]
    return {"runs": [a["name"], b["name"]], "threads": [a["threads"], b["threads"]],
            "bit_identical": all(t["same_bytes"] for t in tables.values()), "tables": tables,
            "max_abs_diff_of_means": float(means.abs().max()),
            "mean_diff_by_method": {m: float(d) for m, d in means.items()}}


def reduction_probe(shape: tuple[int, int] = (6000, 40)) -> dict:
    """One float32 sum() over a larger tensor than the quick study's ops, at 1 and at 2 threads: whether a
    second OpenMP thread changes the last bits of a reduction on this machine."""
    import torch

    x, before, sums = torch.rand(*shape, generator=torch.Generator().manual_seed(0)), torch.get_num_threads(), {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        sums[threads] = x.sum().item()  # a float32 value, exact as a double
    torch.set_num_threads(before)
    return {"shape": list(shape), "sum_threads_1": sums[1], "sum_threads_2": sums[2], "identical": sums[1] == sums[2]}


def print_table(rows: list[dict], repro: dict) -> None:
    print(f"\n{'method':<20} {'meta-test MSE (95% CI)':>24} {'p_holm vs scratch':>18}")
    for r in rows:
        p = "-" if r["p_holm_vs_scratch"] is None else f"{r['p_holm_vs_scratch']:.1e}"
        print(f"{r['method']:<20} {r['mean']:>14.4f} +- {r['ci_half']:.4f} {p:>18}")
    for name in ("cold_runs_threads_1", "threads_1_vs_2"):
        c = repro[name]
        print(f"{name}: bit-identical {c['bit_identical']}, "
              + ", ".join(f"{s} max |diff| {t.get('max_abs_diff')}" for s, t in c["tables"].items())
              + f", means max |diff| {c['max_abs_diff_of_means']:.2e}")


def measure(args, provenance: dict) -> None:
    source = (ROOT / args.config).resolve()
    provenance |= {"machine": machine_info(), "loadavg_start": os.getloadavg()}
    start, runs = time.perf_counter(), []
    for name, threads in RUNS:
        with tempfile.TemporaryDirectory(prefix=f"metapeft-quick-{name}-") as tmp:
            project = Path(tmp)
            run = cold_run(name, study_config(source, project, threads, args.iterations), project, threads)
        print(f"{name}: {run['seconds']:.1f} s, load {run['loadavg_start'][0]:.1f} -> {run['loadavg_end'][0]:.1f}",
              flush=True)
        runs.append(run)
    repro = {"cold_runs_threads_1": compare_runs(runs[0], runs[1]), "threads_1_vs_2": compare_runs(runs[0], runs[2]),
             "reduction_probe": reduction_probe()}
    rows = summary_rows(runs[0])
    result = {**provenance, "loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - start,
              "settings": {"config": args.config, "iterations_override": args.iterations,
                           "threads": runs[0]["threads"], "reference": REFERENCE, "metric": "mse",
                           "keys": runs[0]["keys"]},
              "summary": rows, "reproducibility": repro,
              "runs": [{k: r[k] for k in ("name", "threads", "seconds", "loadavg_start", "loadavg_end", "keys",
                                          "sha256")} | {"summary": summary_rows(r)} for r in runs]}
    write_json_atomic(result, Path(args.out))
    print_table(rows, repro)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quick.yaml")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quick.json"))
    p.add_argument("--rev", default="HEAD", help="the commit whose pipeline runs (default HEAD)")
    p.add_argument("--worktree", action="store_true", help="run the working tree as it is instead")
    p.add_argument("--iterations", type=int, default=None,
                   help="meta-train and pre-train this many iterations instead (a smoke run of the script)")
    p.add_argument("--provenance", default=None, help=argparse.SUPPRESS)  # set when re-run inside the export
    args = p.parse_args()
    if args.provenance:
        return measure(args, json.loads(Path(args.provenance).read_text()))
    command = " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", ".venv/bin/python",
                        "benchmarks/quick.py", *sys.argv[1:]])
    provenance = {"command": command, "git": git_state(args.rev, args.worktree)}
    if args.worktree:
        return measure(args, provenance)
    with tempfile.TemporaryDirectory(prefix="metapeft-quick-code-") as tmp:
        tree = export(provenance["git"]["commit"], Path(tmp))
        (Path(tmp) / "provenance.json").write_text(json.dumps(provenance))
        rerun = [sys.executable, str(tree / "benchmarks" / "quick.py"), "--config", args.config,
                 "--out", str(Path(args.out).resolve()), "--provenance", str(Path(tmp) / "provenance.json"),
                 *(["--iterations", str(args.iterations)] if args.iterations else [])]
        sys.exit(subprocess.run(rerun, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}).returncode)


if __name__ == "__main__":
    main()
