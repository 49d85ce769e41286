"""Task2Vec's Fisher step, six ways side by side: a per-example loop, vmap, unfolded convolutions, BackPACK, Opacus.

Conv4 probe (components/conv4.py, batch norm frozen at the support statistics) on Omniglot-sized random
5-way 5-shot support sets (25 images, 1 x 28 x 28), hidden 16 / 32 / 64 filters, CPU. Per task: fit the head
(L-BFGS), draw n_samples labels per example from the model (the true Fisher), then the diagonal Fisher of the
probe's weights, F = (1/B) Σ_i (1/S) Σ_s (∂ log p(y_is | x_i))². Timed on the same labels, in float32:
  loop          one forward per example, one torch.autograd.grad per (example, label), squared in Python.
  vmap          `fisher_diagonal(method="vmap")`: vmap over examples of a vjp, vmapped over the labels.
  unfold        `fisher_diagonal(method="unfold")`, what `task2vec` runs on a conv4 probe: one forward, one
                backward over the N (example, class drawn) rows of `distinct_rows`, per-example kernel gradients
                as (gradient at the conv output) @ (unfolded input)^T (Goodfellow 2015). A confident head draws
                few distinct classes: "fisher_rows" N against "label_draws" B * S says how much that saves.
  backpack_mc   BackPACK's DiagGGNMC (Dangel et al. 2020): the Monte-Carlo GGN diagonal, which for the
                softmax cross-entropy is the sampled Fisher; it draws its own S labels per example from the
                global RNG, seeded here as `fisher_labels` seeds its generator, so the draws are the same.
                With --labels expected, DiagGGNExact (the GGN diagonal is then exactly that Fisher).
  backpack_sgs  BackPACK's SumGradSquared over the same N rows as a batch, row loss scaled by √weight.
  opacus        Opacus's GradSampleModule (hooks; its conv grad sampler unfolds too, functorch for the frozen
                batch norm), per-sample gradients of the same N rows, squared and summed.
Every method is also run in float64 and compared with the float64 brute-force loop: "max rel diff" is
max over weights of max |F - F_ref| / max |F_ref| (float32's own is recorded too). "task2vec" is the whole
production `task2vec` call (head + labels + Fisher). Timings are interleaved: each repeat runs every method
once, in an order rotated per repeat, after one untimed warm-up call each; medians of --repeats. A library
that is not installed (how to: pyproject.toml's `bench` extra) is skipped with the reason recorded.

    python benchmarks/task2vec.py [--threads 2] [--repeats 5] [--hidden 16 32 64] [--labels sampled] [--out PATH]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_json_atomic  # noqa: E402
from benchmarks.quick import cpu_model, git_state  # noqa: E402
from components.conv4 import PADDING, STRIDE, Conv4, Conv4Config  # noqa: E402
from components.task2vec import (LABEL_MODES, Task2VecConfig, conv4_probe, distinct_rows, fisher_diagonal,  # noqa: E402
                                 fisher_labels, fit_head, predictive, task2vec)

N_WAY, K_SHOT, SIDE = 5, 5, 28
METHODS = ("loop", "vmap", "unfold", "backpack_mc", "backpack_sgs", "opacus")
Fisher = dict[str, torch.Tensor]


def loop_fisher(probe, head, x, labels, weights) -> Fisher:
    """The Fisher diagonal one example and one label at a time: the brute force every method must equal."""
    params = {k: v.clone().requires_grad_() for k, v in probe.params.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(x.shape[0]):
        log_p = F.log_softmax(probe.features(params, x[i:i + 1]) @ head[0].T + head[1], -1)[0]
        for s in range(labels.shape[1]):
            grads = torch.autograd.grad(log_p[labels[i, s]], list(params.values()), retain_graph=True)
            for k, g in zip(params, grads):
                total[k] += weights[i, s] * g.square()
    return {k: v / x.shape[0] for k, v in total.items()}


class FrozenNorm(nn.Module):
    """conv4_probe's batch norm at fixed statistics, held as plain tensors: Opacus refuses modules with buffers."""

    def __init__(self, norm: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.mean = norm.running_mean.clone()[:, None, None]
        self.rstd = torch.rsqrt(norm.running_var + norm.eps)[:, None, None]

    def forward(self, z):
        return (z - self.mean) * self.rstd * self.weight[:, None, None] + self.bias[:, None, None]


def conv4_sequential(model: Conv4, x: torch.Tensor, head, frozen_norm: bool = False) -> nn.Sequential:
    """conv4_probe + head as torch modules: batch norm in eval mode at x's statistics, the head frozen."""
    layers, h = [], x
    with torch.no_grad():
        for block in model.blocks:
            kernel = block.kernel()
            conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], kernel.shape[-1], STRIDE, PADDING, bias=False).to(kernel)
            conv.weight.copy_(kernel)
            z = conv(h)
            norm = nn.BatchNorm2d(kernel.shape[0], eps=model.cfg.eps).to(kernel).eval()
            mean = z.mean((0, 2, 3))
            norm.running_mean.copy_(mean)
            norm.running_var.copy_((z - mean[:, None, None]).square().mean((0, 2, 3)))
            norm.weight.copy_(block.norm.weight)
            norm.bias.copy_(block.norm.bias)
            layers += [conv, FrozenNorm(norm) if frozen_norm else norm, nn.ReLU()]
            h = block(h)
    linear = nn.Linear(head[0].shape[1], head[0].shape[0]).to(kernel).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(head[0])
        linear.bias.copy_(head[1])
    return nn.Sequential(*layers, nn.Flatten(), linear)


def probe_weights(seq: nn.Sequential) -> dict[str, nn.Parameter]:
    """The sequential's weights under conv4_probe's names."""
    blocks = [seq[i:i + 3] for i in range(0, 12, 3)]
    return {f"blocks.{j}.{name}": p for j, (conv, norm, _) in enumerate(blocks)
            for name, p in (("conv.weight", conv.weight), ("norm.weight", norm.weight), ("norm.bias", norm.bias))}


def batch_rows(x, labels, weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch row per (example, class drawn), as unfold has: inputs (N, ...), labels (N,), √weights (N,)."""
    example, label, weight = distinct_rows(labels, weights, N_WAY)
    return x[example], label, weight.sqrt()


def backpack_mc(model, x, probe, head, labels, weights, cfg: Task2VecConfig) -> Callable[[], Fisher]:
    """DiagGGNMC for sampled labels; for expected ones the exact GGN diagonal, which is then the same Fisher."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    seq, loss_fn = extend(conv4_sequential(model, x, head)), extend(nn.CrossEntropyLoss())  # mean: the 1/B
    dummy = torch.zeros(x.shape[0], dtype=torch.long)  # the GGN never reads the targets
    exact = cfg.labels == "expected"

    def run() -> Fisher:
        loss = loss_fn(seq(x), dummy)
        torch.manual_seed(cfg.seed)  # its labels: multinomial on the global generator, fisher_labels' call
        with backpack(DiagGGNExact() if exact else DiagGGNMC(mc_samples=labels.shape[1])):
            loss.backward()
        return {k: p.diag_ggn_exact if exact else p.diag_ggn_mc for k, p in probe_weights(seq).items()}

    return run


def backpack_sgs(model, x, probe, head, labels, weights, cfg: Task2VecConfig) -> Callable[[], Fisher]:
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    seq = extend(conv4_sequential(model, x, head))
    rows, y, root = batch_rows(x, labels, weights)

    def run() -> Fisher:
        loss = (F.cross_entropy(seq(rows), y, reduction="none") * root).sum()
        with backpack(SumGradSquared()):
            loss.backward()
        return {k: p.sum_grad_squared / x.shape[0] for k, p in probe_weights(seq).items()}

    return run


def opacus(model, x, probe, head, labels, weights, cfg: Task2VecConfig) -> Callable[[], Fisher]:
    from opacus import GradSampleModule

    seq = conv4_sequential(model, x, head, frozen_norm=True)
    module = GradSampleModule(seq, loss_reduction="sum")
    rows, y, root = batch_rows(x, labels, weights)

    def run() -> Fisher:
        module.zero_grad(set_to_none=True)
        (F.cross_entropy(module(rows), y, reduction="none") * root).sum().backward()
        return {k: p.grad_sample.square().sum(0) / x.shape[0] for k, p in probe_weights(seq).items()}

    return run


def ours(method: str):
    def build(model, x, probe, head, labels, weights, cfg: Task2VecConfig) -> Callable[[], Fisher]:
        if method == "loop":
            return lambda: loop_fisher(probe, head, x, labels, weights)
        return lambda: fisher_diagonal(probe, head, x, labels, weights, method=method)
    return build


BUILDERS = {"loop": ours("loop"), "vmap": ours("vmap"), "unfold": ours("unfold"), "backpack_mc": backpack_mc,
            "backpack_sgs": backpack_sgs, "opacus": opacus}
PACKAGES = {"backpack_mc": "backpack", "backpack_sgs": "backpack", "opacus": "opacus"}


def missing(method: str, cfg: Task2VecConfig) -> str | None:
    """Why the method cannot run here, or None."""
    if method == "backpack_mc" and cfg.labels == "empirical":
        return "the GGN diagonal is the true Fisher; BackPACK has no empirical-label version of it"
    package = PACKAGES.get(method)
    if package is None:
        return None
    try:
        __import__(package)
    except ImportError as err:
        return f"{package} not installed ({err}); see pyproject.toml's bench extra"
    return None


def max_rel_diff(actual: Fisher, expected: Fisher) -> float:
    if actual.keys() != expected.keys():
        raise ValueError(f"Fisher keys {sorted(actual)} != {sorted(expected)}")
    return max(((actual[k].double() - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected)


def task(hidden: int, cfg: Task2VecConfig) -> tuple:
    """(model, x, y, probe, head, labels, weights) of one random float32 support set and its sampled labels."""
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY, hidden=hidden))
    x, y = torch.rand(N_WAY * K_SHOT, 1, SIDE, SIDE), torch.arange(N_WAY).repeat(K_SHOT)
    probe = conv4_probe(model, x)
    head = fit_head(probe.features(probe.params, x), y, N_WAY, cfg.head_l2, cfg.head_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    labels, weights = fisher_labels(predictive(probe, head, x), y, cfg.labels, cfg.n_samples, gen)
    return model, x, y, probe, head, labels, weights


def in_float64(single: tuple, cfg: Task2VecConfig) -> tuple:
    """The same task in float64: same weights, head and labels; the label weights (expected: p) recomputed."""
    model, x, y, _, head, labels, _ = single
    model, x, head = copy.deepcopy(model).double(), x.double(), tuple(t.double() for t in head)
    probe = conv4_probe(model, x)
    gen = torch.Generator().manual_seed(cfg.seed)
    labels64, weights = fisher_labels(predictive(probe, head, x), y, cfg.labels, cfg.n_samples, gen)
    if not torch.equal(labels64, labels):
        raise RuntimeError("labels: float64 probabilities drew other labels than float32's; the check would differ")
    return model, x, y, probe, head, labels, weights


def measure(hidden: int, cfg: Task2VecConfig, repeats: int) -> list[dict]:
    """Tidy rows (hidden, method, seconds, ...) for one probe size; the whole task2vec call is method 'task2vec'."""
    single = task(hidden, cfg)
    double = in_float64(single, cfg)
    model, x, y, probe, head, labels, weights = single
    reference = loop_fisher(double[3], double[4], double[1], *double[5:])
    skipped = {m: why for m in METHODS if (why := missing(m, cfg))}
    runs, diffs = {"task2vec": lambda: task2vec(probe, x, y, N_WAY, cfg)}, {}
    for method in (m for m in METHODS if m not in skipped):
        build = BUILDERS[method]
        runs[method] = build(model, x, probe, head, labels, weights, cfg)
        diffs[method] = {"max_rel_diff": max_rel_diff(build(*double[:2], *double[3:], cfg)(), reference),
                         "max_rel_diff_float32": max_rel_diff(runs[method](), reference)}
    times = interleaved(runs, repeats)
    loop_s = statistics.median(times["loop"])
    common = {"hidden": hidden, "probe_params": sum(p.numel() for p in probe.params.values()),
              "embedding_dim": len(task2vec(probe, x, y, N_WAY, cfg)), "label_draws": labels.numel(),
              "fisher_rows": len(distinct_rows(labels, weights, N_WAY)[0])}
    rows = [common | {"method": m, "skipped": why} for m, why in skipped.items()]
    for method, seconds in times.items():
        median = statistics.median(seconds)
        fisher = {"speedup_vs_loop": loop_s / median, **diffs[method]} if method in diffs else {}
        rows.append(common | {"method": method, "seconds": median, **fisher, "seconds_repeats": seconds})
    return sorted(rows, key=lambda r: ("task2vec", *METHODS).index(r["method"]))


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run per repeat; every repeat runs all of them, starting one further along each time."""
    names = list(runs)
    for name in names:
        runs[name]()  # warm-up: vmap tracing, hooks, allocator
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def machine_info(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}


def print_row(r: dict) -> None:
    if "skipped" in r:
        print(f"{r['hidden']:>6} {r['method']:>12}  skipped: {r['skipped']}")
        return
    fisher = (f"{r['speedup_vs_loop']:>7.1f}x {r['max_rel_diff']:>10.1e} {r['max_rel_diff_float32']:>10.1e}"
              if "max_rel_diff" in r else "")
    print(f"{r['hidden']:>6} {r['method']:>12} {r['seconds']:>9.4f} {fisher}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timings per method; median reported")
    parser.add_argument("--hidden", type=int, nargs="+", default=[16, 32, 64], help="Conv4 filters per layer")
    parser.add_argument("--n-samples", type=int, default=Task2VecConfig().n_samples, help="labels per example")
    parser.add_argument("--labels", choices=LABEL_MODES, default=Task2VecConfig().labels,
                        help="expected: every class a row (B * n_way), the most work for unfold and the libraries")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/task2vec.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # BackPACK, Opacus: x needs no grad
    cfg = Task2VecConfig(labels=args.labels, n_samples=args.n_samples)
    machine = machine_info(args.threads)
    print(f"{'hidden':>6} {'method':>12} {'seconds':>9} {'vs loop':>8} {'rel f64':>10} {'rel f32':>10}")
    rows = []
    for hidden in args.hidden:
        for r in measure(hidden, cfg, args.repeats):
            rows.append(r)
            print_row(r)
    whole = [r for r in rows if r["method"] == "task2vec"]
    params, seconds = (np.log([r[k] for r in whole]) for k in ("probe_params", "seconds"))
    exponent = float(np.polyfit(params, seconds, 1)[0]) if len(whole) > 1 else float("nan")
    print(f"task2vec seconds grow as probe_params^{exponent:.2f} over this range")
    machine["loadavg_end"] = os.getloadavg()  # other work on the machine skews these numbers
    print(f"load average {machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end")
    write_json_atomic({
        "command": " ".join([*(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ),
                             "python benchmarks/task2vec.py", *sys.argv[1:]]),
        "git": git_state("HEAD", worktree=True),
        "machine": machine,
        "settings": {"n_way": N_WAY, "k_shot": K_SHOT, "image": [1, SIDE, SIDE], "dtype": "float32",
                     "reference": "float64 per-example loop", "labels": cfg.labels, "n_samples": cfg.n_samples,
                     "head_steps": cfg.head_steps, "repeats": args.repeats, "production_method": "unfold",
                     "versions": versions()},
        "results": rows,
        "time_exponent_in_params": exponent,
    }, args.out)
    print(f"wrote {args.out}")


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("backpack-for-pytorch", "opacus"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    main()
