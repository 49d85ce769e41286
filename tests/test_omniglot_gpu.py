"""benchmarks/omniglot_gpu.py: the full protocol's overrides, its refusal without CUDA, and its CPU dry run end to end
(every algorithm and baseline of the configs) on a small Omniglot in a temporary project."""
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

from components import omniglot
from flows.cli import parse_sets
from flows.config import load_config

ROOT = Path(__file__).parents[1]
SHARED = ROOT.parent / "shared" / "data" / "omniglot"
SPEC = importlib.util.spec_from_file_location("omniglot_gpu", ROOT / "benchmarks" / "omniglot_gpu.py")
gpu = sys.modules["omniglot_gpu"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu)


def study(setting: str, dry: bool = False):
    sets = gpu.set_items(gpu.overrides(setting, dry, None), [])[1::2]
    return load_config(gpu.config_path(setting), parse_sets(tuple(sets)))


@pytest.mark.parametrize("setting, n_way, k_shot, batch, steps, lr, test_steps", [
    ("5w1s", 5, 1, 32, 1, 0.4, 3), ("5w5s", 5, 5, 32, 1, 0.4, 3),
    ("20w1s", 20, 1, 16, 5, 0.1, 5), ("20w5s", 20, 5, 16, 5, 0.1, 5)])
def test_the_full_protocol_is_the_paper_s(setting, n_way, k_shot, batch, steps, lr, test_steps):
    cfg = study(setting)
    assert (cfg.family.n_way, cfg.family.k_shot, cfg.family.n_test_episodes) == (n_way, k_shot, 600)
    mt = cfg.meta_train
    assert (mt.meta_batch_size, mt.inner_steps, mt.fast_lr, mt.iterations) == (batch, steps, lr, 60000)
    assert mt.budget_minutes is None and mt.meta_lr == 1e-3 and cfg.evaluate.steps == test_steps
    assert cfg.runtime.device == "cuda" and cfg.name == f"omniglot-{setting}-paper"
    assert study(setting, dry=True).runtime.device == "cpu"


def test_the_full_protocol_refuses_to_start_without_cuda(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and "--dry-run-cpu" in gpu.no_cuda_message()


@pytest.fixture
def small_omniglot(tmp_path) -> Path:
    """The archive's layout with 5 characters per Vinyals split (20 classes each with rotations: 20-way): Magi 1-5
    meta-train, 6-10 meta-val (images_background), Angelic 1-5 meta-test (images_evaluation)."""
    root = tmp_path / "omniglot"
    (root / "splits_vinyals").mkdir(parents=True)
    splits = {"train": ("Alphabet_of_the_Magi", range(1, 6)), "val": ("Alphabet_of_the_Magi", range(6, 11)),
              "test": ("Angelic", range(1, 6))}
    chars = {split: [f"{a}/character{n:02d}" for n in numbers] for split, (a, numbers) in splits.items()}
    parts = {"images_background": chars["train"] + chars["val"], "images_evaluation": chars["test"]}
    for part, keep in parts.items():
        with zipfile.ZipFile(SHARED / f"{part}.zip") as src, zipfile.ZipFile(root / f"{part}.zip", "w") as dst:
            for name in src.namelist():
                if name.endswith(".png") and name.split("/", 1)[1].rsplit("/", 1)[0] in keep:
                    dst.writestr(name, src.read(name))
    for split, listed in chars.items():
        (root / "splits_vinyals" / f"{split}.txt").write_text(
            "".join(f"{c}/rot{r:03d}\n" for c in listed for r in omniglot.ROTATIONS))
    return root


@pytest.mark.slow  # a Prefect flow per study; CI's `make test` runs it
def test_the_cpu_dry_run_runs_the_studies_end_to_end(prefect_harness, project, small_omniglot, capsys):
    """A 5-way and a 20-way study (both rows of PAPER; 20w5s is the config made by --set), about 13 s each here:
    all four take about 55 s, too close to CI's minute."""
    out = project / "dry.json"
    assert gpu.main(["--dry-run-cpu", "--data", str(small_omniglot), "--out", str(out),
                     "--settings", "5w1s", "20w5s"]) == 0
    results = json.loads(out.read_text())
    assert [s["setting"] for s in results["studies"]] == ["5w1s", "20w5s"]
    for s in results["studies"]:
        methods = {row["method"] for row in s["summary"]}
        assert {"maml", "fomaml", "reptile", "metasgd", "scratch", "pretrain_finetune"} <= methods
    assert results["published_maml"]["20w5s"]["maml_accuracy_pct"] == 98.9
