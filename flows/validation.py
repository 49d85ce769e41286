"""Great Expectations checks of the task sets; a failure stops the pipeline before training.

`great_expectations` takes seconds to import, so it is imported inside `validate_tasksets`.
"""
from __future__ import annotations

import pandas as pd

from flows.config import SinusoidSection

POINT_COLUMNS = ["task_id", "split", "role", "point", "x", "y", "amplitude", "phase"]
SPLITS = ["meta_train", "meta_val", "meta_test"]


class ValidationFailed(RuntimeError):
    """Task sets that fail their expectations; the message lists each failing expectation."""

    def __init__(self, name: str, failures: list[str], report: dict):
        super().__init__(f"{name}: {len(failures)} expectation(s) failed:\n  " + "\n  ".join(failures))
        self.failures, self.report = failures, report


def per_task_summary(points: pd.DataFrame) -> pd.DataFrame:
    """One row per task_id: n_splits, n_support, n_query, amplitude, phase."""
    grouped = points.groupby("task_id")
    return pd.DataFrame({
        "n_splits": grouped["split"].nunique(),
        "n_support": grouped["role"].agg(lambda r: int((r == "support").sum())),
        "n_query": grouped["role"].agg(lambda r: int((r == "query").sum())),
        "amplitude": grouped["amplitude"].first(),
        "phase": grouped["phase"].first(),
    }).reset_index()


def _point_expectations(gx, family: SinusoidSection) -> list:
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


def _task_expectations(gx, family: SinusoidSection) -> list:
    e = gx.expectations
    return [
        e.ExpectColumnValuesToBeBetween(column="n_splits", min_value=1, max_value=1),  # no task in two splits
        e.ExpectColumnValuesToBeBetween(column="n_support", min_value=family.k_shot, max_value=family.k_shot),
        e.ExpectColumnValuesToBeBetween(column="n_query", min_value=family.n_query, max_value=family.n_query),
        e.ExpectCompoundColumnsToBeUnique(column_list=["amplitude", "phase"]),  # the same sine twice
    ]


def validate_tasksets(points: pd.DataFrame, family: SinusoidSection, name: str = "tasksets") -> dict:
    """Validate the point table and its per-task summary; return the JSON report or raise ValidationFailed."""
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(name)
    failures, reports = [], {}
    checks = [("points", lambda: points, _point_expectations), ("tasks", lambda: per_task_summary(points),
                                                                   _task_expectations)]
    for table, frame, expectations in checks:
        missing = sorted(set(POINT_COLUMNS) - set(points.columns))
        if table == "tasks" and missing:
            failures.append(f"tasks: not checked, the point table lacks columns {missing}")
            break
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame()})
        suite = gx.ExpectationSuite(name=f"{name}.{table}", expectations=expectations(gx, family))
        result = batch.validate(suite)
        reports[table] = result.to_json_dict()
        failures += [_describe(table, r) for r in result.results if not r.success]
    report = {"success": not failures, "failures": failures, "results": reports}
    if failures:
        raise ValidationFailed(name, failures, report)
    return report


def _describe(table: str, result) -> str:
    cfg = result.expectation_config
    column = cfg.kwargs.get("column") or cfg.kwargs.get("column_list") or ""
    detail = result.result or {}
    examples = detail.get("partial_unexpected_list") or detail.get("details") or ""
    return (f"{table}: {cfg.type}({column}) unexpected_count={detail.get('unexpected_count')} "
            f"examples={str(examples)[:200]}")
