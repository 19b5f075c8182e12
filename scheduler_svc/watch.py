"""Following a run live: its progress and new log entries, read from the database as they change.

The run may execute on any replica, so the watch reads the shared store, every ``interval_s``, and
yields a snapshot only when something changed (a task's state or counts, the run's state, new log
entries; lease renewals alone are not changes). It ends after the run reaches a final state (or is
suspended) and its whole log was yielded.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from carillon_chassis.database import Database
from scheduler_svc.model import LogEntry, Run, RunKey, RunState
from scheduler_svc.runs import RunStore

# The stream ends at these states; a suspended run only resumes through RestartRun (watch it again).
FINAL_STATES = (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.SUSPENDED)
LOG_BATCH = 500


def _progress(run: Run) -> Run:
    return dataclasses.replace(run, lease_owner=None, lease_expires=None)


async def watch_run(
    database: Database, runs: RunStore, key: RunKey, interval_s: float
) -> AsyncIterator[tuple[Run, list[LogEntry]]]:
    """Yield (run, new log entries) at once and then at every change, until the run has ended."""
    after = 0
    last: Run | None = None
    while True:
        run, entries = await database.run(runs.snapshot, key, after, LOG_BATCH)
        if entries:
            after = entries[-1].sequence
        progress = _progress(run)
        if entries or progress != last:
            yield run, entries
            last = progress
        if len(entries) == LOG_BATCH:
            continue
        if run.state in FINAL_STATES:
            return
        await asyncio.sleep(interval_s)
