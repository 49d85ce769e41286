import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.omniglot import (EpisodeBatch, build_class_pool, load_omniglot, parse_class_id,
                                 pixels_to_array, random_class_split, read_vinyals_split, rotate,
                                 sample_episode_indices, sample_episodes)

SHARED = Path(os.environ.get("METAPEFT_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data"))
OMNIGLOT = SHARED / "omniglot"
SUBSET = ["Tagalog", "Angelic"]  # 17 background + 20 evaluation characters: about 0.2 s to load


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return load_omniglot(OMNIGLOT, alphabets=SUBSET)


@pytest.fixture(scope="module")
def pool(table):
    chars = sorted(table["character"].unique())
    return build_class_pool(table, [f"{c}/rot{r:03d}" for c in chars for r in (0, 90, 180, 270)])


def write_png(path: Path, ink: np.ndarray):
    """A 105 x 105 Omniglot-style PNG: black (False) strokes where ink is True, white paper elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(~ink).convert("1").save(path)


def synthetic_tree(root: Path) -> np.ndarray:
    """Both parts, one character each, 3 drawings; returns drawing 0's ink (105, 105) bool."""
    ink = np.zeros((105, 105), dtype=bool)
    ink[:10, :30] = True  # a bar in the top-left corner: asymmetric under every rotation
    for stem, alphabet in (("images_background", "Alpha"), ("images_evaluation", "Beta")):
        for rr in (1, 2, 3):
            write_png(root / stem / alphabet / "character01" / f"0001_{rr:02d}.png", np.roll(ink, rr - 1, axis=0))
    return ink


def zip_tree(tree: Path, dest: Path):
    dest.mkdir()
    for stem in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(dest / f"{stem}.zip", "w") as archive:
            for png in sorted((tree / stem).rglob("*.png")):
                archive.write(png, png.relative_to(tree).as_posix())


# --- loader on the real archives ---

def test_subset_columns_and_drawings(table):
    assert list(table.columns) == ["background", "alphabet", "character", "drawing", "pixels"]
    assert set(table["alphabet"]) == set(SUBSET)
    assert table.groupby("alphabet")["background"].first().to_dict() == {"Tagalog": True, "Angelic": False}
    assert table["character"].str.fullmatch(r"(Tagalog|Angelic)/character\d\d").all()
    per_char = table.groupby("character")["drawing"].agg(list)
    assert len(per_char) == 17 + 20
    assert all(d == list(range(20)) for d in per_char)


def test_pixels_are_inverted_floats_in_unit_range(table):
    x = pixels_to_array(table)
    assert x.shape == (len(table), 28, 28) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert x.mean() < 0.2  # strokes are 1 and cover a small part of the paper
    assert x[:, 0, :].mean() < 0.01  # the border is paper


def test_unknown_alphabet_is_named():
    with pytest.raises(ValueError, match="Klingon"):
        load_omniglot(OMNIGLOT, alphabets=["Klingon"])


# --- loader on synthetic archives: hand-computed pixels, zip == folder, errors ---

def test_synthetic_pixels_drawings_and_zip_equals_folder(tmp_path):
    ink = synthetic_tree(tmp_path / "tree")
    zip_tree(tmp_path / "tree", tmp_path / "zips")
    from_zip = load_omniglot(tmp_path / "zips", size=105)
    from_folder = load_omniglot(tmp_path / "tree", size=105)
    pd.testing.assert_frame_equal(from_zip, from_folder)
    assert from_zip["character"].tolist() == ["Alpha/character01"] * 3 + ["Beta/character01"] * 3
    assert from_zip["drawing"].tolist() == [0, 1, 2] * 2
    assert from_zip["background"].tolist() == [True] * 3 + [False] * 3
    x = pixels_to_array(from_zip)
    np.testing.assert_array_equal(x[0], ink.astype(np.float32))  # ink -> 1, paper -> 0, no resize at 105
    np.testing.assert_array_equal(x[2], np.roll(ink, 2, axis=0).astype(np.float32))
    small = pixels_to_array(load_omniglot(tmp_path / "zips", size=28))
    assert small.shape == (6, 28, 28) and small[0, 0, 0] > 0.9 and small[0, -1, -1] == 0.0


def test_missing_archive_names_file_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images_background\.zip.*brendenlake/omniglot"):
        load_omniglot(tmp_path)
    synthetic_tree(tmp_path)
    shutil.rmtree(tmp_path / "images_evaluation")
    with pytest.raises(FileNotFoundError, match=r"images_evaluation\.zip"):
        load_omniglot(tmp_path)


def test_corrupt_zip_is_named(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"not a zip at all")
    (tmp_path / "images_evaluation.zip").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(ValueError, match=r"images_background\.zip: damaged zip"):
        load_omniglot(tmp_path)


def test_undecodable_png_is_named(tmp_path):
    synthetic_tree(tmp_path / "tree")
    (tmp_path / "tree" / "images_evaluation" / "Beta" / "character01" / "0001_02.png").write_bytes(b"\x89PNG junk")
    zip_tree(tmp_path / "tree", tmp_path / "zips")
    with pytest.raises(ValueError, match=r"images_evaluation\.zip: images_evaluation/Beta/character01/0001_02\.png"):
        load_omniglot(tmp_path / "zips")


def test_oversized_png_is_named_with_its_size(tmp_path):
    from test_image_folder import oversized_png

    synthetic_tree(tmp_path / "tree")
    (tmp_path / "tree" / "images_evaluation" / "Beta" / "character01" / "0001_02.png").write_bytes(oversized_png(20000))
    with pytest.raises(ValueError, match=r"images_evaluation/Beta/character01/0001_02\.png: .*400000000 pixels"):
        load_omniglot(tmp_path / "tree")


# --- class splits ---

def test_vinyals_split_sizes_and_disjointness():
    splits = read_vinyals_split(OMNIGLOT / "splits_vinyals")
    chars = {k: {parse_class_id(c)[0] for c in v} for k, v in splits.items()}
    assert {k: len(v) for k, v in splits.items()} == {"train": 4112, "val": 688, "test": 1692}
    assert {k: len(v) for k, v in chars.items()} == {"train": 1028, "val": 172, "test": 423}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not chars[a] & chars[b], (a, b)
    assert splits["val"][:2] == ["Hebrew/character01/rot000", "Hebrew/character01/rot090"]


def test_parse_class_id():
    assert parse_class_id("Syriac_(Serto)/character07/rot270") == ("Syriac_(Serto)/character07", 270)
    with pytest.raises(ValueError, match="rot045"):
        parse_class_id("A/character01/rot045")


def test_random_class_split_keeps_rotations_together():
    chars = [f"A/character{i:02d}" for i in range(1, 11)]
    splits = random_class_split(chars, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    per_split = {k: {parse_class_id(c)[0] for c in v} for k, v in splits.items()}
    assert {k: len(v) for k, v in per_split.items()} == {"train": 6, "val": 2, "test": 2}
    assert set().union(*per_split.values()) == set(chars)
    assert all(len(v) == 4 * len(per_split[k]) for k, v in splits.items())
    assert splits == random_class_split(chars[::-1], {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert splits != random_class_split(chars, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=4)


# --- rotation and class pools ---

def test_rotation_is_counter_clockwise():
    a = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(rotate(a, 90), [[2, 4], [1, 3]])
    np.testing.assert_array_equal(rotate(a, 180), [[4, 3], [2, 1]])
    np.testing.assert_array_equal(rotate(a, 270), [[3, 1], [4, 2]])
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)  # PIL's rotate(90) is counter-clockwise too
    np.testing.assert_array_equal(rotate(img, 90), np.asarray(Image.fromarray(img).rotate(90, expand=True)))


def test_pool_rotates_each_class(tmp_path):
    ink = synthetic_tree(tmp_path)
    table = load_omniglot(tmp_path, size=105)
    ids = [f"Alpha/character01/rot{r:03d}" for r in (0, 90, 180, 270)] + ["Beta/character01/rot090"]
    pool = build_class_pool(table, ids)
    assert pool.images.shape == (5, 3, 1, 105, 105) and pool.images.dtype == torch.float32
    for c, k in enumerate((0, 1, 2, 3)):
        np.testing.assert_array_equal(pool.images[c, 0, 0].numpy(), np.rot90(ink, k).astype(np.float32))
    assert pool.images[0, 0, 0, 0, 0] == 1 and pool.images[1, 0, 0, -1, 0] == 1  # top-left ink -> bottom-left


def test_pool_names_missing_characters(table):
    with pytest.raises(ValueError, match="Hebrew/character01"):
        build_class_pool(table, ["Angelic/character01/rot000", "Hebrew/character01/rot090"])


def test_pool_from_real_subset(pool):
    assert pool.images.shape == (37 * 4, 20, 1, 28, 28)
    np.testing.assert_array_equal(pool.images[1].numpy(), np.rot90(pool.images[0].numpy(), 1, axes=(-2, -1)))


# --- episodes ---

def test_episode_shapes_and_labels(pool):
    batch, classes = sample_episodes(pool, n_way=5, k_shot=2, n_query=3, n_episodes=7, seed=0)
    assert isinstance(batch, EpisodeBatch) and len(batch) == 7 and len(batch.index(slice(2, 4))) == 2
    assert batch.x_spt.shape == (7, 10, 1, 28, 28) and batch.x_qry.shape == (7, 15, 1, 28, 28)
    assert batch.y_spt.dtype == batch.y_qry.dtype == classes.dtype == torch.int64
    assert classes.shape == (7, 5) and all(len(set(row.tolist())) == 5 for row in classes)
    for y, per_class in ((batch.y_spt, 2), (batch.y_qry, 3)):
        counts = torch.stack([torch.bincount(row, minlength=5) for row in y])
        assert (counts == per_class).all()
    label = batch.y_spt[3, 4]  # the image is one of that label's class drawings
    image = batch.x_spt[3, 4]
    assert any(torch.equal(image, d) for d in pool.images[classes[3, label]])


def test_support_and_query_drawings_are_disjoint(pool):
    _, drawings = sample_episode_indices(len(pool.class_ids), 20, n_way=5, k_shot=5, n_query=15, n_episodes=50, seed=1)
    assert all(len(set(d)) == 20 for d in drawings.reshape(-1, 20).tolist())
    batch, _ = sample_episodes(pool, n_way=5, k_shot=5, n_query=15, n_episodes=4, seed=1)
    spt, qry = batch.x_spt.view(4, 5, 5, -1), batch.x_qry.view(4, 5, 15, -1)
    same = (spt[:, :, :, None] == qry[:, :, None, :]).all(-1)  # (T, N, K, Q)
    assert not same.any()


def test_episodes_are_deterministic_in_seed(pool):
    a, ca = sample_episodes(pool, 5, 1, 2, 6, seed=11)
    b, cb = sample_episodes(pool, 5, 1, 2, 6, seed=11)
    c, cc = sample_episodes(pool, 5, 1, 2, 6, seed=12)
    assert torch.equal(ca, cb) and all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(ca, cc) and not torch.equal(a.x_spt, c.x_spt)


def test_episode_arguments_are_checked(pool):
    with pytest.raises(ValueError, match="n_way"):
        sample_episodes(pool, 1000, 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match="k_shot"):
        sample_episodes(pool, 5, 10, 11, 1, seed=0)
