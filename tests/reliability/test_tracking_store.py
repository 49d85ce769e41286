"""The MLflow store as users leave it: an experiment deleted in the UI is restored, with a word."""
import pytest


@pytest.mark.slow  # creates an MLflow SQLite store (about 5 s)
def test_a_deleted_experiment_is_restored_and_runs_go_on(project):
    from flows.tracking import Tracker

    first = Tracker(project, "study")
    run = first.start_run("before")
    first.end_run(run)
    first.client.delete_experiment(first.experiment_id)  # what the UI's delete does
    assert first.client.get_experiment(first.experiment_id).lifecycle_stage == "deleted"

    again = Tracker(project, "study")
    assert again.experiment_id == first.experiment_id
    assert "runtime.experiment" in again.restored and "'study'" in again.restored
    assert again.client.get_experiment(again.experiment_id).lifecycle_stage == "active"
    after = again.start_run("after")  # failed with "must be in the 'active' state" before
    again.end_run(after)
    assert {r.info.run_name for r in again.client.search_runs([again.experiment_id])} == {"before", "after"}
    assert Tracker(project, "study").restored is None  # active: nothing to say
