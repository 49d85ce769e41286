"""`metapeft`: run the pipeline, list its stages and cache state, open the MLflow UI."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

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
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", default="5000")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = configure()
    from flows.config import ConfigError, load_config
    from flows.plan import STAGES

    try:
        cfg = load_config(args.config, _overrides(args)) if hasattr(args, "config") else None
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
    return _run(args)


def _overrides(args) -> dict:
    budget = getattr(args, "budget_minutes", None)
    return {"meta_train": {"budget_minutes": budget}} if budget is not None else {}


def _stages(cfg, root) -> int:
    from flows.cache import StageCache
    from flows.plan import STAGES, make_plan

    plan, cache = make_plan(cfg), StageCache(root / cfg.runtime.data_dir)
    for stage in [s for s in ("task_sets", "prefix") if s in plan.keys] + list(STAGES[1:]):
        keys = plan.algorithm_keys if stage == "meta_train" else {"": plan.keys[stage]}
        for label, key in keys.items():
            name = f"{stage}[{label}]" if label else stage
            state = "cached" if cache.is_complete(stage, key) else "missing"
            print(f"{name:<24} {key}  {state}")
    return 0


def _ui(root, host: str, port: str) -> int:
    from flows.tracking import default_tracking_uri

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", default_tracking_uri(root),
           "--default-artifact-root", (root / "mlruns" / "artifacts").as_uri(),
           "--host", host, "--port", port, "--workers", "1"]
    print(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it)")
    return subprocess.call(cmd, env=env)


def _run(args) -> int:
    from flows.pipeline import MissingUpstream, meta_pipeline
    from flows.validation import ValidationFailed

    start = time.perf_counter()
    try:
        out = meta_pipeline(config_path=args.config, stages=args.stage or None, force=args.force or None,
                            overrides=_overrides(args) or None)
    except (MissingUpstream, ValidationFailed) as e:
        print(f"metapeft: {e}", file=sys.stderr)
        return 1
    hits = sum(out["hits"].values())
    print(f"\nstudy {args.config}: {len(out['hits'])} stage entries, {hits} from cache, "
          f"{time.perf_counter() - start:.1f} s; MLflow run {out['run_id']}")
    if out["results"]:
        print(out["results"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
