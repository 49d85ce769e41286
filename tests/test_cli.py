"""`metapeft`: help, version, options, --set, --from/--until, --dry-run and the missing-upstream check without
Prefect; runs / compare / export on a tiny finished study (one slow test)."""
import importlib.metadata
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import click
import pandas as pd
import pytest

from flows import cli
from flows.config import load_config
from flows.plan import STAGES, stage_range
from test_pipeline import TINY, write_config

REPO = Path(__file__).resolve().parents[1]


def tiny(project, **sections) -> str:
    """The tiny sinusoid study of test_pipeline with one algorithm (its stages cost seconds)."""
    return write_config(project, **{"meta_train": {**TINY["meta_train"], "algorithms": ["maml"]}, **sections})


def entries(out: str) -> dict[str, tuple[str, str]]:
    """name -> (key, state or action), from the lines of `stages` or `run --dry-run`."""
    lines = [line.split(None, 2) for line in out.splitlines()]
    names = (*STAGES, "train_sets", "prefix")
    return {name: (key, what) for name, key, what in (x for x in lines if x and x[0].split("[")[0] in names)}


def test_no_arguments_prints_the_help_and_succeeds(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: metapeft") and all(c in out for c in ("run", "stages", "runs", "compare", "export"))


def test_version_is_the_installed_package_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"metapeft, version {importlib.metadata.version('metapeft')}"


def test_every_option_shows_its_default_and_choices():
    root = click.Context(cli.cli, info_name="metapeft", **cli.cli.context_settings)  # as `metapeft` makes it
    for name, command in cli.cli.commands.items():
        ctx = click.Context(command, parent=root, info_name=name)
        for option in (p for p in command.params if isinstance(p, click.Option)):
            record = " ".join(option.get_help_record(ctx))
            if not option.is_flag and not option.multiple:
                assert "[default: " in record, f"{name} {option.opts}: {record}"
            if isinstance(option.type, click.Choice):
                assert all(choice in record for choice in option.type.choices), f"{name} {option.opts}: {record}"


def test_stage_options_list_the_stages_of_the_plan(capsys):
    assert cli.main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    for option in ("--stage", "--from", "--until", "--force"):
        assert f"{option} [{'|'.join(STAGES)}]" in out
    assert "[default: configs/quick.yaml]" in out


def run_python(project, code: str) -> list[str]:
    env = {**os.environ, "METAPEFT_HOME": str(project), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_help_version_and_dry_run_start_neither_prefect_nor_mlflow(project):
    loaded = "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'great_expectations', " \
             "'torch'}))"
    quick = run_python(project, f"import sys; from flows.cli import main; main(['--help']); main(['--version']); "
                                f"{loaded}")
    assert quick[-1] == "[]"  # not even torch: flows.plan is read when a stage option is
    dry = run_python(project, f"import sys; from flows.cli import main; assert main(['run', '--config', "
                              f"{tiny(project)!r}, '--dry-run']) == 0; {loaded}")
    assert dry[-1] == "['torch']" and dry[-2].startswith("dry run: 7 to compute")
    assert not (project / "mlruns").exists() and not (project / ".prefect").exists()


def test_dry_run_says_what_would_compute(project, capsys):
    config = tiny(project)
    assert cli.main(["run", "--config", config, "--dry-run"]) == 0
    assert {what for _, what in entries(capsys.readouterr().out).values()} == {"compute (missing)"}
    cli.preflight(load_config(config), project)  # the task sets, as `run` builds them before Prefect
    assert cli.main(["run", "--config", config, "--dry-run"]) == 0
    plan = entries(capsys.readouterr().out)
    assert plan["task_sets"][1] == "cache" and plan["meta_train[maml]"][1] == "compute (missing)"
    assert cli.main(["run", "--config", config, "--dry-run", "--force", "task_sets"]) == 0
    forced = entries(capsys.readouterr().out)
    assert forced["task_sets"][1] == "compute (--force)" and forced["embeddings"][1] == "compute (missing)"


def test_from_until_run_a_contiguous_range():
    assert stage_range("evaluate") == ["evaluate", "baselines", "significance"]
    assert stage_range(None, "meta_train") == ["task_sets", "embeddings", "meta_train"]
    assert stage_range("meta_train", "evaluate") == ["meta_train", "evaluate"]
    assert stage_range() == list(STAGES)
    with pytest.raises(ValueError, match="--from evaluate comes after --until meta_train"):
        stage_range("evaluate", "meta_train")


def test_from_until_in_a_dry_run(project, capsys):
    config = tiny(project)
    assert cli.main(["run", "--config", config, "--dry-run", "--until", "meta_train"]) == 0
    plan = entries(capsys.readouterr().out)
    assert {name: what for name, (_, what) in plan.items()} == {
        "task_sets": "compute (--from/--until)", "train_sets": "compute (missing)",
        "embeddings": "compute (--from/--until)",
        "meta_train[maml]": "compute (--from/--until)", "evaluate": "not run", "baselines": "not run",
        "significance": "not run"}
    assert cli.main(["run", "--config", config, "--dry-run", "--from", "meta_train", "--until", "evaluate"]) == 1
    out, err = capsys.readouterr()
    plan = {name: what for name, (_, what) in entries(out).items()}
    assert plan["task_sets"] == plan["train_sets"] == "missing: needed from the cache"
    assert plan["embeddings"] == "not run"
    assert plan["evaluate"] == "compute (--from/--until)" and plan["baselines"] == "not run"
    assert "'task_sets' (missing" in err


@pytest.mark.parametrize("args, message", [
    (["--from", "evaluate", "--until", "meta_train"], "--from evaluate comes after --until meta_train"),
    (["--from", "evaluate", "--stage", "evaluate"], "--stage cannot be combined with --from / --until"),
    (["--until", "nothing"], "'nothing' is not one of 'task_sets'"),
])
def test_stage_selection_errors_are_usage_errors(project, capsys, args, message):
    assert cli.main(["run", "--config", tiny(project), "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_upstream_stages_are_all_named_before_prefect_starts(project, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "flows.pipeline", None)  # importing it (and so Prefect) would fail
    config = tiny(project, meta_train={**TINY["meta_train"], "algorithms": ["maml", "reptile"]})
    assert cli.main(["run", "--config", config, "--stage", "evaluate", "--set", "evaluate.steps=2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for name in ("'task_sets' (missing", "'meta_train[maml]' (missing", "'meta_train[reptile]' (missing"):
        assert name in err
    assert err.endswith(f"first: metapeft run --config {config} --set evaluate.steps=2 --stage task_sets "
                        f"--stage meta_train")
    assert not (project / "mlruns").exists()

    cli.preflight(load_config(config), project)
    assert cli.main(["run", "--config", config, "--from", "evaluate"]) == 1
    err = capsys.readouterr().err
    assert "task_sets" not in err and "'meta_train[maml]'" in err and "'meta_train[reptile]'" in err


def test_set_values_are_yaml_and_keys_are_section_fields():
    assert cli.parse_sets(("meta_train.iterations=10", "family.n_way=3", "meta_train.algorithms=[maml, reptile]",
                           "significance.confidence=0.9", "runtime.device=cpu", "meta_train.vectorize=false")) == {
        "meta_train": {"iterations": 10, "algorithms": ["maml", "reptile"], "vectorize": False},
        "family": {"n_way": 3}, "significance": {"confidence": 0.9}, "runtime": {"device": "cpu"}}
    assert cli.parse_sets(("seed=3", "family.n_tasks.meta_train=5", "family.n_way=3")) == {
        "seed": 3, "family": {"n_tasks": {"meta_train": 5}, "n_way": 3}}  # top level and deeper: merged key by key
    for bad in ("meta_train.iterations", ".x=1", "meta_train.algorithms=[a", "seed=3,seed.x=1"):
        with pytest.raises(ValueError, match="key=value|not YAML|not a section"):
            cli.parse_sets(tuple(bad.split(",")))


def test_set_changes_the_keys_and_its_errors_name_the_key(project, capsys):
    config = tiny(project)
    assert cli.main(["run", "--config", config, "--dry-run"]) == 0
    before = entries(capsys.readouterr().out)
    assert cli.main(["run", "--config", config, "--dry-run", "--set", "evaluate.steps=4"]) == 0
    after = entries(capsys.readouterr().out)
    changed = {name for name in before if before[name][0] != after[name][0]}
    assert changed == {"evaluate", "baselines", "significance"}
    assert cli.main(["stages", "--config", config, "--set", "evaluate.steps=4"]) == 0  # the same keys as run's
    assert {name: key for name, (key, _) in entries(capsys.readouterr().out).items()} == \
        {name: key for name, (key, _) in after.items()}

    assert cli.main(["run", "--config", config, "--dry-run", "--set", "meta_train.iteratons=10"]) == 2
    assert "meta_train.iteratons: unknown key (did you mean iterations?) (with --set meta_train.iteratons=10)" in \
        capsys.readouterr().err
    assert cli.main(["run", "--config", config, "--dry-run", "--set", "meta_train.iterations=many"]) == 2
    assert "meta_train.iterations: Input should be a valid integer" in capsys.readouterr().err
    assert cli.main(["stages", "--config", config, "--set", "meta_train.iterations=many"]) == 2
    assert "meta_train.iterations: Input should be a valid integer" in capsys.readouterr().err
    assert cli.main(["run", "--config", config, "--dry-run", "--set", "seed=3"]) == 0  # a top-level key
    assert entries(capsys.readouterr().out)["task_sets"][0] != before["task_sets"][0]  # the task sets' seed moved
    assert cli.main(["run", "--config", config, "--dry-run", "--set", "meta_train"]) == 2
    assert "Invalid value for '--set': 'meta_train'" in capsys.readouterr().err


def test_a_transfer_study_runs_whole_with_its_own_settings(capsys):
    config = str(REPO / "configs" / "transfer-omniglot.yaml")
    assert cli.main(["run", "--config", config, "--until", "meta_train"]) == 2
    assert "a transfer study runs whole" in capsys.readouterr().err
    assert cli.main(["run", "--config", config, "--set", "evaluate.steps=2"]) == 2
    assert "a transfer study takes its settings from its file" in capsys.readouterr().err


def test_stages_runs_ui_and_serve_without_a_study(project, capsys, monkeypatch):
    assert cli.main(["stages", "--config", tiny(project)]) == 0
    assert {state for _, state in entries(capsys.readouterr().out).values()} == {"missing"}
    assert cli.main(["runs"]) == 0
    assert capsys.readouterr().out.startswith("no pipeline runs: no MLflow store at ")
    assert not (project / "mlruns").exists()  # listing creates no store
    assert cli.main(["export", "0123abcd"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert cli.main(["ui"]) == 0
    assert "MLFLOW_TRACKING_URI is a tracking server" in capsys.readouterr().out
    assert cli.main(["serve", "--prefect-file", str(project / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_compare_and_export_a_finished_study(prefect_harness, project, capsys):
    config = tiny(project)
    assert cli.main(["run", "--config", config]) == 0
    first_out = capsys.readouterr().out
    first, first_results = first_out.split("MLflow run ")[1].split("\n", 1)
    assert cli.main(["run", "--config", config, "--set", "significance.confidence=0.9"]) == 0  # significance alone
    second = capsys.readouterr().out.split("MLflow run ")[1].split()[0]

    assert cli.main(["runs"]) == 0
    listed = capsys.readouterr().out
    assert listed.index(second) < listed.index(first) and listed.count("FINISHED") == 2
    assert "(90% CI" in listed and "(95% CI" in listed and " is best: meta-test mse " in listed
    assert listed.count("--set significance.confidence=0.9") == 1  # the second run's override, under it only
    assert listed.index(second) < listed.index("--set significance.confidence=0.9") < listed.index(first)

    assert cli.main(["compare", first, second]) == 0
    compared = capsys.readouterr().out
    assert "A (95% CI)" in compared and "B (90% CI)" in compared
    *table_lines, settings, keys = compared.splitlines()[2:]
    rows = {line.split()[0]: line for line in table_lines}
    assert set(rows) == {"maml", "scratch", "pretrain_finetune"} and all(r.endswith("+0") for r in rows.values())
    assert settings == "settings that differ (A -> B): significance.confidence: 0.95 -> 0.9"
    assert keys.startswith("cache keys that differ: significance: their settings, input files or code changed")
    same_cfg = cli._results(project, first)
    with mock.patch.object(cli, "_results", side_effect=[same_cfg, (same_cfg[0], same_cfg[1], {
            **same_cfg[2], "task_sets": "0" * 16})]):  # the same settings, other task sets: data or code
        assert cli.main(["compare", first, first]) == 0
    assert "cache keys that differ: task_sets: their input files or code changed (the settings are the same)" \
        in capsys.readouterr().out

    assert cli.main(["export", second]) == 0
    csv_text = capsys.readouterr().out
    assert cli.main(["export", second, "--out", "-"]) == 0 and capsys.readouterr().out == csv_text
    assert not (Path.cwd() / "-").exists()
    table = pd.read_csv(io.StringIO(csv_text))
    assert list(table.columns) == list(cli.RESULT_COLUMNS) and set(table["method"]) == set(rows)
    assert (table["confidence"] == 0.9).all() and (table["reference"] == "scratch").all()
    assert table.set_index("method")["p_holm_vs_reference"].isna().to_dict() == {
        "maml": False, "pretrain_finetune": False, "scratch": True}
    out = project / "results.json"
    assert cli.main(["export", first, "--format", "json", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    records = json.loads(out.read_text())
    assert {r["method"] for r in records} == set(rows) and {r["confidence"] for r in records} == {0.95}
    assert cli.main(["export", first]) == 0
    as_csv = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("method")
    for r in records:  # JSON holds the CSV's numbers to the last digit (pandas' to_json rounded p to 15 decimals)
        for column in ("mean", "ci_low", "ci_high", "p_holm_vs_reference"):
            assert r[column] == as_csv.loc[r["method"], column] or (r[column] is None and
                                                                    pd.isna(as_csv.loc[r["method"], column]))
    assert cli.main(["export", first, "--out", str(project / "no" / "x.csv")]) == 2
    assert f"--out {project / 'no' / 'x.csv'}: no folder" in capsys.readouterr().err

    significance = project / "data" / "significance"  # the cache entry gone: the tables the run logged to MLflow
    significance.rename(project / "significance.moved")
    assert cli.main(["export", first, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == records
    assert cli.main(["compare", first, "no-such-run"]) == 2
    capsys.readouterr()

    (project / "significance.moved").rename(significance)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # every entry cached: nothing runs, like make
        flow_runs = len(client.read_flow_runs())
        assert cli.main(["run", "--config", config]) == 0
        assert len(client.read_flow_runs()) == flow_runs
    said = capsys.readouterr().out
    assert "from cache: nothing to run, no new Prefect or MLflow run; the results of MLflow run " + first in said
    assert said.split("--force STAGE recomputes.\n")[1].strip() == first_results.strip()
    assert cli.main(["runs"]) == 0 and capsys.readouterr().out.count("FINISHED") == 2


def run_id_of(out: str) -> str:
    return out.split("MLflow run ")[1].split()[0]


@pytest.mark.slow
def test_export_and_report_use_the_settings_the_run_stored_not_its_file_now(prefect_harness, project, capsys):
    import yaml

    config = Path(tiny(project))
    assert cli.main(["run", "--config", str(config)]) == 0
    run_id = run_id_of(capsys.readouterr().out)
    edited = yaml.safe_load(config.read_text())  # the file edited after the run: another confidence and alpha
    config.write_text(yaml.safe_dump({**edited, "significance": {"confidence": 0.9, "alpha": 0.05}}))

    assert cli.main(["export", run_id, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert {r["confidence"] for r in records} == {0.95} and "did not store its config" not in err
    assert cli.main(["report", run_id]) == 0
    page = Path(capsys.readouterr().out.strip()).read_text()
    assert "95% CI" in page and "significant at &alpha; = 0.01" in page
    assert "90% CI" not in page and "&alpha; = 0.05" not in page
    assert cli.main(["report", run_id, "--config", str(config)]) == 2  # a file of another study: never its title
    assert f"--config {config}: its study (significance entry " in capsys.readouterr().err
    (same := project / "same.yaml").write_text(yaml.safe_dump(edited))
    assert cli.main(["report", run_id, "--config", str(same)]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--config", str(same), "--stage", "significance"]) == 0  # rewritten: the same numbers
    assert run_id_of(capsys.readouterr().out) != run_id
    assert cli.main(["report", run_id]) == 0  # still its results: its report
    capsys.readouterr()

    config.rename(project / "moved.yaml")  # the file gone: the run's own config still describes it
    assert cli.main(["export", run_id, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == records


@pytest.mark.slow
def test_a_run_that_never_reached_significance_has_no_results(prefect_harness, project, capsys):
    config = tiny(project)
    assert cli.main(["run", "--config", config]) == 0
    full = run_id_of(capsys.readouterr().out)
    assert cli.main(["run", "--config", config, "--force", "task_sets", "--until", "task_sets"]) == 0
    partial = run_id_of(capsys.readouterr().out)
    assert partial != full
    assert cli.main(["runs"]) == 0
    listed = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(listed) if line.startswith(partial))
    assert listed[row + 1].strip() == "ran stages task_sets only"
    assert not listed[next(i for i, line in enumerate(listed) if line.startswith(full)) + 1].startswith("    ran")

    refused = f"MLflow run {partial} did not run the significance stage: it has no results; `metapeft runs` lists"
    for command in (["export", partial], ["report", partial], ["compare", full, partial]):
        assert cli.main(command) == 1  # not a usage error: the run is there, its results are not
        out, err = capsys.readouterr()
        assert refused in err and not out
    assert cli.main(["export", full]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert set(table["method"]) == {"maml", "scratch", "pretrain_finetune"} and (table["run_id"] == full).all()

    logged = list(project.glob(f"mlruns/artifacts/**/{full}/artifacts/significance"))
    assert len(logged) == 1
    for file in logged[0].iterdir():  # its significance artifacts gone
        file.unlink()
    assert cli.main(["export", full]) == 0  # its significance entry, which it computed
    out, err = capsys.readouterr()
    assert pd.read_csv(io.StringIO(out)).equals(table) and "significance artifacts are gone" in err
    (project / "data" / "significance").rename(project / "significance.moved")  # and the entry too
    assert cli.main(["export", full]) == 1
    assert f"rerun it: metapeft run --config {config}" in capsys.readouterr().err


def test_the_default_config_outside_a_checkout_is_the_shipped_quick_study(project, monkeypatch, capsys):
    monkeypatch.chdir(project)  # no configs/ here
    assert cli.main(["run", "--dry-run"]) == 0
    assert "dry run: 10 to compute" in capsys.readouterr().out
    assert cli.main(["run", "--dry-run", "--config", "configs/other.yaml"]) == 2  # a named file is not replaced
    assert "configs/other.yaml: config file not found" in capsys.readouterr().err


def test_a_changed_input_is_named_relative_to_its_folder_or_absolute_when_inputs_share_none():
    near = cli._shown_input({"/data/set/a.csv": "x", "/data/set/labels/b.txt": "y"})
    assert near("labels/b.txt") == "labels/b.txt"
    apart = cli._shown_input({"/data/set/a.csv": "x", "/tmp/episodes/test.csv": "y"})  # common folder: /
    assert apart("tmp/episodes/test.csv") == "/tmp/episodes/test.csv"


def test_a_budget_that_is_not_positive_is_refused_naming_the_option(capsys):
    assert cli.main(["run", "--dry-run", "--budget-minutes", "0"]) == 2
    assert "Invalid value for '--budget-minutes'" in capsys.readouterr().err


def test_stages_names_the_edited_file_against_the_entry_built_from_the_same_files(project, capsys, monkeypatch):
    """After studies of two data files (the task-set key leaves paths out, so both entries share its settings), an
    edited file is named as changed against its own earlier entry, not as 'added' against the other file's."""
    rows = [f"utterance {i} of intent {c},intent_{c}" for c in range(10) for i in range(6)]
    for name in ("a.csv", "b.csv"):
        (project / name).write_text("text,label\n" + "\n".join(rows) + "\n")
    (project / "b.csv").write_text((project / "b.csv").read_text().replace("utterance 0 of", "sentence 0 of"))
    config = project / "text.yaml"
    config.write_text("family: {kind: text, dataset: csv, path: a.csv, n_way: 2, k_shot: 1, n_query: 2, "
                      "n_val_episodes: 2, n_test_episodes: 3}\nmodel: {kind: minilm, adapted: lora}\n")
    monkeypatch.chdir(project)
    for name in ("a.csv", "b.csv"):
        cli.preflight(load_config(config, {"family": {"path": name}}), project)
    (project / "a.csv").write_text((project / "a.csv").read_text().replace("utterance 5 of intent 9", "hello"))
    capsys.readouterr()
    assert cli.main(["stages", "--config", str(config)]) == 0
    state = entries(capsys.readouterr().out)["task_sets"][1]
    assert state.startswith("stale (inputs changed since entry") and state.endswith(": a.csv (changed))"), state
    (project / "c.csv").write_text((project / "b.csv").read_text())  # a file never built: missing, not stale
    assert cli.main(["stages", "--config", str(config), "--set", "family.path=c.csv"]) == 0
    assert entries(capsys.readouterr().out)["task_sets"][1] == "missing"


def test_stages_names_a_removed_image_against_its_own_folders_entry(project, capsys, monkeypatch):
    """Two image folders read with the same settings, the other one's entry the newest: an image removed from the
    first is named as removed against the first's entry (the one its inputs differ least from), not as every file
    of both folders against the newest."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("shapes", "other"):
        for c in range(6):
            (project / folder / f"class{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                    project / folder / f"class{c}" / f"{i}.png")
    config = project / "images.yaml"
    config.write_text("family: {kind: image_folder, path: shapes, n_way: 2, k_shot: 1, n_query: 1, image_size: 8, "
                      "n_val_episodes: 2, n_test_episodes: 2, fractions: [0.34, 0.33, 0.33]}\nmodel: {kind: conv4}\n")
    monkeypatch.chdir(project)
    for folder in ("shapes", "other"):  # other's entry written last
        cli.preflight(load_config(config, {"family": {"path": folder}}), project)
    (project / "shapes" / "class0" / "2.png").unlink()
    capsys.readouterr()
    assert cli.main(["stages", "--config", str(config)]) == 0
    state = entries(capsys.readouterr().out)["task_sets"][1]
    assert state.startswith("stale (inputs changed since entry") and state.endswith(": class0/2.png (removed))"), \
        state
    assert cli.main(["run", "--config", str(config), "--dry-run"]) == 0  # the run's plan says the same
    assert entries(capsys.readouterr().out)["task_sets"][1] == f"compute ({state})"


def test_forcing_the_task_sets_rebuilds_the_training_tables_too(project):
    """An image changed with its size and time kept (the memo cannot see it: the keys stay): --force task_sets
    rebuilds the train_sets entry from the new pixels too, not only the task sets beside it."""
    import numpy as np
    from PIL import Image

    from flows.config import StudyConfig

    root, rng = project / "images", np.random.default_rng(0)
    for c in range(6):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.bmp")
    cfg = StudyConfig.model_validate({
        "family": {"kind": "image_folder", "path": str(root), "n_way": 2, "k_shot": 1, "n_query": 1,
                   "n_val_episodes": 2, "n_test_episodes": 2, "image_size": 8, "fractions": [0.34, 0.33, 0.33]},
        "model": {"kind": "conv4"}})
    assert cli.preflight(cfg, project) == ("task_sets", "train_sets")
    plan, cache = cli._plan(cfg, project)

    def pixels() -> set[bytes]:
        return set(cache.read_table("train_sets", plan.keys["train_sets"], "images")["pixels"])

    before, image = pixels(), root / "class0" / "0.bmp"
    stat = image.stat()
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size and cli._plan(cfg, project)[0].keys == plan.keys  # unseen
    assert cli.preflight(cfg, project) == () and pixels() == before  # cached, as far as the keys can tell
    assert cli.preflight(cfg, project, rebuild=True) == ("task_sets", "train_sets")
    after = pixels()
    assert len(after - before) == 1 and after == set(cache.read_table("task_sets", plan.keys["task_sets"],
                                                                      "images")["pixels"])


@pytest.mark.parametrize("name, kind", [("transfer-omniglot", "a transfer study"),
                                        ("banking77-protaugment-1shot", "a fold study")])
def test_report_of_a_study_of_another_kind_says_what_to_report(project, capsys, name, kind):
    assert cli.main(["report", "--config", str(REPO / "configs" / f"{name}.yaml")]) == 2
    assert f"{name}.yaml is {kind}: report --config takes one pipeline; give the study's MLflow run" in \
        capsys.readouterr().err


def transfer_config(project, **transfer) -> str:
    """The shipped Omniglot transfer study, its data path made absolute, transfer settings changed."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "transfer-omniglot.yaml").read_text())
    raw["family"]["path"] = str(REPO.parent / "shared" / "data" / "omniglot")
    raw["transfer"] |= transfer
    (path := project / "transfer.yaml").write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_transfer_study_that_cannot_run_says_why_before_prefect_starts(project, capsys):
    config = transfer_config(project, groups=["Latin", "Greek", "Klingon"])
    assert cli.main(["run", "--config", config]) == 1
    err = capsys.readouterr().err
    assert err.startswith("metapeft: transfer.groups: ['Klingon'] are not groups of ") and err.count("\n") == 1
    assert not (project / ".prefect").exists() or not any((project / ".prefect").iterdir())
    config = transfer_config(project, test_fraction=0.9)
    assert cli.main(["run", "--config", config]) == 1
    assert "transfer.test_fraction: 0.9 holds out" in capsys.readouterr().err


def test_a_transfer_study_takes_its_own_stage_names_and_no_set(project, capsys):
    config = transfer_config(project)
    with pytest.raises(click.BadParameter, match="'bogus' is not a stage: a pipeline's are task_sets, .*; a "
                                                 "transfer study's are .*transfer_train"):
        cli.cli.main(["run", "--config", config, "--force", "bogus"], standalone_mode=False)
    assert cli.main(["stages", "--config", config, "--set", "seed=5"]) == 2
    assert "--set: a transfer study takes its settings from its file" in capsys.readouterr().err
    assert cli.main(["stages", "--config", config]) == 0
    assert "transfer_train[Latin]" in capsys.readouterr().out


def test_a_method_diverged_in_every_seed_is_one_row():
    """With seeds a method diverges once per seed: export and compare need one row per method (compare crashed on
    two), saying each seed's reason."""
    diverged = pd.DataFrame([{"method": "metasgd", "stage": "evaluate", "reason": "non-finite", "seed": 0},
                             {"method": "metasgd", "stage": "evaluate", "reason": "blew up", "seed": 1},
                             {"method": "scratch", "stage": "baselines", "reason": "non-finite", "seed": None},
                             {"method": "maml", "stage": "evaluate", "reason": "x", "seed": 1}])
    assert cli.diverged_rows(diverged, {"maml"}) == [
        {"method": "metasgd", "diverged": "seed 0 in evaluate: non-finite | seed 1 in evaluate: blew up"},
        {"method": "scratch", "diverged": "in baselines: non-finite"}]
    assert cli.diverged_rows(pd.DataFrame(), {"maml"}) == []  # nothing diverged: an empty table, no columns


def test_export_rows_carry_each_pair_over_the_seeds_or_folds_and_fold_notes_join_under_their_method():
    """The replicates columns of a seeded study (seed_pairs) give the count and p over the seeds against the
    reference, either way round the pair's row is; a method without a pair (the reference) gets none. A fold
    study's unfinished notes ('fold 01 maml/seed1: ...') join under their method."""
    pairs = pd.DataFrame([{"method_a": "scratch", "method_b": "maml", "n_seeds": 3, "seeds_a_better": 1,
                           "seeds_b_better": 2, "mean_diff": 0.5, "ci_low": -1.0, "ci_high": 2.0, "p_seeds": 0.25}])
    assert cli._over_replicates(pairs, "maml", "scratch", "seed") == {
        "replicates": "seed", "n_replicates": 3, "better_in_replicates": 2, "p_over_replicates": 0.25}
    assert cli._over_replicates(pairs, "scratch", "scratch", "seed") == {}
    assert cli._over_replicates(None, "maml", "scratch", "seed") == {}
    assert cli._unfinished("fold 01 maml: stopped at 3; fold 02 maml/seed1: kept; reptile/seed0: stopped") == {
        "maml": "fold 01: stopped at 3; fold 02 maml/seed1: kept", "reptile": "reptile/seed0: stopped"}


def test_a_fold_studys_summary_entry_is_read_only_when_that_run_computed_it(tmp_path):
    """A fold study run without its logged tables may read its folds entry only if it computed it: an entry under
    the same key written by another run holds that run's numbers."""
    from flows.cache import StageCache

    cache, tags = StageCache(tmp_path), {"metapeft.key.folds": "k" * 16, "metapeft.config": "c.yaml"}
    with pytest.raises(cli.NoResults, match="is not there"):
        cli._fold_entry("mine", tags, cache)
    with cache.writing("folds", "k" * 16, {"mlflow_run_id": "theirs"}) as out:
        (out / "summary.parquet").write_bytes(b"x")
    with pytest.raises(cli.NoResults, match="is MLflow run theirs's, not this run's results"):
        cli._fold_entry("mine", tags, cache)
    assert cli._fold_entry("theirs", tags, cache) == cache.path("folds", "k" * 16)
    with pytest.raises(cli.NoResults, match="predates the summary's key tag"):
        cli._fold_entry("mine", {"metapeft.config": "c.yaml"}, cache)


def test_one_replicate_or_equal_differences_say_there_is_no_test():
    from flows.answer import Gap
    from flows.report import over_replicates

    pairs = pd.DataFrame([{"method_a": "maml", "method_b": "proto", "n_folds": 1, "folds_a_better": 1,
                           "folds_b_better": 0, "p_folds": float("nan")}])
    assert over_replicates(pairs, "maml", "proto", "fold") == "1/1 fold, no test over one fold"
    assert over_replicates(pairs.assign(n_folds=3, folds_a_better=3), "maml", "proto", "fold") == "3/3 folds, no test"
    gap = Gap(other="proto", diff=0.1, ci_low=0.0, ci_high=0.2, p_holm=0.5, unit="fold", units_better=1, n_units=1)
    assert gap.units_text() == " Better in 1 of 1 fold (one fold: no test over folds)."


def test_force_folds_says_how_a_fold_studys_summary_is_recomputed(capsys):
    config = str(REPO / "configs" / "banking77-protaugment-1shot.yaml")
    assert cli.main(["run", "--config", config, "--dry-run", "--force", "folds"]) == 2
    assert "a fold study's summary over folds is recomputed by --force significance" in capsys.readouterr().err
