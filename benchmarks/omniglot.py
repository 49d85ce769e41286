"""Omniglot N-way K-shot: metapeft's meta-learners against learn2learn's MAML, same budget, same test episodes.

The MAML paper's setting (Finn et al. 2017): Conv4 with transductive batch norm, Vinyals class split
(train + val characters for meta-training, rotations as new classes), Adam meta-lr 1e-3, 15 queries per
class; 5-way: 1 inner step of lr 0.4, meta-batch 32; 20-way: 5 steps of lr 0.1, meta-batch 16.
Reptile takes 5 inner steps at train (its paper's Omniglot setting; one step would make it plain joint
training). Every algorithm trains for the same wall-clock budget in a fresh subprocess (so each peak RSS
is its own), on the same sequence of training episodes, from the same initialisation, and is tested on
the same meta-test episodes with the same procedure: `--test-steps` SGD steps on the support set from the
final meta-parameters, then query accuracy. learn2learn's MAML (`l2l.algorithms.MAML`, second order) trains
an equivalent nn.Module Conv4 (nn.BatchNorm2d without running statistics); its final weights are tested
like everyone else's.

    python benchmarks/omniglot.py --budget-minutes 20 [--ways 5 --shots 1 --episodes 600 --out PATH]
    python benchmarks/omniglot.py --smoke           # all five algorithms, a few iterations, 20 episodes
    python benchmarks/omniglot.py --throughput      # MAML tasks/s and peak RSS: metapeft vs learn2learn
    python benchmarks/omniglot.py --curves --budget-minutes 20 [--points 8 --curve-episodes 200]

`--curves`: accuracy against training time. Each run keeps a copy of its meta-parameters at `--points` equally
spaced times of the budget (the first iteration boundary at or after each; the training clock stops while the
copy is taken), and every copy is tested on the first `--curve-episodes` of the same meta-test episodes, so
learn2learn's MAML and the others are compared at each point of the curve. One PNG per setting. Each
algorithm's curve is also logged to MLflow (experiment `benchmark-omniglot-curves` of the project's store, or
$MLFLOW_TRACKING_URI), one run per curve, once: `--log-mlflow` logs a curves JSON written earlier (or by
another session) without training. Smoke runs log only with `--mlflow`.
`--algorithms` takes the names above and the recipes of `RECIPES` (MetaLearnerConfig options), e.g. maml++.

learn2learn is optional: `bash benchmarks/install_learn2learn.sh`. Only `learn2learn.algorithms.maml`
and what it imports are loaded, never the package's __init__, which pulls gym and torchvision.
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import OMNIGLOT_PUBLISHED, git_state, write_json_atomic, write_parquet_atomic  # noqa: E402
from components.conv4 import Conv4, Conv4Config  # noqa: E402
from components.metalearners import MetaLearner, MetaLearnerConfig
from components.omniglot import (EpisodeBatch, build_class_pool, load_omniglot,  # noqa: E402
                                 read_vinyals_split, sample_episodes)
from flows.versions import code_version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "l2l_maml")
# named recipes: MetaLearnerConfig options over the paper's setting (an algorithm's name alone takes none)
RECIPES = {
    # MAML++ (Antoniou et al., ICLR 2019), its Omniglot inner loop (5 steps, lr 0.1) with learned per-step rates,
    # per-step batch norm and the multi-step loss annealed over 500 meta-iterations (its 10 epochs of 500,
    # shortened for a minutes budget)
    "maml++": dict(algorithm="maml", inner_steps=5, fast_lr=0.1, lslr=True, msl_iterations=500, per_step_bn=True),
    "protomaml": dict(algorithm="protomaml"),  # Triantafillou et al. 2020: the head starts at the prototypes
}
# the ablation of MAML++ (what each option adds, paired against MAML++ less that option): its inner loop with no
# option, then MAML++ less one option each
RECIPES.update({"maml-5step": dict(algorithm="maml", inner_steps=5, fast_lr=0.1),
                "maml++/no-lslr": {**RECIPES["maml++"], "lslr": False},
                "maml++/no-msl": {**RECIPES["maml++"], "msl_iterations": 0},
                "maml++/no-bn": {**RECIPES["maml++"], "per_step_bn": False}})
PAPER = {5: dict(train_steps=1, fast_lr=0.4, meta_batch=32), 20: dict(train_steps=5, fast_lr=0.1, meta_batch=16)}
TRAIN_STEPS = {"reptile": 5}  # overrides of the paper's inner steps at train time
PUBLISHED = {shape: methods["MAML"] for shape, methods in OMNIGLOT_PUBLISHED.items()}  # the MAML paper, %
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
META_LR = 1e-3
N_QUERY = 15  # query images per class, at train and at test
EVAL_CHUNK = 4  # test episodes adapted and scored at once (bounds the evaluation's memory)
LOAD_EVERY = 10.0  # seconds between samples of the 1-minute load average during a curve's training
# metapeft's default tasks per adaptation graph / per query graph (speed vs memory): a 20-way task has 4x the
# queries and 5 inner steps, so fewer of its graphs fit beside each other
CHUNKS = {5: (16, 2), 20: (4, 1)}


# ---------------------------------------------------------------- data

def table_path(data: Path) -> Path:
    """data/omniglot/table-<key>.parquet, key = hash of both archives, the loader's code and the image size."""
    digest = hashlib.sha256(code_version(["components.omniglot"]).encode())  # the loader's code
    for stem in ("images_background", "images_evaluation"):
        digest.update((data / f"{stem}.zip").read_bytes())
    return ROOT / "data" / "omniglot" / f"table-{digest.hexdigest()[:16]}-28.parquet"


def cached_table(data: Path) -> pd.DataFrame:
    """The decoded image table, from its Parquet cache (0.1 s) or from the zips (about 10 s), then cached."""
    path = table_path(data)
    if path.exists():
        return pd.read_parquet(path)
    table = load_omniglot(data)
    write_parquet_atomic(table, path)
    return table


def class_pools(data: Path):
    """(meta-train pool: Vinyals train + val classes, 4800; meta-test pool: test classes, 1692)."""
    table, splits = cached_table(data), read_vinyals_split(data / "splits_vinyals")
    return build_class_pool(table, splits["train"] + splits["val"]), build_class_pool(table, splits["test"])


def episode_seed(seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])


# ---------------------------------------------------------------- learn2learn

def load_l2l_maml():
    """learn2learn's MAML class, loading only learn2learn.algorithms.maml and its imports (base_learner, utils)."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None:
        raise ImportError("learn2learn is not installed: run bash benchmarks/install_learn2learn.sh")
    root = spec.submodule_search_locations[0]
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", f"{root}/algorithms")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    from learn2learn.algorithms.maml import MAML
    return MAML


class TorchConv4(nn.Module):
    """Conv4 as a plain nn.Module for learn2learn: nn.BatchNorm2d without running statistics (transductive)."""

    def __init__(self, n_way: int):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (1, 64, 64, 64):
            layers += [nn.Conv2d(c_in, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(256, n_way)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters in order; Conv4 and TorchConv4 list the same tensors in the same order."""
    pairs = list(zip(src.parameters(), dst.parameters(), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            if a.shape != b.shape:
                raise ValueError(f"copy_weights: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            b.copy_(a)


# ---------------------------------------------------------------- one meta-iteration per implementation

def metapeft_learner(algorithm: str, n_way: int, seed: int, task_chunk: int | None = None,
                     query_chunk: int | None = None, task_batched: bool = True) -> MetaLearner:
    torch.manual_seed(seed)
    paper = PAPER[n_way]
    task_chunk = CHUNKS[n_way][0] if task_chunk is None else task_chunk
    query_chunk = CHUNKS[n_way][1] if query_chunk is None else query_chunk
    batched = dict(task_batched=True, task_chunk=task_chunk, query_chunk=query_chunk) if task_batched \
        else dict(vectorize=False, task_chunk=task_chunk)
    options = {"algorithm": algorithm, "inner_steps": TRAIN_STEPS.get(algorithm, paper["train_steps"]),
               "fast_lr": paper["fast_lr"], **RECIPES.get(algorithm, {})}
    cfg, model = MetaLearnerConfig(**options, **batched), Conv4(Conv4Config(n_way=n_way))
    names = [k for k, _ in model.named_parameters()]
    head = tuple(k for k in names if k.startswith("head.")) if cfg.variant.needs_head else ()
    per_step = tuple(k for k in names if k.split(".")[-2:-1] == ["norm"]) if cfg.per_step_bn else ()
    return MetaLearner(model, cfg, F.cross_entropy, head=head, per_step=per_step)


def metapeft_step(learner: MetaLearner):
    opt = torch.optim.Adam(learner.parameters(), lr=META_LR)

    def step(batch: EpisodeBatch, iteration: int | None = None) -> float:  # iteration: MAML++'s schedules
        opt.zero_grad(set_to_none=True)
        loss = learner.meta_backward(batch, iteration)
        opt.step()
        learner.clip_()
        return loss

    return step


def l2l_step(n_way: int, seed: int):
    """learn2learn's MAML loop (its examples' pattern): clone per task, adapt, backward the query loss / T."""
    maml_cls, paper = load_l2l_maml(), PAPER[n_way]
    torch.manual_seed(seed)
    model = TorchConv4(n_way)
    copy_weights(Conv4(Conv4Config(n_way=n_way)), model)  # the same initialisation as metapeft's
    maml = maml_cls(model, lr=paper["fast_lr"], first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=META_LR)

    def step(batch: EpisodeBatch, iteration: int | None = None) -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x_spt, y_spt, x_qry, y_qry in zip(*batch):
            learner = maml.clone()
            for _ in range(paper["train_steps"]):
                learner.adapt(F.cross_entropy(learner(x_spt), y_spt))
            loss = F.cross_entropy(learner(x_qry), y_qry) / len(batch)
            loss.backward()
            total += loss.item()
        opt.step()
        return total

    return step, model


# ---------------------------------------------------------------- evaluation

def test_accuracy(learner: MetaLearner, episodes: EpisodeBatch, steps: int) -> np.ndarray:
    """Query accuracy of each episode after `steps` SGD steps on its support set: (T,)."""
    accs = []
    for lo in range(0, len(episodes), EVAL_CHUNK):
        part = episodes.index(slice(lo, lo + EVAL_CHUNK))
        fast = learner.adapt_batch(part.x_spt, part.y_spt, steps)
        with torch.no_grad():
            logits = functional_call(learner.model, fast, (part.x_qry,))  # (T, N * Q, N)
        accs.append((logits.argmax(-1) == part.y_qry).double().mean(1))
    return torch.cat(accs).numpy()


def meta_state(algorithm: str, trained) -> dict | list[torch.Tensor]:
    """A CPU copy of the meta-parameters: a MetaLearner's state_dict, or learn2learn's model's parameters in order."""
    if algorithm == "l2l_maml":
        return [p.detach().cpu().clone() for p in trained.parameters()]
    return {group: {k: v.cpu() for k, v in values.items()} for group, values in trained.state_dict().items()}


def evaluation_learner(algorithm: str, state, n_way: int, seed: int) -> MetaLearner:
    """A task-batched learner holding the meta-parameters of `meta_state` (learn2learn's weights copied in)."""
    learner = metapeft_learner("maml" if algorithm == "l2l_maml" else algorithm, n_way, seed)
    if algorithm == "l2l_maml":
        with torch.no_grad():
            for p, q in zip(learner.params.values(), state, strict=True):
                p.copy_(q)
    else:
        learner.load_state_dict(state)
    return learner


# ---------------------------------------------------------------- workers (one subprocess each)

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def trainee(args):
    """(one meta-iteration: step(batch, iteration) -> loss, what it trains) of the worker's algorithm."""
    if args.worker == "l2l_maml":
        return l2l_step(args.ways, args.seed)
    trained = metapeft_learner(args.worker, args.ways, args.seed, args.task_chunk, args.query_chunk)
    return metapeft_step(trained), trained


def test_episodes(args, count: int) -> EpisodeBatch:
    """The first `count` of the `--episodes` fixed meta-test episodes (the same for every algorithm)."""
    _, test_pool = class_pools(args.data)
    test, _ = sample_episodes(test_pool, args.ways, args.shots, N_QUERY, args.episodes, seed=args.seed + 1)
    return test.index(slice(0, count))


def curve_points(budget: float, n: int) -> list[float]:
    """The training-clock times (s) of a curve's n snapshots, equally spaced: budget / n, 2 budget / n, ..., budget."""
    if n < 1 or not budget > 0:
        raise ValueError(f"--points {n}, budget {budget} s: need at least one point and a positive budget")
    return [budget * k / n for k in range(1, n + 1)]


def points_due(points: list[float], taken: int, clock: float) -> range:
    """Indices of the points that a snapshot now, at `clock`, stands for: those reached and not yet taken (one
    iteration can overshoot several; each point still gets exactly one snapshot)."""
    return range(taken, max(taken, bisect.bisect_right(points, clock)))


def train(args, step, snapshot=None, points: list[float] = ()) -> dict:
    """Meta-train for the budget on the fixed sequence of training episodes. With `snapshot` (() -> a copy of the
    meta-parameters), one copy per point of `points`, taken with the training clock stopped."""
    train_pool, _ = class_pools(args.data)
    paper, budget = PAPER[args.ways], 60 * args.budget_minutes
    iterations, update_seconds, paused, losses, snapshots = 0, 0.0, 0.0, [], []
    start, load_start = time.perf_counter(), os.getloadavg()
    loads, sampled = [], start  # the 1-minute load, sampled every LOAD_EVERY s: each point records its stretch's
    while time.perf_counter() - start - paused < budget and iterations < args.max_iterations:
        if time.perf_counter() - sampled >= LOAD_EVERY:
            loads, sampled = [*loads, os.getloadavg()[0]], time.perf_counter()
        iterations += 1
        batch, _ = sample_episodes(train_pool, args.ways, args.shots, N_QUERY, paper["meta_batch"],
                                   seed=episode_seed(args.seed, iterations))
        t = time.perf_counter()
        losses.append(step(batch, iterations))
        update_seconds += time.perf_counter() - t
        if due := points_due(points, len(snapshots), clock := time.perf_counter() - start - paused):
            stretch, loads = loads or [os.getloadavg()[0]], []  # a stretch too short to sample: the load now
            taken = {"seconds": clock, "iterations": iterations, "state": snapshot(),
                     "load_mean": statistics.fmean(stretch), "load_max": max(stretch)}
            snapshots += [{"point_seconds": points[i], **taken} for i in due]
            paused = time.perf_counter() - start - clock  # the clock stood still while the copy was taken
    return {"iterations": iterations, "tasks": iterations * paper["meta_batch"],
            "train_seconds": time.perf_counter() - start - paused, "paused_seconds": paused,
            "update_seconds": update_seconds,
            "tasks_per_s": iterations * paper["meta_batch"] / max(update_seconds, 1e-9),
            "final_train_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
            "snapshots": snapshots, "loadavg_start": load_start, "loadavg_end": os.getloadavg()}


def run_algorithm(args) -> dict:
    """Train one algorithm for the budget, test it; per-episode accuracies and costs."""
    torch.set_num_threads(args.threads)
    test, (step, trained) = test_episodes(args, args.episodes), trainee(args)  # test episodes held while training
    run = train(args, step)
    peak_train = peak_rss_mb()
    learner = evaluation_learner(args.worker, meta_state(args.worker, trained), args.ways, args.seed)
    accuracy = test_accuracy(learner, test, args.test_steps)
    return {"algorithm": args.worker, **{k: v for k, v in run.items() if k not in ("snapshots", "paused_seconds")},
            "peak_rss_train_mb": peak_train, "peak_rss_mb": peak_rss_mb(), "accuracy": accuracy.tolist()}


def run_curve(args) -> dict:
    """Train one algorithm for the budget with `--points` snapshots, then test each on the curve's episodes."""
    torch.set_num_threads(args.threads)
    test, (step, trained), tested = test_episodes(args, args.curve_episodes), trainee(args), {}
    points = curve_points(60 * args.budget_minutes, args.points)
    run = train(args, step, lambda: meta_state(args.worker, trained), points)
    for s in run["snapshots"]:
        if s["iterations"] not in tested:  # points one iteration overshot share a snapshot: test it once
            learner = evaluation_learner(args.worker, s["state"], args.ways, args.seed)
            tested[s["iterations"]] = test_accuracy(learner, test, args.test_steps).tolist()
    snapshots = [{**{k: v for k, v in s.items() if k != "state"}, "accuracy": tested[s["iterations"]]}
                 for s in run["snapshots"]]
    return {"algorithm": args.worker, **run, "snapshots": snapshots, "peak_rss_mb": peak_rss_mb()}


CONV_SHAPES = ((1, 28, 64), (64, 14, 64), (64, 7, 64), (64, 4, 64))  # (C_in, side in, C_out) of the 4 convs


def measure_machine(args) -> dict:
    """Plain conv GFLOP/s on conv4's four shapes (forward, 600 images, channels-last; the fastest of 20 runs
    per shape, the machine's capability rather than its mood), matmul GFLOP/s (1024 x 1024 products, the
    fastest of 20) and FLOPs per task of each algorithm."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    n, flops, seconds = 75 * 8, 0.0, 0.0
    for c_in, side, c_out in CONV_SHAPES:
        x = torch.rand(n, c_in, side, side).contiguous(memory_format=torch.channels_last)
        w = torch.rand(c_out, c_in, 3, 3)
        times = []
        for _ in range(22):
            t = time.perf_counter()
            F.conv2d(x, w, None, 2, 1)
            times.append(time.perf_counter() - t)
        seconds += min(times[2:])
        flops += 2 * n * c_out * c_in * 9 * ((side + 1) // 2) ** 2
    a, b = torch.rand(1024, 1024), torch.rand(1024, 1024)
    matmul = []
    for _ in range(22):
        t = time.perf_counter()
        a @ b
        matmul.append(time.perf_counter() - t)
    per_task = {}
    g = torch.Generator().manual_seed(0)
    one = EpisodeBatch(torch.rand(1, args.ways * args.shots, 1, 28, 28, generator=g),
                       torch.arange(args.ways).repeat_interleave(args.shots)[None],
                       torch.rand(1, args.ways * N_QUERY, 1, 28, 28, generator=g),
                       torch.arange(args.ways).repeat_interleave(N_QUERY)[None])
    recipes = [a for a in args.algorithms if a in RECIPES]
    for algorithm in ("maml", "fomaml", "reptile", "metasgd", *recipes):
        learner = metapeft_learner(algorithm, args.ways, 0, task_chunk=0, task_batched=False)  # no grouped convs
        with FlopCounterMode(display=False) as counter:
            learner.meta_backward(one)
        per_task[algorithm] = counter.get_total_flops()
    per_task["l2l_maml"] = per_task["maml"]
    return {"conv_gflops": flops / seconds / 1e9, "matmul_gflops": 2 * 1024 ** 3 / min(matmul[2:]) / 1e9,
            "flops_per_task": per_task}


def throughput(args) -> dict:
    """MAML tasks/s of metapeft (task-batched per --chunks; per-task torch.func loop) and learn2learn,
    interleaved in this one process, on real meta-training episodes; by wall time, and by this process's CPU
    time (with one thread, a busy neighbour that takes the core away does not count there)."""
    torch.set_num_threads(args.threads)
    train_pool, _ = class_pools(args.data)
    batches = [sample_episodes(train_pool, args.ways, args.shots, N_QUERY, PAPER[args.ways]["meta_batch"],
                               seed=episode_seed(args.seed, i))[0] for i in range(args.tp_iterations)]
    steps = {name: make_impl(name, args) for name in implementations(args)}
    for step in steps.values():
        step(batches[0])
    rates, cpu_rates, load_start = {name: [] for name in steps}, {name: [] for name in steps}, os.getloadavg()
    for _ in range(args.tp_repeats):
        for name, step in steps.items():
            t, cpu = time.perf_counter(), time.process_time()
            for b in batches:
                step(b)
            rates[name].append(len(batches) * len(batches[0]) / (time.perf_counter() - t))
            cpu_rates[name].append(len(batches) * len(batches[0]) / (time.process_time() - cpu))
    return {"rates": rates, "cpu_rates": cpu_rates, "loadavg_start": load_start, "loadavg_end": os.getloadavg()}


def implementations(args) -> list[str]:
    return ["l2l_maml", *(f"metapeft_{c}" for c in args.chunks.split(",")), "metapeft_loop"]


def make_impl(name: str, args):
    """One MAML meta-iteration of an implementation: l2l_maml, metapeft_loop or metapeft_<task>x<query>."""
    if name == "l2l_maml":
        return l2l_step(args.ways, args.seed)[0]
    if name == "metapeft_loop":  # the per-task torch.func path, one task's graph at a time, like learn2learn
        return metapeft_step(metapeft_learner("maml", args.ways, args.seed, task_chunk=1, task_batched=False))
    task_chunk, query_chunk = (int(v) for v in name.removeprefix("metapeft_").split("x"))
    return metapeft_step(metapeft_learner("maml", args.ways, args.seed, task_chunk, query_chunk))


def peak_of(args) -> dict:
    """Peak RSS of `--tp-iterations` MAML meta-iterations of one implementation (this process alone)."""
    torch.set_num_threads(args.threads)
    train_pool, _ = class_pools(args.data)
    batches = [sample_episodes(train_pool, args.ways, args.shots, N_QUERY, PAPER[args.ways]["meta_batch"],
                               seed=episode_seed(args.seed, i))[0] for i in range(args.tp_iterations)]
    step = make_impl(args.impl, args)
    before = peak_rss_mb()
    for b in batches:
        step(b)
    return {"peak_rss_mb": peak_rss_mb(), "before_training_mb": before}


# ---------------------------------------------------------------- driver

def worker_env(args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("LD_PRELOAD", None)
    if args.allocator == "tcmalloc":
        if not TCMALLOC.exists():
            raise FileNotFoundError(f"{TCMALLOC} not found: apt-get install -y libtcmalloc-minimal4, "
                                    "or pass --allocator default")
        env["LD_PRELOAD"] = str(TCMALLOC)
    return env


def run_worker(args, worker: str, extra: list[str] = ()) -> dict:
    """Run this script as `--worker worker` in a fresh process; return the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, *args.passthrough, "--worker", worker, "--worker-out", str(out), *extra]
        subprocess.run(cmd, env=worker_env(args), check=True, cwd=ROOT)
        return json.loads(out.read_text())


def machine_info(args) -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": args.threads, "cpu_count": os.cpu_count(), "allocator": args.allocator,
            "ld_preload": str(TCMALLOC) if args.allocator == "tcmalloc" else "", "loadavg_start": os.getloadavg()}


def accuracy_benchmark(args) -> None:
    from components.significance import compare_methods, summarize  # scipy: the driver only, not every worker

    cached_table(args.data)  # decode the zips once, here, not in every worker
    machine = {**machine_info(args), **run_worker(args, "_machine")}
    runs = {}
    for algorithm in args.algorithms:
        print(f"training {algorithm} for {args.budget_minutes:g} min ...", flush=True)
        runs[algorithm] = run_worker(args, algorithm)
    machine["loadavg_end"] = os.getloadavg()
    results = pd.concat([pd.DataFrame({"episode": np.arange(args.episodes), "method": a, "metric": "accuracy",
                                       "value": 100 * np.asarray(r["accuracy"])}) for a, r in runs.items()])
    summary = summarize(results, "accuracy")
    comparisons = compare_methods(results, "accuracy", lower_is_better=False) if len(runs) > 1 else pd.DataFrame()
    rows = []
    for a, r in runs.items():
        flops = machine["flops_per_task"][a]
        rows.append({"algorithm": a, "accuracy": summary.loc[a, "mean"], "ci95": summary.loc[a, "ci_half"],
                     "iterations": r["iterations"], "tasks_per_s": r["tasks_per_s"],
                     "peak_rss_train_mb": r["peak_rss_train_mb"], "peak_rss_mb": r["peak_rss_mb"],
                     "gflop_per_task": flops / 1e9,
                     "conv_rate_fraction": r["tasks_per_s"] * flops / (machine["conv_gflops"] * 1e9),
                     "final_train_loss": r["final_train_loss"], "loadavg_1min_start": r["loadavg_start"][0],
                     "loadavg_1min_end": r["loadavg_end"][0]})
    table = pd.DataFrame(rows)
    print_report(args, machine, table, comparisons)
    out = {"settings": settings(args), "machine": machine, "published_maml": PUBLISHED.get((args.ways, args.shots)),
           "results": table.to_dict("records"), "comparisons": comparisons.to_dict("records")}
    write_json_atomic(out, args.out)
    write_parquet_atomic(results, args.out.with_suffix(".episodes.parquet"))
    print(f"wrote {args.out} and {args.out.with_suffix('.episodes.parquet')}")


def curve_rows(snapshots: list[dict]) -> list[dict]:
    """One row per point of a run's curve: its time, the iterations done, query accuracy (%) on the curve's
    episodes with its 95% t-interval half-width. snapshots: `run_curve`'s, each with per-episode accuracies."""
    from components.significance import mean_ci

    rows = []
    for s in snapshots:
        mean, half = mean_ci(100 * np.asarray(s["accuracy"]))
        rows.append({"point_seconds": s["point_seconds"], "seconds": s["seconds"], "iterations": s["iterations"],
                     "accuracy": mean, "ci95": half,
                     **{k: s[k] for k in ("load_mean", "load_max") if k in s}})  # runs before these: not recorded
    return rows


def curve_table(runs: dict[str, dict]) -> pd.DataFrame:
    """Per-episode accuracies of every snapshot, tidy: (episode, method, point_seconds, seconds, iterations,
    metric, value)."""
    return pd.DataFrame([{"episode": e, "method": a, "point_seconds": s["point_seconds"], "seconds": s["seconds"],
                          "iterations": s["iterations"], "metric": "accuracy", "value": 100 * v}
                         for a, r in runs.items() for s in r["snapshots"] for e, v in enumerate(s["accuracy"])])


REFERENCE = "l2l_maml"  # the curves every other algorithm is compared with, point by point


def curve_comparisons(table: pd.DataFrame, reference: str = REFERENCE) -> list[dict]:
    """Each algorithm against the reference at every point both have, paired over the same test episodes
    (`components.significance.paired_comparison`, accuracy in points): algorithm, point_seconds, n, mean_diff,
    ci_low, ci_high, p_ttest, p_wilcoxon. table: `curve_table`'s rows (several sessions' joined). [] without the
    reference."""
    from components.significance import paired_comparison

    if reference not in set(table["method"]):
        return []
    scores = table.pivot_table(index=["point_seconds", "episode"], columns="method", values="value")
    rows = []
    for (point, frame) in scores.groupby(level="point_seconds"):
        for algorithm in (c for c in frame.columns if c != reference):
            pair = frame[[algorithm, reference]].dropna()
            if len(pair):
                test = paired_comparison(pair[algorithm].to_numpy(), pair[reference].to_numpy())
                rows.append({"algorithm": algorithm, "reference": reference, "point_seconds": float(point),
                             **{k: test[k] for k in ("n", "mean_diff", "ci_low", "ci_high", "p_ttest", "p_wilcoxon")}})
    return rows


# what options add, (with, without) where both ran: each recipe against the algorithm it sets options on, the
# 5-step inner loop against the paper's 1 step, and the ablation: MAML++ against MAML++ less each option
OPTION_PAIRS = (("protomaml", "maml"), ("maml++", "maml"), ("maml-5step", "maml"), ("maml++", "maml-5step"),
                ("maml++", "maml++/no-lslr"), ("maml++", "maml++/no-msl"), ("maml++", "maml++/no-bn"))


def all_comparisons(table: pd.DataFrame) -> list[dict]:
    """`curve_comparisons` against learn2learn's MAML, then each pair of OPTION_PAIRS (what its options add, on the
    same episodes at the same wall-clock points) where both are in the table."""
    rows = curve_comparisons(table)
    methods = set(table["method"])
    for method, base in OPTION_PAIRS:
        if {method, base} <= methods:
            rows += curve_comparisons(table[table["method"].isin([method, base])], reference=base)
    return rows


def plot_curves(curves: dict[str, list[dict]], title: str, path: Path) -> None:
    """Accuracy against training seconds, one line per algorithm with its 95% band; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from components.storage import write_atomic

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        t, acc, half = (np.array([r[k] for r in rows], dtype=float) for k in ("seconds", "accuracy", "ci95"))
        line, = ax.plot(t, acc, marker="o", label=name)
        ax.fill_between(t, acc - np.nan_to_num(half), acc + np.nan_to_num(half), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="meta-training seconds (wall clock)", ylabel="meta-test accuracy % (95% CI)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def previous_curves(args) -> dict | None:
    """With --add, the curves JSON already at the output (another session's runs), checked before any training:
    the same settings (recipes aside), none of --algorithms in it. SystemExit naming the file otherwise."""
    if not args.add:
        return None
    path = args.curves_out
    if not path.is_file():
        raise SystemExit(f"--add: {path} not found; run without --add first")
    before = json.loads(path.read_text())
    ours = {**settings(args), "points": args.points, "curve_episodes": args.curve_episodes}
    theirs = {k: v for k, v in before["settings"].items() if k != "recipes"}
    if differ := sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)):
        raise SystemExit(f"--add: {path} was run with other settings: " +
                         ", ".join(f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ))
    if there := sorted(set(args.algorithms) & set(before["curves"])):
        raise SystemExit(f"--add: {path} already has {there}; leave them out of --algorithms")
    if before.get("smoke") != args.smoke:
        raise SystemExit(f"--add: {path} is {'a smoke run' if before.get('smoke') else 'not a smoke run'}")
    return before


def curves_benchmark(args) -> None:
    before = previous_curves(args)
    git = git_state()  # the code the runs start with (a 2-hour run outlives later commits)
    cached_table(args.data)  # decode the zips once, here, not in every worker
    machine, runs = machine_info(args), {}
    for algorithm in args.algorithms:
        print(f"training {algorithm} for {args.budget_minutes:g} min, {args.points} snapshots ...", flush=True)
        runs[algorithm] = run_worker(args, algorithm)
    machine["loadavg_end"] = os.getloadavg()
    curves = {a: curve_rows(r["snapshots"]) for a, r in runs.items()}
    title = f"Omniglot {args.ways}-way {args.shots}-shot, {args.curve_episodes} test episodes" + \
        (" (smoke)" if args.smoke else "")
    out = {"settings": {**settings(args), "points": args.points, "curve_episodes": args.curve_episodes,
                        "recipes": {a: RECIPES[a] for a in args.algorithms if a in RECIPES}},
           "smoke": args.smoke, "command": shlex.join(["python", "benchmarks/omniglot.py", *sys.argv[1:]]),
           "git": git, "machine": machine, "curves": curves,
           "runs": {a: {k: v for k, v in r.items() if k not in ("snapshots", "algorithm")} for a, r in runs.items()}}
    for a, rows in curves.items():
        print(f"{a:<10} " + "  ".join(f"{r['seconds']:.0f}s/{r['iterations']}it {r['accuracy']:.1f}" for r in rows))
    table = curve_table(runs)
    for run in out["runs"].values():  # each run keeps the machine state and code it ran with (--add joins sessions)
        run["machine"], run["git"] = machine, out["git"]
    if before is not None:
        out = {**out, "settings": {**out["settings"], "recipes": {**before["settings"].get("recipes", {}),
                                                                  **out["settings"]["recipes"]}},
               "command": f"{before['command']} ; {out['command']}", "machine": before["machine"],
               "git": before.get("git"),  # the first session's (each run's machine state is in its runs entry)
               "curves": {**before["curves"], **curves},
               "runs": {**{a: {"machine": before["machine"], **r} for a, r in before["runs"].items()},
                        **out["runs"]}}
        table = pd.concat([pd.read_parquet(args.curves_out.with_suffix(".episodes.parquet")), table],
                          ignore_index=True)
    out["comparisons"] = all_comparisons(table)
    write_json_atomic(out, args.curves_out)
    write_parquet_atomic(table, args.curves_out.with_suffix(".episodes.parquet"))
    plot_curves(out["curves"], title, args.curves_out.with_suffix(".png"))
    print(f"wrote {args.curves_out} and its .episodes.parquet and .png")
    if args.mlflow:
        logged = log_curves_mlflow(out, args.curves_out)
        print(f"MLflow experiment {MLFLOW_EXPERIMENT!r}: " + ", ".join(f"{a} run {i}" for a, i in logged.items()))


MLFLOW_EXPERIMENT = "benchmark-omniglot-curves"


def log_curves_mlflow(out: dict, path: Path, root: Path = ROOT) -> dict[str, str]:
    """Each curve of a curves JSON (`out`, read from or written to `path`) as one MLflow run of the experiment
    `MLFLOW_EXPERIMENT`: the settings and recipe as params; per point `test_accuracy` and `test_accuracy_ci95` (%)
    at step = iterations and `test_accuracy_by_second` at step = the point's training seconds, each stamped at the
    run's start + its training seconds (MLflow's relative-time axis is the training clock); the JSON and figure
    as artifacts; the commit the curve was trained at as a tag. A curve already logged (the same file name,
    algorithm and numbers) is not logged again. Returns {algorithm: run id}, the new and the found."""
    from mlflow.entities import Metric

    from flows.tracking import Tracker, flatten

    tracker, ids = Tracker(root, MLFLOW_EXPERIMENT), {}
    for algorithm, rows in out["curves"].items():
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
        tags = {"metapeft.benchmark": "omniglot-curves", "metapeft.curves_file": path.name,
                "metapeft.algorithm": algorithm, "metapeft.curve_digest": digest}
        if found := tracker.find_run(tags):
            ids[algorithm] = found
            log_comparisons(tracker, found, out, algorithm)  # (a run logged before its comparison existed)
            continue
        run = out["runs"].get(algorithm, {})
        git = run.get("git") or {}
        run_id = tracker.start_run(f"{path.stem} {algorithm}", tags={
            **tags, "metapeft.smoke": str(bool(out.get("smoke"))).lower(),
            "metapeft.trained_at_commit": git.get("commit") or "not recorded",
            "metapeft.trained_dirty": str(git.get("dirty", "not recorded")).lower()})
        recipe = out["settings"].get("recipes", {}).get(algorithm, {})
        tracker.log_params(run_id, {**flatten({k: v for k, v in out["settings"].items() if k != "recipes"}),
                                    **flatten({"recipe": recipe}), "algorithm": algorithm,
                                    "threads": run.get("machine", out["machine"]).get("threads"),
                                    "command": out["command"]})
        start = tracker.client.get_run(run_id).info.start_time
        points = []
        for r in rows:
            stamp = start + int(1000 * r["seconds"])
            points += [Metric("test_accuracy", r["accuracy"], stamp, r["iterations"]),
                       Metric("test_accuracy_ci95", r["ci95"], stamp, r["iterations"]),
                       Metric("test_accuracy_by_second", r["accuracy"], stamp, round(r["point_seconds"]))]
        tracker.log_points(run_id, points)
        tracker.log_metrics(run_id, {k: run[k] for k in ("iterations", "tasks_per_s", "train_seconds")
                                     if isinstance(run.get(k), (int, float))})
        log_comparisons(tracker, run_id, out, algorithm)
        for artifact in (path, path.with_suffix(".png")):
            if artifact.is_file():
                tracker.log_artifact(run_id, artifact)
        tracker.end_run(run_id)
        ids[algorithm] = run_id
    return ids


def log_comparisons(tracker, run_id: str, out: dict, algorithm: str) -> None:
    """The algorithm's paired differences (`all_comparisons`, points) at every point, one metric per reference:
    `accuracy_minus_<reference>_by_second` (step: the point's training seconds), each unless the run has it."""
    from mlflow.entities import Metric

    rows = [c for c in out.get("comparisons", []) if c["algorithm"] == algorithm]
    run = tracker.client.get_run(run_id)
    logged, start = run.data.metrics, run.info.start_time
    for reference in dict.fromkeys(c["reference"] for c in rows):
        if (name := f"accuracy_minus_{reference.replace('+', 'p')}_by_second") not in logged:  # MLflow: no +
            tracker.log_points(run_id, [Metric(name, c["mean_diff"], start + int(1000 * c["point_seconds"]),
                                               round(c["point_seconds"])) for c in rows if c["reference"] == reference])


def settings(args) -> dict:
    return {"ways": args.ways, "shots": args.shots, "episodes": args.episodes, "test_steps": args.test_steps,
            "budget_minutes": args.budget_minutes, "max_iterations": args.max_iterations, "seed": args.seed,
            "meta_lr": META_LR, "n_query": N_QUERY, **PAPER[args.ways], "train_steps_overrides": TRAIN_STEPS,
            "metapeft_task_chunk": args.task_chunk, "metapeft_query_chunk": args.query_chunk}


def print_report(args, machine, table: pd.DataFrame, comparisons: pd.DataFrame) -> None:
    published = PUBLISHED.get((args.ways, args.shots))
    print(f"\nOmniglot {args.ways}-way {args.shots}-shot, {args.episodes} test episodes, {args.test_steps} test steps, "
          f"{args.budget_minutes:g} min each; {args.threads} threads, allocator {args.allocator}; "
          f"conv {machine['conv_gflops']:.0f} GFLOP/s")
    if published:
        print(f"published MAML: {published[0]} +- {published[1]} %")
    print(f"{'algorithm':<10} {'accuracy %':>16} {'iters':>6} {'tasks/s':>8} {'peak MB train/all':>17} "
          f"{'GFLOP/task':>10} {'conv rate':>9}")
    for r in table.itertuples():
        print(f"{r.algorithm:<10} {r.accuracy:>9.2f} +- {r.ci95:<4.2f} {r.iterations:>6} {r.tasks_per_s:>8.1f} "
              f"{r.peak_rss_train_mb:>8.0f} /{r.peak_rss_mb:>7.0f} {r.gflop_per_task:>10.2f} "
              f"{100 * r.conv_rate_fraction:>8.1f}%")
    if not comparisons.empty:
        print("paired comparisons (Holm-adjusted t-test p):")
        for c in comparisons.itertuples():
            print(f"  {c.method_a} - {c.method_b}: {c.mean_diff:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}] "
                  f"p_holm={c.p_ttest_holm:.3g}{'  *' if c.a_better else ''}")


def throughput_benchmark(args) -> None:
    cached_table(args.data)
    rows, allocators = [], args.allocators.split(",")
    measured = {}
    for allocator in allocators:
        args.allocator = allocator
        measured[allocator] = run_worker(args, "_machine")
    # the machine's rates: the best under any allocator (glibc's faults in the 30 MB conv outputs cap its conv rate)
    conv_rate, matmul_rate = (max(m[k] for m in measured.values()) for k in ("conv_gflops", "matmul_gflops"))
    for allocator in allocators:
        args.allocator, machine = allocator, measured[allocator]
        timed = run_worker(args, "_throughput")
        peaks = {name: run_worker(args, "_peak", ["--impl", name]) for name in implementations(args)}
        base, cpu_base = (statistics.median(timed[k]["l2l_maml"]) for k in ("rates", "cpu_rates"))
        gflop = machine["flops_per_task"]["maml"] / 1e9  # the same work per task for every implementation
        for name, rates in timed["rates"].items():
            ratios = [a / b for a, b in zip(rates, timed["rates"]["l2l_maml"])]
            cpu_rates = timed["cpu_rates"][name]
            rows.append({"allocator": allocator, "threads": args.threads, "implementation": name,
                         "tasks_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                         "vs_l2l": statistics.median(rates) / base, "vs_l2l_per_round": statistics.median(ratios),
                         "cpu_tasks_per_s": statistics.median(cpu_rates),
                         "cpu_vs_l2l": statistics.median(cpu_rates) / cpu_base,
                         "gflop_per_task": gflop, "conv_gflops": conv_rate, "matmul_gflops": matmul_rate,
                         "conv_gflops_this_allocator": machine["conv_gflops"],
                         "matmul_gflops_this_allocator": machine["matmul_gflops"],
                         "conv_rate_fraction": statistics.median(rates) * gflop / conv_rate,
                         "matmul_rate_fraction": statistics.median(rates) * gflop / matmul_rate,
                         "peak_rss_mb": peaks[name]["peak_rss_mb"],
                         "peak_rss_over_start_mb": peaks[name]["peak_rss_mb"] - peaks[name]["before_training_mb"],
                         "rates": rates, "cpu_rates": cpu_rates, "loadavg_start": timed["loadavg_start"],
                         "loadavg_end": timed["loadavg_end"]})
    print(f"\nMAML second order, Omniglot {args.ways}-way {args.shots}-shot, meta-batch {PAPER[args.ways]['meta_batch']}, "
          f"{N_QUERY} queries/class; {args.tp_repeats} interleaved rounds of {args.tp_iterations} meta-iterations")
    print(f"{'allocator':<9} {'thr':>3} {'implementation':<16} {'tasks/s':>8} {'[min, max]':>14} {'x l2l':>6} "
          f"{'x l2l/round':>11} {'CPU x l2l':>9} {'conv':>5} {'matmul':>6} {'peak RSS MB':>11} {'over start':>10} "
          f"{'load':>9}")
    for r in rows:
        print(f"{r['allocator']:<9} {r['threads']:>3} {r['implementation']:<16} {r['tasks_per_s']:>8.1f} "
              f"[{r['min']:>5.1f}, {r['max']:>5.1f}] {r['vs_l2l']:>6.2f} {r['vs_l2l_per_round']:>11.2f} "
              f"{r['cpu_vs_l2l']:>9.2f} {r['conv_rate_fraction']:>5.0%} {r['matmul_rate_fraction']:>6.0%} "
              f"{r['peak_rss_mb']:>11.0f} {r['peak_rss_over_start_mb']:>10.0f} "
              f"{r['loadavg_start'][0]:>4.1f}-{r['loadavg_end'][0]:<4.1f}")
    print(f"conv, matmul: the fraction of the machine's plain-conv ({conv_rate:.0f}) and 1024^2 matmul ({matmul_rate:.0f} "
          "GFLOP/s, the best under any allocator) rate that tasks/s x GFLOP/task reaches; CPU x l2l: the ratio of "
          "CPU-time rates (robust to a busy neighbour with --threads 1)")
    out = {"settings": {**settings(args), "tp_iterations": args.tp_iterations, "tp_repeats": args.tp_repeats},
           "machine": {k: v for k, v in machine_info(args).items() if k not in ("allocator", "ld_preload")},
           "rows": rows}
    write_json_atomic(out, args.throughput_out)
    print(f"wrote {args.throughput_out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-minutes", type=float, default=None, help="wall-clock training budget per algorithm")
    p.add_argument("--ways", type=int, default=5, choices=sorted(PAPER))
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--episodes", type=int, default=600, help="meta-test episodes, the same for every algorithm")
    p.add_argument("--test-steps", type=int, default=10, help="SGD steps on the support set at test time")
    p.add_argument("--data", type=Path, default=Path("../shared/data/omniglot"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocator", choices=("tcmalloc", "default"), default="tcmalloc" if TCMALLOC.exists() else "default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iterations", type=int, default=None, help="stop a run earlier than its budget "
                   "(not with --curves: its points are times of the budget)")
    p.add_argument("--out", type=Path, default=None, help="the JSON (--curves: its .png and .episodes.parquet beside)")
    p.add_argument("--task-chunk", type=int, default=None, help="metapeft: tasks per adaptation graph "
                   f"(default by ways: {CHUNKS})")
    p.add_argument("--query-chunk", type=int, default=None, help="metapeft: tasks per query graph; 1 and "
                   "--task-chunk 1 keep one task's graph at a time, as learn2learn does")
    p.add_argument("--smoke", action="store_true", help="2 iterations each, 20 test episodes: a < 1 min check; "
                   "with --curves: 0.2 min each, 3 points, 10 test episodes")
    p.add_argument("--curves", action="store_true", help="accuracy against training time, --points snapshots a run")
    p.add_argument("--add", action="store_true", help="--curves: add these algorithms' curves to the JSON already "
                   "at the output (run with the same settings, e.g. in an earlier session)")
    p.add_argument("--points", type=int, default=8, help="--curves: equally spaced snapshots of the budget")
    p.add_argument("--curve-episodes", type=int, default=200, help="--curves: the first of the --episodes test "
                   "episodes that every snapshot is tested on")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=None, help="--curves: log each "
                   f"curve to MLflow (experiment {MLFLOW_EXPERIMENT!r}); default on, off for --smoke")
    p.add_argument("--log-mlflow", action="store_true", help="log the curves JSON at --out (default: this "
                   "setting's) to MLflow, each curve once, and exit: no training (a JSON written before the paired "
                   "comparisons were gets them, from its .episodes.parquet)")
    p.add_argument("--throughput", action="store_true", help="MAML tasks/s and peak RSS, metapeft vs learn2learn")
    p.add_argument("--allocators", default="tcmalloc,default", help="--throughput: allocators to compare under")
    p.add_argument("--chunks", default=None, help="--throughput: metapeft task x query chunks, e.g. 16x2,1x1")
    p.add_argument("--tp-iterations", type=int, default=4, help="--throughput: meta-iterations per timing")
    p.add_argument("--tp-repeats", type=int, default=7, help="--throughput: interleaved timings per implementation")
    p.add_argument("--throughput-out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data = args.data.resolve()
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    args.curves = args.curves or args.log_mlflow
    args.mlflow = (not args.smoke) if args.mlflow is None else args.mlflow
    if args.add and not args.curves:
        raise SystemExit("--add: only with --curves")
    if args.curves and args.max_iterations is not None and not args.worker:
        raise SystemExit("--max-iterations: not with --curves, whose points are times of the budget")
    args.max_iterations = 10**9 if args.max_iterations is None else args.max_iterations
    if unknown := sorted(set(args.algorithms) - set(ALGORITHMS) - set(RECIPES)):
        raise SystemExit(f"--algorithms: {unknown} not among {ALGORITHMS} or the recipes {tuple(RECIPES)}")
    args.task_chunk = CHUNKS[args.ways][0] if args.task_chunk is None else args.task_chunk
    args.query_chunk = CHUNKS[args.ways][1] if args.query_chunk is None else args.query_chunk
    args.chunks = args.chunks or f"{args.task_chunk}x{args.query_chunk},1x1"
    if args.smoke and args.curves:
        args.budget_minutes, args.points, args.curve_episodes = args.budget_minutes or 0.2, 3, 10
    elif args.smoke:
        args.budget_minutes, args.max_iterations, args.episodes = args.budget_minutes or 0.5, 2, 20
        args.tp_iterations, args.tp_repeats = 1, 2
    if args.curves and not 0 < args.curve_episodes <= args.episodes:
        raise SystemExit(f"--curve-episodes {args.curve_episodes}: need 1 to --episodes ({args.episodes})")
    tag = f"{args.ways}w{args.shots}s" + ("-smoke" if args.smoke else "")
    args.curves_out = (args.curves and args.out) or ROOT / "benchmarks" / "results" / f"omniglot-curves-{tag}.json"
    args.out = args.out or ROOT / "benchmarks" / "results" / f"omniglot-{tag}.json"
    args.throughput_out = args.throughput_out or ROOT / "benchmarks" / "results" / f"omniglot-throughput-{tag}.json"
    args.passthrough = ["--ways", str(args.ways), "--shots", str(args.shots), "--episodes", str(args.episodes),
                        "--test-steps", str(args.test_steps), "--data", str(args.data), "--threads", str(args.threads),
                        "--seed", str(args.seed), "--max-iterations", str(args.max_iterations),
                        "--budget-minutes", str(args.budget_minutes or 0), "--chunks", args.chunks,
                        "--task-chunk", str(args.task_chunk), "--query-chunk", str(args.query_chunk),
                        "--tp-iterations", str(args.tp_iterations), "--tp-repeats", str(args.tp_repeats),
                        "--algorithms", ",".join(args.algorithms), "--points", str(args.points),
                        "--curve-episodes", str(args.curve_episodes), *(["--curves"] if args.curves else [])]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        work = {"_machine": measure_machine, "_throughput": throughput, "_peak": peak_of}.get(
            args.worker, run_curve if args.curves else run_algorithm)
        write_json_atomic(work(args), args.worker_out)
    elif args.log_mlflow:
        if not args.curves_out.is_file():
            raise SystemExit(f"--log-mlflow: {args.curves_out} not found")
        out = json.loads(args.curves_out.read_text())
        # from its per-episode table: a JSON written before the comparisons (or some of them) were gets them
        compared = all_comparisons(pd.read_parquet(args.curves_out.with_suffix(".episodes.parquet")))
        if out.get("comparisons") != compared:
            out["comparisons"] = compared
            write_json_atomic(out, args.curves_out)
        logged = log_curves_mlflow(out, args.curves_out)
        print(f"MLflow experiment {MLFLOW_EXPERIMENT!r}: " + ", ".join(f"{a} run {i}" for a, i in logged.items()))
    elif args.throughput:
        throughput_benchmark(args)
    elif args.budget_minutes is None:
        raise SystemExit("--budget-minutes is required (or --smoke, or --throughput)")
    elif args.curves:
        curves_benchmark(args)
    else:
        accuracy_benchmark(args)


if __name__ == "__main__":
    main()
