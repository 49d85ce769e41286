"""Great Expectations checks of the task sets; a failure stops the pipeline before training.

One suite per task family (`SUITES`, by the family's class name, so this module imports no family);
each reads the family's data settings (n_way, k_shot, ...). `great_expectations` takes seconds to
import, so it is imported inside `validate`.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd

POINT_COLUMNS = ["task_id", "split", "role", "point", "x", "y", "amplitude", "phase"]
SPLITS = ["meta_train", "meta_val", "meta_test"]
DRAWINGS = 20  # Omniglot drawings per character in the archive (one fewer where a duplicate was dropped)
FIXED = "test_images"  # an image family's table of a fixed episode file's images (components.families.images)


class ValidationFailed(RuntimeError):
    """Task sets that fail their expectations; the message lists each failing expectation."""

    def __init__(self, name: str, failures: list[str], report: dict):
        super().__init__(f"{name}: {len(failures)} expectation(s) failed:\n  " + "\n  ".join(failures))
        self.failures, self.report = failures, report


def per_task_summary(points: pd.DataFrame) -> pd.DataFrame:
    """One row per task_id: n_splits, n_support, n_query, amplitude, phase."""
    grouped = points.groupby("task_id")
    roles = points.assign(support=points["role"] == "support", query=points["role"] == "query").groupby("task_id")
    return pd.DataFrame({
        "n_splits": grouped["split"].nunique(),
        "n_support": roles["support"].sum().astype(int),  # vectorised: a lambda per task cost ~10 s on 20k tasks
        "n_query": roles["query"].sum().astype(int),
        "amplitude": grouped["amplitude"].first(),
        "phase": grouped["phase"].first(),
    }).reset_index()


def _point_expectations(gx, family) -> list:
    e = gx.expectations
    amp_max = family.amplitude[1]
    return [
        e.ExpectTableColumnsToMatchSet(column_set=POINT_COLUMNS, exact_match=True),
        *[e.ExpectColumnValuesToNotBeNull(column=c) for c in POINT_COLUMNS],
        e.ExpectColumnValuesToBeInSet(column="split", value_set=SPLITS),
        e.ExpectColumnValuesToBeInSet(column="role", value_set=["support", "query"]),
        e.ExpectColumnValuesToBeBetween(column="x", min_value=family.x_range[0], max_value=family.x_range[1]),
        e.ExpectColumnValuesToBeBetween(column="y", min_value=-amp_max, max_value=amp_max),
        e.ExpectColumnValuesToBeBetween(column="amplitude", min_value=family.amplitude[0], max_value=amp_max),
        e.ExpectColumnValuesToBeBetween(column="phase", min_value=family.phase[0], max_value=family.phase[1]),
        e.ExpectCompoundColumnsToBeUnique(column_list=["task_id", "point"]),
    ]


def _task_expectations(gx, family) -> list:
    e = gx.expectations
    return [
        e.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1),  # no task in two splits
        e.ExpectColumnValuesToBeBetween(column="n_support", min_value=family.k_shot, max_value=family.k_shot),
        e.ExpectColumnValuesToBeBetween(column="n_query", min_value=family.n_query, max_value=family.n_query),
        e.ExpectCompoundColumnsToBeUnique(column_list=["amplitude", "phase"]),  # the same sine twice
    ]


def validate_tasksets(points: pd.DataFrame, family, name: str = "tasksets") -> dict:
    """Validate the sinusoid point table and its per-task summary; return the report or raise ValidationFailed."""
    missing = sorted(set(POINT_COLUMNS) - set(points.columns))
    tables = {"points": (points, lambda gx: _point_expectations(gx, family))}
    if missing:  # the per-task summary needs the columns; the points suite reports them missing
        return validate(name, tables, [f"tasks: not checked, the point table lacks columns {missing}"])
    tables["tasks"] = (per_task_summary(points), lambda gx: _task_expectations(gx, family))
    return validate(name, tables)


def validate(name: str, tables: dict[str, tuple[pd.DataFrame, Callable]], failures: list[str] | None = None) -> dict:
    """Run one expectation suite per table: tables maps name -> (frame, gx -> [expectations]).

    Returns the JSON report; raises ValidationFailed listing every failing expectation.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(name)
    failures, reports = list(failures or []), {}
    for table, (frame, expectations) in tables.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame})
        result = batch.validate(gx.ExpectationSuite(name=f"{name}.{table}", expectations=expectations(gx)))
        reports[table] = result.to_json_dict()
        failures += [_describe(table, r, frame) for r in result.results if not r.success]
    report = {"success": not failures, "failures": failures, "results": reports}
    if failures:
        raise ValidationFailed(name, failures, report)
    return report


def e(gx):
    """The expectation classes of the great_expectations module `gx` (imported lazily by `validate`)."""
    return gx.expectations


def validate_omniglot(images: pd.DataFrame, classes: pd.DataFrame, episodes: pd.DataFrame, family,
                      row_index: Callable, fixed: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> dict:
    """Image shape and range, K + Q to 20 drawings per character (a duplicate is dropped), no class or character
    in two splits, and every episode N classes x (K + Q) distinct drawings of its own classes (episodes:
    `episodes.episode_table` rows, row = a position in `row_index(images, class_ids)` of the split: the family's
    `omniglot.class_row_index`, passed in so that this module, in every family's task_sets key, imports no
    family's loader); fixed: a fixed episode file's meta-test episodes and images (`fixed_episode_suites`)."""
    from components.episodes import pixel_keys

    n_pixels = family.image_size ** 2
    per_image = pd.DataFrame({
        "n_pixels": images["pixels"].map(len),
        "max_intensity": images["pixels"].map(lambda b: max(b) if len(b) else -1),
    })
    per_character = images.groupby("character").size().rename("n_drawings").reset_index()
    per_class = classes.assign(character=classes["class_id"].str.rsplit("/", n=1).str[0])
    per_char_split = per_class.groupby("character")["split"].nunique().rename("n_splits").reset_index()
    keys = pixel_keys(images["pixels"]).to_numpy()
    row_label = pd.Series(index=episodes.index, dtype=object)
    example = pd.Series(index=episodes.index, dtype=object)
    for split, rows in episodes.groupby("split"):
        index, degrees, labels = row_index(images, classes.loc[classes["split"] == split, "class_id"].tolist())
        inside = rows["row"].to_numpy() < len(labels)  # a row past the split names no class
        at = rows["row"].to_numpy()[inside]
        row_label[rows.index[inside]] = labels[at]
        example[rows.index[inside]] = [f"{k}@{d}" for k, d in zip(keys[index[at]], degrees[at])]

    tables = {
        "images": (per_image, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_pixels", min_value=n_pixels, max_value=n_pixels),
            e(gx).ExpectColumnValuesToBeBetween(column="max_intensity", min_value=1, max_value=255)]),  # not blank
        "characters": (per_character, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_drawings", min_value=family.k_shot + family.n_query,
                                                max_value=DRAWINGS)]),
        "classes": (per_class, lambda gx: [
            e(gx).ExpectColumnValuesToBeUnique(column="class_id"),
            e(gx).ExpectColumnValuesToBeInSet(column="split", value_set=SPLITS)]),
        "character_splits": (per_char_split, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1)]),
        **_episode_suites(episodes.assign(row_label=row_label, example=example), family),
        **(fixed_episode_suites(*fixed, family) if fixed is not None else {}),
    }
    return validate("omniglot", tables)


def validate_image_folder(images: pd.DataFrame, classes: pd.DataFrame, episodes: pd.DataFrame, family,
                          fixed: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> dict:
    """Every image channels x size x size bytes, no class in two splits, every split's class a folder with
    enough images for K + Q, and every episode N classes x (K + Q) distinct images of its own classes.

    images: class_id, file, pixels, channels, size; classes: split, class_id; episodes: `episodes.episode_table`
    rows, row = a position among its split's images (the rows of the split's classes, in table order); fixed: a
    fixed episode file's meta-test episodes and images (`fixed_episode_suites`)."""
    n_bytes = family.channels * family.image_size ** 2
    per_image = images[["file", "channels", "size"]].assign(n_bytes=images["pixels"].map(len))
    per_class = classes.assign(n_images=classes["class_id"].map(images.groupby("class_id").size()).fillna(0))
    class_splits = classes.groupby("class_id")["split"].nunique().rename("n_splits").reset_index()
    from components.episodes import pixel_keys

    keys = pixel_keys(images["pixels"])
    row_label = pd.Series(index=episodes.index, dtype=object)
    example = pd.Series(index=episodes.index, dtype=object)
    for split, rows in episodes.groupby("split"):
        in_split = images["class_id"].isin(classes.loc[classes["split"] == split, "class_id"])
        names = pd.Series(images["class_id"][in_split].to_numpy())  # positional: a row past the split is NaN
        row_label[rows.index] = names.reindex(rows["row"].to_numpy()).to_numpy()
        example[rows.index] = pd.Series(keys[in_split].to_numpy()).reindex(rows["row"].to_numpy()).to_numpy()

    tables = {
        "images": (per_image, lambda gx: [
            e(gx).ExpectColumnValuesToBeInSet(column="channels", value_set=[family.channels]),
            e(gx).ExpectColumnValuesToBeInSet(column="size", value_set=[family.image_size]),
            e(gx).ExpectColumnValuesToBeBetween(column="n_bytes", min_value=n_bytes, max_value=n_bytes),
            e(gx).ExpectColumnValuesToBeUnique(column="file")]),
        "classes": (per_class, lambda gx: [
            e(gx).ExpectColumnValuesToBeInSet(column="split", value_set=SPLITS),
            e(gx).ExpectColumnValuesToBeBetween(column="n_images", min_value=family.k_shot + family.n_query)]),
        "class_splits": (class_splits, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1)]),
        **_episode_suites(episodes.assign(row_label=row_label, example=example), family),
        **(fixed_episode_suites(*fixed, family) if fixed is not None else {}),
    }
    return validate("image_folder", tables)


def fixed_episode_suites(episodes: pd.DataFrame, images: pd.DataFrame, family) -> dict:
    """A fixed episode file's meta-test episodes: every episode N x K support rows (K of each of N labels), every
    query label among its episode's support labels, the same Q queries of every label in every episode, no image
    twice in an episode (by content), every episode row's (image, rotation) that of its row in images, and every
    image channels x size x size bytes, once per (image, rotation), rotation one of 0, 90, 180, 270. Failures name
    the file's own episode ids. episodes: `episode_table` rows + image, rotation, source_episode (the file's id),
    row = a position in images (image, rotation, pixels, channels, size); rotation 0 where a column is missing."""
    from components.episodes import pixel_keys

    k, n_bytes = family.k_shot, getattr(family, "channels", 1) * family.image_size ** 2
    rows = episodes.assign(episode=episodes["source_episode"], support=episodes["slot"] < k)
    rows["support_label"] = rows["label"].where(rows["support"])
    known = pd.MultiIndex.from_frame(rows[["episode", "label"]]).isin(
        pd.MultiIndex.from_frame(rows.loc[rows["support"], ["episode", "label"]]))
    rows["unknown_query"] = ~rows["support"] & ~known
    images = images.assign(rotation=images["rotation"] if "rotation" in images else 0)
    rows["rotation"] = rows["rotation"] if "rotation" in rows else 0
    # an example is its pixels at its rotation, as the sampled episodes' suite counts them: a drawing that looks the
    # same turned by 180 degrees is still two examples at 0 and 180
    examples = pixel_keys(images["pixels"]).to_numpy().astype(object) + "@" + images["rotation"].astype(str).to_numpy()
    rows["example"] = pd.Series(examples).reindex(rows["row"].to_numpy()).to_numpy()
    named = images[["image", "rotation"]].reset_index(drop=True).reindex(rows["row"].to_numpy())
    rows["misplaced"] = ((named["image"].to_numpy() != rows["image"].to_numpy())
                         | (named["rotation"].to_numpy() != rows["rotation"].to_numpy()))
    per_episode = rows.groupby("episode", sort=False).agg(
        n_support=("support", "sum"), n_way=("support_label", "nunique"), n_unknown_query=("unknown_query", "sum"),
        n_misplaced=("misplaced", "sum"), n_examples=("row", "size"), n_distinct=("example", "nunique")).reset_index()
    per_label = rows.assign(query=~rows["support"]).groupby(["episode", "label"], sort=False).agg(
        n_support=("support", "sum"), n_query=("query", "sum")).reset_index()
    q = int(per_label["n_query"].iloc[0]) if len(per_label) else 0
    n_rows = family.n_way * k
    return {
        "fixed_images": (images[["image", "rotation"]].assign(n_bytes=images["pixels"].map(len)), lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_bytes", min_value=n_bytes, max_value=n_bytes),
            e(gx).ExpectColumnValuesToBeInSet(column="rotation", value_set=[0, 90, 180, 270]),
            e(gx).ExpectCompoundColumnsToBeUnique(column_list=["image", "rotation"])]),
        "fixed_episodes": (per_episode, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_support", min_value=n_rows, max_value=n_rows),
            e(gx).ExpectColumnValuesToBeBetween(column="n_way", min_value=family.n_way, max_value=family.n_way),
            e(gx).ExpectColumnValuesToBeBetween(column="n_unknown_query", min_value=0, max_value=0),
            e(gx).ExpectColumnValuesToBeBetween(column="n_misplaced", min_value=0, max_value=0),
            e(gx).ExpectColumnValuesToBeBetween(column="n_distinct", min_value=n_rows + family.n_way * q,
                                                max_value=n_rows + family.n_way * q)]),
        "fixed_episode_labels": (per_label, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_support", min_value=k, max_value=k),
            e(gx).ExpectColumnValuesToBeBetween(column="n_query", min_value=max(q, 1), max_value=max(q, 1))]),
    }


def _episode_suites(rows: pd.DataFrame, family) -> dict:
    """Every episode: N distinct classes, K support and Q query examples of each, distinct examples, and each
    example of the class its label names, and no example twice in one episode, support or query, by content
    (rows: split, episode, way, slot, label, row, row_label, example: what makes two examples the same)."""
    k, n_rows = family.k_shot, family.n_way * (family.k_shot + family.n_query)
    per_way = rows.assign(support=rows["slot"] < k).groupby(["split", "episode", "way"]).agg(
        n_support=("support", "sum"), n_examples=("row", "size")).reset_index()
    per_episode = rows.groupby(["split", "episode"]).agg(
        n_way=("label", "nunique"), n_rows=("row", "nunique"), n_examples=("row", "size"),
        n_distinct=("example", "nunique")).reset_index()  # example: the content (normalised text, pixels)

    return {
        "episode_rows": (rows, lambda gx: [
            e(gx).ExpectColumnPairValuesToBeEqual(column_A="row_label", column_B="label")]),
        "episode_ways": (per_way, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_support", min_value=k, max_value=k),
            e(gx).ExpectColumnValuesToBeBetween(column="n_examples", min_value=k + family.n_query,
                                                max_value=k + family.n_query)]),
        "episodes": (per_episode, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_way", min_value=family.n_way, max_value=family.n_way),
            e(gx).ExpectColumnValuesToBeBetween(column="n_rows", min_value=n_rows, max_value=n_rows),
            e(gx).ExpectColumnValuesToBeBetween(column="n_examples", min_value=n_rows, max_value=n_rows),
            e(gx).ExpectColumnValuesToBeBetween(column="n_distinct", min_value=n_rows, max_value=n_rows)]),
    }


def validate_text(utterances: pd.DataFrame, classes: pd.DataFrame, episodes: pd.DataFrame,
                  family) -> dict:
    """No empty text or label, no class (or domain, when split by domain) in two splits, enough utterances
    per class for an episode, every episode N distinct classes x (K + Q) distinct utterances of its split.

    utterances: text, label (+ domain; + usable with split files: the rows its split's episodes may draw, which
    are the ones counted); classes: split, label; episodes: split, episode, way, label, row.
    """
    drawable = utterances[utterances["usable"]] if "usable" in utterances else utterances
    per_class = drawable.groupby("label").size().rename("n_utterances").reset_index()
    class_splits = classes.groupby("label")["split"].nunique().rename("n_splits").reset_index()
    split_of = classes.drop_duplicates("label").set_index("label")["split"]  # duplicates: class_splits fails
    from components.episodes import normalized_text

    at = episodes["row"].to_numpy()
    rows = episodes.assign(row_label=utterances["label"].to_numpy()[at],
                           row_split=lambda t: t["row_label"].map(split_of),
                           example=normalized_text(utterances["text"]).to_numpy()[at])

    tables = {
        "utterances": (utterances.assign(n_chars=utterances["text"].str.strip().str.len()), lambda gx: [
            e(gx).ExpectColumnValuesToNotBeNull(column="text"),
            e(gx).ExpectColumnValuesToNotBeNull(column="label"),
            e(gx).ExpectColumnValuesToBeBetween(column="n_chars", min_value=1)]),
        "classes": (per_class, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_utterances", min_value=family.k_shot + family.n_query)]),
        "class_splits": (class_splits, lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1)]),
        "episode_splits": (rows, lambda gx: [
            e(gx).ExpectColumnPairValuesToBeEqual(column_A="row_split", column_B="split")]),
        **_episode_suites(rows, family),
    }
    if "usable" in utterances:  # split files: no episode draws outside the pool or a conflicting copy
        tables["episode_usable"] = (rows.assign(usable=utterances["usable"].to_numpy()[at]), lambda gx: [
            e(gx).ExpectColumnValuesToBeInSet(column="usable", value_set=[True])])
    if "domain" in utterances and family.split_by == "domain":
        domains = utterances.assign(split=utterances["label"].map(split_of)).groupby("domain")["split"].nunique()
        tables["domain_splits"] = (domains.rename("n_splits").reset_index(), lambda gx: [
            e(gx).ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1)])
    return validate("text", tables)


def _describe(table: str, result, frame: pd.DataFrame | None = None) -> str:
    """One line per failed expectation: table, expectation and column, how many rows, what was expected, and
    the offending rows named by the frame's first column (the class, the episode, the file)."""
    cfg = result.expectation_config
    column = cfg.kwargs.get("column") or cfg.kwargs.get("column_list") or ""
    detail = result.result or {}
    examples = detail.get("partial_unexpected_list") or detail.get("details") or ""
    lo, hi = cfg.kwargs.get("min_value"), cfg.kwargs.get("max_value")
    expected = (f" expected {column} {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}"
                if lo is not None or hi is not None else "")
    named = ""
    if frame is not None and isinstance(column, str) and column in frame and (lo is not None or hi is not None):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = (values < lo if lo is not None else False) | (values > hi if hi is not None else False)
        first = frame.columns[0]
        if first != column and bad.any():
            named = f" at {first} " + ", ".join(f"{k!r} ({v:g})" for k, v in zip(frame[first][bad][:5], values[bad][:5]))
    return (f"{table}: {cfg.type}({column}) unexpected_count={detail.get('unexpected_count')}{expected}{named} "
            f"examples={str(examples)[:200]}")


def validate_family(family, tables) -> dict:
    """The family's suite over its task-set tables (name -> DataFrame); raises ValidationFailed. The report
    also lists what the family's cleaning changed (its `cleaning` table: labels stripped, duplicates dropped)."""
    kind = type(family).__name__
    if kind not in SUITES:
        raise ValueError(f"no Great Expectations suite for the task family {kind}; add one to SUITES")
    report = SUITES[kind](family, tables)
    if "cleaning" in tables:
        report["cleaning"] = tables["cleaning"].to_dict("records")
    return report


def _episodes(tables) -> pd.DataFrame:
    """The sampled fixed episodes (meta-val, and meta-test unless a fixed episode file gave them)."""
    splits = ("meta_val",) if FIXED in tables else ("meta_val", "meta_test")
    return pd.concat([tables[f"episodes_{s}"] for s in splits], ignore_index=True)


def _fixed(tables) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    return (tables["episodes_meta_test"], tables[FIXED]) if FIXED in tables else None


SUITES = {
    "SinusoidTasks": lambda f, t: validate_tasksets(pd.concat([t[s] for s in SPLITS]), f.data.tasks),
    "OmniglotTasks": lambda f, t: validate_omniglot(t["images"], t["classes"], _episodes(t), f.data, f.row_index,
                                                    _fixed(t)),
    "ImageFolderTasks": lambda f, t: validate_image_folder(t["images"], t["classes"], _episodes(t), f.data,
                                                           _fixed(t)),
    "TextTasks": lambda f, t: validate_text(t["utterances"], t["classes"], _episodes(t), f.data),
}
