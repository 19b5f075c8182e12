"""The background runner: claims due runs with leases and executes them with the engine.

Every ``poll_interval_s`` the runner claims up to ``max_concurrent_runs`` minus the runs it is
executing (see :mod:`scheduler_svc.runs` for how claims work on each backend) and executes each in
its own task. While a run executes, a heartbeat renews its lease every third of ``lease_s``; every
progress write renews it too. A replica that finds its lease taken (:class:`LeaseLost`) abandons the
run at once: the replica that claimed it resumes from the stored checkpoints.

``stop()`` (the server's stop hook) cancels the polling loop and every execution, then releases the
leases of the interrupted runs so that another replica, or this one after a restart, resumes them at
once instead of after the lease expires. A database that cannot be reached leaves the run to be
resumed after its lease expires; any other unexpected error fails the run, so a bug cannot make a
run loop forever.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError

from carillon_chassis.database import Database
from scheduler_svc.engine import Engine
from scheduler_svc.model import Ack, ClaimedRun, LeaseLost, RunKey, TaskState
from scheduler_svc.runs import Lease, RunStore

log = structlog.get_logger("carillon.scheduler.runner")


class StoreJournal:
    """The engine's RunJournal over the run store, holding this replica's lease."""

    def __init__(self, database: Database, runs: RunStore, lease: Lease) -> None:
        self.database = database
        self.runs = runs
        self.lease = lease

    async def start_task(self, key: RunKey, activity: str, targeted: int | None = None) -> None:
        await self.database.run(self.runs.start_task, key, self.lease, activity, targeted)

    async def record_working_set(self, key: RunKey, activity: str, working_set: str, count: int) -> None:
        await self.database.run(self.runs.record_working_set, key, self.lease, activity, working_set, count)

    async def record_ack(self, key: RunKey, activity: str, ack: Ack) -> None:
        await self.database.run(self.runs.record_ack, key, self.lease, activity, ack)

    async def finish_task(self, key: RunKey, activity: str) -> None:
        await self.database.run(self.runs.finish_task, key, self.lease, activity)

    async def fail_run(self, key: RunKey, activity: str | None, message: str) -> None:
        await self.database.run(self.runs.fail_run, key, self.lease, activity, message)

    async def succeed_run(self, key: RunKey) -> None:
        await self.database.run(self.runs.succeed_run, key, self.lease)


class Runner:
    """Polls for due runs and executes them, at most ``max_concurrent_runs`` at a time."""

    def __init__(
        self,
        *,
        database: Database,
        runs: RunStore,
        engine: Engine,
        lease: Lease,
        poll_interval_s: float,
        max_concurrent_runs: int,
    ) -> None:
        self.database = database
        self.runs = runs
        self.engine = engine
        self.lease = lease
        self.poll_interval_s = poll_interval_s
        self.max_concurrent_runs = max_concurrent_runs
        self._loop: asyncio.Task[None] | None = None
        self._executing: dict[RunKey, asyncio.Task[None]] = {}

    @property
    def executing(self) -> list[RunKey]:
        """The runs this replica is executing now."""
        return list(self._executing)

    async def start(self) -> None:
        """Start polling (idempotent)."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._poll_forever(), name="scheduler-runner")
            log.info("runner started", replica=self.lease.owner, poll_interval_s=self.poll_interval_s)

    async def stop(self) -> None:
        """Stop polling, cancel the executions and release their leases."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        interrupted = list(self._executing.items())
        for _, task in interrupted:
            task.cancel()
        for key, task in interrupted:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self.database.run(self.runs.release_lease, key, self.lease)
        if interrupted:
            log.info("runner stopped", released=[key.name for key, _ in interrupted])

    async def poll_once(self) -> list[RunKey]:
        """Claim what is due (within the concurrency limit) and start executing it; return the claimed runs."""
        room = self.max_concurrent_runs - len(self._executing)
        if room <= 0:
            return []
        claimed = await self.database.run(self.runs.claim_due_runs, self.lease, room)
        for item in claimed:
            key = item.run.key
            self._executing[key] = asyncio.create_task(self._execute(item), name=f"run {key.name}")
        return [item.run.key for item in claimed]

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as exc:
                log.warning("claiming due runs failed", error=repr(exc))
            await asyncio.sleep(self.poll_interval_s)

    async def _execute(self, claimed: ClaimedRun) -> None:
        key = claimed.run.key
        with structlog.contextvars.bound_contextvars(
            sandbox=key.sandbox, campaign=key.campaign_name, run=key.name, replica=self.lease.owner
        ):
            log.info("run claimed", resumed=any(t.state != TaskState.PENDING for t in claimed.run.tasks))
            execution = asyncio.current_task()
            heartbeat = asyncio.create_task(self._heartbeat(key, execution))
            try:
                await self.engine.execute(claimed)
            except LeaseLost:
                log.warning("lease lost; another replica resumes the run")
            except DBAPIError as exc:
                if isinstance(exc, OperationalError) or exc.connection_invalidated:
                    log.warning("database unavailable; the run resumes when its lease expires", error=repr(exc))
                else:
                    await self._fail_unexpectedly(key, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._fail_unexpectedly(key, exc)
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
                self._executing.pop(key, None)

    async def _fail_unexpectedly(self, key: RunKey, exc: Exception) -> None:
        log.exception("run failed unexpectedly", error=repr(exc))
        with contextlib.suppress(Exception):
            await self.database.run(
                self.runs.fail_run, key, self.lease, None, f"internal error in the scheduler ({type(exc).__name__})"
            )

    async def _heartbeat(self, key: RunKey, execution: asyncio.Task[object] | None) -> None:
        interval = max(self.lease.duration_s / 3, 0.01)
        while True:
            await asyncio.sleep(interval)
            try:
                owned = await self.database.run(self.runs.renew_lease, key, self.lease)
            except Exception as exc:
                log.warning("renewing the lease failed", error=repr(exc))
                continue
            if not owned:
                log.warning("lease lost; abandoning the run")
                if execution is not None:
                    execution.cancel()
                return
