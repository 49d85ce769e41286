"""Cache keys come from the code each stage really runs and the data it really reads.

A scratch copy of components/ and flows/ is edited one module at a time; exactly the stages whose module
(or the family's module) imports the edited one, and the stages downstream of them, must get new keys.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.config import load_config
from flows.plan import MODULES, Plan, make_plan
from flows.versions import ROOT, input_digests, module_closure

CONFIGS = {"sinusoid": "quick", "omniglot": "omniglot-5w1s", "text": "clinc150-lora"}
DOWNSTREAM = {  # entry -> the entries whose keys hash its key
    "task_sets": {"embeddings", "evaluate", "baselines", "significance"},
    "train_sets": {"meta_train", "evaluate", "significance"},  # the task sets' tables that meta-training reads
    "prefix": {"embeddings", "meta_train", "evaluate", "baselines", "significance"},
    "embeddings": set(), "meta_train": {"evaluate", "significance"}, "evaluate": {"significance"},
    "baselines": {"significance"}, "significance": set()}
SHARED = ROOT.parent / "shared" / "data"


def project_modules() -> list[str]:
    """Every module under components/, and every stage module under flows/stages/."""
    files = sorted((ROOT / "components").rglob("*.py")) + sorted((ROOT / "flows" / "stages").glob("*.py"))
    return [".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for f in files]


def flat_keys(plan) -> dict[str, str]:
    """Every key of a plan by entry name; units' entries and checkpoint folders count as meta_train."""
    keys = {stage: key for stage, key in plan.keys.items()}
    keys |= {f"meta_train/{u}": k for u, k in plan.algorithm_keys.items()}
    keys |= {f"meta_train/checkpoint/{u}": k for u, k in plan.checkpoint_keys.items()}
    return keys


def changed_stages(before: dict, after: dict) -> set[str]:
    return {name.split("/")[0] for name in before if before[name] != after[name]}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    for package in ("components", "flows"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    memo = tmp_path_factory.mktemp("memo") / "inputs.json"
    return {kind: load_config(ROOT / "configs" / f"{name}.yaml") for kind, name in CONFIGS.items()}, memo


def edit(path: Path, old: str | None = None, new: str = "") -> str:
    """Edit a scratch file (append a statement, or replace old by new); returns the original text."""
    text = path.read_text()
    assert old is None or old in text, f"{old!r} not in {path}"
    path.write_text(text + "\n_edited = True\n" if old is None else text.replace(old, new, 1))
    return text


def test_comments_docstrings_and_layout_move_no_key(scratch, configs):
    cfgs, memo = configs
    base = {kind: make_plan(cfg, memo, scratch).keys for kind, cfg in cfgs.items()}
    path = scratch / "components" / "conv4.py"
    text = path.read_text()
    try:
        path.write_text("# a new first line\n" + text.replace('"""', '"""Reworded. ', 1).replace("\n\n\n", "\n\n\n\n", 3))
        assert {kind: make_plan(cfg, memo, scratch).keys for kind, cfg in cfgs.items()} == base
        edit(path, "STRIDE, PADDING = 2, 1", "STRIDE, PADDING = 2, 1  # same values\nUNUSED = 0")  # code: moves
        assert make_plan(cfgs["omniglot"], memo, scratch).keys != base["omniglot"]
    finally:
        path.write_text(text)


def test_each_module_edit_moves_exactly_the_stages_that_import_it(scratch, configs):
    cfgs, memo = configs
    base = {kind: make_plan(cfg, memo, scratch) for kind, cfg in cfgs.items()}
    for module in project_modules():
        path = scratch.joinpath(*module.split(".")).with_suffix(".py")
        path = path if path.exists() else path.with_suffix("") / "__init__.py"
        original = edit(path)
        try:
            for kind, cfg in cfgs.items():
                plan = make_plan(cfg, memo, scratch)
                family = type(plan.family).__module__
                direct = {s for s in plan.keys if module in module_closure([MODULES[s], family], scratch)}
                expected = direct | {d for s in direct for d in DOWNSTREAM[s]}
                got = changed_stages(flat_keys(base[kind]), flat_keys(plan))
                assert got == expected, f"{module} edited, {kind} study: keys of {got}, expected {expected}"
                assert base[kind].keys == make_plan(cfg, memo).keys  # the real tree was never touched
        finally:
            path.write_text(original)


def test_imports_at_run_time_are_inside_the_closure():
    """An independent check of the closure: the project modules Python really loads importing each stage
    module and each family module (in a fresh process) are all in module_closure of it."""
    targets = sorted(set(MODULES.values()) | {f"components.families.{f}" for f in ("sinusoid", "omniglot", "text")})
    script = (
        "import json, os, sys\n"
        "import numpy, pandas, torch  # third-party warm-up in the parent; each child imports one module\n"
        "out = {}\n"
        f"for name in {targets!r}:\n"
        "    r, w = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        import importlib\n"
        "        importlib.import_module(name)\n"
        "        loaded = [m for m in sys.modules if m.split('.')[0] in ('components', 'flows')]\n"
        "        os.write(w, json.dumps(loaded).encode()); os._exit(0)\n"
        "    os.close(w)\n"
        "    data = b''\n"
        "    while chunk := os.read(r, 1 << 16):\n"
        "        data += chunk\n"
        "    os.wait()\n"
        "    out[name] = json.loads(data)\n"
        "print(json.dumps(out))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, modules in loaded.items():
        assert name in modules
        assert set(modules) <= set(module_closure([name])), f"{name} loads {set(modules) - set(module_closure([name]))}"


def test_conv4_edits_give_new_omniglot_keys_and_leave_other_families_alone(scratch, configs):
    cfgs, memo = configs
    base = {kind: flat_keys(make_plan(cfg, memo, scratch)) for kind, cfg in cfgs.items()}
    conv4 = scratch / "components" / "conv4.py"
    for old, new in (("eps: float = 1e-5", "eps: float = 1e-1"), ("STRIDE, PADDING = 2, 1", "STRIDE, PADDING = 1, 1")):
        original = edit(conv4, old, new)
        try:
            after = {kind: flat_keys(make_plan(cfg, memo, scratch)) for kind, cfg in cfgs.items()}
        finally:
            conv4.write_text(original)
        assert all(base["omniglot"][k] != after["omniglot"][k] for k in base["omniglot"])  # checkpoints too
        assert after["sinusoid"] == base["sinusoid"] and after["text"] == base["text"]


def test_omniglot_loader_edits_leave_other_families_alone(scratch, configs):
    """The GX suites of every family live in flows/validation.py, which is in every task_sets key: it must not
    import a family's loader, or an Omniglot edit recomputes sinusoid and text studies from their task sets."""
    cfgs, memo = configs
    base = {kind: flat_keys(make_plan(cfg, memo, scratch)) for kind, cfg in cfgs.items()}
    loader = scratch / "components" / "omniglot.py"
    original = edit(loader)
    try:
        after = {kind: flat_keys(make_plan(cfg, memo, scratch)) for kind, cfg in cfgs.items()}
    finally:
        loader.write_text(original)
    assert after["omniglot"]["task_sets"] != base["omniglot"]["task_sets"]
    assert after["sinusoid"] == base["sinusoid"] and after["text"] == base["text"]


def test_report_edit_moves_only_the_stages_that_draw(scratch, configs):
    cfgs, memo = configs
    before = flat_keys(make_plan(cfgs["sinusoid"], memo, scratch))
    original = edit(scratch / "flows" / "report.py")
    try:
        after = flat_keys(make_plan(cfgs["sinusoid"], memo, scratch))
    finally:
        (scratch / "flows" / "report.py").write_text(original)
    assert changed_stages(before, after) == {"embeddings", "significance"}


# ---------------------------------------------------------------- input files by content

def csv_config(tmp_path, csv: Path):
    path = tmp_path / "text.yaml"
    path.write_text(f"family: {{kind: text, dataset: csv, path: {csv}, n_way: 2, k_shot: 1, n_query: 2}}\n"
                    "model: {kind: minilm, adapted: lora}\n")
    return load_config(path)


def intents(n: int = 6, per: int = 5) -> pd.DataFrame:
    return pd.DataFrame([{"text": f"utterance {i} of intent {c}", "label": f"intent_{c}"}
                         for c in range(n) for i in range(per)])


def test_an_edited_input_file_moves_the_task_sets_and_everything_after(tmp_path):
    csv = tmp_path / "intents.csv"
    intents().to_csv(csv, index=False)
    cfg, memo = csv_config(tmp_path, csv), tmp_path / "memo.json"
    before = flat_keys(make_plan(cfg, memo))
    os.utime(csv, ns=(1, 1))  # same bytes, other mtime: hashed again, same content, same keys
    assert flat_keys(make_plan(cfg, memo)) == before
    edited = intents()
    edited.loc[edited["label"] == "intent_3", "label"] = "intent_renamed"
    edited.to_csv(csv, index=False)
    after = flat_keys(make_plan(cfg, memo))
    assert changed_stages(before, after) == {"task_sets", "train_sets", "prefix", *DOWNSTREAM["task_sets"],
                                             *DOWNSTREAM["train_sets"]}
    assert all(before[k] != after[k] for k in before)


@pytest.mark.parametrize("kind, change", [
    ("sinusoid", {"family": {"n_tasks": {"meta_train": 20000, "meta_val": 200, "meta_test": 100}}}),
    ("omniglot", {"family": {"n_test_episodes": 1000}}),
    ("text", {"family": {"n_test_episodes": 50}})])
def test_a_new_test_protocol_keeps_the_meta_training_keys(configs, kind, change):
    """More or fewer meta-test episodes change the task sets and what reads the meta-test episodes, never the
    tables meta-training reads (train_sets) or meta-training itself; meta-val episodes do."""
    cfgs, memo = configs
    cfg = cfgs[kind]
    before = flat_keys(make_plan(cfg, memo))
    after = flat_keys(make_plan(cfg.model_validate(deep_merge(cfg.model_dump(), change)), memo))
    assert changed_stages(before, after) == {"task_sets", *DOWNSTREAM["task_sets"]}
    val = {"family": {"n_tasks": {"meta_train": 20000, "meta_val": 100, "meta_test": 600}}} if kind == "sinusoid" \
        else {"family": {"n_val_episodes": 7}}
    after_val = flat_keys(make_plan(cfg.model_validate(deep_merge(cfg.model_dump(), val)), memo))
    assert {"train_sets", "meta_train"} <= changed_stages(before, after_val)


@pytest.mark.parametrize("kind, field", [("omniglot", ("path",)), ("text", ("path",))])
def test_a_path_written_another_way_gives_the_same_keys(configs, kind, field, tmp_path, monkeypatch):
    """Keys hash the input files' content, not how their path is written: relative, absolute, or relative from
    another folder (a scheduled deployment runs elsewhere than the CLI) all give the same keys."""
    cfgs, memo = configs
    cfg = cfgs[kind]
    before = flat_keys(make_plan(cfg, memo))
    dumped = cfg.model_dump()
    section = dumped["family"]
    for part in field[:-1]:
        section = section[part]
    written = section[field[-1]]
    section[field[-1]] = str(Path(written).resolve())
    assert flat_keys(make_plan(cfg.model_validate(dumped), memo)) == before
    monkeypatch.chdir(tmp_path)
    section[field[-1]] = os.path.relpath(ROOT / written, tmp_path)
    assert flat_keys(make_plan(cfg.model_validate(dumped), memo)) == before


def deep_merge(base: dict, change: dict) -> dict:
    return {k: deep_merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in {**base, **change}.items()}


def test_each_input_file_is_hashed_once_per_size_and_mtime(tmp_path, monkeypatch):
    from flows import versions

    files = [tmp_path / f"f{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
    calls = []
    real = versions.file_sha256
    monkeypatch.setattr(versions, "file_sha256", lambda p: calls.append(p) or real(p))
    memo = tmp_path / "memo.json"
    first = input_digests(files, memo)
    assert len(calls) == 3 and input_digests(files, memo) == first and len(calls) == 3  # the memo answers
    files[1].write_bytes(b"\x09" * 1000)  # same size; the mtime moves
    os.utime(files[1], ns=(10**18, 10**18))
    second = input_digests(files, memo)
    assert len(calls) == 4 and second[str(files[1])] != first[str(files[1])]
    with pytest.raises(FileNotFoundError, match="f9.bin"):
        input_digests([tmp_path / "f9.bin"], memo)


def test_omniglot_keys_read_the_archives_and_the_split_files(tmp_path):
    data = tmp_path / "omniglot"
    shutil.copytree(SHARED / "omniglot", data)
    path = tmp_path / "o.yaml"
    path.write_text(f"family: {{kind: omniglot, path: {data}}}\nmodel: {{kind: conv4}}\n")
    cfg = load_config(path)
    plan = make_plan(cfg)
    assert {Path(p).name for p in plan.inputs} == {"images_background.zip", "images_evaluation.zip",
                                                   "train.txt", "val.txt", "test.txt"}
    split = data / "splits_vinyals" / "test.txt"
    split.chmod(0o644)
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same classes in another order
    assert make_plan(cfg).keys["task_sets"] != plan.keys["task_sets"]


def image_folder_plan(root: Path, **family) -> "Plan":
    from flows.config import StudyConfig

    return make_plan(StudyConfig.model_validate({
        "family": {"kind": "image_folder", "path": str(root), "n_way": 2, "k_shot": 1, "n_query": 1,
                   "n_val_episodes": 2, "image_size": 8, **family}, "model": {"kind": "conv4"}}))


def linked_image_folder(tmp_path: Path) -> Path:
    """<tmp_path>/pool: 4 images; <tmp_path>/linked/<class>/: links into the pool, two a class."""
    from PIL import Image

    (pool := tmp_path / "pool").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i + 10).save(pool / f"{i}.png")
    for c, images in (("circle", (0, 1)), ("square", (2, 3))):
        (tmp_path / "linked" / c).mkdir(parents=True)
        for i in images:
            (tmp_path / "linked" / c / f"{i}.png").symlink_to(pool / f"{i}.png")
    return tmp_path / "linked"


def test_a_linked_image_is_keyed_by_its_class_folder_not_its_target(tmp_path):
    """Links into one flat folder: the class is in the link's path only. Moving a link to another class folder,
    or renaming a class folder, changes the task sets' and the training keys (resolving the links would not see
    either, and meta-training would keep a split whose meta-test classes it was trained on)."""
    root = linked_image_folder(tmp_path)
    before = image_folder_plan(root)
    assert sorted(Path(p).relative_to(root).as_posix() for p in before.inputs) == \
        ["circle/0.png", "circle/1.png", "square/2.png", "square/3.png"]
    (root / "circle" / "1.png").rename(root / "square" / "1.png")
    moved = image_folder_plan(root)
    (root / "square").rename(root / "box")
    renamed = image_folder_plan(root)
    for stage in ("task_sets", "train_sets"):
        assert len({before.keys[stage], moved.keys[stage], renamed.keys[stage]}) == 3, stage
    (root / "box" / "1.png").rename(root / "circle" / "1.png")
    (root / "box").rename(root / "square")
    assert image_folder_plan(root).keys == before.keys  # the same links again: the same keys


def test_a_link_to_a_missing_file_is_named_with_its_target(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=r"input file not found: .*a.png \(a link to .*gone.png\)"):
        input_digests([tmp_path / "a.png"])


def test_a_fixed_episode_file_of_the_folders_own_images_keeps_the_training_key(tmp_path):
    """Episode files naming images of the data folder itself (its meta-test classes): changing the file changes
    the test protocol only; those images are still data, in the training key whichever episodes name them."""
    from PIL import Image

    root = tmp_path / "images"
    for c in range(6):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * c + 10 * i).save(root / f"class{c}" / f"{i}.png")
    files = {}
    for name, images in (("e1.csv", [0, 1]), ("e2.csv", [2, 1])):
        rows = [("only", role, f"images/class{c}/{i}.png", c) for c in (4, 5)
                for role, i in zip(("support", "query"), images)]
        pd.DataFrame(rows, columns=["episode", "role", "image", "label"]).to_csv(tmp_path / name, index=False)
        files[name] = image_folder_plan(root, test_episodes=str(tmp_path / name))
    plain = image_folder_plan(root)
    assert files["e1.csv"].keys["task_sets"] != files["e2.csv"].keys["task_sets"] != plain.keys["task_sets"]
    assert files["e1.csv"].keys["train_sets"] == files["e2.csv"].keys["train_sets"] == plain.keys["train_sets"]
    assert files["e1.csv"].algorithm_keys == plain.algorithm_keys
