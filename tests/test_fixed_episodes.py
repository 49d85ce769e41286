"""Fixed episode files (`family.test_episodes`): a table of support / query images evaluated instead of sampled
meta-test episodes, on a small Omniglot built from the archive's own members."""
import functools
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components import omniglot
from flows.config import ConfigError, StudyConfig, load_config
from flows.families import family_for
from flows.plan import make_plan
from flows.stages.task_sets import summary
from flows.validation import ValidationFailed, validate_family

SHARED = Path(__file__).parents[2] / "shared" / "data" / "omniglot"
MAGI, ANGELIC = "Alphabet_of_the_Magi", "Angelic"
N_WAY, N_EPISODES, QUERIES = 5, 3, 2
LABELS = ["e", "d", "c", "b", "a"]  # Angelic characters 1..5 in the file: way j is sorted order, so character 5 - j


def characters(alphabet: str, numbers) -> list[str]:
    return [f"{alphabet}/character{n:02d}" for n in numbers]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small Omniglot in the archive's layout: Magi characters 1-3 meta-train, 4-5 meta-val, Angelic 5-6
    meta-test (the family's own, unused with a fixed file); Angelic 1-6 in images_evaluation.zip."""
    root = tmp_path_factory.mktemp("omniglot")
    keep = {"images_background": characters(MAGI, range(1, 6)), "images_evaluation": characters(ANGELIC, range(1, 7))}
    for part, chars in keep.items():
        with zipfile.ZipFile(SHARED / f"{part}.zip") as src, zipfile.ZipFile(root / f"{part}.zip", "w") as dst:
            for name in src.namelist():
                if name.endswith(".png") and name.split("/", 1)[1].rsplit("/", 1)[0] in chars:
                    dst.writestr(name, src.read(name))
    splits = root / "splits_vinyals"
    splits.mkdir()
    for split, chars in {"train": characters(MAGI, (1, 2, 3)), "val": characters(MAGI, (4, 5)),
                         "test": characters(ANGELIC, (5, 6))}.items():
        (splits / f"{split}.txt").write_text("".join(f"{c}/rot{r:03d}\n" for c in chars for r in omniglot.ROTATIONS))
    return root


@functools.cache
def member(character: int, drawing: int, alphabet: str = ANGELIC) -> str:
    """The archive member of a character's drawing (0-based), as the loader names it."""
    part = "images_evaluation" if alphabet == ANGELIC else "images_background"
    prefix = f"{part}/{alphabet}/character{character:02d}/"
    return sorted(n for n in archive_names(part) if n.startswith(prefix))[drawing]


@functools.cache
def archive_names(part: str) -> tuple[str, ...]:
    with zipfile.ZipFile(SHARED / f"{part}.zip") as z:
        return tuple(z.namelist())


def episode_file() -> pd.DataFrame:
    """3 episodes, 5-way 1-shot, 2 queries per label: Angelic characters 1-5 labelled e..a, other drawings each
    episode (the second episode lists its characters backwards)."""
    rows = []
    for t in range(N_EPISODES):
        order = range(1, 6) if t != 1 else range(5, 0, -1)
        for c in order:
            rows.append((f"ep{t}", "support", member(c, t), LABELS[c - 1]))
            rows += [(f"ep{t}", "query", member(c, 10 + 2 * t + q), LABELS[c - 1]) for q in range(QUERIES)]
    return pd.DataFrame(rows, columns=["episode", "role", "image", "label"])


def family_with(root: Path, test_episodes: Path | str | None, **family):
    cfg = StudyConfig.model_validate({
        "family": {"kind": "omniglot", "path": str(root), "n_way": N_WAY, "k_shot": 1, "n_query": 2,
                   "n_val_episodes": 2, "test_episodes": None if test_episodes is None else str(test_episodes),
                   **family},
        "model": {"kind": "conv4", "hidden": 8}, "runtime": {"threads": 1},
        "baselines": {"pretrain_iterations": 3, "pretrain_batch_size": 8}})
    return cfg, family_for(cfg)


@pytest.fixture(scope="module")
def built(root, tmp_path_factory):
    path = tmp_path_factory.mktemp("episodes") / "episodes.csv"
    episode_file().to_csv(path, index=False)
    _, family = family_with(root, path)
    tables = family.build(seed=0)
    return family, tables


def loader_image(table: pd.DataFrame, name: str) -> np.ndarray:
    """The loader's own 28 x 28 image of an archive member, strokes 1."""
    alphabet, character, file = name.split("/")[1:]
    row = table[(table["character"] == f"{alphabet}/{character}") & (table["drawing"] == int(file[-6:-4]) - 1)]
    return omniglot.pixels_to_array(row)[0]


def test_the_file_gives_exactly_the_meta_test_episodes(built, root):
    family, tables = built
    report = validate_family(family, tables)
    assert report["success"] and "fixed_episodes" in report["results"]
    test = family.open(tables, torch.device("cpu"), ("meta_test",)).test
    assert test.x_spt.shape == (N_EPISODES, N_WAY, 1, 28, 28) and test.x_qry.shape == (N_EPISODES, 10, 1, 28, 28)
    assert test.y_spt.tolist() == [list(range(N_WAY))] * N_EPISODES
    assert test.y_qry.tolist() == [[j for j in range(N_WAY) for _ in range(QUERIES)]] * N_EPISODES
    images = omniglot.load_omniglot(root, 28)
    for t in range(N_EPISODES):
        for j in range(N_WAY):  # way j: label sorted(LABELS)[j] = 'a'..'e', Angelic character 5 - j
            c = 5 - j
            assert np.array_equal(test.x_spt[t, j, 0].numpy(), loader_image(images, member(c, t)))
            for q in range(QUERIES):
                assert np.array_equal(test.x_qry[t, j * QUERIES + q, 0].numpy(),
                                      loader_image(images, member(c, 10 + 2 * t + q)))
    episodes = tables["episodes_meta_test"]
    assert episodes.groupby("episode")["source_episode"].first().tolist() == ["ep0", "ep1", "ep2"]
    assert set(tables["episodes_meta_val"]["label"]) <= set(family.classes(tables, "meta_val"))  # still sampled
    assert summary(tables)["n_fixed_test_episodes"] == N_EPISODES


def test_parquet_gives_what_csv_gives(built, root, tmp_path):
    family, tables = built
    path = tmp_path / "episodes.parquet"
    episode_file().to_parquet(path)
    _, other = family_with(root, path)
    again = other.build(seed=0)
    assert again["episodes_meta_test"].equals(tables["episodes_meta_test"])
    assert again["test_images"]["pixels"].equals(tables["test_images"]["pixels"])


def test_files_of_another_size_or_polarity_take_the_training_form(built, root, tmp_path, monkeypatch):
    """Images beside the file (paths relative to its folder): a drawing saved light on dark gives the loader's own
    pixels; one saved at 60 x 60 nearly them. The file's own path is relative to the current folder."""
    family, tables = built
    with zipfile.ZipFile(root / "images_evaluation.zip") as z:  # character 1's support and first query in episode 0
        support, query = (Image.open(io.BytesIO(z.read(member(1, d)))).convert("L") for d in (0, 10))
    (tmp_path / "own").mkdir()
    Image.fromarray(255 - np.asarray(support)).save(tmp_path / "own" / "inverted.png")
    query.resize((60, 60), Image.Resampling.LANCZOS).save(tmp_path / "own" / "small.png")
    table = episode_file()
    table.loc[table["image"] == member(1, 0), "image"] = "own/inverted.png"
    table.loc[table["image"] == member(1, 10), "image"] = "own/small.png"
    table.to_csv(tmp_path / "episodes.csv", index=False)
    monkeypatch.chdir(tmp_path)
    _, own = family_with(root, "episodes.csv")
    own_files = {tmp_path / "own" / "inverted.png", tmp_path / "own" / "small.png"}
    assert own_files <= {p.resolve() for p in own.input_files()}
    test = own.open(own.build(seed=0), torch.device("cpu"), ("meta_test",)).test
    expected = family.open(tables, torch.device("cpu"), ("meta_test",)).test
    assert torch.equal(test.x_spt, expected.x_spt)  # the inverted file: exactly the archive member's pixels
    small, original = test.x_qry[0, 4 * QUERIES, 0], expected.x_qry[0, 4 * QUERIES, 0]  # way 4: character 1
    assert (small - original).abs().mean() < 0.05 and small.mean() < 0.5  # strokes 1 on paper 0, as trained


def rewrite(table: pd.DataFrame, change: str) -> pd.DataFrame:
    t = table.copy()
    if change == "missing column":
        return t.drop(columns="label")
    if change == "unknown role":
        t.loc[4, "role"] = "train"
    elif change == "missing image":
        t.loc[4, "image"] = "nowhere/0001_01.png"
    elif change == "4-way episode":
        return t[~((t["episode"] == "ep1") & (t["label"] == "c"))]
    elif change == "2-shot label":
        t.loc[t.index[(t["episode"] == "ep2") & (t["label"] == "a") & (t["role"] == "query")][0], "role"] = "support"
    elif change == "query label not in support":
        t.loc[t.index[(t["episode"] == "ep1") & (t["role"] == "query")][0], "label"] = "zz"
    elif change == "uneven queries":
        return t.drop(index=t.index[(t["episode"] == "ep2") & (t["role"] == "query")][0])
    elif change == "support image as a query":
        t.loc[t.index[(t["episode"] == "ep1") & (t["role"] == "query")][0], "image"] = t.loc[
            t.index[(t["episode"] == "ep1") & (t["role"] == "support")][0], "image"]
    elif change == "empty episode cell":
        t.loc[3, "episode"] = None
    return t


@pytest.mark.parametrize("change, error, message", [
    ("missing column", ValueError, r"column\(s\) \['label'\] missing"),
    ("unknown role", ValueError, r"column 'role': 'train' at episode 'ep0', row 5"),
    ("missing image", FileNotFoundError, r"column 'image': 'nowhere/0001_01.png' \(episode 'ep0'\) not found"),
    ("4-way episode", ValueError, r"column 'label': episode 'ep1' has support rows per label .*family.n_way 5"),
    ("2-shot label", ValueError, r"column 'label': episode 'ep2' has support rows per label .*'a': 2"),
    ("query label not in support", ValueError, r"column 'label': query label 'zz' at episode 'ep1'"),
    ("uneven queries", ValueError, r"column 'role': episode 'ep2' has query rows per label"),
    ("support image as a query", ValueError, r"column 'image': '.*' is in episode 'ep1' 2 times \(rows \[\d+, \d+\], "
                                             r"as \['support', 'query'\]\)"),
    ("empty episode cell", ValueError, r"column 'episode' is empty at row 4 \(no episode\)"),
])
def test_a_malformed_file_is_named_before_any_image_is_read(root, tmp_path, change, error, message):
    path = tmp_path / "episodes.csv"
    rewrite(episode_file(), change).to_csv(path, index=False)
    cfg, _ = family_with(root, path)
    with pytest.raises(error, match=rf"{path}: .*{message}" if change != "missing column" else message) as err:
        make_plan(cfg)  # the plan lists the input files: it reads and checks the table, and decodes nothing
    assert str(path) in str(err.value)


def test_images_of_meta_train_classes_are_an_error_naming_them(root, tmp_path):
    table = episode_file()
    table.loc[0, "image"] = member(2, 0, MAGI)  # a drawing of a meta-train character
    table.to_csv(tmp_path / "episodes.csv", index=False)
    _, family = family_with(root, tmp_path / "episodes.csv")
    with pytest.raises(ValueError, match=rf"images of meta_train classes \(character \['{MAGI}/character02'\]\)"):
        family.build(seed=0)


def rotated_file(classes: list[str]) -> pd.DataFrame:
    """One 5-way 1-shot episode, 2 queries per label, of Omniglot classes (ids '<character>/rotDDD'): drawing 0
    of each at its class's rotation as support, drawings 1 and 2 as queries; labelled by the class ids."""
    rows = []
    for class_id in classes:
        character, degrees = omniglot.parse_class_id(class_id)
        number = int(character.rsplit("character", 1)[1])
        rows += [("rot", "support" if d == 0 else "query", member(number, d), class_id, degrees) for d in range(3)]
    return pd.DataFrame(rows, columns=["episode", "role", "image", "label", "rotation"])


def test_rotated_images_are_the_family_s_own_rotated_classes_pixel_for_pixel(built, root, tmp_path):
    """Vinyals-split test classes at 90, 180 and 270 degrees written out with their rotations: the fixed episode's
    images equal the family's own class examples of those classes (a wrong direction turns 90 into 270)."""
    family, tables = built
    classes = [c for c in family.classes(tables, "meta_test") if not c.endswith("rot000")][:N_WAY]
    assert {omniglot.parse_class_id(c)[1] for c in classes} == {90, 180, 270}
    rotated_file(classes).to_csv(tmp_path / "rotated.csv", index=False)
    _, rotated = family_with(root, tmp_path / "rotated.csv")
    own = rotated.build(seed=0)
    validate_family(rotated, own)
    test = rotated.open(own, torch.device("cpu"), ("meta_test",)).test
    labels, images = family.class_examples(tables, "meta_test", torch.device("cpu"))
    drawings = tables["images"]["drawing"].to_numpy()[omniglot.class_row_index(tables["images"], classes)[0]]
    ours = labels[np.isin(labels, classes)]  # the rows of classes, in their order, as drawings[...] index them

    def expected(class_id: str, drawing: int) -> torch.Tensor:
        return images[np.isin(labels, classes)][(ours == class_id) & (drawings == drawing)][0, 0]

    for j, class_id in enumerate(sorted(classes)):  # way j: the j-th label in sorted order
        assert torch.equal(test.x_spt[0, j, 0], expected(class_id, 0))
        for q in range(QUERIES):
            assert torch.equal(test.x_qry[0, j * QUERIES + q, 0], expected(class_id, 1 + q))
        upright = torch.from_numpy(loader_image(own["images"], member(int(class_id.split("/")[1][-2:]), 0)))
        assert not torch.equal(test.x_spt[0, j, 0], upright)  # turned, not read as drawn
    assert set(own["test_images"]["rotation"]) == {90, 180, 270}


def test_one_image_at_two_rotations_is_two_images(built, root, tmp_path):
    family, tables = built
    table = episode_file().assign(rotation=0)
    again = table.index[(table["episode"] == "ep1") & (table["role"] == "support") & (table["label"] == "e")][0]
    table.loc[again, ["image", "rotation"]] = [member(1, 0), 90]  # ep0's support of character 1, turned
    table.to_csv(tmp_path / "episodes.csv", index=False)
    _, twice = family_with(root, tmp_path / "episodes.csv")
    own = twice.build(seed=0)
    validate_family(twice, own)
    images = own["test_images"]
    same = images[images["image"] == member(1, 0)]
    assert same["rotation"].tolist() == [0, 90] and member(1, 1) not in set(images["image"])
    assert len(images) == len(tables["test_images"])  # member(1, 1) gone, member(1, 0) @90 in
    pixels = [np.frombuffer(p, dtype=np.uint8).reshape(28, 28) for p in same["pixels"]]
    assert np.array_equal(pixels[1], np.rot90(pixels[0])) and not np.array_equal(pixels[0], pixels[1])
    episodes = own["episodes_meta_test"]
    rows = episodes.loc[episodes["image"] == member(1, 0), ["source_episode", "rotation", "row"]]
    assert rows.values.tolist() == [["ep0", 0, same.index[0]], ["ep1", 90, same.index[1]]]
    names, _ = twice.examples(own, "meta_test", torch.device("cpu"))
    assert f"{member(1, 0)} @90" in set(names) and member(1, 0) in set(names)
    test = twice.open(own, torch.device("cpu"), ("meta_test",)).test
    assert torch.equal(test.x_spt[1, 4, 0], torch.rot90(test.x_spt[0, 4, 0]))  # way 4: label 'e', character 1


@pytest.mark.parametrize("value, shown", [(45, "45"), ("ninety", "'ninety'"), (-90, "-90"), ("", "empty")])
def test_a_bad_rotation_names_the_file_column_episode_and_row(root, tmp_path, value, shown):
    table = episode_file().assign(rotation=0).astype({"rotation": object})
    table.loc[7, "rotation"] = value  # ep0's third label's support (row 7 of the data, 1-based 8)
    path = tmp_path / "episodes.csv"
    table.to_csv(path, index=False)
    place = r"at episode 'ep0', row 8"
    message = (rf"column 'rotation' is empty {place}" if value == "" else
               rf"column 'rotation': {shown} {place}; need degrees counter-clockwise, one of \(0, 90, 180, 270\)")
    with pytest.raises(ValueError, match=rf"{path}: {message}"):
        make_plan(family_with(root, path)[0])  # reads and checks the table, decodes nothing


def test_a_non_square_image_is_not_rotated():
    from components.families.images import turned

    with pytest.raises(ValueError, match=r"e.csv: 'a.png @90': 600 bytes of pixels, not a square 1 x 28 x 28"):
        turned(bytes(600), 90, 1, 28, "e.csv: 'a.png @90'")


def test_config_checks_the_extension_and_n_test_episodes(root, tmp_path):
    with pytest.raises(ValueError, match=r"test_episodes: a fixed episode file is \.csv or \.parquet"):
        family_with(root, tmp_path / "episodes.txt")
    path = tmp_path / "study.yaml"
    path.write_text(f"family: {{kind: omniglot, path: {root}, test_episodes: e.csv, n_test_episodes: 10}}\n"
                    "model: {kind: conv4}\n")
    with pytest.raises(ConfigError, match="family.n_test_episodes: read only without test_episodes"):
        load_config(path)
    from flows.versions import ROOT

    shipped = load_config(ROOT / "configs" / "omniglot-5w1s.yaml", {"family": {"test_episodes": "e.csv"}})
    assert shipped.family.test_episodes == "e.csv"  # its n_test_episodes is the default: --set works on it
    assert type(shipped).model_validate(shipped.model_dump(mode="json")) == shipped  # a stored config.json
    path.write_text(f"family: {{kind: omniglot, path: {root}, test_episodes: e.csv}}\nmodel: {{kind: conv4}}\n"
                    "transfer: {n_groups: 3}\n")
    with pytest.raises(ConfigError, match="family.test_episodes: the transfer study"):
        load_config(path)


def test_the_task_sets_key_follows_the_file_content(root, tmp_path):
    path = tmp_path / "episodes.csv"
    table = episode_file()
    table.to_csv(path, index=False)
    key = make_plan(family_with(root, path)[0]).keys["task_sets"]
    assert make_plan(family_with(root, None)[0]).keys["task_sets"] != key
    table.to_csv(path, index=False)  # rewritten, same content
    assert make_plan(family_with(root, path)[0]).keys["task_sets"] == key
    table.loc[1, "image"] = member(1, 19)  # another query drawing
    table.to_csv(path, index=False)
    assert make_plan(family_with(root, path)[0]).keys["task_sets"] != key


def test_validation_names_the_malformed_episode(built):
    family, tables = built
    episodes = tables["episodes_meta_test"]
    short = episodes.drop(index=episodes.index[(episodes["source_episode"] == "ep2") & (episodes["slot"] == 0)][0])
    with pytest.raises(ValidationFailed, match=r"fixed_episodes: .*\(n_support\).* at episode 'ep2'"):
        validate_family(family, {**tables, "episodes_meta_test": short})
    stray = episodes.copy()
    stray.loc[stray.index[(stray["source_episode"] == "ep1") & (stray["slot"] == 1)][0], "label"] = "zz"
    with pytest.raises(ValidationFailed, match=r"\(n_unknown_query\).* at episode 'ep1'"):
        validate_family(family, {**tables, "episodes_meta_test": stray})


def test_every_method_and_baseline_is_scored_and_paired_on_the_file_s_episodes(built, root, tmp_path):
    """The evaluate, baselines and significance stages, as the pipeline calls them: a meta-learned start and the
    baselines are scored on the file's episodes (numbered in file order), and the paired tests pair those."""
    from flows.families import algorithm_settings
    from flows.stages.baselines import run_baselines
    from flows.stages.evaluate import evaluate_unit
    from flows.stages.significance import compare

    family, tables = built
    cfg, _ = family_with(root, None)
    settings, cpu = algorithm_settings(cfg, "maml", 0), torch.device("cpu")
    (tmp_path / "maml").mkdir()
    torch.save(family.learner(tables, settings.learner, cpu, 0).state_dict(), tmp_path / "maml" / "state.pt")
    evaluated = evaluate_unit(family, tables, settings, tmp_path / "maml", steps=1, score_every=1, chunk=3,
                              method="maml", device=cpu, out=tmp_path)
    baselines = run_baselines(family, tables, steps=1, score_every=1, chunk=3, seed=0, device=cpu, out=tmp_path)
    for results in (evaluated, baselines):
        assert sorted(results["episode"].unique()) == list(range(N_EPISODES))
    summary, pairs = compare(pd.concat([evaluated.drop(columns="seed"), baselines]), pd.DataFrame(), "accuracy",
                             False, 0.95, 0.01, tmp_path)
    assert set(summary.index) == {"maml", "scratch", "pretrain_finetune"} and len(pairs) == 3
    assert (pairs["n"] == N_EPISODES).all()


def image_folder_with_held_out(tmp_path: Path, n_classes: int, held_size: int):
    """<tmp_path>/images: n_classes folders of 4 random 12 x 12 images; <tmp_path>/held_out: 3 classes of 2 random
    held_size images each; <tmp_path>/e.csv: one 3-way 1-shot episode of the held-out images (paths relative to it).
    Returns (root, held, the episode rows)."""
    root, held, rows, rng = tmp_path / "images", tmp_path / "held_out", [], np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    for c in range(3):
        (held / f"new{c}").mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (held_size, held_size), dtype=np.uint8)
            Image.fromarray(image).save(held / f"new{c}" / f"{i}.png")
            rows.append(("only", "support" if i == 0 else "query", f"held_out/new{c}/{i}.png", c))
    pd.DataFrame(rows, columns=["episode", "role", "image", "label"]).to_csv(tmp_path / "e.csv", index=False)
    return root, held, rows


def test_an_image_folder_reads_a_file_too(tmp_path):
    """image_folder: paths relative to the file's folder, read as the folder's images are; the meta-test classes
    need not be in the folder."""
    root, held, rows = image_folder_with_held_out(tmp_path, n_classes=8, held_size=20)
    cfg = StudyConfig.model_validate({
        "family": {"kind": "image_folder", "path": str(root), "n_way": 3, "k_shot": 1, "n_query": 1,
                   "n_val_episodes": 2, "image_size": 8, "fractions": [0.5, 0.375, 0.125],
                   "test_episodes": str(tmp_path / "e.csv")}, "model": {"kind": "conv4"}})
    family = family_for(cfg)
    tables = family.build(seed=0)
    validate_family(family, tables)
    test = family.open(tables, torch.device("cpu"), ("meta_test",)).test
    from components.image_folder import decode_image

    first = np.frombuffer(decode_image(held / "new0" / "0.png", 8, 1), dtype=np.uint8).reshape(8, 8) / 255
    assert test.x_spt.shape == (1, 3, 1, 8, 8) and np.allclose(test.x_spt[0, 0, 0].numpy(), first)
    pd.DataFrame(rows, columns=["episode", "role", "image", "label"]).assign(rotation=270).to_csv(
        tmp_path / "e.csv", index=False)  # the base class turns an image folder's images too
    turned = family.open(family.build(seed=0), torch.device("cpu"), ("meta_test",)).test
    assert np.allclose(turned.x_spt[0, 0, 0].numpy(), np.rot90(first, 3))
    shutil.rmtree(held / "new2")
    with pytest.raises(FileNotFoundError, match=r"column 'image': 'held_out/new2/0.png @270' \(episode 'only'\)"):
        family.input_files()



@pytest.mark.parametrize("command", [["stages"], ["run", "--dry-run"], ["run"]])
def test_a_malformed_file_is_one_line_from_every_command(root, tmp_path, monkeypatch, capsys, command):
    from flows import cli

    path = tmp_path / "episodes.csv"
    rewrite(episode_file(), "unknown role").to_csv(path, index=False)
    config = tmp_path / "study.yaml"
    config.write_text(f"family: {{kind: omniglot, path: {root}, test_episodes: {path}}}\nmodel: {{kind: conv4}}\n")
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path))
    assert cli.main([command[0], "--config", str(config), *command[1:]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column 'role': 'train' at episode 'ep0'" in err[0]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / ".prefect").exists()


def test_a_drawing_that_looks_the_same_turned_is_two_examples_at_two_rotations():
    """The GX suite counts an example as its pixels at its rotation (as the sampled episodes' suite does): the same
    pixels at 0 and 180 (a symmetric drawing) are two examples; the same image at the same rotation twice is one."""
    import types

    from flows.validation import fixed_episode_suites

    family = types.SimpleNamespace(k_shot=1, n_way=2, image_size=2)
    same = bytes([0, 255, 255, 0])
    images = pd.DataFrame({"image": ["a.png", "a.png", "b.png"], "rotation": [0, 180, 0],
                           "pixels": [same, same, bytes([255, 0, 0, 0])], "channels": 1, "size": 2})

    def episode(rows):  # (label, slot, images row) per episode row
        return pd.DataFrame([{"split": "meta_test", "episode": 0, "way": w, "slot": slot, "label": label,
                              "image": images["image"][row], "rotation": images["rotation"][row], "row": row,
                              "source_episode": "e0"} for w, (label, slot, row) in enumerate(rows)])

    distinct = fixed_episode_suites(episode([("x", 0, 0), ("y", 0, 1), ("x", 1, 2)]), images, family)
    assert distinct["fixed_episodes"][0]["n_distinct"].tolist() == [3]
    repeated = fixed_episode_suites(episode([("x", 0, 0), ("y", 0, 2), ("x", 1, 0)]), images, family)
    assert repeated["fixed_episodes"][0]["n_distinct"].tolist() == [2]


def test_a_fixed_file_changes_no_table_or_key_of_meta_training(built, root, tmp_path):
    """The file is the test protocol: the tables meta-training reads (all but the family's test_tables) are the
    same with it, without it and with another file, and so are the train_sets and meta_train keys; the task sets'
    key and what reads the meta-test episodes change."""
    family, with_file = built
    _, plain_family = family_with(root, None)
    without = plain_family.build(seed=0)
    training = set(with_file) - set(family.test_tables)
    assert training == set(without) - set(family.test_tables) and "images" in training
    for name in training:
        pd.testing.assert_frame_equal(with_file[name], without[name])
    path = tmp_path / "episodes.csv"
    table = episode_file()
    table.to_csv(path, index=False)
    plans = [make_plan(family_with(root, path)[0])]
    table.loc[1, "image"] = member(1, 19)  # another query drawing
    table.to_csv(path, index=False)
    plans += [make_plan(family_with(root, path)[0]), make_plan(family_with(root, None)[0])]
    assert len({p.keys["task_sets"] for p in plans}) == len({p.keys["evaluate"] for p in plans}) == 3
    assert len({p.keys["train_sets"] for p in plans}) == len({p.keys["meta_train"] for p in plans}) == 1
    assert len({tuple(p.checkpoint_keys.values()) for p in plans}) == 1


def test_transparent_blank_bold_and_copied_images(built, root, tmp_path):
    """Files as users make them: strokes on transparent paper read as the drawing; a bold drawing cropped to its
    strokes (mostly ink) is still strokes 1 on paper 0 (the paper is judged by the border); a white or fully
    transparent image, and one picture under two names in an episode, are errors naming the file and the image."""
    from PIL import ImageFilter

    family, tables = built
    expected = family.open(tables, torch.device("cpu"), ("meta_test",)).test
    with zipfile.ZipFile(root / "images_evaluation.zip") as z:
        support = Image.open(io.BytesIO(z.read(member(1, 0)))).convert("L")
    gray = np.asarray(support)
    own = tmp_path / "own"
    own.mkdir()
    rgba = np.zeros((*gray.shape, 4), np.uint8)
    rgba[..., 3] = 255 - gray  # black strokes, opaque; paper transparent (RGBA 0, 0, 0, 0)
    Image.fromarray(rgba, "RGBA").save(own / "transparent.png")
    bold = support.filter(ImageFilter.MinFilter(11))
    bold = bold.crop(Image.fromarray(255 - np.asarray(bold)).getbbox())
    assert (np.asarray(bold) < 128).mean() > 0.5  # mostly ink: the old rule (mean < 127.5) took it for dark paper
    bold.save(own / "bold.png")
    Image.new("L", (105, 105), 255).save(own / "white.png")
    Image.new("RGBA", (105, 105), (0, 0, 0, 0)).save(own / "clear.png")
    shutil.copy(own / "transparent.png", own / "copy.png")

    def build_with(changes: dict) -> dict:
        table = episode_file()
        for old, new in changes.items():
            table.loc[table["image"] == old, "image"] = new
        table.to_csv(tmp_path / "episodes.csv", index=False)
        return family_with(root, tmp_path / "episodes.csv")[1].build(seed=0)

    test = family.open(build_with({member(1, 0): "own/transparent.png", member(2, 0): "own/bold.png"}),
                       torch.device("cpu"), ("meta_test",)).test
    assert torch.equal(test.x_spt[0, 4], expected.x_spt[0, 4])  # way 4 (label 'e'): character 1, exactly
    drawn = test.x_spt[0, 3, 0]  # way 3: character 2, bold
    assert drawn.mean() > 0.5  # mostly strokes, as drawn (taken for dark paper, it would be mostly 0)
    for image in ("own/white.png", "own/clear.png"):
        with pytest.raises(ValueError, match=rf"episodes.csv: column 'image': '{image}' \(episode 'ep0'\) is blank"):
            build_with({member(1, 0): image})
    with pytest.raises(ValueError, match=r"\['own/transparent.png', 'own/copy.png'\] in episode 'ep0' are the same "
                                         r"picture"):
        build_with({member(1, 0): "own/transparent.png", member(1, 10): "own/copy.png"})
