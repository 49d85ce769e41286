"""Meta-learned LoRA on a frozen MiniLM for few-shot intent classification: CLINC150 and BANKING77.

Accuracy: each study config runs through the pipeline itself (`flows.pipeline.meta_pipeline`, cached
and tracked like any run): MAML, FOMAML, Reptile and Meta-SGD over LoRA (top layers) + head, and the
three baselines (prototypes, linear head, per-episode LoRA fine-tuning) on the same 600 meta-test
episodes; the table shows accuracy +- 95% CI and the Holm-corrected paired t-test of the best
meta-learner against each baseline.

Speed: second-order MAML meta-training episodes/s with the cached frozen prefix (only the adapted
top layers run) against running the whole backbone per episode (embeddings + frozen lower layers +
the same adapted top), each in its own subprocess (so each peak RSS is its own), timings interleaved.

    python benchmarks/text_lora.py                      # the 1-shot configs of both datasets
    python benchmarks/text_lora.py --configs clinc150-lora,clinc150-lora-5shot,banking77-lora,banking77-lora-5shot
    python benchmarks/text_lora.py --speed [--top-layers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json_atomic  # noqa: E402
from components import text  # noqa: E402
from components.episodes import class_members, episodes_from_rows, sample_rows  # noqa: E402
from components.metalearners import MetaLearner, MetaLearnerConfig  # noqa: E402

DEFAULT_CONFIGS = ("clinc150-lora", "banking77-lora")
META_LEARNERS = ("maml", "fomaml", "reptile", "metasgd")
BASELINES = ("prototypes", "linear_head", "lora_finetune")


# ---------------------------------------------------------------- accuracy through the pipeline

def accuracy(args) -> dict:
    os.environ.setdefault("METAPEFT_HOME", str(ROOT))
    from flows.cache import StageCache
    from flows.config import load_config
    from flows.environment import project_root
    from flows.pipeline import meta_pipeline
    from flows.plan import make_plan

    results = {}
    for name in args.configs:
        path = ROOT / "configs" / f"{name}.yaml"
        start = time.perf_counter()
        overrides = {"runtime": {"threads": args.threads}} if args.threads else None
        out = meta_pipeline(config_path=str(path), overrides=overrides)
        cfg = load_config(path, overrides)
        plan, cache = make_plan(cfg), StageCache(project_root() / cfg.runtime.data_dir)
        summary = cache.read_table("significance", plan.keys["significance"], "summary").set_index("method")
        comparisons = cache.read_table("significance", plan.keys["significance"], "comparisons")
        metas = [m for m in summary.index if m in META_LEARNERS]
        best = max(metas, key=lambda m: summary.loc[m, "mean"])
        tests = {b: pair(comparisons, best, b) for b in BASELINES if b in summary.index}
        iterations = {a: cache.manifest("meta_train", k)["meta"] for a, k in plan.algorithm_keys.items()}
        results[name] = {
            "config": str(path.relative_to(ROOT)), "run_id": out["run_id"], "n_way": cfg.family.n_way,
            "k_shot": cfg.family.k_shot, "dataset": cfg.family.dataset, "seconds": time.perf_counter() - start,
            "summary": summary.reset_index().to_dict("records"), "best_meta_learner": best, "best_vs": tests,
            "meta_train": {a: {k: m.get(k) for k in ("iterations_total", "stop_reason", "best_iteration", "seconds")}
                           for a, m in iterations.items()}}
        print_accuracy(name, results[name])
    return results


def pair(comparisons, a: str, b: str) -> dict:
    """a - b from the comparison table (whichever order it stores), with Holm-corrected p."""
    row = comparisons[(comparisons.method_a == a) & (comparisons.method_b == b)]
    sign = 1
    if row.empty:
        row, sign = comparisons[(comparisons.method_a == b) & (comparisons.method_b == a)], -1
    r = row.iloc[0]
    lo, hi = sorted((sign * r["ci_low"], sign * r["ci_high"]))
    return {"mean_diff": sign * float(r["mean_diff"]), "ci_low": float(lo), "ci_high": float(hi),
            "p_ttest_holm": float(r["p_ttest_holm"]), "p_wilcoxon_holm": float(r["p_wilcoxon_holm"])}


def print_accuracy(name: str, r: dict) -> None:
    print(f"\n{name}: {r['dataset']} {r['n_way']}-way {r['k_shot']}-shot, {r['summary'][0]['n']} meta-test episodes, "
          f"{r['seconds'] / 60:.1f} min")
    for row in r["summary"]:
        print(f"  {row['method']:<16} {100 * row['mean']:6.2f} +- {100 * row['ci_half']:.2f} %")
    for b, t in r["best_vs"].items():
        print(f"  {r['best_meta_learner']} - {b}: {100 * t['mean_diff']:+.2f} [{100 * t['ci_low']:+.2f}, "
              f"{100 * t['ci_high']:+.2f}] p_holm={t['p_ttest_holm']:.2g}")


# ---------------------------------------------------------------- speed: cached prefix vs whole backbone

class WholeBackbone(nn.Module):
    """The uncached reference: embeddings and frozen lower layers run for every episode, then the adapted
    top. forward(rows) looks token ids up like CachedTopEncoder looks hidden states up."""

    def __init__(self, backbone, top: text.TopEncoder, input_ids: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        n = len(backbone.encoder.layer) - top.cfg.n_layers
        self.embeddings, self.lower, self.top = backbone.embeddings, backbone.encoder.layer[:n], top
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        ids, mask = self.input_ids[rows], self.mask[rows]
        h = self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        bias = text.additive_mask(mask, h.dtype)
        for layer in self.lower:
            h = layer(h, bias)
        return self.top(h, mask)


def speed_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    utterances = text.load_clinc150(args.clinc)
    texts = utterances["text"].iloc[:args.utterances].tolist()
    labels = utterances["label"].iloc[:args.utterances].to_numpy()
    backbone, tokenizer = text.load_minilm()
    first = len(backbone.encoder.layer) - args.top_layers
    top = text.TopEncoder(backbone, text.TopEncoderConfig(n_layers=args.top_layers, n_way=args.ways, lora_r=8))
    if args.impl == "cached":
        hidden, mask = text.encode_prefix(backbone, tokenizer, texts, first, args.max_length)
        model = text.CachedTopEncoder(top, hidden.half(), mask)
    else:
        enc = tokenizer(texts, padding="longest", truncation=True, max_length=args.max_length, return_tensors="pt")
        model = WholeBackbone(backbone, top, enc["input_ids"], enc["attention_mask"].long())
    frozen = [n for n, _ in model.named_parameters() if n not in set(text.adapted_names(model))]
    learner = MetaLearner(model, MetaLearnerConfig(algorithm="maml", inner_steps=1, fast_lr=0.5, vectorize=True),
                          F.cross_entropy, adapted=text.adapted_names(model), frozen=frozen)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    members = class_members(labels, sorted(set(labels)))

    def iteration(i: int) -> None:
        rows, _ = sample_rows(members, args.ways, args.shots, args.queries, args.meta_batch, i)
        opt.zero_grad(set_to_none=True)
        learner.meta_backward(episodes_from_rows(rows, args.shots))
        opt.step()

    for i in range(2):  # warm-up
        iteration(10_000 + i)
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.iterations):
            iteration(r * args.iterations + i)
        times.append(time.perf_counter() - start)
    return {"impl": args.impl, "episodes_per_s": [args.iterations * args.meta_batch / t for t in times],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def speed(args) -> dict:
    """Both implementations, each in its own subprocess per repeat round, alternating."""
    runs = {"cached": [], "whole": []}
    peaks = {"cached": 0.0, "whole": 0.0}
    for _ in range(args.rounds):
        for impl in ("cached", "whole"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--worker-out", str(out),
                       *forwarded(args)]
                subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                r = json.loads(out.read_text())
            runs[impl] += r["episodes_per_s"]
            peaks[impl] = max(peaks[impl], r["peak_rss_mb"])
    table = {impl: {"episodes_per_s_median": statistics.median(v), "episodes_per_s": v, "peak_rss_mb": peaks[impl]}
             for impl, v in runs.items()}
    ratio = table["cached"]["episodes_per_s_median"] / table["whole"]["episodes_per_s_median"]
    print(f"\nMAML (2nd order) meta-training, {args.ways}-way {args.shots}-shot, {args.queries} queries/class, "
          f"meta-batch {args.meta_batch}, top {args.top_layers} of 6 layers adapted (LoRA r 8 + head), "
          f"{args.threads} threads")
    for impl, t in table.items():
        print(f"  {impl:<7} {t['episodes_per_s_median']:7.2f} episodes/s   peak RSS {t['peak_rss_mb']:7.0f} MB")
    print(f"  cached / whole: {ratio:.2f}x")
    return {"table": table, "ratio": ratio}


def forwarded(args) -> list[str]:
    keys = ("top_layers", "ways", "shots", "queries", "meta_batch", "iterations", "repeats", "threads",
            "utterances", "max_length", "clinc")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


# ---------------------------------------------------------------- entry point

def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="study configs under configs/")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--speed", action="store_true", help="episodes/s: cached prefix vs the whole backbone")
    p.add_argument("--top-layers", type=int, default=2)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=5, help="--speed: meta-iterations per timing")
    p.add_argument("--repeats", type=int, default=3, help="--speed: timings per subprocess")
    p.add_argument("--rounds", type=int, default=2, help="--speed: subprocess rounds, implementations alternating")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (accuracy: overrides the configs' runtime.threads; --speed default 2)")
    p.add_argument("--utterances", type=int, default=3000, help="--speed: CLINC150 utterances episodes draw from")
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--clinc", type=Path, default=ROOT.parent / "shared" / "data" / "clinc150")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if args.speed and args.threads is None:
        args.threads = 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        write_json_atomic(speed_worker(args), args.worker_out)
        return
    if args.speed:
        out = {"speed": speed(args), "machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()},
               "command": "python benchmarks/text_lora.py " + " ".join(sys.argv[1:])}
        write_json_atomic(out, args.out or ROOT / "benchmarks" / "results" / f"text-lora-speed-top{args.top_layers}.json")
        return
    out = {"accuracy": accuracy(args), "machine": machine(),
           "command": "python benchmarks/text_lora.py " + " ".join(sys.argv[1:])}
    write_json_atomic(out, args.out or ROOT / "benchmarks" / "results" / "text-lora.json")


if __name__ == "__main__":
    main()
