"""User data errors come before Prefect starts, once, as one line naming the file, the class and the setting."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow


def intents(n: int, per: int, short: dict[str, int] | None = None) -> pd.DataFrame:
    rows = [{"text": f"please do task {c} in way {i}", "label": f"intent_{c:02d}"}
            for c in range(n) for i in range((short or {}).get(f"intent_{c:02d}", per))]
    return pd.DataFrame(rows)


def run_cli(project, csv, *args: str, **family) -> tuple[int, list[str]]:
    """`metapeft run` on a text study over csv, with no Prefect server to reach: an early error never needs one."""
    config = project / "study.yaml"
    config.write_text(yaml.safe_dump({
        "family": {"kind": "text", "dataset": "csv", "path": str(csv), "n_way": 3, "k_shot": 1, "n_query": 3,
                   "n_val_episodes": 3, "n_test_episodes": 4, **family},
        "model": {"kind": "minilm", "adapted": "lora", "top_layers": 1, "lora_r": 2}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    env.update(METAPEFT_HOME=str(project), PREFECT_API_URL="http://127.0.0.1:9/api",  # nothing listens there
               OMP_NUM_THREADS="1")
    command = list(args) or ["run", "--config", str(config)]
    done = subprocess.run([sys.executable, "-m", "flows.cli", *[str(config) if a == "CONFIG" else a for a in command]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, [line for line in done.stderr.splitlines() if line.startswith("metapeft:")]


@pytest.mark.parametrize("make, family, expected", [
    (lambda: intents(12, 8, {"intent_01": 2}), {"fractions": [0.5, 0.25, 0.25]},
     ["intents.csv: meta_", " split: k_shot + n_query: 4 exceeds the examples of 1 classes, e.g. ['intent_01'] ([2])",
      "lower family.k_shot or family.n_query"]),
    (lambda: intents(16, 8), {"n_way": 5},
     ["intents.csv: meta_val split: n_way: 5 exceeds the split's 3 classes",  # every short split, not the first
      "; meta_test split: n_way: 5 exceeds the split's 3 classes", "lower family.n_way"]),
    (lambda: pd.concat([intents(12, 8), pd.DataFrame([{"text": "Please do task 3 in way 1", "label": "intent_05"}])]),
     {"fractions": [0.5, 0.25, 0.25]},
     ["intents.csv:27 ('intent_03'), intents.csv:98 ('intent_05')", "family.conflicting_labels: drop"]),
    (None, {}, ["input file not found: ", "intents.csv (a file the family section of ", "relative paths are resolved from "]),
], ids=["class-too-small", "n_way-over-split", "text-under-two-labels", "missing-file"])
def test_data_errors_stop_before_prefect_as_one_line(tmp_path, make, family, expected):
    csv = tmp_path / "intents.csv"
    if make is not None:
        make().to_csv(csv, index=False)
    code, lines = run_cli(tmp_path, csv, **family)
    assert code == 1 and len(lines) == 1, lines
    assert all(part in lines[0] for part in expected), lines[0]
    assert not (tmp_path / "mlruns").exists()  # nothing started: no MLflow store, no flow run


@pytest.mark.parametrize("command", [["run", "--config", "CONFIG", "--stage", "task_sets"],
                                     ["stages", "--config", "CONFIG"]], ids=["run-stage-task_sets", "stages"])
def test_the_same_errors_from_a_stage_run_and_from_stages(tmp_path, command):
    csv = tmp_path / "intents.csv"
    if command[0] == "run":
        intents(16, 8).to_csv(csv, index=False)
    code, lines = run_cli(tmp_path, csv, *command, n_way=5)
    assert code == 1 and len(lines) == 1, lines
    expected = "n_way: 5 exceeds the split's 3 classes" if command[0] == "run" else "input file not found"
    assert expected in lines[0] and not (tmp_path / "mlruns").exists()


def test_labels_are_stripped_and_counted(tmp_path):
    from flows.config import load_config
    from flows.families import family_for
    from flows.validation import validate_family

    table = intents(9, 8)
    table.loc[table["label"] == "intent_02", "label"] = "intent_02 "  # a trailing space: the same class
    table.to_csv(tmp_path / "intents.csv", index=False)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"family": {"kind": "text", "dataset": "csv", "path": str(tmp_path / "intents.csv"),
                                                 "n_way": 2, "n_query": 3, "n_val_episodes": 2, "n_test_episodes": 2},
                                      "model": {"kind": "minilm", "adapted": "lora"}}))
    family = family_for(load_config(config))
    tables = family.build(seed=0)
    assert tables["utterances"]["label"].nunique() == 9 and "intent_02" in set(tables["utterances"]["label"])
    report = validate_family(family, tables)
    assert {r["what"]: r["count"] for r in report["cleaning"]}["labels_stripped"] == 8
