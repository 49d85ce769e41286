"""meta_train: exact resume, early stopping, budget, checkpoints, logging. Tiny sinusoid tasks."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from components.metalearners import MetaLearner, MetaLearnerConfig
from components.models import MLP
from components.tasksets import SinusoidFamily, TaskBatch, sample_sinusoid_tasks, to_batch
from components.training import TrainConfig, meta_batch_indices, meta_train

SIZES = (1, 8, 8, 1)


@pytest.fixture(scope="module")
def pools() -> tuple[TaskBatch, TaskBatch]:
    """12 meta-train and 4 meta-val tasks, 5 support + 5 query points each."""
    family = SinusoidFamily(k_shot=5, n_query=5)
    table = sample_sinusoid_tasks(family, {"meta_train": 12, "meta_val": 4}, seed=0)
    return tuple(to_batch(table[table["split"] == s]) for s in ("meta_train", "meta_val"))


def make_learner(algorithm: str = "maml") -> MetaLearner:
    torch.manual_seed(0)
    cfg = MetaLearnerConfig(algorithm=algorithm, inner_steps=2, fast_lr=0.02)
    return MetaLearner(MLP(SIZES), cfg, F.mse_loss)


def cfg_for(**kw) -> TrainConfig:
    base = dict(meta_lr=1e-2, iterations=14, meta_batch_size=4, val_every=3, patience=0, checkpoint_every=5, seed=1)
    return TrainConfig(**{**base, **kw})


def assert_states_equal(a: dict, b: dict) -> None:
    for group in ("params", "lrs"):
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}.{k}"


def assert_same_run(resumed, fresh) -> None:
    assert_states_equal(resumed.final_state, fresh.final_state)
    assert_states_equal(resumed.state, fresh.state)
    pd.testing.assert_frame_equal(resumed.history, fresh.history, check_exact=True)
    assert (resumed.best_iteration, resumed.iterations_total, resumed.stop_reason) == \
        (fresh.best_iteration, fresh.iterations_total, fresh.stop_reason)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
def test_resume_after_stop_equals_uninterrupted_run(pools, tmp_path, algorithm):
    train, val = pools
    fresh = meta_train(make_learner(algorithm), train, val, cfg_for())
    ckpt = tmp_path / "run.pt"
    first = meta_train(make_learner(algorithm), train, val, cfg_for(iterations=7), ckpt)  # 7: no val, no ckpt tick
    assert first.iterations_run == 7
    resumed = meta_train(make_learner(algorithm), train, val, cfg_for(), ckpt)
    assert resumed.iterations_run == 7
    assert_same_run(resumed, fresh)


def test_resume_after_crash_uses_periodic_checkpoint(pools, tmp_path):
    train, val = pools
    fresh = meta_train(make_learner("metasgd"), train, val, cfg_for())

    class Crash(Exception):
        pass

    def crash_at_9(iteration, metrics):
        if iteration == 9:
            raise Crash

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Crash):
        meta_train(make_learner("metasgd"), train, val, cfg_for(), ckpt, log=crash_at_9)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 5
    resumed = meta_train(make_learner("metasgd"), train, val, cfg_for(), ckpt)
    assert resumed.iterations_run == 9
    assert_same_run(resumed, fresh)
    assert list(tmp_path.iterdir()) == [ckpt]  # no temp files left behind


def test_finished_checkpoint_resumes_with_zero_steps(pools, tmp_path):
    train, val = pools
    ckpt = tmp_path / "run.pt"
    done = meta_train(make_learner(), train, val, cfg_for(), ckpt)
    learner = make_learner()
    again = meta_train(learner, train, val, cfg_for(), ckpt)
    assert again.iterations_run == 0 and again.iterations_total == 14
    assert_same_run(again, done)
    assert_states_equal(learner.state_dict(), done.final_state)


def test_checkpoint_loads_with_weights_only(pools, tmp_path):
    train, val = pools
    ckpt = tmp_path / "sub" / "run.pt"
    meta_train(make_learner("metasgd"), train, val, cfg_for(), ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 14
    assert set(state["history"]) == {"iteration", "metric", "value"}
    assert len(state["history"]["value"]) == 14 + 5  # train losses + val at 0, 3, 6, 9, 12
    assert set(state["learner"]) == {"params", "lrs"} and "state" in state["optimizer"]


def test_resume_with_other_config_fails_loudly(pools, tmp_path):
    train, val = pools
    ckpt = tmp_path / "run.pt"
    meta_train(make_learner(), train, val, cfg_for(iterations=3), ckpt)
    with pytest.raises(ValueError, match="train.seed"):
        meta_train(make_learner(), train, val, cfg_for(seed=2), ckpt)
    with pytest.raises(ValueError, match="learner.algorithm"):
        meta_train(make_learner("reptile"), train, val, cfg_for(), ckpt)


def test_early_stopping_on_flat_val_loss(pools, tmp_path):
    train, val = pools
    cfg = cfg_for(meta_lr=0.0, iterations=50, val_every=2, patience=3)
    ckpt = tmp_path / "run.pt"
    result = meta_train(make_learner(), train, val, cfg, ckpt)
    # meta_lr = 0 keeps the val loss exactly flat: best at 0, then 3 validations (2, 4, 6) without improvement
    assert (result.stop_reason, result.iterations_total, result.best_iteration) == ("early_stopping", 6, 0)
    val_losses = result.history.query("metric == 'val_loss'")["value"]
    assert val_losses.nunique() == 1 and len(val_losses) == 4
    again = meta_train(make_learner(), train, val, cfg, ckpt)
    assert (again.stop_reason, again.iterations_run) == ("early_stopping", 0)


def test_best_state_is_kept_and_training_helps(pools):
    train, val = pools
    result = meta_train(make_learner(), train, val, cfg_for(iterations=30, val_every=5))
    vals = result.history.query("metric == 'val_loss'").set_index("iteration")["value"]
    assert result.best_iteration == vals.idxmin() and vals.min() < vals.loc[0]
    if result.best_iteration != 30:
        assert not torch.equal(result.state["params"]["net.0.weight"], result.final_state["params"]["net.0.weight"])


def test_budget_stops_and_next_call_goes_on(pools, tmp_path):
    train, val = pools
    ckpt = tmp_path / "run.pt"
    stopped = meta_train(make_learner(), train, val, cfg_for(budget_seconds=0.0), ckpt)
    assert (stopped.stop_reason, stopped.iterations_run) == ("budget", 0)
    short = meta_train(make_learner(), train, val, cfg_for(iterations=10**6, budget_seconds=0.3))
    assert short.stop_reason == "budget" and 0 < short.iterations_run < 10**6
    resumed = meta_train(make_learner(), train, val, cfg_for(), ckpt)
    assert_same_run(resumed, meta_train(make_learner(), train, val, cfg_for()))


def test_seconds_total_adds_up_across_budgeted_pieces(pools, tmp_path):
    """A training continued over several budgets counts every piece's seconds (seconds: this call's only)."""
    train, val = pools
    ckpt = tmp_path / "run.pt"
    meta_train(make_learner(), train, val, cfg_for(iterations=2))  # warm-up: the first call's setup is slow
    pieces = [meta_train(make_learner(), train, val, cfg_for(iterations=10**6, budget_seconds=0.3), ckpt)
              for _ in range(3)]
    assert all(p.stop_reason == "budget" for p in pieces) and pieces[-1].iterations_run > 0
    assert pieces[0].seconds_total == pytest.approx(pieces[0].seconds, abs=0.05)
    for before, after in zip(pieces, pieces[1:]):
        assert after.seconds_total == pytest.approx(before.seconds_total + after.seconds, abs=0.05)
    assert pieces[-1].seconds_total > 0.85  # three budgets of 0.3 s


def test_log_gets_every_train_loss_and_val_loss(pools):
    train, val = pools
    calls = []
    meta_train(make_learner(), train, val, cfg_for(iterations=6), log=lambda i, m: calls.append((i, sorted(m))))
    assert calls == [(0, ["val_loss"]), (1, ["train_loss"]), (2, ["train_loss"]), (3, ["train_loss", "val_loss"]),
                     (4, ["train_loss"]), (5, ["train_loss"]), (6, ["train_loss", "val_loss"])]


def test_meta_batches_depend_on_seed_and_iteration_only():
    a = meta_batch_indices(12, 4, seed=1, iteration=3)
    assert torch.equal(a, meta_batch_indices(12, 4, seed=1, iteration=3))
    assert len(set(a.tolist())) == 4 and a.max() < 12
    assert not torch.equal(a, meta_batch_indices(12, 4, seed=1, iteration=4))
    assert not torch.equal(a, meta_batch_indices(12, 4, seed=2, iteration=3))


def test_config_rejects_bad_values(pools):
    with pytest.raises(ValueError, match="val_every"):
        TrainConfig(val_every=0)
    train, val = pools
    with pytest.raises(ValueError, match="meta_batch_size"):
        meta_train(make_learner(), train, val, cfg_for(meta_batch_size=13))


def test_a_budget_stop_between_validations_still_scores_the_last_state(pools):
    """Without a last validation a short budget would hand back the iteration-0 meta-parameters."""
    import time as _time

    train, val = pools
    start = _time.perf_counter()
    result = meta_train(make_learner("maml"), train, val, cfg_for(iterations=10_000, val_every=10_000,
                                                                  budget_seconds=0.5))
    assert result.stop_reason == "budget" and _time.perf_counter() - start < 5
    vals = result.history[result.history["metric"] == "val_loss"]
    assert vals["iteration"].tolist() == [0, result.iterations_total]
    assert result.best_iteration == result.iterations_total  # training improved on the start


def test_a_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path, monkeypatch, pools):
    """Storages tagged cuda:0 (as a GPU machine writes them) load here: no GPU needed to write such a file."""
    import torch.serialization

    from components.storage import load_tensors

    train, val = pools
    path = tmp_path / "checkpoint.pt"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        meta_train(make_learner(), train, val, cfg_for(iterations=6), path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # what a plain load does on a CPU-only machine
    assert load_tensors(path)["iteration"] == 6
    resumed = meta_train(make_learner(), train, val, cfg_for(), path)
    assert resumed.iterations_run == 14 - 6
    assert_same_run(resumed, meta_train(make_learner(), train, val, cfg_for(), tmp_path / "straight.pt"))


def test_every_tensor_file_is_loaded_through_load_tensors():
    """One loader (components/storage.py) maps every saved tensor file to the run's device."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for p in [*root.glob("components/**/*.py"), *root.glob("flows/**/*.py")]
                 if "torch.load(" in p.read_text() and p.name != "storage.py"]
    assert offenders == []


def test_the_last_state_is_validated_whatever_ends_training(pools):
    """iterations 14 with val_every 3: iteration 14 is validated, so the last 2 iterations are not thrown away."""
    train, val = pools
    result = meta_train(make_learner(), train, val, cfg_for())
    validated = result.history.loc[result.history["metric"] == "val_loss", "iteration"].tolist()
    assert validated == [0, 3, 6, 9, 12, 14] and result.stop_reason == "iterations"
    assert result.best_iteration in validated


def test_resume_note_says_how_a_unit_will_start(tmp_path):
    """What the log and `run --dry-run` say of a meta-training about to run: afresh, going on from the trajectory's
    checkpoint, or from the start beside a checkpoint past its iterations (which is kept for the longer run)."""
    import torch

    from flows.stages.meta_train import resume_note, resume_point

    checkpoint = tmp_path / "checkpoint.pt"
    assert resume_note(checkpoint, 400) == "" and resume_point(checkpoint, 400) == (checkpoint, 0, 0)
    torch.save({"iteration": 349}, checkpoint)
    assert resume_note(checkpoint, 400) == "goes on from its checkpoint at iteration 349"
    torch.save({"iteration": 664}, checkpoint)
    assert resume_note(checkpoint, 400) == ("from the start: its checkpoint at iteration 664 is past iterations 400 "
                                            "(kept for the longer run)")
    torch.save({"iteration": 120}, tmp_path / "upto-400.pt")  # an earlier run of 400 beside it
    assert resume_point(checkpoint, 400) == (tmp_path / "upto-400.pt", 120, 664)
    assert resume_note(checkpoint, 400) == "goes on from its checkpoint at iteration 120"
