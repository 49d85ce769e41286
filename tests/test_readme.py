"""Every results table of README.md is what benchmarks/readme_tables.py generates from its JSON."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SPEC = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
readme_tables = sys.modules["readme_tables"] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up
SPEC.loader.exec_module(readme_tables)


def test_every_readme_table_matches_its_json():
    stale = readme_tables.differing((ROOT / "README.md").read_text())
    assert not stale, f"README tables {stale} differ from their JSON: run .venv/bin/python benchmarks/readme_tables.py"


def test_a_number_changed_in_the_readme_is_found():
    text = (ROOT / "README.md").read_text()
    body = readme_tables.blocks(text)["quick"]
    mean = f"{json.loads((readme_tables.RESULTS / 'quick.json').read_text())['summary'][0]['mean']:.4f}"
    assert mean in body
    edited = text.replace(body, body.replace(mean, f"{float(mean) + 0.0001:.4f}", 1))
    assert readme_tables.differing(edited) == ["quick"]
    assert readme_tables.differing(readme_tables.update(edited)) == []  # and regenerating repairs it


def test_a_number_changed_in_the_json_is_found(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(readme_tables.RESULTS, results, ignore=shutil.ignore_patterns("*.parquet", "ui"))
    data = json.loads((results / "throughput.json").read_text())
    data["results"][0]["tasks_per_s"] += 10
    (results / "throughput.json").write_text(json.dumps(data))
    assert readme_tables.differing((ROOT / "README.md").read_text(), results) == ["throughput"]


def test_prose_outside_the_blocks_is_left_alone():
    text = (ROOT / "README.md").read_text()
    edited = text.replace("## Results", "## Results\n\nA sentence someone added.")
    assert readme_tables.update(edited) == readme_tables.update(text).replace(
        "## Results", "## Results\n\nA sentence someone added.")


@pytest.mark.parametrize("broken, why", [
    (lambda t: t.replace("<!-- /table:quick -->", ""), "no block for table"),
    (lambda t: t + "\n<!-- table:nowhere -->\nx\n<!-- /table:nowhere -->\n", "unknown"),
])
def test_a_missing_or_unknown_block_is_an_error(broken, why):
    with pytest.raises(ValueError, match=why):
        readme_tables.differing(broken((ROOT / "README.md").read_text()))


def test_a_json_without_commit_or_machine_says_so():
    assert readme_tables.commit({}) == "commit not recorded"
    assert readme_tables.machine({}) == "machine not recorded"
    assert readme_tables.commit({"git": {"commit": "0123456789abcdef", "dirty": True}}) == \
        "commit 0123456789 with uncommitted changes"


def test_a_block_whose_json_is_not_written_yet_says_so_and_names_its_script(tmp_path):
    """A benchmark not yet run on this code: its block says which script writes which JSON, no numbers; once the
    JSON is there the block is its table."""
    results = tmp_path / "results"
    shutil.copytree(readme_tables.RESULTS, results, ignore=shutil.ignore_patterns("*.parquet", "ui"))
    (results / "quick.json").unlink()
    assert readme_tables.generate("quick", results) == \
        "Not measured yet: `benchmarks/quick.py` writes `benchmarks/results/quick.json`.\n"
    assert readme_tables.differing((ROOT / "README.md").read_text(), results) == ["quick"]


def test_curves_sampled_for_load_say_its_mean_and_max_and_older_runs_their_start_and_end(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(readme_tables.RESULTS, results, ignore=shutil.ignore_patterns("*.parquet", "ui"))
    data = json.loads((results / "omniglot-curves-5w1s.json").read_text())
    first, *others = data["curves"]
    for i, point in enumerate(data["curves"][first]):
        point.update(load_mean=1.0 + i, load_max=2.0 + 2 * i)
    (results / "omniglot-curves-5w1s.json").write_text(json.dumps(data))
    n = len(data["curves"][first])
    text = readme_tables.generate("omniglot-curves", results)
    assert f"mean {(2 + n - 1) / 2:.1f}, max {2.0 + 2 * (n - 1):.1f} (sampled through its training)" in text
    run = data["runs"][others[0]]
    assert f"{run['loadavg_start'][0]:.1f} / {run['loadavg_end'][0]:.1f}" in text
