"""Meta-training throughput (tasks/second) of each algorithm: MetaLearner with and without vmap,
against a classic per-task loop written here (torch.autograd.grad over a hand-written MLP).

Sinusoid MLP 1-40-40-1, meta-batch 25, K=10 support and 10 query points, one inner step, float32,
CPU. One meta-iteration = zero_grad + meta-gradient + Adam step (+ Meta-SGD's rate clip); task
sampling is done beforehand and not timed. All implementations run interleaved in the same
process: warmup, then the median (and best) of --repeats timings of --iterations meta-iterations
each. tasks/s is the median; on a shared machine, a busy neighbour hurts 2-thread vmap most.

    python benchmarks/throughput.py [--threads 2] [--iterations 40] [--repeats 5] [--out PATH]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_json_atomic  # noqa: E402
from components.metalearners import ALGORITHMS, MetaLearner, MetaLearnerConfig
from components.models import MLP
from components.tasksets import SinusoidFamily, TaskBatch, sample_sinusoid_tasks, to_batch

SIZES = (1, 40, 40, 1)
META_BATCH = 25
INNER_STEPS = 1
FAST_LR = 0.01
META_LR = 1e-3
IMPLEMENTATIONS = ("vmap", "loop", "reference")  # reference = classic per-task autograd loop
Step = Callable[[TaskBatch], None]


def sample_batches(n: int, seed: int) -> list[TaskBatch]:
    """n meta-batches of META_BATCH sinusoid tasks, float32."""
    tasks = sample_sinusoid_tasks(SinusoidFamily(k_shot=10, n_query=10), {"meta_train": n * META_BATCH}, seed)
    whole = to_batch(tasks)
    return [whole.index(slice(i * META_BATCH, (i + 1) * META_BATCH)) for i in range(n)]


def metalearner_step(algorithm: str, vectorize: bool, meta_lr: float) -> tuple[Step, list[torch.Tensor]]:
    torch.manual_seed(0)
    cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=INNER_STEPS, fast_lr=FAST_LR, vectorize=vectorize)
    learner = MetaLearner(MLP(SIZES), cfg, F.mse_loss)
    opt = torch.optim.Adam(learner.parameters(), lr=meta_lr)

    def step(batch: TaskBatch) -> None:
        opt.zero_grad()
        learner.meta_backward(batch)
        opt.step()
        learner.clip_()

    return step, learner.parameters()


def mlp_forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ReLU MLP from [W0, b0, W1, b1, ...]; x (N, d_in) -> (N, d_out)."""
    h = x
    for i in range(0, len(weights), 2):
        h = torch.addmm(weights[i + 1], h, weights[i].T)
        if i < len(weights) - 2:
            h = torch.relu(h)
    return h


def reference_step(algorithm: str, meta_lr: float) -> tuple[Step, list[torch.Tensor]]:
    """The non-batched way: adapt one task at a time, backward each task's query loss."""
    torch.manual_seed(0)
    weights = [p.detach().clone().requires_grad_() for p in MLP(SIZES).parameters()]
    lrs = [torch.full_like(w, FAST_LR, requires_grad=algorithm == "metasgd") for w in weights]
    meta_params = weights + (lrs if algorithm == "metasgd" else [])
    opt = torch.optim.Adam(meta_params, lr=meta_lr)
    second_order = algorithm in ("maml", "metasgd")

    def step(batch: TaskBatch) -> None:
        opt.zero_grad()
        total = 0.0  # mean query loss, reported as MetaLearner.meta_backward does
        for x_spt, y_spt, x_qry, y_qry in zip(*batch):
            if algorithm == "reptile":
                total = total + reptile_task(weights, lrs, x_spt, y_spt, x_qry, y_qry, len(batch))
                continue
            fast = weights
            for _ in range(INNER_STEPS):
                grads = torch.autograd.grad(F.mse_loss(mlp_forward(fast, x_spt), y_spt), fast,
                                            create_graph=second_order)
                fast = [w - lr * g for w, lr, g in zip(fast, lrs, grads)]
            loss = F.mse_loss(mlp_forward(fast, x_qry), y_qry) / len(batch)
            loss.backward()
            total = total + loss.detach()
        total.item()
        opt.step()
        if algorithm == "metasgd":
            with torch.no_grad():
                for lr in lrs:
                    lr.clamp_(1e-4, 1.0)

    return step, meta_params


def reptile_task(weights, lrs, x_spt, y_spt, x_qry, y_qry, n_tasks: int) -> torch.Tensor:
    """Accumulate (theta - phi) / n_tasks into .grad, phi = theta after INNER_STEPS of SGD.

    Returns phi's query loss / n_tasks, the loss MetaLearner reports for Reptile.
    """
    fast = [w.detach().requires_grad_() for w in weights]
    for _ in range(INNER_STEPS):
        grads = torch.autograd.grad(F.mse_loss(mlp_forward(fast, x_spt), y_spt), fast)
        fast = [(w - lr * g).detach().requires_grad_() for w, lr, g in zip(fast, lrs, grads)]
    for w, phi in zip(weights, fast):
        delta = (w.detach() - phi.detach()) / n_tasks
        w.grad = delta if w.grad is None else w.grad + delta
    with torch.no_grad():
        return F.mse_loss(mlp_forward(fast, x_qry), y_qry) / n_tasks


def make_step(algorithm: str, implementation: str, meta_lr: float = META_LR) -> tuple[Step, list[torch.Tensor]]:
    """One meta-iteration of an implementation, and the meta-parameters it updates."""
    if implementation == "reference":
        return reference_step(algorithm, meta_lr)
    return metalearner_step(algorithm, implementation == "vmap", meta_lr)


def check_same_gradients(algorithm: str, batch: TaskBatch) -> None:
    """Every implementation must compute the same meta-gradient, or the timings compare different work."""
    grads = {}
    for impl in IMPLEMENTATIONS:
        step, params = make_step(algorithm, impl, meta_lr=0.0)
        step(batch)
        grads[impl] = [p.grad for p in params]
    for impl in IMPLEMENTATIONS[:-1]:
        for got, want in zip(grads[impl], grads["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{algorithm} {impl}: {m}")


def time_steps(step: Step, batches: list[TaskBatch], iterations: int) -> float:
    """Tasks per second over `iterations` meta-iterations."""
    cycle = itertools.cycle(batches)
    start = time.perf_counter()
    for _ in range(iterations):
        step(next(cycle))
    return iterations * META_BATCH / (time.perf_counter() - start)


def measure(algorithm: str, batches: list[TaskBatch], args) -> dict[str, list[float]]:
    """tasks/s of each implementation, `repeats` times, interleaved so drift hits all alike."""
    check_same_gradients(algorithm, batches[0])
    steps = {impl: make_step(algorithm, impl)[0] for impl in IMPLEMENTATIONS}
    for step in steps.values():
        time_steps(step, batches, args.warmup)
    rates: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
    for _ in range(args.repeats):
        for impl, step in steps.items():
            rates[impl].append(time_steps(step, batches, args.iterations))
    return rates


def machine_info(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu_count": os.cpu_count(), "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "loadavg_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=40, help="meta-iterations per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per implementation; median reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed meta-iterations first")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = sample_batches(8, seed=0)

    machine = machine_info(args.threads)
    rows = []
    print(f"{'algorithm':<9} {'implementation':<14} {'tasks/s':>9} {'best':>7} {'ms/iter':>8} {'vs reference':>13}")
    for algorithm in args.algorithms:
        rates = measure(algorithm, batches, args)
        medians = {impl: statistics.median(r) for impl, r in rates.items()}
        for impl in IMPLEMENTATIONS:
            speedup = medians[impl] / medians["reference"]
            ms = 1e3 * META_BATCH / medians[impl]
            print(f"{algorithm:<9} {impl:<14} {medians[impl]:>9.0f} {max(rates[impl]):>7.0f} {ms:>8.2f} "
                  f"{speedup:>12.2f}x")
            rows.append({"algorithm": algorithm, "implementation": impl, "tasks_per_s": medians[impl],
                         "tasks_per_s_repeats": rates[impl], "speedup_vs_reference": speedup})
    machine["loadavg_end"] = os.getloadavg()  # other work on the machine skews these numbers
    write_json_atomic({
        "machine": machine,
        "settings": {"sizes": SIZES, "meta_batch": META_BATCH, "k_shot": 10, "n_query": 10,
                     "inner_steps": INNER_STEPS, "dtype": "float32", "iterations": args.iterations,
                     "repeats": args.repeats, "warmup": args.warmup},
        "results": rows,
    }, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
