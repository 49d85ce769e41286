"""Task2Vec seconds per task: per-example gradients by vmap against a per-example Python loop, by probe size.

Conv4 probe (components/conv4.py, batch norm frozen at the support statistics) on Omniglot-sized random
5-way 5-shot support sets (25 images, 1 x 28 x 28), hidden 16 / 32 / 64 filters, float32, CPU. Per task:
fit the head (L-BFGS), draw n_samples labels per example from the model (the true Fisher), then the
diagonal Fisher of the probe's weights. The Fisher step is timed two ways on the same labels:
  vmap  `fisher_diagonal`: vmap over examples, one forward each, vmap over the labels' vjp cotangents;
  loop  one forward per example, one torch.autograd.grad per (example, label), squared and summed in Python.
Both give the same Fisher (max relative difference printed). "task2vec s" is the whole `task2vec` call.
Every number is the median of --repeats timings after one untimed warm-up call; all run in one process.

    python benchmarks/task2vec.py [--threads 2] [--repeats 5] [--hidden 16 32 64] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_json_atomic  # noqa: E402
from components.conv4 import Conv4, Conv4Config  # noqa: E402
from components.task2vec import (Task2VecConfig, conv4_probe, fisher_diagonal, fisher_labels, fit_head, predictive,
                                 task2vec)

N_WAY, K_SHOT, SIDE = 5, 5, 28


def loop_fisher(probe, head, x, labels, weights) -> dict[str, torch.Tensor]:
    """The Fisher diagonal one example and one label at a time: what vmap replaces."""
    params = {k: v.clone().requires_grad_() for k, v in probe.params.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(x.shape[0]):
        log_p = F.log_softmax(probe.features(params, x[i:i + 1]) @ head[0].T + head[1], -1)[0]
        for s in range(labels.shape[1]):
            grads = torch.autograd.grad(log_p[labels[i, s]], list(params.values()), retain_graph=True)
            for k, g in zip(params, grads):
                total[k] += weights[i, s] * g.square()
    return {k: v / x.shape[0] for k, v in total.items()}


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: vmap tracing, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(hidden: int, cfg: Task2VecConfig, repeats: int) -> dict:
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY, hidden=hidden))
    x, y = torch.rand(N_WAY * K_SHOT, 1, SIDE, SIDE), torch.arange(N_WAY).repeat(K_SHOT)
    probe = conv4_probe(model, x)
    head = fit_head(probe.features(probe.params, x), y, N_WAY, cfg.head_l2, cfg.head_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    labels, weights = fisher_labels(predictive(probe, head, x), y, cfg.labels, cfg.n_samples, gen)
    by_vmap, by_loop = (fisher_diagonal(probe, head, x, labels, weights), loop_fisher(probe, head, x, labels, weights))
    rel_err = max(((by_vmap[k] - by_loop[k]).abs().max() / by_loop[k].abs().max()).item() for k in by_loop)
    vmap_s, vmap_all = median_seconds(lambda: fisher_diagonal(probe, head, x, labels, weights), repeats)
    loop_s, loop_all = median_seconds(lambda: loop_fisher(probe, head, x, labels, weights), repeats)
    task_s, task_all = median_seconds(lambda: task2vec(probe, x, y, N_WAY, cfg), repeats)
    return {"hidden": hidden, "probe_params": sum(p.numel() for p in probe.params.values()),
            "embedding_dim": len(task2vec(probe, x, y, N_WAY, cfg)), "task2vec_s": task_s, "vmap_s": vmap_s,
            "loop_s": loop_s, "speedup": loop_s / vmap_s, "max_rel_diff": rel_err,
            "task2vec_s_repeats": task_all, "vmap_s_repeats": vmap_all, "loop_s_repeats": loop_all}


def machine_info(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement; median reported")
    parser.add_argument("--hidden", type=int, nargs="+", default=[16, 32, 64], help="Conv4 filters per layer")
    parser.add_argument("--n-samples", type=int, default=Task2VecConfig().n_samples, help="labels per example")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/task2vec.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Task2VecConfig(n_samples=args.n_samples)
    machine = machine_info(args.threads)
    print(f"{'hidden':>6} {'params':>8} {'embed':>6} {'task2vec s':>11} {'vmap s':>8} {'loop s':>8} "
          f"{'speedup':>8} {'max rel diff':>13}")
    rows = []
    for hidden in args.hidden:
        r = measure(hidden, cfg, args.repeats)
        rows.append(r)
        print(f"{r['hidden']:>6} {r['probe_params']:>8} {r['embedding_dim']:>6} {r['task2vec_s']:>11.3f} "
              f"{r['vmap_s']:>8.3f} {r['loop_s']:>8.3f} {r['speedup']:>7.1f}x {r['max_rel_diff']:>13.1e}")
    params, seconds = (np.log([r[k] for r in rows]) for k in ("probe_params", "task2vec_s"))
    exponent = float(np.polyfit(params, seconds, 1)[0]) if len(rows) > 1 else float("nan")
    print(f"task2vec seconds grow as probe_params^{exponent:.2f} over this range")
    machine["loadavg_end"] = os.getloadavg()  # other work on the machine skews these numbers
    write_json_atomic({
        "machine": machine,
        "settings": {"n_way": N_WAY, "k_shot": K_SHOT, "image": [1, SIDE, SIDE], "dtype": "float32",
                     "labels": cfg.labels, "n_samples": cfg.n_samples, "head_steps": cfg.head_steps,
                     "repeats": args.repeats},
        "results": rows,
        "time_exponent_in_params": exponent,
    }, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
