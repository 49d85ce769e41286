"""image_folder: a small folder of real Omniglot drawings (PNG as stored, and RGB JPEGs of another size),
its image table, class lists, duplicates; conv4 with 3 input channels, grouped path vs per-task loop; and the
image_folder family on 12 classes of uneven size: task sets, GX suite, config, cache keys, the whole pipeline."""
from __future__ import annotations

import copy
import io
import os
import shutil
import struct
import unicodedata
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.conv4 import Conv4, Conv4Config, adapted_names
from components.episodes import clean_examples, pixel_keys
from components.image_folder import (check_class_lists, decode_image, images_to_array, load_image_folder,
                                     read_class_lists, scan_image_folder, split_classes)
from components.metalearners import MetaLearner, MetaLearnerConfig
from components.omniglot import EpisodeBatch

SHARED = Path(os.environ.get("METAPEFT_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data"))
ARCHIVE = SHARED / "omniglot" / "images_background.zip"
ALPHABET = "images_background/Alphabet_of_the_Magi"
N_CLASSES, N_IMAGES = 5, 6
CLASSES = [f"magi_{i:02d}" for i in range(1, N_CLASSES + 1)]
JPEG_SIZE = (64, 80)  # (width, height): not square, not 105


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """5 classes x 6 images: images 0-3 the archive's PNG bytes (mode '1', 105 x 105), 4-5 red-on-blue RGB JPEGs.

    Plus what must be ignored: a hidden file in a class folder, a hidden folder and a text file in root.
    """
    root = tmp_path_factory.mktemp("images")
    with zipfile.ZipFile(ARCHIVE) as archive:
        for c, cls in enumerate(CLASSES, 1):
            members = sorted(n for n in archive.namelist() if n.startswith(f"{ALPHABET}/character{c:02d}/"))
            (root / cls).mkdir()
            for i, name in enumerate(members[:N_IMAGES]):
                data = archive.read(name)
                if i < 4:
                    (root / cls / f"img{i}.png").write_bytes(data)
                else:
                    write_colour_jpeg(data, root / cls / f"img{i}.jpg")
    (root / CLASSES[0] / ".DS_Store").write_bytes(b"\0junk")
    (root / ".cache").mkdir()
    (root / "README.txt").write_text("my images\n")
    return root


def write_colour_jpeg(png: bytes, path: Path):
    ink = np.asarray(Image.open(io.BytesIO(png)).convert("L")) < 128  # strokes are black in the files
    rgb = np.where(ink[..., None], [220, 30, 30], [20, 40, 200]).astype(np.uint8)
    Image.fromarray(rgb).resize(JPEG_SIZE).save(path, quality=95)


@pytest.fixture(scope="module")
def gray(folder) -> pd.DataFrame:
    return load_image_folder(folder, 28, 1)


def copy_folder(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


# --- scan and load ---

def test_scan_lists_every_image_sorted_and_skips_hidden_and_root_files(folder):
    table = scan_image_folder(folder)
    assert list(table.columns) == ["class_id", "file"]
    assert len(table) == N_CLASSES * N_IMAGES
    assert sorted(table["class_id"].unique()) == CLASSES
    assert table["file"].tolist() == sorted(table["file"])
    assert table["file"].iloc[0] == "magi_01/img0.png" and table["file"].iloc[-1] == "magi_05/img5.jpg"
    assert not table["file"].str.contains("DS_Store|README|cache").any()


@pytest.mark.parametrize("channels", [1, 3])
def test_load_shapes_range_and_schema(folder, channels):
    table = load_image_folder(folder, 20, channels)
    assert list(table.columns) == ["class_id", "file", "pixels", "channels", "size"]
    assert (table["channels"] == channels).all() and (table["size"] == 20).all()
    assert table[["class_id", "file"]].equals(scan_image_folder(folder))
    images = images_to_array(table)
    assert images.shape == (N_CLASSES * N_IMAGES, channels, 20, 20) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0


def test_png_at_its_own_size_is_its_pixels_and_a_grayscale_png_as_rgb_repeats_them(folder):
    png = folder / "magi_02" / "img1.png"
    want = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255  # white paper 1, strokes 0: no inversion
    for channels in (1, 3):
        table = load_image_folder(folder, 105, channels)
        got = image_of(table, "magi_02/img1.png")
        np.testing.assert_array_equal(got, np.broadcast_to(want, (channels, 105, 105)))


def test_jpeg_is_resized_with_lanczos_and_stored_channel_first(folder):
    jpg = folder / "magi_03" / "img4.jpg"
    with Image.open(jpg) as image:
        assert image.mode == "RGB" and image.size == JPEG_SIZE
        rgb = np.asarray(image.resize((28, 28), Image.Resampling.LANCZOS), dtype=np.float32) / 255
        gray = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    colour = image_of(load_image_folder(folder, 28, 3), "magi_03/img4.jpg")
    np.testing.assert_array_equal(colour, rgb.transpose(2, 0, 1))  # (C, H, W): red strokes, blue paper
    assert not np.allclose(colour[0], colour[2])
    np.testing.assert_array_equal(image_of(load_image_folder(folder, 28, 1), "magi_03/img4.jpg")[0], gray)


def image_of(table: pd.DataFrame, file: str) -> np.ndarray:
    return images_to_array(table[table["file"] == file])[0]


def test_load_is_deterministic_and_survives_parquet(folder, gray, tmp_path):
    again = load_image_folder(folder, 28, 1)
    pd.testing.assert_frame_equal(again, gray)
    gray.to_parquet(tmp_path / "images.parquet")
    back = pd.read_parquet(tmp_path / "images.parquet")
    np.testing.assert_array_equal(images_to_array(back), images_to_array(gray))


def test_images_to_array_refuses_mixed_shapes(folder, gray):
    mixed = pd.concat([gray.head(2), load_image_folder(folder, 20, 1).head(2)])
    with pytest.raises(ValueError, match="channels, size"):
        images_to_array(mixed)
    broken = gray.head(3).assign(size=27)
    with pytest.raises(ValueError, match="magi_01/img0.png"):
        images_to_array(broken)


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(folder, 28, 4)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(folder, 0, 1)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    (tmp_path / "a").mkdir()
    Image.fromarray(ramp).save(tmp_path / "a" / "ramp.png")
    assert Image.open(tmp_path / "a" / "ramp.png").mode == "I;16"
    got = images_to_array(load_image_folder(tmp_path, 32, 1))[0, 0]
    np.testing.assert_array_equal(got, (np.round(ramp / 257) / 255).astype(np.float32))


# --- errors naming the path ---

def test_missing_root_and_root_without_class_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="flat: no class folders"):
        scan_image_folder(tmp_path / "flat")


def test_unreadable_file_is_named(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    (root / "magi_04" / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"magi_04/notes\.png: not an image"):
        load_image_folder(root, 28, 1)


def test_truncated_image_is_named_when_decoded(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    path = root / "magi_04" / "img2.png"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 3 // 4])  # header intact, image data cut
    scan_image_folder(root)  # only headers are read here
    with pytest.raises(ValueError, match=r"magi_04/img2\.png: image failed to decode"):
        load_image_folder(root, 28, 1)


def oversized_png(side: int) -> bytes:
    """A 1 x 1 grayscale PNG whose header says side x side: Pillow's size check trips on opening it."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height (after signature, length, type)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the chunk's CRC over type + data
    return bytes(data)


def test_an_image_over_pillows_size_limit_is_named_with_its_size_and_the_limit(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    big = root / "magi_04" / "big.png"
    big.write_bytes(oversized_png(20000))
    message = r"magi_04/big\.png: .*400000000 pixels.* limit of 178956970 pixels"
    with pytest.raises(ValueError, match=message):
        scan_image_folder(root)
    with pytest.raises(ValueError, match=message):
        decode_image(big, 28, 1)
    big.write_bytes(oversized_png(10000))  # over MAX_IMAGE_PIXELS, under twice it: a warning, here an error
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match=r"magi_04/big\.png: .*100000000 pixels.* limit of 89478485 pixels"):
            scan_image_folder(root)


def test_macosx_resource_folder_is_not_a_class(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    (root / "__MACOSX" / "magi_01").mkdir(parents=True)  # what unzipping a zip made on macOS leaves
    (root / "__MACOSX" / "magi_01" / "._img0.png").write_bytes(b"\0\5\26\7resource fork")
    (root / ".Trashes").mkdir()
    table = scan_image_folder(root)
    assert sorted(table["class_id"].unique()) == CLASSES and len(table) == N_CLASSES * N_IMAGES


def test_empty_class_and_nested_folder(folder, tmp_path):
    root = copy_folder(folder, tmp_path)
    (root / "magi_06").mkdir()
    (root / "magi_06" / ".hidden.png").write_bytes(b"")
    with pytest.raises(ValueError, match="magi_06: class folder holds no images"):
        scan_image_folder(root)
    (root / "magi_06" / "more").mkdir()
    with pytest.raises(ValueError, match="magi_06/more: nested folders"):
        scan_image_folder(root)


# --- class lists and splits ---

def write_lists(folder: Path, train: str, val: str, test: str | None):
    for name, text in (("train", train), ("val", val), ("test", test)):
        if text is not None:
            (folder / f"classes.{name}.txt").write_text(text)


def test_class_lists_read_in_file_order_and_check_against_the_folder(folder, tmp_path):
    write_lists(tmp_path, "magi_03\n\nmagi_01\n", "  magi_02  \n", "magi_05\n")
    lists = read_class_lists(tmp_path)
    assert lists == {"meta_train": ["magi_03", "magi_01"], "meta_val": ["magi_02"], "meta_test": ["magi_05"]}
    check_class_lists(lists, scan_image_folder(folder)["class_id"], tmp_path)  # magi_04 held out: allowed


def test_class_list_errors_name_file_and_line(tmp_path):
    write_lists(tmp_path, "magi_01\nmagi_02\n", "magi_03\n\nmagi_02\n", None)
    with pytest.raises(FileNotFoundError, match=r"classes\.test\.txt"):
        read_class_lists(tmp_path)
    write_lists(tmp_path, "magi_01\nmagi_02\n", "magi_03\n\nmagi_02\n", "magi_04\n")
    with pytest.raises(ValueError, match=r"classes\.val\.txt:3: class 'magi_02' listed in two lists, "
                                         r"first at .*classes\.train\.txt:2"):
        read_class_lists(tmp_path)
    write_lists(tmp_path, "magi_01\nmagi_02\nmagi_01\n", "magi_03\n", "magi_04\n")
    with pytest.raises(ValueError, match=r"classes\.train\.txt:3: class 'magi_01' listed twice"):
        read_class_lists(tmp_path)


def test_unknown_class_is_named_with_file_and_line(folder, tmp_path):
    write_lists(tmp_path, "magi_01\n", "magi_02\n", "magi_03\n\nmagi_9\n")
    lists, classes = read_class_lists(tmp_path), scan_image_folder(folder)["class_id"]
    with pytest.raises(ValueError, match=r"classes\.test\.txt:3: class 'magi_9' is not a class folder"):
        check_class_lists(lists, classes, tmp_path)
    with pytest.raises(ValueError, match=r"^classes\.test\.txt: class 'magi_9'"):
        check_class_lists(lists, classes)


def test_class_names_match_in_unicode_nfc_whatever_form_folder_and_list_use(folder, tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "étoile"), unicodedata.normalize("NFD", "étoile")
    assert nfc != nfd
    root = copy_folder(folder, tmp_path)
    (root / "magi_01").rename(root / nfd)  # as macOS names folders
    write_lists(root, f"{nfc}\nmagi_02\n", "magi_03\n", f"{unicodedata.normalize('NFD', 'magi_04')}\n")
    lists = read_class_lists(root)
    table = load_image_folder(root, 28, 1)
    check_class_lists(lists, table["class_id"], root)
    assert lists["meta_train"] == [nfc, "magi_02"] and nfc in set(table["class_id"])
    assert table.loc[table["class_id"] == nfc, "file"].str.startswith(f"{nfd}/").all()  # the folder's own name
    (root / nfc).mkdir()
    shutil.copy(root / "magi_02" / "img0.png", root / nfc / "img0.png")
    with pytest.raises(ValueError, match=f"{nfd} and .*{nfc}: two class folders named {nfc!r}"):
        scan_image_folder(root)


def test_seeded_class_split_is_disjoint_and_reproducible(gray):
    fractions = {"meta_train": 0.6, "meta_val": 0.2, "meta_test": 0.2}
    split = split_classes(gray, fractions, seed=3)
    assert split == split_classes(gray, fractions, seed=3)
    assert [len(v) for v in split.values()] == [3, 1, 1]
    assert sorted(sum(split.values(), [])) == CLASSES


# --- identical images ---

def test_no_duplicates_then_copies_are_found_in_and_across_classes(folder, gray, tmp_path):
    assert not pixel_keys(gray["pixels"]).duplicated().any()
    root = copy_folder(folder, tmp_path)
    shutil.copy(root / "magi_02" / "img1.png", root / "magi_02" / "zcopy.png")  # same class, later in order
    table = load_image_folder(root, 28, 1)
    clean, report = clean_examples(table, pixel_keys(table["pixels"]), "class_id")
    assert len(clean) == len(table) - 1 and "magi_02/zcopy.png" not in set(clean["file"])  # the first copy stays
    assert report.set_index("what").loc["duplicates_dropped", "count"] == 1
    shutil.copy(root / "magi_02" / "img1.png", root / "magi_05" / "stray.png")  # another class: a conflict
    shutil.copy(root / "magi_03" / "img4.jpg", root / "magi_01" / "colour.jpg")  # JPEG: same decoded pixels
    table = load_image_folder(root, 28, 1)
    with pytest.raises(ValueError, match=r"2 examples .* magi_01/colour.jpg \('magi_01'\), magi_03/img4.jpg \('magi_03'\)"):
        clean_examples(table, pixel_keys(table["pixels"]), "class_id")
    clean, report = clean_examples(table, pixel_keys(table["pixels"]), "class_id", conflicting="drop")
    dropped = {"magi_02/img1.png", "magi_02/zcopy.png", "magi_05/stray.png", "magi_01/colour.jpg", "magi_03/img4.jpg"}
    assert not dropped & set(clean["file"]) and len(clean) == len(table) - 5
    assert report.set_index("what").loc["conflicts_dropped", "count"] == 5


# --- conv4 with the folder's channels ---

N_WAY, N_QUERY, N_TASKS, FAST_LR = 5, 2, 3, 0.4


def test_conv4_default_stays_one_channel_and_three_channels_run_on_folder_images(folder):
    assert Conv4().blocks[0].conv.weight.shape == (64, 1, 3, 3)
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY, in_channels=3, lora_rank=2))
    assert model.blocks[0].conv.base_layer.weight.shape == (64, 3, 3, 3)
    assert model.blocks[0].conv.lora_A.shape == (2, 3, 3, 3)
    images = torch.from_numpy(images_to_array(load_image_folder(folder, 28, 3)))  # (30, 3, 28, 28)
    assert model(images).shape == (30, N_WAY)
    assert model(images.view(N_CLASSES, N_IMAGES, 3, 28, 28)).shape == (N_CLASSES, N_IMAGES, N_WAY)


@pytest.fixture(scope="module")
def colour_episodes(random_episodes) -> EpisodeBatch:
    """3 tasks, 5-way 1-shot, 2 queries per class, random 3 x 28 x 28 images in [0, 1], float64."""
    return random_episodes(N_TASKS, N_WAY, N_QUERY, channels=3)


def meta_grads(episodes: EpisodeBatch, mode: str, steps: int, **path) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Conv4(Conv4Config(n_way=N_WAY, in_channels=3, lora_rank=2 if mode == "lora" else 0,
                              lora_b_std=0.05)).double()
    cfg = MetaLearnerConfig(algorithm="maml", inner_steps=steps, fast_lr=FAST_LR, **path)
    learner = MetaLearner(model, cfg, F.cross_entropy, adapted=adapted_names(model, mode))
    loss = learner.meta_backward(episodes)
    return loss, [p.grad for p in learner.parameters()]


@pytest.mark.parametrize("path", [dict(task_batched=True), dict(task_batched=True, task_chunk=2, query_chunk=1)],
                         ids=["task_batched", "task_batched_chunked"])
@pytest.mark.parametrize("mode, steps", [("full", 2), ("lora", 1)])
def test_grouped_path_matches_per_task_loop_with_three_channels(colour_episodes, path, mode, steps):
    """Second-order MAML meta-gradient, float64: grouped convolutions over T * 3 input channels vs one task at a time."""
    want_loss, want = meta_grads(colour_episodes, mode, steps, vectorize=False)
    got_loss, got = meta_grads(colour_episodes, mode, steps, **path)
    assert got_loss == pytest.approx(want_loss, rel=1e-10)
    assert got[0].shape[1] == 3  # blocks.0: kernel (64, 3, 3, 3) or lora_A (r, 3, 3, 3)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=str(i))



# --- pretrain_classifier over classes of unequal size (the image_folder baseline)

def test_pretrain_classifier_on_equal_classes_draws_as_before():
    """Omniglot's (C, D) path: the same (class, drawing) draws and Adam steps as the loop written out here."""
    from components.baselines import pretrain_classifier

    torch.manual_seed(0)
    images, model = torch.rand(4, 3, 1, 8, 8), Conv4(Conv4Config(n_way=4, hidden=4, image_size=8))
    got = pretrain_classifier(model, images, 5, 6, 0.01, seed=3, loss_fn=F.cross_entropy)
    want = copy.deepcopy(model)
    opt, g = torch.optim.Adam(want.parameters(), lr=0.01), torch.Generator().manual_seed(3)
    for _ in range(5):
        c = torch.randint(4, (6,), generator=g)
        d = torch.randint(3, (6,), generator=g)
        opt.zero_grad()
        F.cross_entropy(want(images[c, d]), c).backward()
        opt.step()
    for k, p in want.named_parameters():
        torch.testing.assert_close(got[k], p.detach(), rtol=0, atol=0)


def test_pretrain_classifier_with_members_reads_only_each_class_rows():
    """Rows outside members (the -1 padding would read the last row) are NaN: one read would poison the weights."""
    from components.baselines import pretrain_classifier
    from components.episodes import class_members

    labels = ["a", "b", "a", "c", "b", "a", "x"]  # x: an unused class, the last row
    images = torch.rand(len(labels), 1, 8, 8)
    images[-1] = float("nan")
    members = torch.from_numpy(class_members(labels, ["a", "b", "c"]))  # sizes 3, 2, 1
    assert members.tolist() == [[0, 2, 5], [1, 4, -1], [3, -1, -1]]
    model = Conv4(Conv4Config(n_way=3, hidden=4, image_size=8))
    trained = pretrain_classifier(model, images, 40, 8, 0.01, seed=0, loss_fn=F.cross_entropy, members=members)
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert not torch.equal(trained["head.weight"], model.head.weight)


# --- the image_folder family: a folder of 12 Omniglot characters with 8, 12 or 16 drawings each

N_FOLDER_CLASSES = 12


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> Path:
    """12 class folders c01..c12 of the archive's PNGs; class c holds 8 + 4 * (c % 3) images (uneven)."""
    root = tmp_path_factory.mktemp("twelve")
    with zipfile.ZipFile(ARCHIVE) as archive:
        names = archive.namelist()
        for c in range(1, N_FOLDER_CLASSES + 1):
            members = sorted(n for n in names if n.startswith(f"{ALPHABET}/character{c:02d}/") and n.endswith(".png"))
            (root / f"c{c:02d}").mkdir()
            for i, name in enumerate(members[:8 + 4 * (c % 3)]):
                (root / f"c{c:02d}" / f"{i:02d}.png").write_bytes(archive.read(name))
    return root


def folder_cfg(root: Path, **family):
    from flows.config import StudyConfig

    settings = {"kind": "image_folder", "path": str(root), "n_way": 3, "k_shot": 2, "n_query": 3, "n_val_episodes": 4,
                "n_test_episodes": 6, "image_size": 20, **family}
    if settings.get("split", "random") == "random":
        settings.setdefault("fractions", [0.5, 0.25, 0.25])  # 6 / 3 / 3 classes
    return StudyConfig.model_validate({"family": settings, "model": {"kind": "conv4", "hidden": 8}})


@pytest.fixture(scope="module")
def rgb(twelve):
    """The family (3 channels, 20 x 20, 3-way 2-shot 3 queries) and its validated task sets."""
    from flows.families import family_for
    from flows.validation import validate_family

    family = family_for(folder_cfg(twelve, channels=3))
    tables = family.build(seed=0)
    validate_family(family, tables)
    return family, tables


def class_of_pixels(tables) -> dict[bytes, str]:
    """An image's bytes (C, s, s) uint8 -> its class: the drawings are all distinct."""
    images = tables["images"]
    assert not pixel_keys(images["pixels"]).duplicated().any()
    return dict(zip(images["pixels"], images["class_id"]))


def classes_of(x: torch.Tensor, lookup: dict[bytes, str]) -> np.ndarray:
    """x (T, B, C, s, s) in [0, 1] -> (T, B) class ids, by the images' exact bytes."""
    flat = (x * 255).round().to(torch.uint8).flatten(0, 1)
    return np.array([lookup[img.numpy().tobytes()] for img in flat]).reshape(x.shape[:2])


def test_family_builds_a_seeded_class_split_and_fixed_episodes_of_uneven_classes(rgb):
    from flows.stages.task_sets import summary

    family, tables = rgb
    assert set(tables) == {"images", "classes", "cleaning", "episodes_meta_val", "episodes_meta_test"}
    assert summary(tables) == {"n_classes_meta_train": 6, "n_classes_meta_val": 3, "n_classes_meta_test": 3,
                               "labels_stripped": 0, "duplicates_dropped": 0, "conflicts_dropped": 0}
    assert sorted(tables["classes"]["class_id"]) == [f"c{c:02d}" for c in range(1, N_FOLDER_CLASSES + 1)]
    assert tables["images"]["class_id"].value_counts().to_dict() == {
        f"c{c:02d}": 8 + 4 * (c % 3) for c in range(1, N_FOLDER_CLASSES + 1)}
    again = family.build(seed=0)
    for name, table in tables.items():
        pd.testing.assert_frame_equal(again[name], table)
    assert not family.build(seed=1)["classes"].equals(tables["classes"])
    assert len(family.input_files()) == len(tables["images"])  # every image file, nothing else


def test_family_opens_episodes_of_their_own_classes_and_split(rgb):
    family, tables = rgb
    lookup, split_of = class_of_pixels(tables), tables["classes"].set_index("class_id")["split"]
    data = family.open(tables, torch.device("cpu"), meta_batch_size=5, seed=0)
    assert data.test.x_spt.shape == (6, 3 * 2, 3, 20, 20) and data.test.x_qry.shape == (6, 3 * 3, 3, 20, 20)
    assert data.val.x_spt.shape == (4, 6, 3, 20, 20) and data.test_ids.tolist() == list(range(6))
    for split, batch in (("meta_val", data.val), ("meta_test", data.test), ("meta_train", data.train(7))):
        spt, qry = classes_of(batch.x_spt, lookup), classes_of(batch.x_qry, lookup)
        for t in range(len(batch)):
            for way in range(3):  # one class per label, the same in support and query, of the split
                names = {*spt[t][batch.y_spt[t].numpy() == way], *qry[t][batch.y_qry[t].numpy() == way]}
                assert len(names) == 1 and split_of[names.pop()] == split
            assert len(set(spt[t])) == 3
    table, images = tables["episodes_meta_test"], tables["images"]
    in_split = images["class_id"][images["class_id"].isin(family.classes(tables, "meta_test"))].to_numpy()
    assert (in_split[table["row"]] == table["label"].to_numpy()).all()  # rows: positions among the split's images
    again = family.open(tables, torch.device("cpu"), ("meta_test",))
    assert torch.equal(again.test.x_qry, data.test.x_qry)
    assert torch.equal(data.train(7).x_spt, data.train(7).x_spt) and not torch.equal(data.train(7).x_spt,
                                                                                     data.train(8).x_spt)
    other = family.open(tables, torch.device("cpu"), ("meta_train",), meta_batch_size=5, seed=1)
    assert not torch.equal(other.train(7).x_spt, data.train(7).x_spt)


def test_family_model_features_and_baselines_take_the_folders_channels(rgb):
    family, tables = rgb
    test = family.open(tables, torch.device("cpu"), ("meta_test",)).test
    torch.manual_seed(0)
    model = family.model(tables)
    assert model.blocks[0].conv.weight.shape == (8, 3, 3, 3) and model(test.x_spt[0]).shape == (6, 3)
    features = family.features(tables)
    assert len(features) == 6 and (features["split"] == "meta_test").all() and (features["k_shot"] == 2).all()
    runs = family.baseline_runs(tables, test, model, steps=2, score_steps=[0, 2], chunk=6, seed=0)
    assert set(runs) == {"scratch", "pretrain_finetune"}
    for run in runs.values():
        curve = run()
        assert curve.shape == (2, 6) and ((0 <= curve) & (curve <= 1)).all()


def test_grayscale_family_has_one_channel(twelve):
    from flows.families import family_for

    family = family_for(folder_cfg(twelve, n_val_episodes=1, n_test_episodes=2))
    tables = family.build(seed=0)
    assert family.open(tables, torch.device("cpu"), ("meta_test",)).test.x_spt.shape == (2, 6, 1, 20, 20)
    assert family.model().blocks[0].conv.weight.shape == (8, 1, 3, 3)


def test_validation_names_a_class_in_two_splits_short_classes_and_wrong_rows(rgb):
    from flows.validation import ValidationFailed, validate_image_folder

    family, tables = rgb
    images, classes, episodes = tables["images"], tables["classes"], tables["episodes_meta_test"]
    with pytest.raises(ValidationFailed) as err:  # the first support image: another class's, or past the split
        validate_image_folder(images, classes, episodes.assign(row=np.where(episodes.index == 0, 10 ** 6,
                                                                            episodes["row"])), family.data)
    assert "episode_rows:" in str(err.value) and "class_splits" not in str(err.value)
    leaked = pd.concat([classes, classes.iloc[[0]].assign(split="meta_test")])
    short = images[~images["class_id"].eq(classes["class_id"].iloc[1]) | (images.groupby("class_id").cumcount() < 4)]
    with pytest.raises(ValidationFailed) as err:
        validate_image_folder(short.reset_index(drop=True), leaked, episodes, family.data)
    text = str(err.value)
    assert "class_splits:" in text and "classes: expect_column_values_to_be_between(n_images)" in text
    assert "episode_rows:" in text  # the leaked class's images join meta-test's: positions shift
    wrong_size = images.assign(pixels=images["pixels"].str[:-1])
    with pytest.raises(ValidationFailed, match=r"images: expect_column_values_to_be_between\(n_bytes\)"):
        validate_image_folder(wrong_size, classes, episodes, family.data)


# --- class lists as files

def test_class_lists_in_the_root_split_the_classes_and_enter_the_key(twelve, tmp_path):
    from flows.families import family_for
    from flows.plan import make_plan

    root = Path(shutil.copytree(twelve, tmp_path / "lists"))
    write_lists(root, "c01\nc02\nc03\nc05\n", "c06\nc07\nc08\n", "c12\nc11\nc10\n")  # c04, c09 held out
    family = family_for(folder_cfg(root, split="files"))
    tables = family.build(seed=0)
    assert {s: g["class_id"].tolist() for s, g in tables["classes"].groupby("split", sort=False)} == {
        "meta_train": ["c01", "c02", "c03", "c05"], "meta_val": ["c06", "c07", "c08"],
        "meta_test": ["c12", "c11", "c10"]}
    labels, images = family.examples(tables, "meta_test", torch.device("cpu"))
    assert sorted(set(labels)) == ["c10", "c11", "c12"] and len(images) == len(labels) == 16 + 8 + 12
    episodes = tables["episodes_meta_test"]
    assert (labels[episodes["row"]] == episodes["label"].to_numpy()).all()
    assert {p.name for p in family.input_files()} >= {"classes.train.txt", "classes.val.txt", "classes.test.txt"}
    key = make_plan(folder_cfg(root, split="files")).keys["task_sets"]
    (root / "classes.test.txt").write_text("c12\nc11\nc09\n")
    assert make_plan(folder_cfg(root, split="files")).keys["task_sets"] != key


def test_class_list_problems_name_the_file(twelve, tmp_path):
    from flows.families import family_for

    root = Path(shutil.copytree(twelve, tmp_path / "lists"))
    family = family_for(folder_cfg(root, split="files"))
    with pytest.raises(FileNotFoundError, match=r"classes\.train\.txt: class list not found"):
        family.build(seed=0)
    write_lists(root, "c01\nc02\nc03\n", "c06\nc07\nc08\n", "c12\nc11\nc13\n")
    with pytest.raises(ValueError, match=r"classes\.test\.txt:3: class 'c13' is not a class folder"):
        family.build(seed=0)
    write_lists(root, "c01\nc02\nc03\n", "c06\nc07\n", "c12\nc11\nc10\n")
    with pytest.raises(ValueError, match=r"classes\.val\.txt: lists 2 classes, fewer than n_way 3"):
        family.build(seed=0)


def test_too_few_images_for_k_plus_q_names_the_split_and_class(twelve):
    from flows.families import family_for

    family = family_for(folder_cfg(twelve, k_shot=5, n_query=5))  # classes of 8 images are too small
    with pytest.raises(ValueError, match=r"\(fractions \[0\.5, 0\.25, 0\.25\]\): meta_train split: k_shot \+ n_query: "
                                         r"10 exceeds the examples of \d+ classes"):
        family.build(seed=0)


# --- config

@pytest.mark.parametrize("text, key", [
    ("family: {kind: image_folder}", "family.path"),
    ("family: {kind: image_folder, path: x, channels: 2}", "family.channels"),
    ("family: {kind: image_folder, path: x, fractions: [0.5, 0.5, 0.0]}", "family.fractions"),
    ("family: {kind: image_folder, path: x, split: files, fractions: [0.5, 0.3, 0.2]}", "family.fractions"),
    ("family: {kind: image_folder, path: x, image_size: 4}", "family.image_size"),
    ("family: {kind: image_folder, path: x}", "model.kind"),  # mlp by default: needs conv4
    ("family: {kind: image_folder, path: x}\nmodel: {kind: conv4}\ntransfer: {}", "transfer"),
], ids=["no-path", "channels", "zero-share", "fractions-with-files", "image-size", "model", "transfer"])
def test_config_problems_name_the_key(tmp_path, text, key):
    from flows.config import ConfigError, load_config

    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f": {key}" in str(err.value) and str(path) in str(err.value)


def test_config_converts_to_the_family(twelve):
    from components.families.image_folder import ImageFolderData, ImageFolderTasks
    from flows.families import family_for

    family = family_for(folder_cfg(twelve, channels=3, split="files"))
    assert isinstance(family, ImageFolderTasks)
    assert family.data == ImageFolderData(path=str(twelve), channels=3, image_size=20, split="files",
                                          fractions=(0.6, 0.2, 0.2), n_way=3, k_shot=2, n_query=3,
                                          n_val_episodes=4, n_test_episodes=6)
    assert family.model_settings.hidden == 8 and family.model_settings.adapted == "full"


# --- cache keys follow the images' content

def test_editing_one_image_changes_the_task_set_key_and_every_key_downstream(twelve, tmp_path):
    from flows.plan import STAGES, make_plan

    root = Path(shutil.copytree(twelve, tmp_path / "edited"))
    before = make_plan(folder_cfg(root)).keys
    assert make_plan(folder_cfg(root)).keys == before
    image = root / "c05" / "03.png"
    pixels = np.asarray(Image.open(image).convert("L")).copy()
    pixels[:10, :10] = 255 - pixels[:10, :10]
    Image.fromarray(pixels).save(image)
    after = make_plan(folder_cfg(root)).keys
    assert [s for s in STAGES if after[s] == before[s]] == []


def test_moving_an_image_to_another_class_changes_the_task_set_key(twelve, tmp_path):
    from flows.plan import make_plan

    root = Path(shutil.copytree(twelve, tmp_path / "moved"))
    before = make_plan(folder_cfg(root)).keys["task_sets"]
    (root / "c05" / "03.png").rename(root / "c06" / "03.png.moved")
    (root / "c06" / "03.png").rename(root / "c05" / "03.png")
    (root / "c06" / "03.png.moved").rename(root / "c06" / "03.png")  # two images swap classes
    assert make_plan(folder_cfg(root)).keys["task_sets"] != before


# --- end to end

@pytest.mark.slow
def test_image_folder_study_runs_end_to_end_then_hits_the_cache(prefect_harness, project, twelve, tiny_conv4_study):
    """meta_pipeline on the 12-class folder: validated task sets, two meta-learners, both baselines, accuracy."""
    import yaml
    from mlflow.tracking import MlflowClient

    from flows.pipeline import meta_pipeline

    cfg = tiny_conv4_study(
        "folder-tiny", {"kind": "image_folder", "path": str(twelve), "image_size": 16, "n_way": 3, "k_shot": 1,
                        "n_query": 2, "fractions": [0.5, 0.25, 0.25], "n_val_episodes": 3, "n_test_episodes": 6},
        ["maml", "reptile"], iterations=10, val_every=5, checkpoint_every=5)
    path = project / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = meta_pipeline(config_path=str(path))
    assert not any(first["hits"].values())
    assert {entry.split("/")[0] for entry in first["hits"]} >= {"task_sets", "embeddings", "meta_train", "evaluate",
                                                                 "baselines", "significance"}
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    parent = client.get_run(first["run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'")
    assert parent.info.status == "FINISHED"
    assert {r.info.run_name for r in children} == {"maml", "reptile", "scratch", "pretrain_finetune"}
    assert all(0 <= r.data.metrics["meta_test_accuracy"] <= 1 for r in children)

    second = meta_pipeline(config_path=str(path))
    assert second["hits"] and all(second["hits"].values())
    assert second["keys"] == first["keys"]
