"""Task families as the pipeline builds them: Omniglot task sets from the real archives, validated."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.families import TaskFamily, accuracy
from components.features import episode_features
from flows.config import StudyConfig
from flows.families import family_for
from flows.stages.task_sets import summary
from flows.validation import ValidationFailed, validate_family, validate_omniglot

OMNIGLOT = Path(__file__).parents[2] / "shared" / "data" / "omniglot"


def omniglot_cfg(**family):
    return StudyConfig.model_validate({"family": {"kind": "omniglot", "path": str(OMNIGLOT), **family},
                                       "model": {"kind": "conv4"}})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The 5-way 1-shot task sets built once from the full archives (about 15 s)."""
    cfg = omniglot_cfg(n_val_episodes=10, n_test_episodes=20)
    family = family_for(cfg)
    tables = family.build(seed=0)
    validate_family(family, tables)
    return family, tables


def test_build_uses_the_vinyals_split_and_fixed_episodes(built):
    family, tables = built
    assert summary(tables) == {"n_classes_meta_train": 4112, "n_classes_meta_val": 688, "n_classes_meta_test": 1692,
                               "labels_stripped": 0, "duplicates_dropped": 1, "conflicts_dropped": 0}
    assert len(tables["images"]) == 32460 - 1  # the archive holds one pair of identical drawings of a character
    data = family.open(tables, torch.device("cpu"), ("meta_train", "meta_test"), meta_batch_size=4)
    assert data.test.x_spt.shape == (20, 5, 1, 28, 28) and data.test.x_qry.shape == (20, 75, 1, 28, 28)
    again = family.open(tables, torch.device("cpu"), ("meta_test",))
    assert torch.equal(data.test.x_qry, again.test.x_qry)  # the same episodes for every method
    assert torch.equal(data.train(7).x_spt, data.train(7).x_spt)  # meta-batches depend on the iteration only
    assert not torch.equal(data.train(7).x_spt, data.train(8).x_spt)
    other_seed = family.open(tables, torch.device("cpu"), ("meta_train",), meta_batch_size=4, seed=1)
    assert not torch.equal(data.train(7).x_spt, other_seed.train(7).x_spt)  # the unit's seed draws its episodes


def test_validation_rejects_a_class_in_two_splits_and_short_episodes(built):
    family, tables = built
    classes, episodes = tables["classes"], tables["episodes_meta_test"]
    leaked = pd.concat([classes, classes.iloc[[0]].assign(split="meta_test")])
    short = episodes[episodes.index != 0]  # one support example of one way missing
    with pytest.raises(ValidationFailed) as err:
        validate_omniglot(tables["images"].iloc[20:], leaked, short, family.data, family.row_index)
    text = str(err.value)
    assert "classes: expect_column_values_to_be_unique(class_id)" in text
    assert "character_splits" in text
    assert "episode_ways" in text and "episodes:" in text


def test_accuracy_and_episode_features():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])).item() == pytest.approx(2 / 3)
    x = torch.zeros(1, 4, 1, 2, 2)
    x[0, 2:] = 1.0  # class 1 all ink, class 0 blank
    features = episode_features(x, torch.tensor([[0, 0, 1, 1]]))
    assert features.loc[0, "within_class_distance"] == 0
    assert features.loc[0, "between_class_distance"] == pytest.approx(2.0)  # sqrt(4 pixels)
    assert features.loc[0, "ink_fraction"] == pytest.approx(0.5)


# ---------------------------------------------------------------- the text family

def intent_table(n_intents=9, per_intent=8):
    labels = np.repeat([f"intent_{i}" for i in range(n_intents)], per_intent)
    texts = [f"utterance {j} of {label}" for j, label in enumerate(labels)]
    return pd.DataFrame({"text": texts, "label": labels})


def text_config(path, **family):
    return StudyConfig.model_validate({
        "family": {"kind": "text", "dataset": "csv", "path": str(path), "n_way": 2, "k_shot": 1, "n_query": 3,
                   "n_val_episodes": 3, "n_test_episodes": 5, "fractions": [0.34, 0.33, 0.33], **family},
        "model": {"kind": "minilm", "adapted": "lora"}})


def test_text_build_writes_class_disjoint_validated_episodes(tmp_path):
    intent_table().to_csv(tmp_path / "intents.csv", index=False)
    tasks = family_for(text_config(tmp_path / "intents.csv"))
    tables = tasks.build(seed=0)
    validate_family(tasks, tables)
    meta = summary(tables)
    assert len(tables["utterances"]) == 72 and sum(meta[f"n_classes_{s}"] for s in ("meta_train", "meta_val", "meta_test")) == 9
    classes = tables["classes"]
    assert classes["label"].is_unique
    test = tasks.open(tables, torch.device("cpu"), ("meta_test",)).test
    assert test.x_spt.shape == (5, 2) and test.x_qry.shape == (5, 6)
    utterances = tables["utterances"]
    test_classes = set(classes.loc[classes["split"] == "meta_test", "label"])
    assert set(utterances["label"].to_numpy()[test.x_qry.flatten().numpy()]) <= test_classes
    batch = tasks.open(tables, torch.device("cpu"), ("meta_train",), meta_batch_size=3).train(7)
    assert batch.x_spt.shape == (3, 2) and torch.equal(batch.x_spt, tasks.open(tables, torch.device("cpu"),
                                                                               ("meta_train",), 3).train(7).x_spt)


def test_text_validation_names_a_class_in_two_splits_and_empty_text(tmp_path):
    from flows.validation import validate_text

    utterances = intent_table(4, 4)
    classes = pd.DataFrame({"split": ["meta_train", "meta_train", "meta_test", "meta_test", "meta_val"],
                            "label": ["intent_0", "intent_1", "intent_2", "intent_3", "intent_0"]})
    episodes = pd.DataFrame({"split": "meta_test", "episode": 0, "way": [0, 0, 1, 1], "slot": [0, 1, 0, 1],
                             "label": ["intent_2", "intent_2", "intent_3", "intent_3"], "row": [8, 9, 12, 13]})
    cfg = text_config(tmp_path / "x.csv", n_query=1).family
    utterances.loc[3, "text"] = "  "
    with pytest.raises(ValidationFailed) as e:
        validate_text(utterances, classes, episodes, cfg)
    message = str(e.value)
    assert "class_splits" in message and "utterances" in message and "n_chars" in message
    assert e.value.failures and not any(f.startswith("episodes") for f in e.value.failures)


def test_head_names_the_classification_head_at_any_depth():
    from torch import nn

    family = family_for(text_config("intents.csv"))
    assert isinstance(family, TaskFamily)
    top = nn.Module()
    top.head, top.heads = nn.Linear(4, 2), nn.Linear(4, 2)  # "heads" is not the head
    model = nn.Sequential()
    model.top, model.body = top, nn.Linear(4, 4)
    assert family.head(model) == ("top.head.weight", "top.head.bias")
    with pytest.raises(ValueError, match="zero_head"):
        family.head(nn.Linear(4, 2))


# ---------------------------------------------------------------- a unit's seed drives its start and its episodes

def trained_state(family, tables, seed: int) -> dict:
    from components.metalearners import MetaLearnerConfig
    from components.training import TrainConfig, meta_train

    cpu = torch.device("cpu")
    data = family.open(tables, cpu, ("meta_train", "meta_val"), meta_batch_size=2, seed=seed)
    learner = family.learner(tables, MetaLearnerConfig(algorithm="fomaml", fast_lr=0.1), cpu, seed)
    meta_train(learner, data.train, data.val, TrainConfig(iterations=2, meta_batch_size=2, val_every=1, seed=seed))
    return learner.state_dict()["params"]


def assert_seed_drives_training(family, tables) -> None:
    a, again, b = (trained_state(family, tables, s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], again[k]) for k in a)  # the same seed: bit-identical
    assert any(not torch.equal(a[k], b[k]) for k in a)  # another seed: another start and other episodes


def test_seed_drives_the_start_and_the_episodes_sinusoid():
    family = family_for(StudyConfig.model_validate({"family": {"n_tasks": {"meta_train": 20, "meta_val": 4,
                                                                           "meta_test": 4}},
                                                    "meta_train": {"meta_batch_size": 2}}))
    assert_seed_drives_training(family, family.build(seed=0))


def test_seed_drives_the_start_and_the_episodes_omniglot(built):
    family, tables = built
    assert_seed_drives_training(family, tables)


@pytest.mark.slow  # loads MiniLM and encodes 72 utterances (about 10 s)
def test_seed_drives_the_start_and_the_episodes_text(tmp_path):
    intent_table().to_csv(tmp_path / "intents.csv", index=False)
    family = family_for(text_config(tmp_path / "intents.csv", n_query=2))
    tables = family.build(seed=0)
    prefix: dict[str, list] = {}
    family.build_prefix(lambda name, table: prefix.setdefault(name, []).append(table))
    tables |= {name: pd.concat(parts, ignore_index=True) for name, parts in prefix.items()}
    a, b = (family.open(tables, torch.device("cpu"), ("meta_train",), 3, seed=s).train(1) for s in (0, 1))
    assert not torch.equal(a.x_spt, b.x_spt)  # the unit's seed, not the study's, draws the episodes
    assert_seed_drives_training(family, tables)


def test_duplicated_utterances_never_sit_in_support_and_query(tmp_path):
    """8 intents of 8 utterances plus 4 exact copies each (case and spaces changed): 103 of 200 2-way 1-shot
    episodes held their support utterance in the query before; now the copies are dropped, counted, and GX
    checks every episode's examples are distinct by content."""
    from components.episodes import normalized_text

    table = intent_table(8, 8)
    copies = table.groupby("label").head(4).assign(text=lambda t: "  " + t["text"].str.upper() + " ")
    pd.concat([table, copies]).to_csv(tmp_path / "dup.csv", index=False)
    family = family_for(text_config(tmp_path / "dup.csv", n_way=2, k_shot=1, n_query=5, n_test_episodes=200,
                                    fractions=[0.5, 0.25, 0.25]))
    tables = family.build(seed=0)
    report = validate_family(family, tables)
    assert {r["what"]: r["count"] for r in report["cleaning"]}["duplicates_dropped"] == 32
    texts = normalized_text(tables["utterances"]["text"]).to_numpy()
    episodes = tables["episodes_meta_test"]
    assert episodes["episode"].nunique() == 200
    distinct = episodes.assign(t=texts[episodes["row"]]).groupby("episode")["t"].nunique()
    assert (distinct == 2 * (1 + 5)).all()


def assert_training_tables_unchanged(family: TaskFamily, other: TaskFamily) -> None:
    """Two families that differ only in their test protocol: the same training_data and training_files, and every
    table outside test_tables identical (what the train_sets entry, and so meta-training, is keyed by), while
    some test table differs."""
    assert family.training_data() == other.training_data() and family.training_files() == other.training_files()
    a, b = family.build(seed=0), other.build(seed=0)
    assert set(a) - set(family.test_tables) == set(b) - set(family.test_tables)
    for name in set(a) - set(family.test_tables):
        pd.testing.assert_frame_equal(a[name].reset_index(drop=True), b[name].reset_index(drop=True))
    assert any(name not in b or not a[name].equals(b[name]) for name in set(a) & set(family.test_tables))


def test_the_test_protocol_changes_only_the_test_tables_sinusoid():
    def family(n_test):
        return family_for(StudyConfig.model_validate({"family": {
            "kind": "sinusoid", "n_tasks": {"meta_train": 50, "meta_val": 10, "meta_test": n_test}}}))
    assert_training_tables_unchanged(family(20), family(30))
    assert family(20).training_data() != family_for(StudyConfig.model_validate({"family": {
        "kind": "sinusoid", "n_tasks": {"meta_train": 50, "meta_val": 11, "meta_test": 20}}})).training_data()


def test_the_test_protocol_changes_only_the_test_tables_text(tmp_path):
    intent_table().to_csv(tmp_path / "intents.csv", index=False)
    assert_training_tables_unchanged(family_for(text_config(tmp_path / "intents.csv")),
                                     family_for(text_config(tmp_path / "intents.csv", n_test_episodes=9)))


def test_the_test_protocol_changes_only_the_test_tables_omniglot(built):
    family, _ = built
    assert_training_tables_unchanged(family, family_for(omniglot_cfg(n_val_episodes=10, n_test_episodes=25)))


def test_the_test_protocol_changes_only_the_test_tables_image_folder(tmp_path):
    from test_fixed_episodes import image_folder_with_held_out

    root, held, _ = image_folder_with_held_out(tmp_path, n_classes=12, held_size=9)

    def family(**test):
        return family_for(StudyConfig.model_validate({
            "family": {"kind": "image_folder", "path": str(root), "n_way": 3, "k_shot": 1, "n_query": 1,
                       "n_val_episodes": 2, "image_size": 8, "fractions": [0.5, 0.25, 0.25], **test},
            "model": {"kind": "conv4"}}))

    with_file = family(test_episodes=str(tmp_path / "e.csv"))
    assert set(with_file.input_files()) - set(with_file.training_files()) == {
        tmp_path / "e.csv", *(held / f"new{c}" / f"{i}.png" for c in range(3) for i in range(2))}
    assert_training_tables_unchanged(with_file, family(n_test_episodes=4))


def test_embedding_features_describe_the_classes_geometry_not_pixels():
    """Three classes of two examples each, class means a (0, 0), b (1, 0), c (0, 2): hand-computed."""
    from components.features import EMBEDDING_FEATURES, embedding_features

    z = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])
    z[0, 0, 1], z[0, 1, 1] = 0.5, -0.5  # class 0 spread around its mean (0, 0) by 0.5
    features = embedding_features(z, torch.tensor([[0, 0, 1, 1, 2, 2]]))
    assert tuple(features.columns) == EMBEDDING_FEATURES
    row = features.loc[0]
    assert (row["n_way"], row["k_shot"]) == (3, 2)
    assert row["within_class_distance"] == pytest.approx(0.5 * 2 / 6)  # two of six examples 0.5 from their mean
    assert row["between_class_distance"] == pytest.approx((1 + 2 + 5 ** 0.5) / 3)  # a-b 1, a-c 2, b-c sqrt(5)
    assert row["min_between_class_distance"] == pytest.approx(1.0)
    assert row["embedding_norm"] == pytest.approx((2 * 0.5 + 2 * 1 + 2 * 2) / 6)
