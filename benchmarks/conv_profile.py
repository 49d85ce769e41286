"""Where one second-order MAML meta-step of conv4's grouped path spends its time, against this machine's rates.

Omniglot 5-way 1-shot, 15 queries per class, meta-batch 32, metapeft's default chunks (16 tasks per
adaptation graph, 2 per query graph), float32, random binary 28 x 28 images (the kernels do not care).

  rates    the machine: matmul GFLOP/s (one large square product, and the batched im2col products a
           convolution of each conv4 layer would be: T tasks x (64, C_in * 9) @ (C_in * 9, B * H' * W'));
           task-grouped convolution GFLOP/s at the same shapes (forward, grad-input, grad-weight, oneDNN);
           and the plain-conv rate `benchmarks/omniglot.py` scores its runs against. Best of several runs.
  profile  every aten call of a few meta-steps timed through a dispatch mode, by op kind (conv forward,
           grad-input, grad-weight, batch norm, ReLU, other element-wise, copies, allocation), pass (support /
           query, by batch size) and phase (forward; the inner loop's create_graph backward; the outer
           backward; the double backward, from the autograd node running), each kind's GFLOP/s where it
           computes FLOPs, and minor page faults per step (the allocator handing memory back, faulting it in).
           One thread: thread CPU time, which a busy neighbour does not inflate; more threads: wall time.
  variants whole meta-steps, interleaved, by conv path and chunks (tasks per adaptation graph x per query
           graph): conv4's task-grouped convolutions, or `gemm_conv` (im2col + one batched matmul per layer,
           backward and double backward by autograd's fold / bmm); both checked first against each other's
           float64 second-order meta-gradient. Peak memory per chunk setting: `omniglot.py --throughput`.

    python benchmarks/conv_profile.py [--threads 2,1] [--steps 3] [--variants grouped:16x2,gemm:16x2] [--out PATH]

On a shared machine run it under the allocator you compare with (LD_PRELOAD=...libtcmalloc_minimal.so.4)
and read the load average it records; 2 threads suffer most from a busy neighbour.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_json_atomic  # noqa: E402
from components.conv4 import Conv4, Conv4Config, _BatchNorm, _per_task  # noqa: E402
from components.episodes import EpisodeBatch  # noqa: E402
from components.metalearners import MetaLearner, MetaLearnerConfig  # noqa: E402

N_WAY, K_SHOT, N_QUERY, META_BATCH, FAST_LR = 5, 1, 15, 32, 0.4
TASK_CHUNK, QUERY_CHUNK = 16, 2  # benchmarks/omniglot.py's CHUNKS[5]
LAYERS = ((1, 28), (64, 14), (64, 7), (64, 4))  # (C_in, side in) of conv4's convolutions; C_out 64, stride 2
C_OUT = 64
MATMUL_OPS = {"aten::bmm": "matmul", "aten::mm": "matmul", "aten::addmm": "matmul", "aten::baddbmm": "matmul"}
BN_OPS = ("aten::native_batch_norm", "aten::native_batch_norm_backward")
RELU_OPS = ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::threshold_backward")
ALLOC_OPS = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zeros", "aten::zeros_like",
             "aten::resize_", "aten::fill_", "aten::zero_")
COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::im2col", "aten::col2im", "aten::index_put_")


def best_seconds(fn, repeats: int = 12) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def conv_flops(n: int, c_in_per_group: int, c_out: int, side_out: int) -> float:
    return 2.0 * n * c_out * c_in_per_group * 9 * side_out * side_out


# ---------------------------------------------------------------- the machine's rates

def machine_rates() -> dict:
    """GFLOP/s of matmul and task-grouped convolution at conv4's shapes, query and support chunks."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    rows = {"matmul_1024": 2 * 1024 ** 3 / best_seconds(lambda: a @ b) / 1e9, "shapes": []}
    for name, tasks, images in (("query", QUERY_CHUNK, N_WAY * N_QUERY), ("support", TASK_CHUNK, N_WAY * K_SHOT)):
        for c_in, side in LAYERS:
            out = (side + 1) // 2
            flops = conv_flops(tasks * images, c_in, C_OUT, out)
            w, cols = torch.randn(tasks, C_OUT, c_in * 9), torch.randn(tasks, c_in * 9, images * out * out)
            x = torch.randn(images, tasks * c_in, side, side).contiguous(memory_format=torch.channels_last)
            kernel = torch.randn(tasks * C_OUT, c_in, 3, 3)
            g = torch.randn_like(F.conv2d(x, kernel, None, 2, 1, 1, tasks))

            def backward(mask):
                return lambda: torch.ops.aten.convolution_backward(g, x, kernel, None, [2, 2], [1, 1], [1, 1], False,
                                                                   [0, 0], tasks, mask)
            seconds = {"bmm": best_seconds(lambda: torch.bmm(w, cols)),
                       "conv_forward": best_seconds(lambda: F.conv2d(x, kernel, None, 2, 1, 1, tasks)),
                       "conv_grad_input": best_seconds(backward([True, False, False])),
                       "conv_grad_weight": best_seconds(backward([False, True, False])),
                       "unfold": best_seconds(lambda: F.unfold(x, 3, 1, 1, 2))}
            rows["shapes"].append({"pass": name, "tasks": tasks, "images": images, "c_in": c_in, "side": side,
                                   "gflop": flops / 1e9, "unfold_ms": 1e3 * seconds.pop("unfold"),
                                   **{f"{k}_gflops": flops / s / 1e9 for k, s in seconds.items()}})
    rows["plain_conv"] = plain_conv_rate()
    return rows


def plain_conv_rate() -> float:
    """benchmarks/omniglot.py's `measure_machine` rate: plain conv forward, 600 images, channels-last, conv4's
    four shapes, the fastest of 20 runs each; the rate its tasks/s are scored against."""
    n, flops, seconds = 600, 0.0, 0.0
    for c_in, side in LAYERS:
        x = torch.rand(n, c_in, side, side).contiguous(memory_format=torch.channels_last)
        w = torch.rand(C_OUT, c_in, 3, 3)
        seconds += best_seconds(lambda: F.conv2d(x, w, None, 2, 1), 20)
        flops += conv_flops(n, c_in, C_OUT, (side + 1) // 2)
    return flops / seconds / 1e9


# ---------------------------------------------------------------- the im2col alternative

def gemm_conv(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Stride-2 3x3 convolution of every task as one batched matrix product: h (T, C, B, H, W), weight
    (T, C_out, C, 3, 3) -> (T, C_out, B, H', W'). unfold (im2col), permute and bmm are all linear, so autograd's
    own derivatives give the backward and the double backward as the same kind of ops (fold, bmm)."""
    t, c, b, side, _ = h.shape
    out_side = (side + 1) // 2
    cols = F.unfold(h.reshape(t * c * b, 1, side, side), 3, padding=1, stride=2)  # (T * C * B, 9, H' * W')
    cols = cols.view(t, c, b, 9, -1).transpose(2, 3).reshape(t, c * 9, -1)  # (T, C * 9, B * H' * W')
    return torch.bmm(weight.reshape(t, weight.shape[1], -1), cols).view(t, -1, b, out_side, out_side)


def gemm_features(model: Conv4, x: torch.Tensor) -> torch.Tensor:
    """Conv4's task-batched features with `gemm_conv`, tasks and channels leading (T, C, B, H, W), so that each
    task's batch norm is a plain per-row one over (1, T * C, B * H' * W'): x (T, B, 1, 28, 28) -> (T, B, 256)."""
    n_tasks, n = x.shape[:2]
    h = x.transpose(1, 2)
    for block in model.blocks:
        h = gemm_conv(h, _per_task(block.kernel(), n_tasks, 4))
        t, c, b, side, _ = h.shape
        weight, bias = (_per_task(p, n_tasks, 1).flatten() for p in (block.norm.weight, block.norm.bias))
        h = _BatchNorm.apply(h.reshape(1, t * c, b * side, side), weight, bias, model.cfg.eps)
        h = F.relu(h, inplace=True).view(t, c, b, side, side)
    return h.transpose(1, 2).reshape(n_tasks, n, -1)


CONVS = {"grouped": None, "gemm": gemm_features}  # None: conv4's own task-grouped convolutions


def check_convs() -> float:
    """The largest relative difference of each alternative's float64 second-order meta-gradient from the grouped
    path's, on 3 random tasks with 2 queries per class; a difference above 1e-9 stops the run."""
    g = torch.Generator().manual_seed(1)
    batch = EpisodeBatch(torch.rand(3, N_WAY, 1, 28, 28, generator=g, dtype=torch.float64),
                         torch.arange(N_WAY).expand(3, -1),
                         torch.rand(3, 2 * N_WAY, 1, 28, 28, generator=g, dtype=torch.float64),
                         torch.arange(N_WAY).repeat_interleave(2).expand(3, -1))
    grads = {}
    for conv in CONVS:
        learner = learner_for(conv, 2, 1, torch.float64)
        learner.meta_backward(batch)
        grads[conv] = [p.grad for p in learner.parameters()]
    worst = max(float((a - b).abs().max() / b.abs().max()) for conv in CONVS
                for a, b in zip(grads[conv], grads["grouped"]))
    if worst > 1e-9:
        raise AssertionError(f"a conv path's float64 meta-gradient differs from the grouped one by {worst:.2e}")
    return worst


def compare(variants: list[tuple[str, int, int]], rounds: int, clock) -> list[dict]:
    """Meta-step time of each (conv, task_chunk, query_chunk), interleaved round by round in this process."""
    steps = {v: meta_step(v[1], v[2], v[0]) for v in variants}
    for step in steps.values():
        step()
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, step in steps.items():
            t = clock()
            step()
            times[v].append(clock() - t)
    base = statistics.median(times[variants[0]])
    return [{"conv": v[0], "task_chunk": v[1], "query_chunk": v[2], "ms_per_step": 1e3 * statistics.median(t),
             "tasks_per_s": META_BATCH / statistics.median(t), "speed_vs_first": base / statistics.median(t),
             "ms": [1e3 * x for x in t]} for v, t in times.items()]


# ---------------------------------------------------------------- one meta-step, per op

def random_batch(seed: int = 0) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_WAY)
    images = lambda n: (torch.rand(META_BATCH, n, 1, 28, 28, generator=g) > 0.8).float()  # noqa: E731
    return EpisodeBatch(images(N_WAY * K_SHOT), labels.repeat_interleave(K_SHOT).expand(META_BATCH, -1),
                        images(N_WAY * N_QUERY), labels.repeat_interleave(N_QUERY).expand(META_BATCH, -1))


def learner_for(conv: str, task_chunk: int, query_chunk: int, dtype=torch.float32) -> MetaLearner:
    """Second-order MAML over a Conv4 whose task-batched forward is `conv` (one of CONVS)."""
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY)).to(dtype)
    if CONVS[conv] is not None:
        model._features_tasks = types.MethodType(CONVS[conv], model)  # this instance only
    cfg = MetaLearnerConfig(algorithm="maml", inner_steps=1, fast_lr=FAST_LR, task_batched=True,
                            task_chunk=task_chunk, query_chunk=query_chunk)
    return MetaLearner(model, cfg, F.cross_entropy)


def meta_step(task_chunk: int = TASK_CHUNK, query_chunk: int = QUERY_CHUNK, conv: str = "grouped"):
    """One MAML meta-iteration as benchmarks/omniglot.py times it: zero_grad, meta_backward, Adam step."""
    learner = learner_for(conv, task_chunk, query_chunk)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    batch = random_batch()

    def step():
        opt.zero_grad(set_to_none=True)
        learner.meta_backward(batch)
        opt.step()

    return step


def kind_of(func, args) -> str:
    name = f"aten::{func.overloadpacket.__name__}"
    if name == "aten::convolution":
        return "conv forward"
    if name == "aten::convolution_backward":
        return {(True, False): "conv grad-input", (False, True): "conv grad-weight"}.get(tuple(args[10][:2]),
                                                                                     "conv grad-input+weight")
    if name in MATMUL_OPS:
        return MATMUL_OPS[name]
    if name in BN_OPS:
        return "batch norm"
    if name in RELU_OPS:
        return "relu"
    if name in ALLOC_OPS:
        return "allocation"
    if name in COPY_OPS:
        return "copies"
    return "other element-wise"


def phase_now() -> str | int:
    """forward, double backward, or the id of the backward graph task running (inner or outer: decided later)."""
    node = torch._C._current_autograd_node()
    if node is None:
        return "forward"
    if "BackwardBackward" in node.name():
        return "double backward"
    return torch._C._current_graph_task_id()


def pass_of(args) -> str:
    shapes = [a.shape for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
    return {N_WAY * N_QUERY: "query", N_WAY * K_SHOT: "support"}.get(shapes[0][0], "other") if shapes else "other"


def op_flops(kind: str, args) -> float:
    """FLOPs of a convolution or matmul call from its arguments; 0 for the rest."""
    if kind == "conv forward":
        (n, _, side, _), (c_out, c_in_g, _, _) = args[0].shape, args[1].shape
        return conv_flops(n, c_in_g, c_out, (side + 1) // 2)
    if kind.startswith("conv grad"):
        (n, _, side_out, _), (c_out, c_in_g, _, _) = args[0].shape, args[2].shape
        return conv_flops(n, c_in_g, c_out, side_out) * (2 if kind.endswith("+weight") else 1)
    if kind == "matmul":
        a, b = args[-2].shape, args[-1].shape
        return 2.0 * (a[0] if len(a) == 3 else 1) * a[-2] * a[-1] * b[-1]
    return 0.0


class OpTimer(TorchDispatchMode):
    """Time every aten call by (kind, pass, phase): thread CPU time with one thread (a busy neighbour that takes
    the core away is not counted), wall time with more (the other threads' work is not in this one's CPU time)."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.cells = clock, defaultdict(lambda: [0.0, 0.0, 0])
        self.create_graph = set()  # ids of the backward graph tasks that build a graph: the inner loop's

    def phases(self) -> dict[tuple, list]:
        """cells keyed by (kind, pass, phase) with each graph task's phase resolved: inner or outer backward."""
        out = defaultdict(lambda: [0.0, 0.0, 0])
        for (kind, where, phase), cell in self.cells.items():
            if isinstance(phase, int):
                phase = "inner backward" if phase in self.create_graph else "backward"
            for i, v in enumerate(cell):
                out[(kind, where, phase)][i] += v
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = self.clock()
        out = func(*args, **(kwargs or {}))
        seconds = self.clock() - t
        kind, phase = kind_of(func, args), phase_now()
        if isinstance(phase, int) and torch.is_grad_enabled():
            self.create_graph.add(phase)
        cell = self.cells[(kind, pass_of(args), phase)]
        cell[0] += seconds
        cell[1] += op_flops(kind, args)
        cell[2] += 1
        return out


def op_profile(steps: int, clock) -> dict:
    """Per (kind, pass, phase): ms per meta-step, share of the op time, GFLOP/s; the step's time without the
    timer, by the same clock; minor page faults per step."""
    step = meta_step()
    for _ in range(2):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        t = clock()
        step()
        times.append(clock() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    timer = OpTimer(clock)
    with timer:
        for _ in range(steps):
            step()
    cells = timer.phases()
    total = sum(c[0] for c in cells.values()) / steps
    rows = [{"kind": k, "pass": p, "phase": ph, "ms_per_step": 1e3 * sec / steps, "share": sec / steps / total,
             "gflop_per_step": fl / steps / 1e9, "gflops": fl / sec / 1e9 if sec and fl else None,
             "calls_per_step": n / steps}
            for (k, p, ph), (sec, fl, n) in sorted(cells.items(), key=lambda kv: -kv[1][0])]
    step_s = statistics.median(times)
    return {"clock": "thread CPU time" if clock is time.thread_time else "wall", "ms_per_step": 1e3 * step_s,
            "tasks_per_s": META_BATCH / step_s, "op_ms_per_step": 1e3 * total, "minor_faults_per_step": faults,
            "rows": rows}


def by_kind(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """{kind: (ms per step, GFLOP per step)} summed over passes and phases."""
    out = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        out[r["kind"]][0] += r["ms_per_step"]
        out[r["kind"]][1] += r["gflop_per_step"]
    return {k: tuple(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1][0])}


# ---------------------------------------------------------------- driver

def run(threads: int, steps: int, variants: list[tuple[str, int, int]], rounds: int) -> dict:
    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    load_start = os.getloadavg()
    rates = machine_rates()
    prof = op_profile(steps, clock)
    return {"threads": threads, "loadavg_start": load_start, "rates": rates, "profile": prof,
            "variants": compare(variants, rounds, clock), "loadavg_end": os.getloadavg()}


def print_report(result: dict) -> None:
    rates, prof = result["rates"], result["profile"]
    peak = max(rates["matmul_1024"], max(s["bmm_gflops"] for s in rates["shapes"]))
    print(f"\n== {result['threads']} thread(s); load {result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}")
    print(f"matmul 1024^2: {rates['matmul_1024']:.0f} GFLOP/s; plain conv (omniglot.py's rate): "
          f"{rates['plain_conv']:.0f} GFLOP/s")
    print(f"{'pass':<8} {'T':>3} {'B':>3} {'C_in':>4} {'side':>4} {'GFLOP':>6} {'bmm':>6} {'conv':>6} {'grad-in':>7} "
          f"{'grad-w':>6}  (GFLOP/s)  unfold ms")
    for s in rates["shapes"]:
        print(f"{s['pass']:<8} {s['tasks']:>3} {s['images']:>3} {s['c_in']:>4} {s['side']:>4} {s['gflop']:>6.3f} "
              f"{s['bmm_gflops']:>6.0f} {s['conv_forward_gflops']:>6.0f} {s['conv_grad_input_gflops']:>7.0f} "
              f"{s['conv_grad_weight_gflops']:>6.0f}  {s['unfold_ms']:>14.2f}")
    print(f"meta-step: {prof['ms_per_step']:.0f} ms {prof['clock']} ({prof['tasks_per_s']:.1f} tasks/s), "
          f"{prof['op_ms_per_step']:.0f} ms in aten ops under the timer, "
          f"{prof['minor_faults_per_step']:.0f} minor page faults")
    print(f"{'kind':<24} {'ms/step':>8} {'share':>6} {'GFLOP':>6} {'GFLOP/s':>8} {'of conv':>7} {'of matmul':>9}")
    total = prof["op_ms_per_step"]
    for kind, (ms, gflop) in by_kind(prof["rows"]).items():
        rate = gflop / ms * 1e3 if gflop else None
        cols = f"{rate:>8.0f} {rate / rates['plain_conv']:>7.0%} {rate / peak:>9.0%}" if rate else ""
        print(f"{kind:<24} {ms:>8.1f} {ms / total:>6.1%} {gflop:>6.2f} {cols}")
    print(f"{'kind':<24} {'pass':<8} {'phase':<16} {'ms/step':>8} {'share':>6} {'GFLOP/s':>8}")
    for r in prof["rows"][:20]:
        rate = f"{r['gflops']:>8.0f}" if r["gflops"] else ""
        print(f"{r['kind']:<24} {r['pass']:<8} {r['phase']:<16} {r['ms_per_step']:>8.1f} {r['share']:>6.1%} {rate}")
    print(f"meta-step by conv path and chunks (tasks per adaptation graph x per query graph), {prof['clock']}, "
          "interleaved:")
    for v in result["variants"]:
        print(f"  {v['conv']:<8} {v['task_chunk']:>2}x{v['query_chunk']:<2} {v['ms_per_step']:>6.0f} ms "
              f"{v['tasks_per_s']:>6.1f} tasks/s  x{v['speed_vs_first']:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    p.add_argument("--steps", type=int, default=3, help="meta-steps timed and profiled per thread count")
    p.add_argument("--variants", default="grouped:16x2,grouped:8x1,grouped:4x1,grouped:2x1,gemm:16x2",
                   help=f"conv:TASKSxQUERY meta-steps timed against each other; conv one of {', '.join(CONVS)}")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --variants")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "conv-profile.json")
    args = p.parse_args(argv)
    variants = [(conv, *map(int, chunks.split("x")))
                for conv, chunks in (v.split(":") for v in args.variants.split(","))]
    worst = check_convs()
    print(f"float64 second-order meta-gradients of {', '.join(CONVS)} agree (worst relative difference {worst:.1e})")
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        results.append(run(threads, args.steps, variants, args.rounds))
        print_report(results[-1])
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "ld_preload": os.environ.get("LD_PRELOAD", "")}
    out = {"settings": {"n_way": N_WAY, "k_shot": K_SHOT, "n_query": N_QUERY, "meta_batch": META_BATCH,
                        "task_chunk": TASK_CHUNK, "query_chunk": QUERY_CHUNK, "steps": args.steps,
                        "variants": args.variants, "rounds": args.rounds},
           "float64_worst_relative_difference": worst,
           "machine": machine, "results": results}
    write_json_atomic(out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
