"""What Prefect, MLflow and Great Expectations cost the quick study, as a share of its cold wall time.

Two ways to compute the same study, each in a fresh subprocess on an empty project (so every stage
computes), run interleaved for --rounds rounds (the order alternates between rounds):

    pipeline  `metapeft run --config CONFIG` (in-process, `flows.cli.main`): the task sets built and validated
              by GX before the flow while the temporary Prefect server starts in a thread, then the flow:
              one task per stage and unit, MLflow parent and nested runs, the HTML report.
    bare      the same `flows.stages` calls in the same order on the same stage cache and plan keys,
              the same report; no Prefect, no MLflow, GX validation replaced by a stub. The child
              asserts that none of the three was imported.

Wall time is measured around each subprocess (interpreter start to exit, so imports and the
temporary server's start and stop count), and so is CPU time (the child and the processes it reaped,
the temporary Prefect server included): on a shared machine the wall times of two runs minutes apart
differ by more than the overhead, their CPU times much less. overhead = pipeline - bare and
share = overhead / pipeline, for each clock, on the medians over rounds. Inside each child, callables
are wrapped with timers to split the overhead: the Prefect server (import, start, stop; by CPU also
its own process), GX validation, MLflow calls (Tracker methods, `import mlflow` and the store's
creation included), imports; what is left is the Prefect engine (flow and task runs, their API calls
and log shipping) plus noise. Both sides must produce identical meta-test and baseline tables
(asserted). --iterations shortens meta-training (and is recorded); the share holds for that length.

After each round, in the pipeline's project, what a user runs next is timed as a process (AFTER_COLD):
the fully cached rerun (`metapeft run`, asserted to compute nothing; also as a share of the cold run),
`metapeft stages` and `metapeft run --dry-run`.

    python benchmarks/overhead.py [--config configs/quick.yaml] [--iterations N] [--rounds 3] [--out PATH]
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import git_state, write_json_atomic  # noqa: E402
MODES = ("pipeline", "bare")
def tracker_methods(tracker: type) -> tuple[str, ...]:
    """Every method of flows.tracking.Tracker that talks to MLflow: its public ones and __init__."""
    return ("__init__", *(name for name, value in vars(tracker).items() if callable(value) and not name.startswith("_")))
STAGE_FUNCTIONS = ("build_task_sets", "build_prefix", "build_embeddings", "train_unit", "score_unit",
                   "run_baselines", "compare")  # as flows.pipeline names them
VALIDATORS = ("validate_tasksets", "validate_omniglot", "validate_text")
FORBIDDEN_IN_BARE = ("prefect", "mlflow", "great_expectations")
COMPARED_TABLES = (("evaluate", "results"), ("baselines", "results"), ("significance", "summary"))


class Stopwatch:
    """Wall and CPU seconds spent inside wrapped callables, per bucket; a call made inside a call of the same
    bucket (Tracker.log_metrics -> log_curves) counts once. On the main thread CPU is the process's (all
    threads); on another thread (the Prefect server's start, overlapping the task sets' build) it is that
    thread's own, and its wall time goes to `<bucket>_overlapped`, outside the split of the wall overhead."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def timing(self, bucket: str) -> Iterator[None]:
        if self._depth[bucket]:
            yield
            return
        self._depth[bucket] += 1
        main = threading.current_thread() is threading.main_thread()
        cpu_clock = time.process_time if main else time.thread_time  # a thread's own CPU: it overlaps the main's
        start, cpu = time.perf_counter(), cpu_clock()
        try:
            yield
        finally:  # a background thread's wall time overlaps other work: kept apart, out of the overhead split
            self.seconds[bucket if main else f"{bucket}_overlapped"] += time.perf_counter() - start
            self.cpu_seconds[bucket] += cpu_clock() - cpu
            self._depth[bucket] -= 1

    def wrap(self, bucket: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.timing(bucket):
                return fn(*args, **kwargs)
        return timed

    def patch(self, bucket: str, owner: object, *names: str) -> None:
        """Replace owner.<name> by its timed wrapper, for each name owner has."""
        for name in names:
            if hasattr(owner, name):
                setattr(owner, name, self.wrap(bucket, getattr(owner, name)))


def summarize(rounds: list[dict[str, dict]], clock: str = "wall") -> dict:
    """Medians over rounds of both sides' times and buckets; overhead = pipeline - bare and its share.

    rounds: one {"pipeline": {"wall_s", "buckets", "cpu_s", "cpu_buckets"}, "bare": {...}} per round;
    clock "wall" or "cpu" picks which pair is read. The overhead is split into the pipeline's measured
    buckets (by CPU, the Prefect server process's own CPU time); `prefect_engine_and_rest` is the rest.
    """
    total, buckets = ("wall_s", "buckets") if clock == "wall" else ("cpu_s", "cpu_buckets")
    med = {m: statistics.median(r[m][total] for r in rounds) for m in MODES}
    bucket = lambda m, b: statistics.median(r[m][buckets].get(b, 0.0) for r in rounds)  # noqa: E731
    overhead = med["pipeline"] - med["bare"]
    server = ("import", "start", "stop") if clock == "wall" else ("import", "start", "stop", "process")
    parts = {
        "prefect_server": sum(bucket("pipeline", f"prefect_server_{b}") for b in server),
        "prefect_import": bucket("pipeline", "import") - bucket("bare", "import"),
        "gx_validation": bucket("pipeline", "gx_validation"),
        "mlflow": bucket("pipeline", "mlflow"),
    }
    parts["prefect_engine_and_rest"] = overhead - sum(parts.values())
    return {
        "total_s": med, "overhead_s": overhead, "share": overhead / med["pipeline"],
        "share_of_bare": overhead / med["bare"],  # the issue's measure: overhead against the bare stages' time
        "share_per_round": [(r["pipeline"][total] - r["bare"][total]) / r["pipeline"][total] for r in rounds],
        "overhead_parts_s": parts,
        "compute_s": {m: bucket(m, "compute") - bucket(m, "gx_validation") for m in MODES},
    }


# ---- children: one cold study each, timings to --report ----

def child(mode: str, config: str, overrides: dict, report: Path) -> None:
    watch, t0 = Stopwatch(), time.perf_counter()
    record: dict = {"mode": mode}
    atexit.register(lambda: report.write_text(json.dumps(
        {**record, "buckets": dict(watch.seconds), "cpu_buckets": dict(watch.cpu_seconds)}, indent=1)))
    (run_pipeline if mode == "pipeline" else run_bare)(watch, config, overrides, record)
    record["in_process_s"] = time.perf_counter() - t0


def _patch_common(watch: Stopwatch, callers) -> None:
    """Time the stage functions as `callers` (a module holding them by STAGE_FUNCTIONS' names) calls them."""
    from flows import report_page, validation

    watch.patch("compute", callers, *STAGE_FUNCTIONS)
    watch.patch("report", report_page, "study_report")
    watch.patch("gx_validation", validation, *VALIDATORS)


def run_pipeline(watch: Stopwatch, config: str, overrides: dict, record: dict) -> None:
    """`metapeft run --config CONFIG --set ...` as a user runs it: the task sets built and validated before
    the flow, the temporary Prefect server started meanwhile, then the flow."""
    with watch.timing("import"):
        import flows.pipeline as pipeline
        import flows.stages.task_sets as task_sets
        from flows import cli, tracking
    with watch.timing("prefect_server_import"):  # done by the client's first call anyway
        from prefect.server.api.server import SubprocessASGIServer
    watch.patch("prefect_server_start", SubprocessASGIServer, "start")
    watch.patch("prefect_server_stop", SubprocessASGIServer, "stop")  # runs at exit (atexit, before the report)
    stop = SubprocessASGIServer.stop

    def stop_counting_server_cpu(server) -> None:
        if server.server_process is not None:
            watch.cpu_seconds["prefect_server_process"] += process_cpu_seconds(server.server_process.pid)
        stop(server)

    SubprocessASGIServer.stop = stop_counting_server_cpu
    watch.patch("mlflow", tracking.Tracker, *tracker_methods(tracking.Tracker))
    _patch_common(watch, pipeline)
    watch.patch("compute", task_sets, "build_task_sets")  # the CLI's preflight imports it from there
    flow, outs = pipeline.meta_pipeline, []
    pipeline.meta_pipeline = lambda **kwargs: outs.append(flow(**kwargs)) or outs[-1]
    start = time.perf_counter()
    sets = set_args(overrides)
    assert cli.main(["run", "--config", config, *sets]) == 0, "metapeft run failed"
    record["flow_s"] = time.perf_counter() - start
    assert outs and not any(outs[0]["hits"].values()), f"not a cold run, cache hits: {outs and outs[0]['hits']}"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_bare(watch: Stopwatch, config: str, overrides: dict, record: dict) -> None:
    with watch.timing("import"):
        import types

        import torch

        from flows import validation
        from flows.cache import StageCache, write_table
        from flows.config import load_config
        from flows.environment import project_root
        from flows.plan import make_plan
        from flows.stages.baselines import run_baselines
        from flows.stages.embeddings import build_embeddings
        from flows.stages.evaluate import evaluate_unit
        from flows.stages.meta_train import train_unit
        from flows.stages.prefix import build_prefix
        from flows.stages.significance import compare
        from flows.stages.task_sets import build_task_sets
    stages = types.SimpleNamespace(build_task_sets=build_task_sets, build_prefix=build_prefix,
                                   build_embeddings=build_embeddings, train_unit=train_unit, score_unit=evaluate_unit,
                                   run_baselines=run_baselines, compare=compare)
    for name in VALIDATORS:  # GX off: the task sets are the same, only their checks are skipped
        setattr(validation, name, lambda *args, **kwargs: {"success": True, "skipped": "overhead benchmark"})
    _patch_common(watch, stages)
    start = time.perf_counter()
    cfg, root = load_config(config, overrides), project_root()
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    plan, cache = make_plan(cfg), StageCache(root / cfg.runtime.data_dir)
    bare_study(cfg, root, plan, cache, stages, write_table)
    record["flow_s"] = time.perf_counter() - start
    loaded = [m for m in FORBIDDEN_IN_BARE if m in sys.modules]
    assert not loaded, f"the bare run imported {loaded}"


def bare_study(cfg, root: Path, plan, cache, stages, write_table) -> None:
    """The pipeline's stage calls in its order, on its cache layout (flows/pipeline.py without the tasks)."""
    import pandas as pd
    import torch

    from flows import report, report_page
    from flows.cache import DIVERGED, RESULTS

    keys, family, ev, dev = plan.keys, plan.family, cfg.evaluate, torch.device("cpu")
    entry = lambda stage, key, compute: _write_entry(cache, stage, key, compute)  # noqa: E731
    entry("task_sets", keys["task_sets"], lambda out: stages.build_task_sets(family, cfg.seed, out))
    if "prefix" in keys:
        entry("prefix", keys["prefix"], lambda out: stages.build_prefix(family, out))
    tables = cache.tables(*plan.data)
    entry("embeddings", keys["embeddings"], lambda out: stages.build_embeddings(
        family, tables, tuple(cfg.embedding.metrics), cfg.embedding.n_similarity_tasks, out))
    for label in plan.units:
        key = plan.algorithm_keys[label]
        checkpoint = cache.checkpoint(plan.checkpoint_keys[label])
        entry("meta_train", key, lambda out: stages.train_unit(family, tables, plan.settings[label], dev, out,
                                                               checkpoint))
    for label, (algorithm, _) in plan.units.items():
        trained = cache.path("meta_train", plan.algorithm_keys[label])
        entry("evaluate_parts", plan.part_key(label), lambda out: stages.score_unit(
            family, tables, plan.settings[label], trained, ev.steps, ev.score_every, ev.chunk, algorithm, dev, out))

    def join_parts(out: Path) -> None:
        for table in (RESULTS, DIVERGED):
            parts = [cache.read_table("evaluate_parts", plan.part_key(label), table) for label in plan.units]
            write_table(pd.concat(parts, ignore_index=True), out, table)

    entry("evaluate", keys["evaluate"], join_parts)
    entry("baselines", keys["baselines"], lambda out: stages.run_baselines(
        family, tables, ev.steps, ev.score_every, ev.chunk, cfg.seed, dev, out))
    both = {t: pd.concat([cache.read_table(s, keys[s], t) for s in ("evaluate", "baselines")], ignore_index=True)
            for t in (RESULTS, DIVERGED)}
    sig = cfg.significance
    entry("significance", keys["significance"], lambda out: stages.compare(
        both[RESULTS], both[DIVERGED], family.metric, family.lower_is_better, sig.confidence, sig.alpha, out))
    path = cache.path("significance", keys["significance"])
    summary = pd.read_parquet(path / "summary.parquet").set_index("method")
    comparisons = pd.read_parquet(path / "comparisons.parquet")
    text = report.results_text(summary, comparisons, family.metric, family.reference, sig.alpha, sig.confidence,
                               pd.read_parquet(path / f"{DIVERGED}.parquet"))
    (root / "results.txt").write_text(text + "\n")
    report_page.study_report(cfg, cache, keys, plan.algorithm_keys, root / "reports" / "bare" / "report.html")


def _write_entry(cache, stage: str, key: str, compute: Callable[[Path], object]) -> None:
    with cache.writing(stage, key) as out:
        compute(out)


# ---- parent: rounds of both children, comparison, table, JSON ----

def project_env(project: Path) -> dict[str, str]:
    """The environment of a metapeft process in `project`: its own Prefect home and MLflow store, 1 thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}
    return env | {"METAPEFT_HOME": str(project), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def set_args(overrides: dict) -> list[str]:
    """{section: {key: value}} as `metapeft run` options: --set=section.key=<JSON, which is YAML>."""
    return [f"--set={section}.{key}={json.dumps(value)}" for section, values in overrides.items()
            for key, value in values.items()]


def run_child(mode: str, config: str, overrides: dict, workdir: Path, template: Path | None = None) -> dict:
    """One cold study in a child process, in workdir/<mode>: an empty folder, or a copy of `template` (a project
    whose Prefect database and MLflow store exist, its stage cache empty)."""
    project, report = workdir / mode, workdir / f"{mode}.json"
    if template is not None and mode == "pipeline":
        shutil.copytree(template, project)
    else:
        project.mkdir()
    env = project_env(project)
    cmd = [sys.executable, __file__, "--child", mode, "--config", config, "--overrides", json.dumps(overrides),
           "--report", str(report)]
    load, start, cpu = os.getloadavg()[0], time.perf_counter(), children_cpu_seconds()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if done.returncode:
        raise RuntimeError(f"{mode} child failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return {**json.loads(report.read_text()), "wall_s": wall, "cpu_s": cpu, "loadavg_1m_before": load,
            "loadavg_1m_after": os.getloadavg()[0], "project": project}


AFTER_COLD = {  # what a user runs next in the project the cold run left: metapeft ARGS, timed as a process
    "cached_rerun": ["run"],
    "stages": ["stages"],
    "dry_run": ["run", "--dry-run"],
}


def initialized_project(tmp: Path, config: str) -> tuple[Path, dict]:
    """A project as users have it after their first run, its stage cache then cleared (`make clean-cache`): the
    Prefect database and the MLflow store exist. Made by an untimed two-iteration run of the study; returns it
    and what creating them cost: the temporary server's start (wall s) in a new project against an existing one."""
    project = tmp / "template"
    project.mkdir()
    env = project_env(project)
    tiny = ["--set=meta_train.iterations=2", "--set=baselines.pretrain_iterations=2"]
    done = subprocess.run([str(Path(sys.executable).with_name("metapeft")), "run", "--config", config, *tiny],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"initialising the project failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    shutil.rmtree(project / "data")
    starts = {name: _server_start_s(home) for name, home in (("new", tmp / "fresh-prefect"),
                                                             ("existing", project / ".prefect"))}
    return project, {"server_start_s": starts, "first_run_extra_s": starts["new"] - starts["existing"]}


def _server_start_s(prefect_home: Path) -> float:
    """Wall seconds until the temporary Prefect server answers, in a child process, with PREFECT_HOME there."""
    code = ("import time; t = time.perf_counter(); from prefect.server.api.server import SubprocessASGIServer as S; "
            "s = S(); s.start(); print(time.perf_counter() - t); s.stop()")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def after_cold(project: Path, config: str, overrides: dict) -> dict[str, dict]:
    """Wall and CPU seconds of each AFTER_COLD command in the cold pipeline run's project; the cached rerun
    must take every entry from the cache (its summary line says so: asserted)."""
    env, sets = project_env(project), set_args(overrides)
    timings = {}
    for name, args in AFTER_COLD.items():
        cmd = [str(Path(sys.executable).with_name("metapeft")), args[0], "--config", config, *sets, *args[1:]]
        start, cpu = time.perf_counter(), children_cpu_seconds()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        timings[name] = {"wall_s": time.perf_counter() - start, "cpu_s": children_cpu_seconds() - cpu}
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        if name == "cached_rerun":
            counts = [line for line in done.stdout.splitlines() if " stage entries, " in line]
            entries, hits = (int(x.split()[0]) for x in counts[-1].split(": ", 1)[1].split(", ")[:2])
            assert hits == entries, f"the rerun computed something: {counts[-1]}"
    return timings


def summarize_after(rounds: list[dict]) -> dict:
    """Medians over rounds of the AFTER_COLD commands, the cached rerun also as a share of the cold run."""
    med = {name: {clock: statistics.median(r["after"][name][clock] for r in rounds) for clock in ("wall_s", "cpu_s")}
           for name in AFTER_COLD}
    cold = statistics.median(r["pipeline"]["wall_s"] for r in rounds)
    return {**med, "cold_run_wall_s": cold, "cached_rerun_share_of_cold": med["cached_rerun"]["wall_s"] / cold}


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children and their reaped descendants (the Prefect server)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def meta_test_tables(project: Path, config: str, overrides: dict) -> dict:
    """The meta-test results (meta-learners, baselines) and the significance summary of one child's cache."""
    from flows.cache import StageCache
    from flows.config import load_config
    from flows.plan import make_plan

    cfg = load_config(config, overrides)
    keys, cache = make_plan(cfg).keys, StageCache(project / cfg.runtime.data_dir)
    return {f"{stage}/{name}": cache.read_table(stage, keys[stage], name) for stage, name in COMPARED_TABLES}


def assert_same_results(a: dict, b: dict) -> None:
    import pandas as pd

    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def main() -> None:
    args = _parser().parse_args()
    overrides = json.loads(args.overrides) if args.overrides else {}
    if args.iterations is not None:
        overrides.setdefault("meta_train", {})["iterations"] = args.iterations
    if args.pretrain_iterations is not None:
        overrides.setdefault("baselines", {})["pretrain_iterations"] = args.pretrain_iterations
    config = str((REPO / args.config).resolve())
    if args.child:
        return child(args.child, config, overrides, Path(args.report))
    rounds = []
    with tempfile.TemporaryDirectory(prefix="metapeft-overhead-") as tmp:
        template, first_run = (None, None) if args.fresh_project else initialized_project(Path(tmp), config)
        for i in range(args.rounds):
            round_ = {}
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                workdir = Path(tmp) / f"round{i}"
                workdir.mkdir(exist_ok=True)
                side = round_[mode] = run_child(mode, config, overrides, workdir, template)
                print(f"round {i} {mode:<8} wall {side['wall_s']:7.1f} s  CPU {side['cpu_s']:7.1f} s  "
                      f"(load {side['loadavg_1m_before']:.2f})", flush=True)
            round_["after"] = after_cold(round_["pipeline"]["project"], config, overrides)
            print(f"round {i} after    " + "  ".join(f"{k} {v['wall_s']:.2f} s" for k, v in round_["after"].items()),
                  flush=True)
            tables = {m: meta_test_tables(round_[m].pop("project"), config, overrides) for m in MODES}
            assert_same_results(tables["pipeline"], tables["bare"])
            rounds.append(round_)
            result = write_result(args, overrides, rounds, tables["pipeline"]["significance/summary"], first_run)
    print(table(result))


def write_result(args, overrides: dict, rounds: list[dict], summary, first_run: dict | None) -> dict:
    """The JSON of the rounds so far (rewritten after each round: a cut-short run keeps what it measured)."""
    result = {"config": args.config, "overrides": overrides, "git": git_state(),
              "command": " ".join(["python", "benchmarks/overhead.py", *sys.argv[1:]]),
              "project": "new each round" if args.fresh_project else "first run over, stage cache cleared",
              "first_run_in_a_new_project": first_run, "wall": summarize(rounds, "wall"),
              "cpu": summarize(rounds, "cpu"), "after_cold": summarize_after(rounds), "same_meta_test_results": True,
              "meta_test_summary": json.loads(summary.to_json(orient="records")), "machine": _machine(),
              "rounds": rounds}
    write_json_atomic(result, Path(args.out))
    return result


def table(result: dict) -> str:
    wall, cpu = result["wall"], result["cpu"]
    row = lambda name, w, c: (f"{name:<30}{w:9.1f}{w / wall['total_s']['pipeline']:8.1%}"  # noqa: E731
                              f"{c:9.1f}{c / cpu['total_s']['pipeline']:8.1%}")
    lines = [f"{result['config']} overrides={result['overrides']}  rounds={len(result['rounds'])}  "
             f"project: {result['project']}  "
             f"load avg (1, 5, 15 min) at the end {result['machine']['loadavg']}, "
             f"{result['machine']['cpus']} CPUs; medians over rounds",
             f"{'':<30}{'wall s':>9}{'share':>8}{'CPU s':>9}{'share':>8}",
             row("pipeline (Prefect+MLflow+GX)", wall["total_s"]["pipeline"], cpu["total_s"]["pipeline"]),
             row("bare stages", wall["total_s"]["bare"], cpu["total_s"]["bare"]),
             row("overhead", wall["overhead_s"], cpu["overhead_s"])]
    lines += [row("  " + name, s, cpu["overhead_parts_s"][name]) for name, s in wall["overhead_parts_s"].items()]
    lines += [row(f"stage compute, {m}", wall["compute_s"][m], cpu["compute_s"][m]) for m in MODES]
    lines += [f"overhead against the bare stages: wall {wall['share_of_bare']:.1%}, CPU {cpu['share_of_bare']:.1%}"]
    lines += ["per-round share, wall: " + ", ".join(f"{s:.1%}" for s in wall["share_per_round"])
              + "; CPU: " + ", ".join(f"{s:.1%}" for s in cpu["share_per_round"]),
              "meta-test tables identical in both: yes (asserted)"]
    if first := result["first_run_in_a_new_project"]:
        lines += [f"a project's first run also creates the Prefect database: the server starts in "
                  f"{first['server_start_s']['new']:.1f} s there, {first['server_start_s']['existing']:.1f} s after"]
    after = result["after_cold"]
    lines += [f"then, in the cold run's project (median wall s): cached rerun {after['cached_rerun']['wall_s']:.2f} "
              f"({after['cached_rerun_share_of_cold']:.1%} of the cold run), stages {after['stages']['wall_s']:.2f}, "
              f"run --dry-run {after['dry_run']['wall_s']:.2f}"]
    return "\n".join(lines)


def _machine() -> dict:
    import torch

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": 1,
            "loadavg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quick.yaml")
    p.add_argument("--iterations", type=int, default=None, help="meta_train.iterations (default: the config's)")
    p.add_argument("--pretrain-iterations", type=int, default=None, help="baselines.pretrain_iterations")
    p.add_argument("--overrides", default=None, help="JSON {section: {key: value}}, as meta_pipeline takes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fresh-project", action="store_true",
                   help="each round's pipeline in a new project (its Prefect database and MLflow store created in "
                        "the round), instead of one whose first run is over and whose stage cache was cleared")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    main()
