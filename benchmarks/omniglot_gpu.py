"""The MAML paper's full Omniglot protocol on a GPU: four `metapeft run --config` studies, 60,000 iterations each.

    python benchmarks/omniglot_gpu.py                         # 5w1s 5w5s 20w1s 20w5s; refuses to start without CUDA
    python benchmarks/omniglot_gpu.py --settings 20w1s 20w5s --set "meta_train.algorithms=[maml]"
    python benchmarks/omniglot_gpu.py --dry-run-cpu           # the same studies on CPU: 2 iterations, tiny episodes

Settings (Finn et al. 2017, section 5.2; the configs' comments): conv4 with stride-2 convolutions and transductive
batch norm, Vinyals split with rotations, Adam meta-lr 1e-3, 60,000 meta-iterations, 600 meta-test episodes;
5-way: meta-batch 32, 1 inner step of lr 0.4 in meta-training and 3 at test; 20-way: meta-batch 16, 5 inner steps
of lr 0.1 in meta-training and at test. The studies are configs/omniglot-5w1s.yaml, -5w5s.yaml and -20w1s.yaml
(20w5s: 20w1s with k_shot 5), with every algorithm and baseline they list, and these values as `--set` overrides
(device cuda, no wall-clock budget); `--set` items given here come last and win. Every study runs in this one
process through `metapeft run` (one Prefect server), in the project at $METAPEFT_HOME or the current folder;
family.path is the configs' (relative to the current folder) unless `--data` names the Omniglot folder.

The last step's accuracy per method, with its 95% interval and the paper's MAML number beside it, goes to
`--out` (default benchmarks/results/omniglot_gpu.json; the dry run writes nothing unless given `--out`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"5w1s": "omniglot-5w1s", "5w5s": "omniglot-5w5s", "20w1s": "omniglot-20w1s", "20w5s": "omniglot-20w1s"}
SHAPES = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}  # (n_way, k_shot)
PAPER = {  # n_way -> the MAML paper's meta-batch, inner steps and rate (meta-training), test-time steps
    5: {"meta_train.meta_batch_size": 32, "meta_train.inner_steps": 1, "meta_train.fast_lr": 0.4, "evaluate.steps": 3},
    20: {"meta_train.meta_batch_size": 16, "meta_train.inner_steps": 5, "meta_train.fast_lr": 0.1,
         "evaluate.steps": 5},
}
FULL = {"runtime.device": "cuda", "meta_train.iterations": 60000, "meta_train.budget_minutes": None,
        "family.n_test_episodes": 600}
DRY = {  # every stage of every study, on CPU, in seconds: the wiring, not the numbers
    "runtime.device": "cpu", "runtime.threads": 1, "meta_train.iterations": 2, "meta_train.budget_minutes": None,
    "meta_train.meta_batch_size": 2, "meta_train.val_every": 1, "meta_train.checkpoint_every": 2,
    "family.n_query": 2, "family.n_val_episodes": 2, "family.n_test_episodes": 4, "model.hidden": 8,
    "evaluate.chunk": 4, "baselines.pretrain_iterations": 2, "baselines.pretrain_batch_size": 8,
    "embedding.n_similarity_tasks": 2,
}
OUT = ROOT / "benchmarks" / "results" / "omniglot_gpu.json"


def overrides(setting: str, dry: bool, data: Path | None) -> dict:
    """The `--set` values of one study: the paper's for its n_way, then the full protocol's or the dry run's."""
    n_way, k_shot = SHAPES[setting]
    name = f"omniglot-{setting}-{'dry' if dry else 'paper'}"
    values = {"name": name, "family.k_shot": k_shot, **PAPER[n_way], **(DRY if dry else FULL)}
    return values | ({"family.path": str(data)} if data is not None else {})


def set_items(values: dict, extra: list[str]) -> list[str]:
    """--set KEY=VALUE arguments (values as YAML: None is null), then the caller's own."""
    items = [f"{k}={'null' if v is None else v}" for k, v in values.items()] + list(extra)
    return [a for item in items for a in ("--set", item)]


def config_path(setting: str) -> str:
    return str(ROOT / "configs" / f"{CONFIGS[setting]}.yaml")


def no_cuda_message() -> str | None:
    """Why the full protocol cannot start here, or None when a CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"the full protocol ({len(SHAPES)} studies x {FULL['meta_train.iterations']:,} iterations) needs a CUDA "
            f"GPU, and torch {torch.__version__} sees none (built with CUDA {torch.version.cuda}); "
            "check the studies on CPU with --dry-run-cpu")


def run_study(setting: str, args: argparse.Namespace) -> dict:
    """One `metapeft run`; returns its exit code, wall time and the last step's summary per method."""
    from flows.cli import main as metapeft

    argv = ["run", "--config", config_path(setting), *set_items(overrides(setting, args.dry_run_cpu, args.data),
                                                                 args.set)]
    print(f"\n== {setting}: metapeft {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = metapeft(argv)
    record = {"setting": setting, "exit_code": code, "wall_seconds": round(time.perf_counter() - start, 1),
              "argv": argv}
    return record | ({"summary": summary(setting, args)} if code == 0 else {})


def summary(setting: str, args: argparse.Namespace) -> list[dict]:
    """The significance stage's summary of the study just run (mean accuracy, 95% interval, per method)."""
    import pandas as pd

    from flows.cli import parse_sets
    from flows.config import load_config
    from flows.environment import project_root
    from flows.plan import make_plan

    cfg = load_config(config_path(setting), parse_sets(tuple(set_items(
        overrides(setting, args.dry_run_cpu, args.data), args.set)[1::2])))
    entry = project_root() / cfg.runtime.data_dir / "significance" / make_plan(cfg).keys["significance"]
    return pd.read_parquet(entry / "summary.parquet").to_dict("records")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="Run every study on CPU with 2 iterations and tiny episode counts (CI).")
    p.add_argument("--data", type=Path, default=None, help="The Omniglot folder (family.path).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="More `metapeft run --set` overrides, applied last (repeatable).")
    p.add_argument("--out", type=Path, default=None, help=f"Results JSON [default: {OUT.relative_to(ROOT)}; "
                                                          "none for --dry-run-cpu].")
    args = p.parse_args(argv)
    if not args.dry_run_cpu and (why := no_cuda_message()):
        print(f"omniglot_gpu: {why}", file=sys.stderr)
        return 2
    records = [run_study(setting, args) for setting in args.settings]
    out = args.out or (None if args.dry_run_cpu else OUT)
    if out is not None:
        write_results(records, args, out)
    failed = [r["setting"] for r in records if r["exit_code"]]
    print(f"\nomniglot_gpu: {len(records) - len(failed)} of {len(records)} studies finished"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def write_results(records: list[dict], args: argparse.Namespace, out: Path) -> None:
    import torch

    from benchmarks.common import write_json_atomic
    from benchmarks.omniglot import PUBLISHED

    published = {s: {"maml_accuracy_pct": PUBLISHED[SHAPES[s]][0], "ci95_pct": PUBLISHED[SHAPES[s]][1]}
                 for s in SHAPES}
    write_json_atomic({"protocol": "dry run on CPU" if args.dry_run_cpu else "full (MAML paper)",
                       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       "published_maml": published, "studies": records}, out)


if __name__ == "__main__":
    sys.exit(main())
