"""`metapeft`: run the pipeline, list its stages and cache state, open the MLflow UI, rewrite a report."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from flows.environment import configure

DEFAULT_CONFIG = "configs/quick.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metapeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (or only some stages, inputs from the cache)")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    run.add_argument("--stage", nargs="+", default=[], metavar="NAME", help="run only these stages")
    run.add_argument("--force", nargs="+", default=[], metavar="NAME", help="recompute these stages even if cached")
    run.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                     help="stop each algorithm's meta-training after M minutes (overrides meta_train.budget_minutes)")
    stages = sub.add_parser("stages", help="print each stage, its cache key and whether it is cached")
    stages.add_argument("--config", default=DEFAULT_CONFIG)
    ui = sub.add_parser("ui", help="start the MLflow UI over the project's store")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    ui.add_argument("--port", default="5000")
    serve = sub.add_parser("serve", help="serve the deployments of deployments/prefect.yaml from this process "
                                         "(needs a Prefect server: PREFECT_API_URL)")
    serve.add_argument("names", nargs="*", metavar="NAME", help="deployments to serve (default: all)")
    serve.add_argument("--prefect-file", default=None, metavar="PATH", help="default: deployments/prefect.yaml")
    report = sub.add_parser("report", help="rewrite a run's HTML report from the cache (and log it to the run)")
    report.add_argument("run_id", nargs="?", default=None, metavar="RUN_ID",
                        help="the pipeline's MLflow parent run (default: the --config study, logged nowhere)")
    report.add_argument("--config", dest="report_config", default=None, metavar="CONFIG",
                        help=f"the study config (default: the run's own, or {DEFAULT_CONFIG})")
    report.add_argument("--out", default=None, help="the HTML file (default: reports/RUN_ID/report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = configure()
    from flows.config import ConfigError, load_config
    from flows.plan import STAGES

    try:
        cfg = load_config(args.config, _overrides(args)) if hasattr(args, "config") else None
        if args.command == "run" and cfg.transfer is not None:  # a transfer study: flows/transfer.py
            return _transfer(args)
        for name in getattr(args, "stage", []) + getattr(args, "force", []):
            if name not in STAGES:
                raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    except ConfigError as e:
        print(f"metapeft: {e}", file=sys.stderr)
        return 2
    if args.command == "stages":
        return _stages(cfg, root)
    if args.command == "ui":
        return _ui(root, args.host, args.port)
    if args.command == "report":
        return _report(args, root)
    if args.command == "serve":
        return _serve(args)
    return _run(args)


def _overrides(args) -> dict:
    budget = getattr(args, "budget_minutes", None)
    return {"meta_train": {"budget_minutes": budget}} if budget is not None else {}


def _stages(cfg, root) -> int:
    """Each entry's key and state: cached, missing, stale (an entry it reads changed since), or for the
    task sets, stale because an input file changed since an entry of the same settings was built."""
    from flows.cache import StageCache
    from flows.plan import STAGES, make_plan

    data_dir = root / cfg.runtime.data_dir
    plan, cache = make_plan(cfg, data_dir / "inputs.json"), StageCache(data_dir)
    for stage in [s for s in ("task_sets", "prefix") if s in plan.keys] + list(STAGES[1:]):
        keys = plan.algorithm_keys if stage == "meta_train" else {"": plan.keys[stage]}
        for label, key in keys.items():
            name = f"{stage}[{label}]" if label else stage
            state = plan.status(cache, stage, key)
            if state == "missing" and stage in ("task_sets", "prefix"):
                state = _changed_inputs(cache, stage, key, plan) or state
            elif state == "cached" and stage == "meta_train" and \
                    cache.manifest(stage, key)["meta"].get("stop_reason") == "budget":
                meta = cache.manifest(stage, key)["meta"]
                state = f"cached, unfinished (budget at iteration {meta.get('iterations_total')}; a rerun continues)"
            print(f"{name:<28} {key}  {state}")
    return 0


def _changed_inputs(cache, stage: str, key: str, plan) -> str | None:
    """'stale (...)' naming the input files that differ from an entry of the same stage built with the same
    settings, if there is one."""
    for manifest in (cache.manifest(stage, p.name) for p in sorted((cache.root / stage).glob("[!.]*"))):
        inputs = (manifest or {}).get("meta", {}).get("inputs")
        if manifest and manifest["meta"].get("settings") == plan.settings_key(stage) and inputs:
            changed = sorted(Path(p).name for p, sha in plan.inputs.items() if inputs.get(p) != sha)
            if changed:
                return f"stale (input changed since entry {manifest['key']}: {', '.join(changed)})"
    return None


def _ui(root, host: str, port: str) -> int:
    from flows.tracking import default_tracking_uri

    uri = default_tracking_uri(root)
    if uri.startswith(("http://", "https://")):  # MLFLOW_TRACKING_URI names a tracking server: it is the UI
        print(f"MLflow UI: {uri} (MLFLOW_TRACKING_URI is a tracking server; nothing to start)")
        return 0
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--default-artifact-root", (root / "mlruns" / "artifacts").as_uri(),
           "--host", host, "--port", port, "--workers", "1"]
    print(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it)")
    return subprocess.call(cmd, env=env)


def _serve(args) -> int:
    from flows.schedules import PREFECT_FILE, serve

    try:
        serve(args.names, Path(args.prefect_file) if args.prefect_file else PREFECT_FILE)
    except (ValueError, FileNotFoundError) as e:
        print(f"metapeft: {e}", file=sys.stderr)
        return 2
    return 0


def _report(args, root) -> int:
    from flows.cache import StageCache
    from flows.config import ConfigError
    from flows.report_page import study_report

    try:
        cfg, keys, algorithm_keys = _run_keys(root, args.run_id, args.report_config)
    except (ConfigError, LookupError) as e:
        print(f"metapeft: {e}", file=sys.stderr)
        return 2
    cache = StageCache(root / cfg.runtime.data_dir)
    if not cache.is_complete("significance", keys["significance"]):
        print(f"metapeft: no cached significance entry {keys['significance']} for study {cfg.name!r}; "
              f"run the pipeline first", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else root / "reports" / (args.run_id or cfg.name) / "report.html"
    study_report(cfg, cache, keys, algorithm_keys, out, args.run_id)
    if args.run_id:
        _client(root).log_artifact(args.run_id, str(out))
    print(out)
    return 0


def _run_keys(root, run_id: str | None, config: str | None):
    """(config, stage keys, algorithm keys) of an MLflow parent run (from its tags), or of a config file."""
    from flows.config import load_config
    from flows.plan import make_plan

    if run_id is None:
        plan = make_plan(cfg := load_config(config or DEFAULT_CONFIG))
        return cfg, plan.keys, plan.algorithm_keys
    client = _client(root)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # MlflowException: unknown run id
        raise LookupError(f"MLflow run {run_id}: {e}") from None
    tags = run.data.tags
    if "metapeft.key.significance" not in tags:
        raise LookupError(f"MLflow run {run_id} is not a metapeft pipeline run (no metapeft.key.* tags)")
    keys = {k.removeprefix("metapeft.key."): v for k, v in tags.items() if k.startswith("metapeft.key.")}
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    algorithm_keys = {c.info.run_name: c.data.tags["metapeft.meta_train_key"] for c in children
                      if "metapeft.meta_train_key" in c.data.tags}
    return load_config(config or tags["metapeft.config"]), keys, algorithm_keys


def _client(root):
    from mlflow.tracking import MlflowClient

    from flows.tracking import default_tracking_uri

    return MlflowClient(tracking_uri=default_tracking_uri(root))


def preflight(cfg, root: Path, force: set[str]) -> str | None:
    """What needs only the config and the data, before Prefect starts (tens of seconds here): the input files
    are read (a missing one is named), and the task sets are built and validated into the cache, where the
    flow then finds them. Returns the task sets' key, or None when --force task_sets leaves them to the flow."""
    from flows.cache import StageCache
    from flows.plan import make_plan, provenance
    from flows.stages.task_sets import build_task_sets

    data = root / cfg.runtime.data_dir
    plan, cache = make_plan(cfg, data / "inputs.json"), StageCache(data)
    key = plan.keys["task_sets"]
    if "task_sets" in force:
        return None
    with cache.lock("task_sets", key):
        if not cache.is_complete("task_sets", key):
            print(f"task sets [{key}]: building and validating before the flow starts", file=sys.stderr)
            start, meta = time.perf_counter(), {}
            with cache.writing("task_sets", key, meta) as out:
                meta.update(build_task_sets(plan.family, cfg.seed, out) | provenance(plan, "task_sets"))
                meta["seconds"] = round(time.perf_counter() - start, 3)
    return key


def _run(args) -> int:
    from flows.cache import CacheWriteError
    from flows.config import load_config
    from flows.validation import ValidationFailed

    start = time.perf_counter()
    try:
        if not args.stage:  # a stage run alone takes its inputs from the cache: nothing to build early
            preflight(load_config(args.config, _overrides(args)), configure(), set(args.force))
    except FileNotFoundError as e:
        print(f"metapeft: {e} (family.path in {args.config})", file=sys.stderr)
        return 1
    except (ValidationFailed, CacheWriteError, ValueError) as e:
        print(f"metapeft: {e}", file=sys.stderr)
        return 1
    from flows.pipeline import MissingUpstream, meta_pipeline

    try:
        out = meta_pipeline(config_path=args.config, stages=args.stage or None, force=args.force or None,
                            overrides=_overrides(args) or None)
    except (MissingUpstream, ValidationFailed, CacheWriteError) as e:
        print(f"metapeft: {e}", file=sys.stderr)
        return 1
    hits = sum(out["hits"].values())
    print(f"\nstudy {args.config}: {len(out['hits'])} stage entries, {hits} from cache, "
          f"{time.perf_counter() - start:.1f} s; MLflow run {out['run_id']}")
    if out["results"]:
        print(out["results"])
    return 0


def _transfer(args) -> int:
    """The transfer study (a config with a `transfer:` section); --force takes its stage names."""
    from flows.config import ConfigError
    from flows.transfer_stages import STAGES

    if args.stage:
        raise ConfigError("--stage: a transfer study runs whole; use --force to recompute a stage")
    if unknown := sorted(set(args.force) - set(STAGES)):
        raise ConfigError(f"--force: unknown transfer stage(s) {unknown}; stages are {', '.join(STAGES)}")
    from flows.transfer import transfer_study

    start = time.perf_counter()
    out = transfer_study(config_path=args.config, force=args.force or None)
    print(f"\ntransfer study {args.config}: {len(out['hits'])} stage entries, {sum(out['hits'].values())} from "
          f"cache, {time.perf_counter() - start:.1f} s; MLflow run {out['run_id']}\n{out['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
