import pytest

from components.tasksets import SinusoidFamily, sample_sinusoid_tasks
from flows.config import SinusoidSection
from flows.validation import ValidationFailed, validate_tasksets


@pytest.fixture(scope="module")
def points():
    return sample_sinusoid_tasks(SinusoidFamily(), {"meta_train": 30, "meta_val": 5, "meta_test": 5}, seed=1)


def test_sampled_task_sets_pass(points):
    assert validate_tasksets(points, SinusoidSection())["success"]


@pytest.mark.parametrize("corrupt, expected", [
    (lambda d: d.assign(x=d["x"].where(d.index != 3, 9.0)), "expect_column_values_to_be_between(x)"),
    (lambda d: d.assign(y=d["y"].where(d.index != 0, float("nan"))), "expect_column_values_to_not_be_null(y)"),
    (lambda d: d.assign(split=d["split"].where(~((d.task_id == 0) & (d.role == "query")), "meta_test")),
     "(n_splits)"),
    (lambda d: d[~((d.task_id == 2) & (d.point == 0))], "(n_support)"),
    (lambda d: d.drop(columns="phase"), "expect_table_columns_to_match_set"),
])
def test_corrupted_task_sets_fail_with_the_expectation_named(points, corrupt, expected):
    with pytest.raises(ValidationFailed) as err:
        validate_tasksets(corrupt(points.copy()), SinusoidSection())
    assert expected in str(err.value)
    assert not err.value.report["success"]
