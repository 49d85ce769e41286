"""A truncated or edited file in the cache is detected by its entry's manifest and recomputed, never used;
checkpoints load with weights_only=True, so a pickle carrying arbitrary objects is refused; the HTML report."""
import ast
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_truncated_or_edited_cache_files_are_recomputed_and_the_report_is_rewritten(
        prefect_harness, seeded_store, project, tiny_config, store, capsys):
    from flows import cli
    from flows.pipeline import meta_pipeline

    config = tiny_config(project)
    first = meta_pipeline(config_path=config)
    keys, data = first["keys"], project / "data"
    report = project / "reports" / first["run_id"] / "report.html"
    check_report(report.read_text())
    artifacts = {a.path for a in store.client(project).list_artifacts(first["run_id"])}
    assert "report.html" in artifacts

    evaluated = data / "evaluate" / keys["evaluate"] / "results.parquet"
    expected_results = pd.read_parquet(evaluated)
    evaluated.write_bytes(evaluated.read_bytes()[: evaluated.stat().st_size // 2])  # truncated
    test_tasks = data / "task_sets" / keys["task_sets"] / "meta_test.parquet"
    expected_tasks = pd.read_parquet(test_tasks)
    expected_tasks.assign(y=expected_tasks["y"] * 1.01).to_parquet(test_tasks, index=False)  # valid, but edited

    second = meta_pipeline(config_path=config)
    recomputed = {entry.split("/")[0] for entry, hit in second["hits"].items() if not hit}
    assert recomputed == {"task_sets", "evaluate"}  # same keys: downstream entries stay valid hits
    pd.testing.assert_frame_equal(pd.read_parquet(test_tasks), expected_tasks)
    pd.testing.assert_frame_equal(pd.read_parquet(evaluated), expected_results)

    report.unlink()
    assert cli.main(["report", first["run_id"]]) == 0
    assert capsys.readouterr().out.strip() == str(report)
    check_report(report.read_text())
    assert cli.main(["report", "--config", config]) == 0
    check_report((project / "reports" / "tiny" / "report.html").read_text())
    assert cli.main(["report", "no-such-run"]) == 2


def check_report(html: str) -> None:
    """Self-contained: every method in the results and pairwise tables, figures inlined, nothing fetched."""
    for method in ("maml", "scratch", "pretrain_finetune"):
        assert html.count(f">{method}<") >= 2
    for heading in ("Results: meta-test mse", "Learning curves", "Pairwise significance", "Task embeddings"):
        assert heading in html
    assert html.count("src='data:image/png;base64,") >= 5  # CI bars, two curves, three heatmaps
    assert "http://" not in html and "https://" not in html


class Payload:
    """What an attacker would put in a checkpoint: unpickling it calls Path.write_text."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "executed")


def test_checkpoint_carrying_arbitrary_objects_is_refused(tmp_path):
    """meta_train resumes with torch.load(weights_only=True): a crafted pickle is rejected, never executed."""
    import torch.nn.functional as F

    from components.metalearners import MetaLearner, MetaLearnerConfig
    from components.models import MLP
    from components.tasksets import SinusoidFamily, sample_sinusoid_tasks, to_batch
    from components.training import TrainConfig, meta_train

    table = sample_sinusoid_tasks(SinusoidFamily(k_shot=3, n_query=3), {"meta_train": 4, "meta_val": 2}, seed=0)
    train, val = (to_batch(table[table["split"] == s]) for s in ("meta_train", "meta_val"))
    learner = MetaLearner(MLP((1, 4, 1)), MetaLearnerConfig(algorithm="maml"), F.mse_loss)
    checkpoint, marker = tmp_path / "checkpoint.pt", tmp_path / "marker"
    torch.save({"version": "1", "iteration": 1, "payload": Payload(marker)}, checkpoint)
    assert not marker.exists()  # saving does not run it; loading with pickle would

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        meta_train(learner, train, val, TrainConfig(iterations=2, meta_batch_size=2), checkpoint)
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """State files (checkpoints, state.pt) are read in components/ and flows/ only with weights_only=True."""
    calls = []
    for path in [*(REPO / "components").glob("*.py"), *(REPO / "flows").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                weights_only = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                calls.append((path.name, node.lineno, weights_only))
    assert calls and all(w == "True" for _, _, w in calls), calls
