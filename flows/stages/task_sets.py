"""task_sets: the family's tables, validated by Great Expectations before anything is cached."""
from __future__ import annotations

import json
from pathlib import Path

from components.families import TaskFamily
from flows.cache import VALIDATION, StageCache, copy_tables, write_tables
from flows.validation import validate_family


HINTS = {  # what a family's error is about -> the settings that change it
    "n_way:": "lower family.n_way, or give the split more classes (family.fractions; Omniglot: family.random_fractions; or more classes in the data)",
    "k_shot + n_query:": "lower family.k_shot or family.n_query, or give these classes more examples",
    "more than one label": "",  # the message names its setting already
}


def build_task_sets(family: TaskFamily, seed: int, out: Path) -> dict:
    """Build, validate (a failure raises ValidationFailed and caches nothing) and write the task sets.

    A family's ValueError about episode sizes gets the settings to change appended."""
    hints = HINTS if getattr(family.data, "split", None) != "files" else {
        **HINTS, "n_way:": "lower family.n_way, or list more classes in that split's file"}  # (no fractions to set)
    try:
        tables = family.build(seed)
    except ValueError as e:
        hint = next((h for k, h in hints.items() if k in str(e)), "")
        raise ValueError(f"{e}; {hint}" if hint else str(e)) from None
    report = validate_family(family, tables)
    (out / VALIDATION).write_text(json.dumps(report, default=str))
    write_tables(tables, out)
    return summary(tables)


def summary(tables) -> dict:
    """Counts for the log and MLflow: classes per split (classification) or tasks per split (regression), what
    cleaning changed (labels stripped, duplicates dropped, examples under two labels dropped), and the episodes of a
    fixed episode file (its images' table: `test_images`)."""
    cleaned = {r["what"]: int(r["count"]) for r in tables["cleaning"].to_dict("records")} if "cleaning" in tables \
        else {}
    if "test_images" in tables:
        cleaned["n_fixed_test_episodes"] = int(tables["episodes_meta_test"]["episode"].nunique())
    if "classes" in tables:
        return {f"n_classes_{s}": int(n) for s, n in tables["classes"].groupby("split").size().items()} | cleaned
    return {f"n_tasks_{s}": int(t["task_id"].nunique()) for s, t in tables.items()}


def write_train_sets(cache: StageCache, plan, rebuild: bool = False) -> bool:
    """The training side of the task sets as its own entry ("train_sets", `flows.plan`): the tables of the complete
    task_sets entry but the family's `test_tables`, which meta-training reads. Written when missing (an entry of the
    same key holds the same tables), so task sets of a new key (a new test protocol) leave it, and the meta-training
    after it, as they are; and again when rebuild (the task sets forced: a file changed that the keys did not see),
    after which a meta-training that read other tables is stale. Nothing without a complete task_sets entry. True
    when it wrote it."""
    key = plan.keys["train_sets"]
    with cache.lock("train_sets", key):
        if not cache.is_complete("task_sets", plan.keys["task_sets"]) or \
                (cache.is_complete("train_sets", key) and not rebuild):
            return False
        meta = {"settings": plan.settings_key("train_sets"), "inputs": plan.inputs}
        with cache.writing("train_sets", key, meta) as out:
            meta["tables"] = copy_tables(cache.path("task_sets", plan.keys["task_sets"]), out, plan.family.test_tables)
    return True
