"""Fast checks of the pieces the slow reliability tests rely on: the per-entry lock, write errors, and
the stale-run check that ends a killed process's MLflow runs."""
import errno
import shutil
import subprocess
import threading
import time

import pandas as pd
import pytest

from flows.cache import CacheWriteError, StageCache, write_table


def test_lock_makes_the_second_writer_wait_then_find_the_entry(tmp_path):
    cache, order = StageCache(tmp_path), []

    def second():
        with cache.lock("s", "k"):
            order.append(("second", cache.is_complete("s", "k")))

    with cache.lock("s", "k"):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.2)
        with cache.writing("s", "k") as out:
            write_table(pd.DataFrame({"a": [1]}), out, "t")
        order.append(("first", True))
    waiter.join(5)
    assert order == [("first", True), ("second", True)]


def test_lock_clears_a_killed_writers_temporary_folder(tmp_path):
    cache = StageCache(tmp_path)
    leftover = tmp_path / "s" / ".k.tmp-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "half.parquet").write_bytes(b"PAR1")
    with cache.lock("s", "k"):
        assert not leftover.exists()


def test_full_disk_while_writing_names_the_folder_and_keeps_the_entry(tmp_path):
    cache = StageCache(tmp_path)
    with cache.writing("s", "k", {"v": 1}) as out:
        (out / "f.txt").write_text("old")
    with pytest.raises(CacheWriteError, match=r"stage s: cannot write .*/s \(No space left on device\)") as err:
        with cache.writing("s", "k", {"v": 2}) as out:
            raise OSError(errno.ENOSPC, "Error writing bytes to file")  # pyarrow: errno, no file name
    assert err.value.errno == errno.ENOSPC
    assert (cache.path("s", "k") / "f.txt").read_text() == "old" and cache.is_complete("s", "k")
    assert [p.name for p in (tmp_path / "s").iterdir() if not p.name.endswith(".lock")] == ["k"]


def test_other_errors_pass_through_unchanged(tmp_path):
    """An unreadable input outside the cache is the input's problem, not the cache's: not rewritten."""
    cache, outside = StageCache(tmp_path / "data"), tmp_path / "input.csv"
    with pytest.raises(PermissionError) as err:
        with cache.writing("s", "k"):
            raise PermissionError(errno.EACCES, "Permission denied", str(outside))
    assert not isinstance(err.value, CacheWriteError)
    with pytest.raises(FileNotFoundError):
        with cache.writing("s", "k"):
            raise FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "data" / "x"))


def test_stale_runs_of_dead_processes_end_killed(tmp_path, empty_store):
    from flows.tracking import Tracker, process_tags

    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_store, tmp_path / "mlruns" / "mlflow.db")
    tracker = Tracker(tmp_path, "stale")
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = tracker.start_run("alive")
    dead = tracker.start_run("dead", tags={"metapeft.pid": str(gone.pid), "metapeft.pid_start": ""})
    recycled = tracker.start_run("recycled", tags={**process_tags(), "metapeft.pid_start": "1"})  # same pid, later
    foreign = tracker.start_run("foreign", tags={"metapeft.host": "elsewhere", "metapeft.pid": str(gone.pid)})
    assert sorted(tracker.end_stale_runs()) == sorted([dead, recycled])
    status = {r: tracker.client.get_run(r).info.status for r in (mine, dead, recycled, foreign)}
    assert status == {mine: "RUNNING", dead: "KILLED", recycled: "KILLED", foreign: "RUNNING"}
    assert tracker.end_stale_runs() == []
