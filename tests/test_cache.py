import pandas as pd
import pytest

from flows.cache import StageCache, content_key, write_table
from flows.config import StudyConfig
from flows.plan import make_plan, needed_stages


def test_entry_is_atomic_and_checksummed(tmp_path):
    cache = StageCache(tmp_path)
    with cache.writing("s", "k1", {"n": 1}) as out:
        write_table(pd.DataFrame({"a": [1, 2, 3]}), out, "t")
    assert cache.is_complete("s", "k1")
    assert cache.manifest("s", "k1")["meta"] == {"n": 1}
    assert cache.read_table("s", "k1", "t")["a"].tolist() == [1, 2, 3]
    table = cache.path("s", "k1") / "t.parquet"
    table.write_bytes(table.read_bytes()[:-10])  # truncated file: must count as missing
    assert not cache.is_complete("s", "k1")


def test_failed_write_leaves_previous_entry(tmp_path):
    cache = StageCache(tmp_path)
    with cache.writing("s", "k", {"v": 1}) as out:
        (out / "f.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with cache.writing("s", "k", {"v": 2}) as out:
            (out / "f.txt").write_text("new")
            raise RuntimeError("stage crashed")
    assert (cache.path("s", "k") / "f.txt").read_text() == "old"
    assert cache.is_complete("s", "k")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["k"]  # no temporary folders left


def test_content_key_ignores_dict_order():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_editing_a_section_changes_that_stage_and_downstream_only():
    base = make_plan(StudyConfig())
    edited = make_plan(StudyConfig.model_validate({"evaluate": {"steps": 5}}))
    changed = {s for s in base.keys if base.keys[s] != edited.keys[s]}
    assert changed == {"evaluate", "baselines", "significance"}
    retrained = make_plan(StudyConfig.model_validate({"meta_train": {"overrides": {"maml": {"fast_lr": 0.05}}}}))
    assert {a for a in base.algorithm_keys if base.algorithm_keys[a] != retrained.algorithm_keys[a]} == {"maml"}
    assert base.keys["task_sets"] == retrained.keys["task_sets"]
    assert base.keys["evaluate"] != retrained.keys["evaluate"]


def test_needed_stages_adds_upstream():
    assert needed_stages({"evaluate"}) == ["task_sets", "meta_train", "evaluate"]
    assert needed_stages(None)[0] == "task_sets"
    with pytest.raises(ValueError, match="bogus"):
        needed_stages({"bogus"})
