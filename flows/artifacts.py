"""Prefect artifacts of a flow run: progress of long work, the results table and the verdict.

Each artifact call is one request to the Prefect API (5-40 ms here): progress is sent at most every
`every` seconds. Outside a flow or task run (a task's body called directly in a test) nothing is created.
"""
from __future__ import annotations

import re
import time

import pandas as pd

from flows.answer import Answer


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from free text, e.g. the study's name."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


class Progress:
    """A progress artifact of `total` units of work (iterations, units, baselines), in percent."""

    def __init__(self, description: str, total: int, every: float = 5.0):
        from prefect.artifacts import create_progress_artifact

        self.total, self.every, self.sent = max(int(total), 1), every, time.monotonic()
        self.id = create_progress_artifact(0.0, description=description) if _in_run() else None

    def update(self, done: int) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.id is None or (done < self.total and time.monotonic() - self.sent < self.every):
            return
        update_progress_artifact(self.id, min(100.0, 100.0 * done / self.total))
        self.sent = time.monotonic()

    def finish(self) -> None:
        self.update(self.total)


def publish_results(study: str, summary: pd.DataFrame, answer: Answer | None, text: str, mlflow_run: str) -> None:
    """The results table (one row per method: n, mean, CI) and the verdict in words, as this flow run's
    artifacts under the keys <study>-results and <study>-verdict (the Artifacts page keeps their history)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if not _in_run():
        return
    table = summary.reset_index().round(6).to_dict("records")
    create_table_artifact(table, key=artifact_key(study, "results"),
                          description=f"{study}: meta-test score per method (MLflow run {mlflow_run})")
    title = answer.leader() if answer else "no method finished"
    verdict = answer.sentence() if answer else "Every method diverged: see the table below."
    create_markdown_artifact(f"# {study}: {title}\n\n{verdict}\n\n```\n{text}\n```\n\nMLflow run: `{mlflow_run}`\n",
                             key=artifact_key(study, "verdict"), description=f"{study}: the verdict")
