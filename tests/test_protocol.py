"""The published few-shot intent protocol: class splits given as files, a labelled pool for meta-training, studies
over folds (mean over folds, pooled paired tests), and the prefix padded per episode and encoded in chunks."""
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy import stats

from components.significance import compare_folds, fold_means, fold_summary, pool_folds
from flows.config import ConfigError, fold_overrides, load_config
from flows.families import family_for
from flows.plan import make_plan

ROOT = Path(__file__).parents[1]
DATA = ROOT.parent / "shared" / "data"
INTENTS = {"meta_train": ["a", "b", "c"], "meta_val": ["d", "e"], "meta_test": ["f", "g"]}
FILES = {"meta_train": "labels.train.txt", "meta_val": "labels.valid.txt", "meta_test": "labels.test.txt"}


# ---------------------------------------------------------------- a small dataset in ProtAugment's layout

def write_dataset(root: Path, per_intent: int = 8, pool: int = 4, intents=INTENTS) -> Path:
    """<root>/full.jsonl ({"sentence", "label"}, per_intent utterances per intent) and fold <root>/01 with the intent
    lists and train.4samples.jsonl (the first `pool` utterances of each training intent). Returns the fold."""
    rows = [{"sentence": f"utterance {j} of intent {c}", "label": c}
            for cs in intents.values() for c in cs for j in range(per_intent)]
    (root / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fold = root / "01"
    fold.mkdir(exist_ok=True)
    for split, name in FILES.items():
        (fold / name).write_text("".join(f"{c}\n" for c in intents[split]))
    lines = [r for r in rows if r["label"] in intents["meta_train"] and int(r["sentence"].split()[1]) < pool]
    (fold / "train.4samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return fold


def config(tmp_path: Path, top: dict | None = None, **family) -> Path:
    raw = {"name": "protocol", "model": {"kind": "minilm", "adapted": "lora", "top_layers": 1, "lora_r": 2},
           "family": {"kind": "text", "dataset": "csv", "path": str(tmp_path / "full.jsonl"), "text_col": "sentence",
                      "split": "files", "split_dir": str(tmp_path / "01"), "train_pool": "4samples", "n_way": 2,
                      "k_shot": 1, "n_query": 3, "n_val_episodes": 4, "n_test_episodes": 6, **family},
           **(top or {})}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def family_of(tmp_path: Path, **family):
    return family_for(load_config(config(tmp_path, **family)))


def build_error(tmp_path: Path, **family) -> str:
    with pytest.raises(ValueError) as err:
        family_of(tmp_path, **family).build(seed=0)
    return str(err.value)


def test_split_files_give_the_listed_intents_and_meta_training_draws_only_the_pool(tmp_path):
    write_dataset(tmp_path)
    family = family_of(tmp_path)
    tables = family.build(seed=0)
    classes = tables["classes"].groupby("split")["label"].apply(list).to_dict()
    assert classes == INTENTS  # in file order
    utterances = tables["utterances"]
    pool = utterances["label"].isin(INTENTS["meta_train"]) & (utterances["text"].str.split().str[1].astype(int) < 4)
    assert (utterances["usable"] == (pool | ~utterances["label"].isin(INTENTS["meta_train"]))).all()
    data = family.open(tables, torch.device("cpu"), ("meta_train",), meta_batch_size=50, seed=3)
    drawn = torch.cat([data.train(0).x_spt.flatten(), data.train(0).x_qry.flatten()]).unique().numpy()
    assert set(drawn) == set(np.flatnonzero(pool))  # 50 episodes reach all 12 pool utterances, nothing else
    test_rows = set(tables["episodes_meta_test"]["row"])
    assert test_rows <= set(np.flatnonzero(utterances["label"].isin(INTENTS["meta_test"])))
    assert len(test_rows) > 8  # meta-test episodes draw every utterance of the test intents, not a pool

    from flows.validation import validate_family
    assert validate_family(family, tables)["success"]


def test_meta_test_episodes_open_ordered_by_their_longest_utterance_under_their_own_ids(tmp_path):
    from components.families import ClassificationTasks

    rows = [{"sentence": " ".join(["word"] * (1 + (7 * j) % 9)) + f" {c}{j}", "label": c}
            for cs in INTENTS.values() for c in cs for j in range(8)]
    write_dataset(tmp_path)
    (tmp_path / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    family = family_of(tmp_path, train_pool="full", n_test_episodes=30)
    tables = family.build(seed=0)
    plain = ClassificationTasks.open(family, tables, torch.device("cpu"), ("meta_test",))
    data = family.open(tables, torch.device("cpu"), ("meta_test",))
    chars = torch.tensor(tables["utterances"]["text"].str.len().to_numpy(dtype=np.int64))
    longest = torch.maximum(chars[data.test.x_spt].amax(1), chars[data.test.x_qry].amax(1))
    assert (longest.diff() >= 0).all() and sorted(data.test_ids) == list(range(30))
    assert not np.array_equal(data.test_ids, np.arange(30))
    for field in range(4):
        assert torch.equal(data.test[field], plain.test[field][data.test_ids])  # each episode under its own id


def test_split_files_and_the_pool_enter_the_key_and_the_prefix_reads_the_data_only(tmp_path):
    fold = write_dataset(tmp_path)
    family = family_of(tmp_path)
    assert set(family.input_files()) == {tmp_path / "full.jsonl", *(fold / n for n in FILES.values()),
                                         fold / "train.4samples.jsonl"}
    assert family.prefix_files() == (tmp_path / "full.jsonl",)
    before = make_plan(load_config(config(tmp_path))).keys["task_sets"]
    (fold / "train.4samples.jsonl").write_text((fold / "train.4samples.jsonl").read_text().replace(
        "utterance 0 of intent a", "utterance 5 of intent a"))
    assert make_plan(load_config(config(tmp_path))).keys["task_sets"] != before
    assert family_of(tmp_path, train_pool="full").input_files()[-1] == fold / "labels.test.txt"


def test_pool_utterances_are_matched_after_case_and_whitespace_normalisation(tmp_path):
    fold = write_dataset(tmp_path)
    pool = fold / "train.4samples.jsonl"
    pool.write_text(pool.read_text().replace("utterance 0 of intent a", "  Utterance 0   OF intent a"))
    assert family_of(tmp_path).build(seed=0)["utterances"]["usable"].sum() == 12 + 4 * 8


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f / "labels.valid.txt").write_text("d\nnope\ne\n"),
     r"labels\.valid\.txt:2: intent 'nope' has no utterance in the data"),
    (lambda f: (f / "labels.test.txt").write_text("f\n"),
     r"intent 'g' \(e\.g\. full\.jsonl:49\) is in none of labels\.train\.txt"),
    (lambda f: (f / "labels.test.txt").write_text("f\ng\na\n"),
     r"labels\.test\.txt:3: class 'a' listed in two lists, first at .*labels\.train\.txt:1"),
    (lambda f: (f / "labels.train.txt").write_text("a\nb\nc\nb\n"), r"labels\.train\.txt:4: class 'b' listed twice"),
    (lambda f: ((f / "labels.valid.txt").write_text("d\n"), (f / "labels.test.txt").write_text("f\ng\ne\n")),
     r"labels\.valid\.txt: n_way: 2 exceeds the 1 intents listed"),
])
def test_split_file_errors_name_file_line_and_intent(tmp_path, edit, message):
    edit(write_dataset(tmp_path))
    assert pytest.raises(ValueError, family_of(tmp_path).build, 0).match(message)


def test_a_missing_split_file_is_named(tmp_path):
    fold = write_dataset(tmp_path)
    (fold / "labels.valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels\.valid\.txt"):
        make_plan(load_config(config(tmp_path)))  # the plan hashes it: before any work
    with pytest.raises(FileNotFoundError, match=r"labels\.valid\.txt: class list not found"):
        family_of(tmp_path).build(seed=0)
    write_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train\.10samples\.jsonl"):
        make_plan(load_config(config(tmp_path, train_pool="10samples")))


def pool_lines(fold: Path) -> list[dict]:
    return [json.loads(line) for line in (fold / "train.4samples.jsonl").read_text().splitlines()]


def write_pool(fold: Path, lines: list[dict]) -> None:
    (fold / "train.4samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_pool_errors_name_file_line_and_intent(tmp_path):
    fold = write_dataset(tmp_path)
    lines = pool_lines(fold)
    write_pool(fold, lines[:2] + [{"sentence": "utterance 0 of intent d", "label": "d"}] + lines[2:])
    assert re_search(r"train\.4samples\.jsonl:3: intent 'd' is not a training intent", build_error(tmp_path))
    write_pool(fold, lines[:4] + [{"sentence": "never said", "label": "b"}] + lines[4:])
    assert re_search(r"train\.4samples\.jsonl:5: utterance 'never said' is not in the data under intent 'b'",
                     build_error(tmp_path))
    write_pool(fold, [r for r in lines if r["label"] != "b" or r["sentence"].split()[1] in "01"])  # b: 2 lines
    assert re_search(r"train\.4samples\.jsonl:5: intent 'b' has 2 usable utterances in the pool train\.4samples"
                     r"\.jsonl, fewer than k_shot \+ n_query: 4", build_error(tmp_path))
    write_pool(fold, [r for r in lines if r["label"] != "c"])
    assert re_search(r"labels\.train\.txt:3: intent 'c' has 0 usable", build_error(tmp_path))
    write_pool(fold, [{"text": r["sentence"], "intent": r["label"]} for r in lines])  # its own column names
    assert re_search(r"train\.4samples\.jsonl: no text column 'sentence'; columns are \['text', 'intent'\]; a pool "
                     r"names its columns as the data file does", build_error(tmp_path))
    assert family_of(tmp_path, train_pool="full").build(seed=0)  # the full setting needs no pool


def re_search(pattern: str, text: str) -> bool:
    import re

    assert re.search(pattern, text), text
    return True


def test_an_utterance_under_two_intents_counts_only_where_one_episode_can_draw_both(tmp_path):
    fold = write_dataset(tmp_path)
    full = tmp_path / "full.jsonl"
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    rows += [{"sentence": "Utterance 0 of intent d", "label": "e"},  # 57: d and e are both meta_val
             {"sentence": "utterance 1 of intent f", "label": "a"},  # 58: f meta_test, a meta_train: never together
             {"sentence": "utterance 0 of intent b", "label": "a"}]  # 59: a and b meta_train, but 59 not in the pool
    full.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert re_search(r"2 utterances are filed under two intents of one split of .*01, e\.g\. full\.jsonl:25 \('d'\), "
                     r"full\.jsonl:57 \('e'\)", build_error(tmp_path))
    tables = family_of(tmp_path, conflicting_labels="drop").build(seed=0)
    cleaning = tables["cleaning"].set_index("what")
    assert cleaning.loc["conflicts_dropped", "count"] == 2
    assert list(cleaning.loc["conflicts_dropped", "examples"]) == ["full.jsonl:25", "full.jsonl:57"]
    usable = tables["utterances"].set_index("source")["usable"]
    assert usable["full.jsonl:42"] and usable["full.jsonl:9"]  # f's copy, and b's (its copy under a: not in the pool)
    # every fold of a dataset (and its 1- and 5-shot studies) share one prefix: the cleaning does not depend on a split
    assert len(tables["utterances"]) == 59  # kept in the table (the prefix encodes it); not drawn
    assert family_of(tmp_path).prefix_settings() == family_of(tmp_path, conflicting_labels="drop").prefix_settings()
    write_pool(fold, pool_lines(fold) + [{"sentence": "utterance 0 of intent b", "label": "a"}])  # now in the pool
    assert re_search(r"intent 'a' has 4 usable", build_error(tmp_path, conflicting_labels="drop", n_query=4))
    assert re_search(r"full\.jsonl:9 \('b'\), full\.jsonl:59 \('a'\)", build_error(tmp_path))


# ---------------------------------------------------------------- config: split files and folds

def fold_config(tmp_path: Path, folds, **family) -> Path:
    family = {"split_dir": None, "split_root": str(tmp_path), **family}
    return config(tmp_path, {"folds": folds}, **family)


def test_folds_run_each_fold_with_its_own_split_dir_and_keys(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "02").mkdir()
    for name in (*FILES.values(), "train.4samples.jsonl"):
        (tmp_path / "02" / name).write_text((tmp_path / "01" / name).read_text())
    (tmp_path / "02" / "labels.train.txt").write_text("a\nc\nb\n")  # another order: other episodes
    path = fold_config(tmp_path, ["01", "02"])
    cfg = load_config(path)
    with pytest.raises(ValueError, match="family.split_dir: the study runs over folds"):
        family_for(cfg)
    overrides = fold_overrides(cfg, {"family": {"n_query": 2}})
    assert overrides["02"]["family"] == {"n_query": 2, "split_dir": str(tmp_path / "02")}
    plans = {f: make_plan(load_config(path, o)) for f, o in overrides.items()}
    assert plans["01"].keys["task_sets"] != plans["02"].keys["task_sets"]
    assert plans["01"].family.prefix_settings() == plans["02"].family.prefix_settings()
    import os

    relative = os.path.relpath(tmp_path / "02", Path.cwd())  # the same folder written relative, split_root absolute
    assert load_config(path, {"family": {"split_dir": relative}}).family.split_dir == relative
    from flows.config import check_fold_dirs

    check_fold_dirs(cfg)
    with pytest.raises(FileNotFoundError, match=rf"folds: no folder for fold\(s\) 09 \({tmp_path / '09'}\)$"):
        check_fold_dirs(load_config(fold_config(tmp_path, ["01", "09"])))


@pytest.mark.parametrize("folds, family, message", [
    ([1, 2], {}, r"folds: give folder names as strings"),
    (["01", "01"], {}, r"folds: need a non-empty list without repeats"),
    (["01"], {"split_dir": "elsewhere"}, r"family\.split_dir: with folds, it names one fold's folder"),
    (["01"], {"split": "random", "split_root": None, "train_pool": "full"}, r"folds: a study over class splits"),
    (None, {}, r"family\.split_root: read only with folds"),
    (None, {"split_root": None}, r"family\.split_dir: split: files needs the folder"),
    (None, {"split": "random", "split_root": None, "train_pool": "full", "split_dir": "x"},
     r"family\.split_dir: read only with split: files"),
    (None, {"split_dir": "x", "split_root": None, "fractions": [0.5, 0.25, 0.25]},
     r"family\.fractions: read only with split: random"),
])
def test_fold_and_split_file_settings_that_cannot_work_stop_at_load(tmp_path, folds, family, message):
    path = fold_config(tmp_path, folds, **family)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


PROTOCOL_CONFIGS = [f"{d}-protaugment-{k}shot" for d in ("banking77", "oos") for k in (1, 5)]


@pytest.mark.skipif(not (DATA / "protaugment").is_dir(), reason="needs ../shared/data/protaugment")
@pytest.mark.parametrize("name", PROTOCOL_CONFIGS)
def test_protocol_configs_load_and_plan_every_fold_quickly(name):
    start = time.perf_counter()
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.folds == ("01", "02", "03", "04", "05") and cfg.family.train_pool == "10samples"
    assert set(cfg.meta_train.algorithms) == {"maml", "fomaml", "protomaml", "anil_maml", "protonet", "metasgd"}
    assert cfg.meta_train.for_algorithm("fomaml")["zero_head"]
    plans = [make_plan(load_config(path, o)) for o in fold_overrides(cfg).values()]
    assert len({p.keys["task_sets"] for p in plans}) == 5
    assert len({p.family.prefix_files() for p in plans}) == 1
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------- the mean over folds, pooled paired tests

def tidy(scores: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([(e, m, "accuracy", v) for m, vs in scores.items() for e, v in enumerate(vs)],
                        columns=["episode", "method", "metric", "value"])


FOLDS = {"01": tidy({"a": [0.6, 0.8], "b": [0.5, 0.5]}),
         "02": tidy({"a": [0.4, 0.6], "b": [0.4, 0.4]}),
         "03": tidy({"a": [0.6, 0.6], "b": [0.3, 0.5]})}


def test_fold_summary_on_a_hand_computed_example():
    """Fold means a: 0.7, 0.5, 0.6; b: 0.5, 0.4, 0.4. Mean over folds a 0.6 with sd 0.1, b 0.4333 with sd 0.05774;
    half-width t_{0.975, 2} * sd / sqrt(3) with t = 4.302653: a 0.248414, b 0.143422."""
    means = fold_means(FOLDS, "accuracy")
    assert means[["fold", "method"]].values.tolist() == [["01", "a"], ["01", "b"], ["02", "a"], ["02", "b"],
                                                          ["03", "a"], ["03", "b"]]
    np.testing.assert_allclose(means["mean"], [0.7, 0.5, 0.5, 0.4, 0.6, 0.4])
    summary = fold_summary(FOLDS, "accuracy")
    assert summary.index.tolist() == ["a", "b"]  # best first
    assert summary["n_folds"].tolist() == [3, 3] and summary["n_episodes"].tolist() == [6, 6]
    np.testing.assert_allclose(summary["mean"], [0.6, 0.433333], atol=1e-6)
    np.testing.assert_allclose(summary["ci_half"], [0.248414, 0.143422], atol=1e-6)
    np.testing.assert_allclose(summary["ci_high"] - summary["ci_low"], 2 * summary["ci_half"])
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-6)


def test_pooled_episodes_stay_distinct_per_fold_and_are_paired():
    pooled = pool_folds(FOLDS)
    assert pooled["episode"].nunique() == 6 and "01/0" in set(pooled["episode"])
    out = compare_folds({f: t.assign(steps=10) for f, t in FOLDS.items()}, {"01": pd.DataFrame(), "02": pd.DataFrame(
        {"method": ["c"], "stage": ["evaluate"]})}, "accuracy", lower_is_better=False)
    pair = out["comparisons"].iloc[0]
    d = np.array([0.1, 0.3, 0.0, 0.2, 0.3, 0.1])  # a - b, episode by episode, folds pooled
    assert (pair["method_a"], pair["method_b"], pair["n"]) == ("a", "b", 6)
    assert pair["mean_diff"] == pytest.approx(d.mean())
    assert pair["p_ttest"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    assert out["diverged"].values.tolist() == [["02", "c"]]


def test_each_pair_is_also_tested_over_the_folds_themselves():
    """Fold means a - b: 0.2, 0.1, 0.2 (hand-computed: mean 0.16667, sd 0.057735, t = 5.0, p = 0.037750 with 2 df):
    a is better in 3 of 3 folds. The text puts it beside the pooled-episode test and says what each counts."""
    from flows.folds import folds_text

    out = compare_folds({f: t.assign(steps=10) for f, t in FOLDS.items()}, {}, "accuracy", lower_is_better=False)
    row = out["fold_pairs"].iloc[0]
    assert (row["method_a"], row["method_b"], row["n_folds"], row["folds_a_better"], row["folds_b_better"]) == \
        ("a", "b", 3, 3, 0)
    assert (row["mean_diff"], row["p_folds"]) == pytest.approx((1 / 6, 0.037750), abs=1e-6)
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * 4.302653 * 0.057735 / np.sqrt(3), abs=1e-5)
    text = folds_text(out, "accuracy", "b", 0.95, 0.01)
    assert next(line for line in text.splitlines() if line.startswith("a ")).endswith("3/3 folds, p 0.038")
    assert "count every fold's episodes as independent" in text
    lower = compare_folds({f: t.assign(steps=10) for f, t in FOLDS.items()}, {}, "accuracy", lower_is_better=True)
    assert lower["fold_pairs"].iloc[0][["method_a", "folds_a_better", "folds_b_better"]].tolist() == ["b", 3, 0]


def test_compare_folds_leaves_out_diverged_methods_and_takes_the_last_step_and_seed_mean():
    results = {f: pd.concat([t.assign(steps=10, seed=0), t.assign(steps=10, seed=1),
                             t.assign(steps=0, seed=0, value=0.0)]) for f, t in FOLDS.items()}
    results["02"] = pd.concat([results["02"], tidy({"c": [1.0, 1.0]}).assign(steps=10, seed=0)])
    out = compare_folds(results, {"02": pd.DataFrame({"method": ["c"]})}, "accuracy", False)
    assert out["summary"]["method"].tolist() == ["a", "b"]
    np.testing.assert_allclose(out["summary"]["mean"], [0.6, 0.433333], atol=1e-6)
    with pytest.raises(ValueError, match=r"methods lack scores in some folds: \{'c': \['01', '03'\]\}"):
        fold_summary({f: pd.concat([t, tidy({"c": [1.0, 1.0]})]) if f == "02" else t for f, t in FOLDS.items()},
                     "accuracy")


def test_the_fold_summary_is_recomputed_when_a_folds_results_are_rewritten_under_the_same_key(tmp_path, monkeypatch):
    from flows import folds
    from flows.cache import DIVERGED, RESULTS, StageCache, write_table

    write_dataset(tmp_path)
    (tmp_path / "02").mkdir()
    for name in (*FILES.values(), "train.4samples.jsonl"):
        (tmp_path / "02" / name).write_text((tmp_path / "01" / name).read_text())
    cfg = load_config(path := fold_config(tmp_path, ["01", "02"]))
    plans = {f: make_plan(load_config(path, o)) for f, o in fold_overrides(cfg, None).items()}
    cache = StageCache(tmp_path / "data")

    def write(fold: str, stage: str, scores: dict) -> None:
        with cache.writing(stage, plans[fold].keys[stage]) as out:
            write_table(tidy(scores).assign(steps=10), out, RESULTS)
            write_table(pd.DataFrame({"method": pd.Series(dtype=str)}), out, DIVERGED)

    for fold in plans:
        write(fold, "evaluate", {"a": [0.6, 0.8]})
        write(fold, "baselines", {"prototypes": [0.5, 0.5]})
    monkeypatch.setattr(folds, "get_run_logger", lambda: __import__("logging").getLogger("test"))
    summary = lambda: pd.read_parquet(folds.summarize.fn(cfg, cache, plans) / "summary.parquet")  # noqa: E731
    assert summary().set_index("method")["mean"].to_dict() == pytest.approx({"a": 0.7, "prototypes": 0.5})
    write("02", "evaluate", {"a": [0.2, 0.2]})  # e.g. a budgeted meta-training continued: same keys, new results
    assert summary().set_index("method")["mean"].to_dict() == pytest.approx({"a": 0.45, "prototypes": 0.5})


# ---------------------------------------------------------------- the prefix: padded per episode, encoded in chunks

transformers = pytest.importorskip("transformers")


def tiny_bert(dtype=torch.float32, hidden=16):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=2 * hidden, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).to(dtype).eval()


def word_tokenizer(texts, padding, truncation, max_length, return_tensors):
    """A tokenizer for tiny_bert: [CLS]=1, a word's id from its letters (5..49), [SEP]=2, 0-padded to the longest."""
    ids = [[1, *(5 + sum(map(ord, w)) % 45 for w in t.split())][:max_length - 1] + [2] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long(),
            "token_type_ids": torch.zeros_like(input_ids)}


TEXTS = [" ".join(f"w{i * j % 11}" for j in range(1 + (i * 7) % 13)) for i in range(23)]  # 1..13 words


def cached_model(trim: bool, dtype=torch.float64):
    from components.text import CachedTopEncoder, TopEncoder, TopEncoderConfig, encode_prefix

    bert = tiny_bert(dtype)
    hidden, mask = encode_prefix(bert, word_tokenizer, TEXTS, first_adapted_layer=2, max_length=16, batch_size=4)
    top = TopEncoder(bert, TopEncoderConfig(n_layers=1, n_way=3, lora_r=2, lora_b_std=0.1)).to(dtype)
    return CachedTopEncoder(top, hidden.to(dtype), mask, trim=trim)


def test_an_episode_padded_to_its_longest_utterance_gives_the_same_logits_and_meta_gradients_float64():
    from torch.func import functional_call, grad, vmap

    from components.text import adapted_names, longest

    trimmed, full = cached_model(True), cached_model(False)
    short = torch.tensor([[0, 1, 2, 3], [4, 5, 7, 14]])  # two tasks' rows
    assert longest(trimmed.lengths, short) < trimmed.mask.shape[1] == 15
    torch.testing.assert_close(trimmed(short[0]), full(short[0]), rtol=0, atol=1e-12)
    params = {k: v.detach().requires_grad_() for k, v in trimmed.named_parameters() if k in adapted_names(trimmed)}
    y = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 0]])

    def task_loss(model, p, rows, labels):  # one inner step, then the query loss: a second-order meta-gradient
        inner = grad(lambda q: F.cross_entropy(functional_call(model, q, (rows,)), labels))(p)
        fast = {k: p[k] - 0.5 * inner[k] for k in p}
        return F.cross_entropy(functional_call(model, fast, (rows,)), labels)

    grads = [torch.autograd.grad(vmap(lambda r, t: task_loss(m, params, r, t))(short, y).sum(), list(params.values()))
             for m in (trimmed, full)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert any(g.abs().max() > 1e-6 for g in grads[0])


def test_chunked_encoding_equals_one_shot_encoding(tmp_path):
    from components.text import encode_prefix, prefix_from_table, prefix_table, stream_utterances
    from flows.cache import table_appender

    bert = tiny_bert()
    hidden, mask = encode_prefix(bert, word_tokenizer, TEXTS, first_adapted_layer=2, max_length=16, batch_size=4)
    one_shot = prefix_table(hidden, mask)  # every utterance's float32 states at once, as before streaming
    sentences = {}
    for chunk in (4, 8, 64):
        with table_appender(tmp_path) as write:
            sentences[chunk], meta = stream_utterances(TEXTS, 1, 16, write, chunk=chunk, batch_size=4,
                                                       encoder=(bert, word_tokenizer))
        table = pd.read_parquet(tmp_path / "prefix.parquet")
        assert table.filter(like="h").dtypes.eq(np.float16).all()
        table = table.sort_values(["utterance", "position"], ignore_index=True)
        pd.testing.assert_frame_equal(table, one_shot)  # the same batches: bit for bit
        assert meta == {"n_utterances": 23, "n_tokens": int(mask.sum()), "prefix_width": 15, "first_adapted_layer": 2}
    torch.testing.assert_close(prefix_from_table(table, 23)[0].float(), hidden.half().float() * mask[..., None])
    for chunk in (4, 8):
        np.testing.assert_allclose(sentences[chunk], sentences[64], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="chunk: need a positive multiple of batch_size 4, got 6"):
        stream_utterances(TEXTS, 1, 16, lambda *_: None, chunk=6, batch_size=4, encoder=(bert, word_tokenizer))


# ---------------------------------------------------------------- a fold study end to end

@pytest.mark.slow  # MiniLM, a Prefect server, two folds' pipelines twice: about 35 s here
def test_fold_study_runs_each_fold_then_hits_the_cache(prefect_harness, project, capsys):
    from flows.folds import fold_study

    data = json.loads((DATA / "clinc150" / "data_full.json").read_text())
    rows = pd.DataFrame(data["train"], columns=["sentence", "label"])
    intents = sorted(rows["label"].unique())[:9]
    rows = rows[rows["label"].isin(intents)].groupby("label").head(8)
    (project / "full.jsonl").write_text(rows.to_json(orient="records", lines=True))
    for fold, order in (("01", intents), ("02", intents[::-1])):
        (project / fold).mkdir()
        for (split, name), part in zip(FILES.items(), (order[:3], order[3:6], order[6:])):
            (project / fold / name).write_text("\n".join(part) + "\n")
        pool = rows[rows["label"].isin(order[:3])].groupby("label").head(5)
        (project / fold / "train.5samples.jsonl").write_text(pool.to_json(orient="records", lines=True))
    raw = {"name": "folds-tiny", "folds": ["01", "02"],
           "family": {"kind": "text", "dataset": "csv", "path": str(project / "full.jsonl"), "text_col": "sentence",
                      "split": "files", "split_root": str(project), "train_pool": "5samples", "n_way": 3,
                      "k_shot": 1, "n_query": 3, "n_val_episodes": 2, "n_test_episodes": 6, "max_length": 16},
           "model": {"kind": "minilm", "adapted": "lora", "top_layers": 1, "lora_r": 2},
           "meta_train": {"algorithms": ["protonet", "maml"], "fast_lr": 0.1, "meta_batch_size": 2,
                          "iterations": 2, "val_every": 2, "checkpoint_every": 2},
           "evaluate": {"steps": 2, "chunk": 3}, "embedding": {"n_similarity_tasks": 4}, "runtime": {"threads": 1}}
    path = project / "folds.yaml"
    path.write_text(yaml.safe_dump(raw))
    from flows import cli

    assert cli.main(["run", "--config", str(path), "--dry-run"]) == 0  # every fold's entries, nothing started
    planned = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[:-1])
    assert planned["01/meta_train[maml]"].endswith("compute (missing)") and "02/evaluate" in planned
    assert planned["01/prefix"].endswith("compute (missing)")  # one utterance file: the folds share its prefix
    assert planned["02/prefix"].endswith("cache (fold 01 computes it first)")
    assert planned["folds"].endswith("compute (missing)")
    first = fold_study(config_path=str(path))
    assert first["folds"]["01"]["keys"]["task_sets"] != first["folds"]["02"]["keys"]["task_sets"]
    lines = first["results"].splitlines()
    assert lines[-2].startswith("only 2 folds: the interval over the fold means has 1 degree(s) of freedom")
    assert lines[-1].startswith("the pooled-episode tests count every fold's episodes as independent")
    lines = lines[:-2]
    assert {line.split()[0] for line in lines[1:]} == {"protonet", "maml", "prototypes", "linear_head",
                                                       "lora_finetune"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    study = client.get_run(first["run_id"])
    assert study.data.tags["metapeft.kind"] == "fold_study" and "protonet.meta_test_accuracy_ci95" in study.data.metrics
    assert study.data.tags["metapeft.best_method"] == lines[1].split()[0]  # the answer `metapeft runs` shows
    assert study.data.tags["metapeft.verdict"].startswith(lines[1].split()[0]) and \
        "best_meta_test_accuracy" in study.data.metrics
    assert {m.name for m in client.search_registered_models()} >= {"folds-tiny-fold01-maml", "folds-tiny-fold02-maml"}
    fold_run = client.get_run(first["folds"]["02"]["run_id"])
    assert fold_run.data.tags["mlflow.parentRunId"] == first["run_id"] and fold_run.data.tags["metapeft.fold"] == "02"
    page = (project / "reports" / first["folds"]["02"]["run_id"] / "report.html").read_text()
    assert "<h1>folds-tiny fold 02</h1>" in page and "<title>metapeft: folds-tiny fold 02</title>" in page
    page = (project / "reports" / first["run_id"] / "report.html").read_text()  # the study's own report
    assert "<h1>folds-tiny: 2 folds</h1>" in page and "mean over folds" in page
    assert f"href='../{first['folds']['02']['run_id']}/report.html'>fold 02</a>" in page
    best = lines[1].split()[0]
    assert f"<b>{best}</b>" in page.split("class='verdict'>")[1][:50] and "over the means of 2 folds (12 meta-test" in page
    assert re.search(r"Better in [0-2] of 2 folds", page)
    assert "Only 2 folds: 1 degree(s) of freedom" in page and "comparisons.parquet in the study's folds entry" in page
    (project / "reports" / first["run_id"] / "report.html").unlink()
    assert cli.main(["report", first["run_id"]]) == 0  # rewritten from the folds entry
    assert (project / "reports" / first["run_id"] / "report.html").read_text().split("page written")[0] == \
        page.split("page written")[0]
    assert cli.main(["report", first["run_id"], "--config", str(path)]) == 2  # --config: one pipeline's
    said = capsys.readouterr().err
    assert f"{first['run_id']} is a fold study" in said and f"fold 02: {first['folds']['02']['run_id']}" in said
    assert cli.main(["export", first["run_id"]]) == 0  # the study's table: means over folds, pairs over folds
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("method")
    summary = pd.read_parquet(study_folder := project / "data" / "folds" / first["key"] / "summary.parquet")
    assert set(table["study"]) == {"folds-tiny (mean over folds 01, 02)"} and set(table.index) == set(summary["method"])
    np.testing.assert_array_equal(table.loc[summary["method"], "mean"], summary["mean"])
    pairs = pd.read_parquet(study_folder.parent / "fold_pairs.parquet")
    row = pairs[(pairs.method_a == "protonet") & (pairs.method_b == "prototypes")
                | (pairs.method_a == "prototypes") & (pairs.method_b == "protonet")].iloc[0]
    side = "a" if row["method_a"] == "protonet" else "b"
    assert table.loc["protonet", "replicates"] == "fold" and table.loc["protonet", "n_replicates"] == 2
    assert table.loc["protonet", "better_in_replicates"] == row[f"folds_{side}_better"]
    assert table.loc["prototypes", "n_replicates"] == 2 and pd.isna(table.loc["prototypes", "better_in_replicates"])
    assert cli.main(["compare", first["run_id"], first["folds"]["02"]["run_id"]]) == 0  # the mean over folds vs a fold
    assert "A = " + first["run_id"] + " (folds-tiny (mean over folds 01, 02))" in capsys.readouterr().out
    assert cli.main(["export", first["folds"]["02"]["run_id"]]) == 0  # a fold's run: its rows name the fold
    assert set(pd.read_csv(io.StringIO(capsys.readouterr().out))["study"]) == {"folds-tiny fold 02"}
    assert cli.main(["runs", "-n", "3"]) == 0  # the study and its folds, each marked
    listed = capsys.readouterr().out.splitlines()
    marks = {line.split()[0]: listed[i + 1].strip() for i, line in enumerate(listed[1:], 1) if not line[0].isspace()}
    assert marks[first["run_id"]].startswith("fold study over folds 01, 02: its folds are pipeline runs")
    assert marks[first["folds"]["02"]["run_id"]] == f"fold 02 of fold study {first['run_id']}"
    second = fold_study(config_path=str(path))
    assert all(all(out["hits"].values()) for out in second["folds"].values())
    assert second["results"] == first["results"] and second["key"] == first["key"]
    runs_before = len(client.search_runs([study.info.experiment_id]))
    assert cli.main(["run", "--config", str(path)]) == 0  # every entry cached: like make, nothing is started
    said = capsys.readouterr().out
    assert f"every entry cached: nothing to run, no new Prefect or MLflow run; the results of MLflow run " \
           f"{first['run_id']}" in said and first["results"] in said
    assert len(client.search_runs([study.info.experiment_id])) == runs_before
    assert "~ fold" not in first["results"] and "metapeft.unfinished" not in study.data.tags
    from unittest import mock

    with mock.patch("flows.folds.unfinished_training", return_value={"maml": "kept its initial state"}):
        assert cli.main(["run", "--config", str(path)]) == 0  # cached: the notes are said as on the first run
    assert "~ fold 02 maml: kept its initial state" in capsys.readouterr().out
    assert cli.main(["stages", "--config", str(path)]) == 0  # every fold's entries, then the summary's
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert "02/meta_train[maml]" in listed and listed["folds"] == f"{first['key']}  cached"
    assert all(state.endswith("  cached") for state in listed.values())
    assert cli.main(["run", "--config", str(path), "--dry-run", "--force", "evaluate"]) == 0
    planned = capsys.readouterr().out.splitlines()
    fates = dict(line.split(None, 1) for line in planned[:-1])
    assert fates["02/evaluate"].endswith("compute (--force)") and fates["01/meta_train[maml]"].endswith("  cache")
    assert fates["folds"] == f"{first['key']}  cache, or compute if an entry it reads changes"
    assert planned[-1].startswith("dry run: 2 to compute, ")

    short = fold_study(config_path=str(path), overrides={"meta_train": {"iterations": 10**6, "budget_minutes": 1e-4}})
    for fold in ("01", "02"):  # the means over folds hold training a budget stopped short: the study says where
        assert f"~ fold {fold} maml: meta-training stopped by the time budget at iteration " in short["results"]
    assert "fold 02 protonet: meta-training stopped" in client.get_run(short["run_id"]).data.tags["metapeft.unfinished"]


def test_too_few_classes_in_a_split_file_gets_a_hint_that_applies(tmp_path):
    """Split files have no fractions to set: the hint says to list more classes, not family.fractions."""
    from flows.stages.task_sets import build_task_sets

    write_dataset(tmp_path, intents={"meta_train": ["a", "b", "c"], "meta_val": ["d"], "meta_test": ["e", "f", "g"]})
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError) as err:
        build_task_sets(family_of(tmp_path), 0, tmp_path / "out")
    assert "labels.valid.txt: n_way: 2 exceeds" in str(err.value) and "list more classes in that split's file" in str(
        err.value) and "fractions" not in str(err.value)
