"""Meta-training throughput (tasks/second) of each algorithm: MetaLearner task-batched, with vmap and with a
Python loop over tasks, against learn2learn (`l2l.algorithms.MAML` for MAML and FOMAML,
`l2l.algorithms.MetaSGD`; it has no Reptile class) and a classic per-task loop written here
(torch.autograd.grad over a hand-written MLP).

`task_batched` is metapeft's fastest path here: the MLP runs all tasks of the meta-batch as one network
(per-task weights (T, out, in), batched matmuls), the loss of every task in one op, plain autograd.

Sinusoid MLP 1-40-40-1, meta-batch 25, K=10 support and 10 query points, one inner step, float32,
CPU. One meta-iteration = zero_grad + meta-gradient + Adam step (+ Meta-SGD's rate clip, for
learn2learn too); task sampling is done beforehand and not timed. All implementations run on the
same task batches, interleaved in the same process: warmup, then --repeats rounds, each timing
every implementation over --iterations meta-iterations. tasks/s is the median; a speed-up is the
ratio of medians (and, in the JSON, the median of the per-round ratios). On a shared machine a busy
neighbour hurts 2-thread vmap most: the load average at the start and end is recorded.

Before timing, every implementation's meta-gradient on the first batch, from the same initial
weights, is compared with metapeft's vmap one, in float64 and in float32; a mismatch stops the run,
and the JSON keeps the worst relative difference (max |g - g_vmap| / max |g_vmap| over the tensors).

learn2learn is optional (`bash benchmarks/install_learn2learn.sh`); without it the others run and
the JSON says why it was skipped.

    python benchmarks/throughput.py [--threads 2] [--iterations 40] [--repeats 5] [--out PATH]
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import itertools
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_json_atomic  # noqa: E402
from benchmarks.quick import cpu_model, git_state  # noqa: E402
from components.metalearners import ALGORITHMS, MetaLearner, MetaLearnerConfig
from components.models import MLP
from components.tasksets import SinusoidFamily, TaskBatch, sample_sinusoid_tasks, to_batch

SIZES = (1, 40, 40, 1)
META_BATCH = 25
INNER_STEPS = 1
FAST_LR = 0.01
META_LR = 1e-3
IMPLEMENTATIONS = ("vmap", "task_batched", "loop", "reference", "l2l")  # reference = classic per-task autograd loop
LEARNER_PATHS = {"vmap": dict(vectorize=True), "task_batched": dict(task_batched=True), "loop": dict(vectorize=False)}
L2L_CLASS = {"maml": "MAML", "fomaml": "MAML", "metasgd": "MetaSGD"}  # learn2learn has no Reptile algorithm
RTOL_64 = 1e-9  # the float64 gradient check: max |g - g_vmap| <= RTOL_64 * max |g_vmap|, per tensor
Step = Callable[[TaskBatch], None]


def sample_batches(n: int, seed: int) -> list[TaskBatch]:
    """n meta-batches of META_BATCH sinusoid tasks, float32."""
    tasks = sample_sinusoid_tasks(SinusoidFamily(k_shot=10, n_query=10), {"meta_train": n * META_BATCH}, seed)
    whole = to_batch(tasks)
    return [whole.index(slice(i * META_BATCH, (i + 1) * META_BATCH)) for i in range(n)]


def initial_model(dtype: torch.dtype) -> MLP:
    """The MLP every implementation starts from (same seed, same weights)."""
    torch.manual_seed(0)
    return MLP(SIZES).to(dtype)


def metalearner_step(algorithm: str, path: str, meta_lr: float, dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    """MetaLearner on one of LEARNER_PATHS."""
    cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=INNER_STEPS, fast_lr=FAST_LR, **LEARNER_PATHS[path])
    learner = MetaLearner(initial_model(dtype), cfg, F.mse_loss)
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


def reference_step(algorithm: str, meta_lr: float, dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    """The non-batched way: adapt one task at a time, backward each task's query loss."""
    weights = [p.detach().clone().requires_grad_() for p in initial_model(dtype).parameters()]
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


def l2l_step(algorithm: str, meta_lr: float, dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    """learn2learn's own loop (its examples/maml_sine.py): per task clone, adapt on the support, query loss;
    the mean query loss over the meta-batch, one backward, Adam. Meta-SGD's rates are clipped like metapeft's."""
    maml, meta_sgd = l2l_algorithms()
    model = initial_model(dtype)
    if algorithm == "metasgd":
        meta = meta_sgd.MetaSGD(model, lr=FAST_LR, first_order=False)
        meta_params = [*model.parameters(), *meta.lrs]  # metapeft's order: weights, then rates
    else:
        meta = maml.MAML(model, lr=FAST_LR, first_order=algorithm == "fomaml")
        meta_params = list(model.parameters())
    opt = torch.optim.Adam(meta_params, lr=meta_lr)

    def step(batch: TaskBatch) -> None:
        opt.zero_grad()
        total = 0.0
        for x_spt, y_spt, x_qry, y_qry in zip(*batch):
            learner = meta.clone()
            for _ in range(INNER_STEPS):
                learner.adapt(F.mse_loss(learner(x_spt), y_spt))
            total = total + F.mse_loss(learner(x_qry), y_qry)
        loss = total / len(batch)
        loss.backward()
        loss.item()
        opt.step()
        if algorithm == "metasgd":
            with torch.no_grad():
                for lr in meta.lrs:
                    lr.clamp_(1e-4, 1.0)

    return step, meta_params


@functools.cache  # load_l2l_maml stubs the learn2learn package; a second call cannot find its spec
def l2l_algorithms() -> tuple[types.ModuleType, types.ModuleType]:
    """learn2learn.algorithms' maml and meta_sgd modules, without the package's __init__ (gym, torchvision)."""
    from benchmarks.omniglot import load_l2l_maml
    load_l2l_maml()
    from learn2learn.algorithms import maml, meta_sgd
    return maml, meta_sgd


def l2l_missing() -> str | None:
    """Why learn2learn cannot run here, or None."""
    try:
        l2l_algorithms()
    except ImportError as err:
        return str(err)
    return None


def implementations(algorithm: str, l2l: bool) -> tuple[str, ...]:
    return tuple(i for i in IMPLEMENTATIONS if i != "l2l" or (l2l and algorithm in L2L_CLASS))


def make_step(algorithm: str, implementation: str, meta_lr: float = META_LR,
              dtype: torch.dtype = torch.float32) -> tuple[Step, list[torch.Tensor]]:
    """One meta-iteration of an implementation, and the meta-parameters it updates."""
    if implementation == "reference":
        return reference_step(algorithm, meta_lr, dtype)
    if implementation == "l2l":
        return l2l_step(algorithm, meta_lr, dtype)
    return metalearner_step(algorithm, implementation, meta_lr, dtype)


def meta_gradients(algorithm: str, impls: tuple[str, ...], batch: TaskBatch,
                   dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """Each implementation's meta-gradient on batch, from the same initial weights, in dtype."""
    batch = TaskBatch(*(t.to(dtype) for t in batch))
    grads = {}
    for impl in impls:
        step, params = make_step(algorithm, impl, meta_lr=0.0, dtype=dtype)
        step(batch)
        grads[impl] = [p.grad for p in params]
    return grads


def relative_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The worst tensor's max |got - want| / max |want|."""
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True))


def check_same_gradients(algorithm: str, impls: tuple[str, ...], batch: TaskBatch) -> dict[str, dict[str, float]]:
    """Every implementation must compute metapeft vmap's meta-gradient, or the timings compare different work.

    float64 within RTOL_64 (relative to each tensor's largest entry); float32 element-wise within rtol 1e-4,
    atol 1e-6 (Reptile's theta - phi cancels: its float32 relative error reaches 2e-4 on small entries).
    Returns the relative differences, by dtype and implementation.
    """
    diffs = {}
    for dtype in (torch.float64, torch.float32):
        grads = meta_gradients(algorithm, impls, batch, dtype)
        others = [impl for impl in impls if impl != "vmap"]
        diffs[str(dtype).removeprefix("torch.")] = {i: relative_difference(grads[i], grads["vmap"]) for i in others}
        for impl in others:
            for got, want in zip(grads[impl], grads["vmap"], strict=True):
                if dtype == torch.float64:
                    torch.testing.assert_close(got, want, rtol=0, atol=RTOL_64 * want.abs().max().item(),
                                               msg=lambda m: f"{algorithm} {impl} float64: {m}")
                else:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{algorithm} {impl} float32: {m}")
    return diffs


def time_steps(step: Step, batches: list[TaskBatch], iterations: int) -> float:
    """Tasks per second over `iterations` meta-iterations."""
    cycle = itertools.cycle(batches)
    start = time.perf_counter()
    for _ in range(iterations):
        step(next(cycle))
    return iterations * META_BATCH / (time.perf_counter() - start)


def measure(algorithm: str, impls: tuple[str, ...], batches: list[TaskBatch], args) -> dict[str, list[float]]:
    """tasks/s of each implementation, `repeats` times, interleaved so drift hits all alike."""
    steps = {impl: make_step(algorithm, impl)[0] for impl in impls}
    for step in steps.values():
        time_steps(step, batches, args.warmup)
    rates: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl, step in steps.items():
            rates[impl].append(time_steps(step, batches, args.iterations))
    return rates


def machine_info(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu_count": os.cpu_count(), "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "allocator": os.environ.get("LD_PRELOAD") or "default (glibc malloc)",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "loadavg_start": os.getloadavg()}


def ratio(rates: dict[str, list[float]], impl: str, base: str) -> tuple[float | None, float | None]:
    """(ratio of the medians, median of the per-round ratios) of impl's tasks/s over base's; None without base."""
    if base not in rates:
        return None, None
    per_round = [a / b for a, b in zip(rates[impl], rates[base], strict=True)]
    return statistics.median(rates[impl]) / statistics.median(rates[base]), statistics.median(per_round)


def speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


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
    l2l_skipped = l2l_missing()
    if l2l_skipped:
        print(f"learn2learn skipped: {l2l_skipped}")
    rows, checks = [], {}
    print(f"{'algorithm':<9} {'implementation':<14} {'tasks/s':>9} {'best':>7} {'ms/iter':>8} {'vs l2l':>8} "
          f"{'vs reference':>13}")
    for algorithm in args.algorithms:
        impls = implementations(algorithm, l2l=not l2l_skipped)
        checks[algorithm] = check_same_gradients(algorithm, impls, batches[0])
        rates = measure(algorithm, impls, batches, args)
        for impl in impls:
            median = statistics.median(rates[impl])
            vs_l2l, vs_l2l_round = ratio(rates, impl, "l2l")
            vs_ref, vs_ref_round = ratio(rates, impl, "reference")
            print(f"{algorithm:<9} {impl:<14} {median:>9.0f} {max(rates[impl]):>7.0f} "
                  f"{1e3 * META_BATCH / median:>8.2f} {speedup(vs_l2l):>8} {speedup(vs_ref):>13}")
            rows.append({"algorithm": algorithm, "implementation": impl, "tasks_per_s": median,
                         "tasks_per_s_repeats": rates[impl], "speedup_vs_l2l": vs_l2l,
                         "speedup_vs_l2l_per_round": vs_l2l_round, "speedup_vs_reference": vs_ref,
                         "speedup_vs_reference_per_round": vs_ref_round})
    machine["loadavg_end"] = os.getloadavg()  # other work on the machine skews these numbers
    print(f"load average start {machine['loadavg_start']}, end {machine['loadavg_end']}")
    write_json_atomic({
        "command": " ".join(["python benchmarks/throughput.py", *sys.argv[1:]]),
        "git": git_state("HEAD", worktree=True),
        "machine": machine,
        "settings": {"sizes": SIZES, "meta_batch": META_BATCH, "k_shot": 10, "n_query": 10,
                     "inner_steps": INNER_STEPS, "fast_lr": FAST_LR, "meta_lr": META_LR, "dtype": "float32",
                     "iterations": args.iterations, "repeats": args.repeats, "warmup": args.warmup},
        "learn2learn": {"version": None if l2l_skipped else importlib.metadata.version("learn2learn"),
                        "skipped": l2l_skipped, "classes": L2L_CLASS},
        "gradient_check": {"against": "vmap", "batch": "the first meta-batch", "bounds": {
            "float64": f"max|g - g_vmap| <= {RTOL_64:g} max|g_vmap| per tensor",
            "float32": "element-wise rtol 1e-4, atol 1e-6"},
            "measure": "max over tensors of max|g - g_vmap| / max|g_vmap|", "max_rel_diff": checks},
        "results": rows,
    }, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
