"""Meta-training of any MetaLearner: one Adam, periodic meta-validation, early stopping, resumable checkpoints.

The meta-batch of iteration i depends only on (seed, i), and a checkpoint holds everything else the
loop carries (meta-parameters, Adam state, the meta learning rate schedule, best state, patience counter,
history), so a run resumed from a checkpoint ends exactly where an uninterrupted run with the same seed ends.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from components.episodes import derive_seed
from components.metalearners import Diverged, MetaLearner, MetaLearnerConfig, rates_in_force
from components.storage import load_tensors, write_atomic
from components.tasksets import TaskBatch

TRAINING_VERSION = "1"
STOP_REASONS = ("iterations", "early_stopping", "budget")
# TrainConfig fields a resumed run must share with its checkpoint: they shape the trajectory.
TRAJECTORY_FIELDS = ("meta_lr", "meta_batch_size", "val_every", "patience", "seed", "cosine_iterations", "min_meta_lr")

Log = Callable[[int, dict[str, float]], None]
Sampler = Callable[[int], TaskBatch]


@dataclass(frozen=True)
class TrainConfig:
    meta_lr: float = 1e-3  # outer Adam step size, the same optimizer for every algorithm
    iterations: int = 1000  # meta-iterations in total, counting those already in a resumed checkpoint
    meta_batch_size: int = 25  # tasks per meta-gradient, drawn without replacement from the train pool
    val_every: int = 100  # iterations between meta-val losses (iteration 0 is validated too)
    patience: int = 0  # validations without a new best val loss before stopping; 0 = never stop early
    checkpoint_every: int = 100  # iterations between checkpoints; 0 = only the one written at the end
    seed: int = 0  # with the iteration number, fixes each meta-batch, so a resume replays exactly
    budget_seconds: float | None = None  # wall-clock limit of one call; a checkpoint lets the next go on
    # MAML++: meta_lr annealed to min_meta_lr along a cosine over this many iterations (then held); 0 = constant
    cosine_iterations: int = 0
    min_meta_lr: float = 0.0  # the cosine's floor (MAML++ used 1e-5)

    def __post_init__(self):
        for name in ("iterations", "patience", "checkpoint_every", "seed", "cosine_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("meta_batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.meta_lr < 0:
            raise ValueError(f"meta_lr: must be >= 0, got {self.meta_lr}")
        if not 0 <= self.min_meta_lr <= self.meta_lr:
            raise ValueError(f"min_meta_lr: need 0 <= min_meta_lr <= meta_lr ({self.meta_lr}), got {self.min_meta_lr}")


@dataclass
class TrainResult:
    state: dict  # best meta-parameters by meta-val loss (MetaLearner.state_dict format): evaluate these
    final_state: dict  # meta-parameters after the last iteration (the learner is left holding them)
    history: pd.DataFrame  # long: iteration, metric (train_loss | val_loss), value
    iterations_run: int  # iterations executed in this call (0 when a finished checkpoint was resumed)
    iterations_total: int  # iterations the meta-parameters have seen, across resumes
    stop_reason: str  # one of STOP_REASONS
    best_iteration: int  # iteration whose meta-parameters are `state`: the best validated, the last state included
    seconds: float  # wall-clock seconds of this call
    seconds_total: float  # wall-clock seconds of training the meta-parameters have seen, across resumes (a run
    # killed between checkpoints counts up to its last checkpoint, the work a resume replays)


def meta_train(learner: MetaLearner, train: TaskBatch | Sampler, val: TaskBatch, cfg: TrainConfig,
               checkpoint_path: Path | None = None, log: Log | None = None) -> TrainResult:
    """Train the learner's meta-parameters in place; resume from checkpoint_path when it exists.

    train: a pool of T_train tasks (meta-batches drawn by `meta_batch_indices`) or a sampler
    iteration -> meta-batch, which must depend on the iteration only (so a resume replays it).
    val: T_val tasks. log(iteration, metrics) gets train_loss at
    every iteration and val_loss at every validation (val_loss alone at iteration 0).
    """
    start = time.perf_counter()
    if not callable(train) and cfg.meta_batch_size > len(train):
        raise ValueError(f"meta_batch_size: {cfg.meta_batch_size} exceeds the {len(train)} train tasks")
    opt = torch.optim.Adam(learner.parameters(), lr=cfg.meta_lr)
    schedule = meta_lr_schedule(opt, cfg)
    path = None if checkpoint_path is None else Path(checkpoint_path)
    if path is not None and path.exists():
        run = _resume(path, learner, opt, schedule, cfg)
    else:
        run = _fresh_run(learner, cfg)
        _validate(learner, val, run, log)
    first, before = run["iteration"], run.get("seconds", 0.0)  # (a checkpoint older than the field: 0)
    while (stop := _stop_reason(run, cfg, start)) is None:
        _iterate(learner, opt, schedule, train, val, run, cfg, log)
        if path is not None and cfg.checkpoint_every and run["iteration"] % cfg.checkpoint_every == 0:
            run["seconds"] = before + time.perf_counter() - start
            _save(path, run, learner, opt, schedule)
    run["seconds"] = before + time.perf_counter() - start
    if path is not None:
        _save(path, run, learner, opt, schedule)  # the trajectory as an uninterrupted run has it: a resume goes on
    final = run
    if _last_validation(run) < run["iteration"]:  # stopped between validations: the last state competes too
        final = {**run, "history": {k: list(v) for k, v in run["history"].items()}}
        _validate(learner, val, final, log)
    return TrainResult(
        state=final["best_state"], final_state=learner.state_dict(), history=pd.DataFrame(final["history"]),
        iterations_run=run["iteration"] - first, iterations_total=run["iteration"], stop_reason=stop,
        best_iteration=final["best_iteration"], seconds=time.perf_counter() - start, seconds_total=run["seconds"])


def meta_batch_indices(n_tasks: int, meta_batch_size: int, seed: int, iteration: int) -> torch.Tensor:
    """Task indices (meta_batch_size,) of one iteration, without replacement, a function of (seed, iteration) only."""
    g = torch.Generator().manual_seed(derive_seed(seed, iteration))
    return torch.randperm(n_tasks, generator=g)[:meta_batch_size]


def meta_lr_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """MAML++'s cosine annealing of the meta learning rate (None: constant), stepped once per meta-iteration: iteration
    i runs at min + (meta_lr - min) * (1 + cos(pi * min(i - 1, N) / N)) / 2, N = cfg.cosine_iterations. A closed form
    of the iteration, so a resumed run (its state is checkpointed) continues the same values."""
    if not cfg.cosine_iterations:
        return None
    n, floor = cfg.cosine_iterations, cfg.min_meta_lr / cfg.meta_lr if cfg.meta_lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda done: floor + (1 - floor) * (1 + math.cos(math.pi * min(done, n) / n)) / 2)


def val_loss(learner: MetaLearner, val: TaskBatch) -> float:
    """Mean query loss over val after learner.cfg.inner_steps inner steps; builds no graph."""
    with torch.no_grad():
        fast = learner.adapt_batch(val.x_spt, val.y_spt, learner.cfg.inner_steps)
        return learner.evaluate_fast(fast, val.x_qry, val.y_qry).mean().item()


def _iterate(learner, opt, schedule, train, val, run, cfg, log) -> None:
    """One meta-iteration, plus a validation when it falls on val_every."""
    it = run["iteration"] + 1
    if callable(train):
        batch = train(it)
    else:
        batch = train.index(meta_batch_indices(len(train), cfg.meta_batch_size, cfg.seed, it))
    opt.zero_grad(set_to_none=True)
    metrics = {"train_loss": learner.meta_backward(batch, it)}
    rates = lambda: {"meta_lr": opt.param_groups[0]["lr"], **rates_in_force(learner.lrs)}  # noqa: E731 (on failure)
    if not math.isfinite(metrics["train_loss"]):
        raise Diverged(f"train_loss is {metrics['train_loss']}", iteration=it, rates=rates())
    opt.step()
    if schedule is not None:
        schedule.step()
    learner.clip_()
    if not torch.stack([torch.isfinite(p).all() for p in learner.parameters()]).all():  # one sync, not one a tensor
        raise Diverged("a meta-parameter became non-finite after the outer step", iteration=it, rates=rates())
    run["iteration"] = it
    _record(run, it, metrics)
    if it % cfg.val_every == 0:
        metrics["val_loss"] = _validate(learner, val, run, log=None)
    if log is not None:
        log(it, metrics)


def _validate(learner, val, run, log) -> float:
    """Record the meta-val loss of the current iteration; update the best state and the patience counter."""
    loss = val_loss(learner, val)
    if not math.isfinite(loss):
        raise Diverged(f"val_loss is {loss}", iteration=run["iteration"], rates=rates_in_force(learner.lrs))
    _record(run, run["iteration"], {"val_loss": loss})
    if loss < run["best_val"]:
        run.update(best_val=loss, best_iteration=run["iteration"], best_state=learner.state_dict(), bad_validations=0)
    else:
        run["bad_validations"] += 1
    if log is not None:
        log(run["iteration"], {"val_loss": loss})
    return loss


def _last_validation(run) -> int:
    history = run["history"]
    return max((i for i, m in zip(history["iteration"], history["metric"]) if m == "val_loss"), default=-1)


def _stop_reason(run, cfg: TrainConfig, start: float) -> str | None:
    if cfg.patience and run["bad_validations"] >= cfg.patience:
        return "early_stopping"
    if run["iteration"] >= cfg.iterations:
        return "iterations"
    if cfg.budget_seconds is not None and time.perf_counter() - start >= cfg.budget_seconds:
        return "budget"
    return None


def _record(run, iteration: int, metrics: dict[str, float]) -> None:
    for metric, value in metrics.items():
        run["history"]["iteration"].append(iteration)
        run["history"]["metric"].append(metric)
        run["history"]["value"].append(float(value))


def _run_config(learner: MetaLearner, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must agree on with the run resuming it (plain types, for weights_only loading)."""
    return {"train": {k: getattr(cfg, k) for k in TRAJECTORY_FIELDS}, "learner": _plain(asdict(learner.cfg))}


def _plain(fields: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


# what a checkpoint written before a field existed holds for it: the field's default
_DEFAULTS = {"train": asdict(TrainConfig()), "learner": _plain(asdict(MetaLearnerConfig()))}


def _fresh_run(learner: MetaLearner, cfg: TrainConfig) -> dict[str, Any]:
    return {"version": TRAINING_VERSION, "config": _run_config(learner, cfg), "iteration": 0, "seconds": 0.0,
            "best_state": learner.state_dict(), "best_val": float("inf"), "best_iteration": 0,
            "bad_validations": 0, "history": {"iteration": [], "metric": [], "value": []}}


def _save(path: Path, run: dict, learner: MetaLearner, opt: torch.optim.Optimizer, schedule=None) -> None:
    """Write run, learner, optimizer (and schedule) state atomically (a kill mid-write keeps the previous one)."""
    state = {**run, "learner": learner.state_dict(), "optimizer": opt.state_dict()}
    if schedule is not None:
        state["schedule"] = schedule.state_dict()
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def checkpoint_iteration(path: Path) -> int:
    """The iteration a checkpoint file holds, 0 when there is none."""
    path = Path(path)
    if not path.exists():
        return 0
    return int(load_tensors(path)["iteration"])


def _resume(path: Path, learner: MetaLearner, opt: torch.optim.Optimizer, schedule, cfg: TrainConfig) -> dict[str, Any]:
    """Load a checkpoint into learner, opt and schedule; return the loop state it holds."""
    device = next(iter(learner.parameters())).device
    ckpt = load_tensors(path, device)  # written on another device: loads here
    if ckpt.get("version") != TRAINING_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r}, expected {TRAINING_VERSION!r}")
    expected = _run_config(learner, cfg)
    for group, fields in expected.items():
        for k, v in fields.items():
            if (held := ckpt["config"][group].get(k, _DEFAULTS[group][k])) != v:
                raise ValueError(f"{path}: checkpoint has {group}.{k}={held!r}, this run has {v!r}")
    learner.load_state_dict(ckpt.pop("learner"))
    opt.load_state_dict(ckpt.pop("optimizer"))
    if schedule is not None:
        schedule.load_state_dict(ckpt.pop("schedule"))
    return ckpt
