"""The background runner: claims due runs with leases and executes them with the engine.

Every ``purge_interval_s`` it also deletes the campaigns archived longer ago than the retention
period, with their runs (:meth:`Lifecycle.purge_archived`).

Every ``poll_interval_s`` the runner first creates the runs of recurring campaigns whose launch time
has come (idempotent across replicas: one run per campaign and launch time), then claims up to
``max_concurrent_runs`` minus the runs it is executing (see :mod:`scheduler_svc.runs` for how claims
work on each backend) and executes each in its own task. Every claim comes with a fencing token
(:attr:`ClaimedRun.fencing_token`); the execution's writes, its heartbeat and the release on stop
carry that claim's lease (:meth:`Lease.of_claim`, set for the execution's tasks with
:func:`executing_claim`), so they fail once the run is claimed again, even by this replica (its
lease expired while its event loop stalled, say). While a run executes, a heartbeat renews its lease
every third of ``lease_s``; a progress write renews it too when a third of the lease has passed
since the last renewal. A replica that finds its lease taken (:class:`LeaseLost`) abandons the run at
once: the claim that took it resumes from the stored checkpoints. Should this replica claim again a
run it is still executing, it cancels the older execution.

``stop()`` (the server's stop hook) cancels the polling loop and every execution, then releases the
leases of the interrupted runs so that another replica, or this one after a restart, resumes them at
once instead of after the lease expires. A database that cannot be reached leaves the run to be
resumed after its lease expires; any other unexpected error fails the run, so a bug cannot make a
run loop forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime, timedelta

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError

from carillon.type.v1 import value_pb2
from carillon_chassis.database import Database
from carillon_chassis.errors import FailedPrecondition
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.engine import Engine
from scheduler_svc.lifecycle import Lifecycle
from scheduler_svc.model import Ack, ClaimedRun, DeferredBatch, LeaseLost, RunKey, TaskState
from scheduler_svc.runs import Lease, RunStore

log = structlog.get_logger("carillon.scheduler.runner")

# Recurring campaigns handled per create_due_runs call; the runner repeats while a batch is full.
SPAWN_BATCH = 500

# The run the current task executes and the lease of its claim (inherited by the tasks it starts).
_CLAIM: ContextVar[tuple[RunKey, Lease] | None] = ContextVar("scheduler_claim", default=None)


@contextlib.contextmanager
def executing_claim(key: RunKey, lease: Lease) -> Iterator[None]:
    """Within this block (and the tasks started in it), :class:`StoreJournal` writes to ``key`` with ``lease``."""
    reset = _CLAIM.set((key, lease))
    try:
        yield
    finally:
        _CLAIM.reset(reset)


class StoreJournal:
    """The engine's RunJournal over the run store.

    Each write carries the lease of the claim being executed (see :func:`executing_claim`); outside an
    execution (tools and tests driving an engine directly) it carries this replica's token-less lease.
    """

    def __init__(self, database: Database, runs: RunStore, lease: Lease, lifecycle: Lifecycle | None = None) -> None:
        self.database = database
        self.runs = runs
        self.lease = lease
        self.lifecycle = lifecycle

    def lease_of(self, key: RunKey) -> Lease:
        """The lease the current execution writes to ``key`` with."""
        claim = _CLAIM.get()
        return claim[1] if claim is not None and claim[0] == key else self.lease

    async def signal_campaign(
        self, key: RunKey, activity: str, campaign_id: str, parameters: Mapping[str, value_pb2.Value]
    ) -> str:
        if self.lifecycle is None:
            raise FailedPrecondition("this scheduler cannot signal campaigns", reason="SIGNALS_UNAVAILABLE")
        # The request id makes the signal happen once, however often the activity is resumed.
        signalled = await self.database.run(
            self.lifecycle.signal, key.sandbox, campaign_id, parameters, f"{key.name}/{activity}"
        )
        return signalled.name

    async def start_task(self, key: RunKey, activity: str, targeted: int | None = None) -> None:
        await self.database.run(self.runs.start_task, key, self.lease_of(key), activity, targeted)

    async def record_working_set(self, key: RunKey, activity: str, working_set: str, count: int) -> None:
        await self.database.run(self.runs.record_working_set, key, self.lease_of(key), activity, working_set, count)

    async def record_outputs(
        self, key: RunKey, activity: str, outputs: Mapping[str, tuple[str, int]], note: str = ""
    ) -> None:
        await self.database.run(self.runs.record_outputs, key, self.lease_of(key), activity, outputs, note)

    async def record_ack(self, key: RunKey, activity: str, ack: Ack, after: int = 0) -> None:
        await self.database.run(self.runs.record_ack, key, self.lease_of(key), activity, ack, after)

    async def await_confirmation(self, key: RunKey, activity: str, deadline: datetime) -> None:
        await self.database.run(self.runs.await_confirmation, key, self.lease_of(key), activity, deadline)

    async def skip_recipients(self, key: RunKey, activity: str, reason: str, count: int) -> None:
        await self.database.run(self.runs.skip_recipients, key, self.lease_of(key), activity, reason, count)

    async def deferred_batches(self, key: RunKey, activity: str) -> list[DeferredBatch]:
        return await self.database.run(self.runs.deferred_batches, key, activity)

    async def record_replay(self, key: RunKey, activity: str, ack: Ack) -> None:
        await self.database.run(self.runs.record_replay, key, self.lease_of(key), activity, ack)

    async def exclude_deferred(self, key: RunKey, activity: str, reason: str) -> int:
        return await self.database.run(self.runs.exclude_deferred, key, self.lease_of(key), activity, reason)

    async def finish_task(
        self, key: RunKey, activity: str, note: str = "", outputs: Mapping[str, int] | None = None
    ) -> None:
        await self.database.run(self.runs.finish_task, key, self.lease_of(key), activity, note, outputs)

    async def skip_task(self, key: RunKey, activity: str, reason: str) -> None:
        await self.database.run(self.runs.skip_task, key, self.lease_of(key), activity, reason)

    async def wait_task(self, key: RunKey, activity: str, wake: datetime) -> None:
        await self.database.run(self.runs.wait_task, key, self.lease_of(key), activity, wake)

    async def suspend_run(self, key: RunKey, wake: datetime) -> None:
        await self.database.run(self.runs.suspend_run, key, self.lease_of(key), wake)

    async def fail_task(self, key: RunKey, activity: str, message: str) -> None:
        await self.database.run(self.runs.fail_task, key, self.lease_of(key), activity, message)

    async def suspend_failed_run(self, key: RunKey, activity: str, message: str) -> None:
        await self.database.run(self.runs.suspend_failed_run, key, self.lease_of(key), activity, message)

    async def fail_run(self, key: RunKey, activity: str | None, message: str) -> None:
        await self.database.run(self.runs.fail_run, key, self.lease_of(key), activity, message)

    async def succeed_run(self, key: RunKey) -> None:
        await self.database.run(self.runs.succeed_run, key, self.lease_of(key))


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
        campaigns: CampaignStore | None = None,
        misfire_grace_s: float = 300.0,
        lifecycle: Lifecycle | None = None,
        archived_retention: timedelta | None = None,
        purge_interval_s: float = 3600.0,
    ) -> None:
        self.lifecycle = lifecycle
        self.archived_retention = archived_retention
        self.purge_interval_s = purge_interval_s
        self._purge_loop: asyncio.Task[None] | None = None
        self.campaigns = campaigns
        self.misfire_grace_s = misfire_grace_s
        self.database = database
        self.runs = runs
        self.engine = engine
        self.lease = lease
        self.poll_interval_s = poll_interval_s
        self.max_concurrent_runs = max_concurrent_runs
        self._loop: asyncio.Task[None] | None = None
        # The runs executing, with their tasks and the leases of their claims.
        self._executing: dict[RunKey, tuple[asyncio.Task[None], Lease]] = {}

    @property
    def executing(self) -> list[RunKey]:
        """The runs this replica is executing now."""
        return list(self._executing)

    async def start(self) -> None:
        """Start polling (idempotent)."""
        if self._loop is None:
            self._loop = asyncio.create_task(self._poll_forever(), name="scheduler-runner")
            log.info("runner started", replica=self.lease.owner, poll_interval_s=self.poll_interval_s)
        if self._purge_loop is None and self.lifecycle is not None and self.archived_retention is not None:
            self._purge_loop = asyncio.create_task(self._purge_forever(), name="scheduler-purge")

    async def stop(self) -> None:
        """Stop polling and purging, cancel the executions and release their leases."""
        if self._purge_loop is not None:
            self._purge_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge_loop
            self._purge_loop = None
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        interrupted = list(self._executing.items())
        for _, (task, _) in interrupted:
            task.cancel()
        for key, (task, lease) in interrupted:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self.database.run(self.runs.release_lease, key, lease)
        if interrupted:
            log.info("runner stopped", released=[key.name for key, _ in interrupted])

    async def purge_once(self) -> list[str]:
        """Delete the campaigns archived longer ago than the retention period, with their runs."""
        if self.lifecycle is None or self.archived_retention is None:
            return []
        purged: list[str] = []
        while True:
            batch = await self.database.run(self.lifecycle.purge_archived, self.archived_retention, SPAWN_BATCH)
            purged += batch
            if len(batch) < SPAWN_BATCH:
                break
        if purged:
            log.info("archived campaigns purged", campaigns=purged)
        return purged

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge_once()
            except Exception as exc:
                log.warning("purging archived campaigns failed", error=repr(exc))
            await asyncio.sleep(self.purge_interval_s)

    async def create_due_runs(self) -> list[RunKey]:
        """Create the runs of recurring campaigns whose launch time has come (see CampaignStore)."""
        created: list[RunKey] = []
        if self.campaigns is None:
            return created
        while True:
            batch = await self.database.run(self.campaigns.create_due_runs, self.misfire_grace_s, SPAWN_BATCH)
            created += batch
            if len(batch) < SPAWN_BATCH:
                return created

    async def poll_once(self) -> list[RunKey]:
        """Create due recurring runs, claim what is due (within the concurrency limit) and start executing it.

        Returns the claimed runs.
        """
        try:
            await self.create_due_runs()
        except Exception as exc:
            log.warning("creating the runs of recurring campaigns failed", error=repr(exc))
        room = self.max_concurrent_runs - len(self._executing)
        if room <= 0:
            return []
        claimed = await self.database.run(self.runs.claim_due_runs, self.lease, room)
        for item in claimed:
            key, lease = item.run.key, self.lease.of_claim(item)
            older = self._executing.get(key)
            if older is not None:
                # Its lease expired while it was still executing (a stalled event loop, say): its
                # writes fail with its stale fencing token; the new claim resumes from the checkpoints.
                log.warning(
                    "run claimed again; abandoning the older execution", run=key.name, fencing_token=lease.token
                )
                older[0].cancel()
            task = asyncio.create_task(self._execute(item, lease), name=f"run {key.name}")
            self._executing[key] = (task, lease)
        return [item.run.key for item in claimed]

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as exc:
                log.warning("claiming due runs failed", error=repr(exc))
            await asyncio.sleep(self.poll_interval_s)

    async def _execute(self, claimed: ClaimedRun, lease: Lease) -> None:
        key = claimed.run.key
        with (
            structlog.contextvars.bound_contextvars(
                sandbox=key.sandbox, campaign=key.campaign_name, run=key.name, replica=self.lease.owner
            ),
            executing_claim(key, lease),
        ):
            log.info(
                "run claimed",
                resumed=any(t.state != TaskState.PENDING for t in claimed.run.tasks),
                fencing_token=lease.token,
            )
            execution = asyncio.current_task()
            heartbeat = asyncio.create_task(self._heartbeat(key, lease, execution))
            try:
                await self.engine.execute(claimed)
            except LeaseLost:
                log.warning("lease lost; another replica resumes the run")
            except DBAPIError as exc:
                if isinstance(exc, OperationalError) or exc.connection_invalidated:
                    log.warning("database unavailable; the run resumes when its lease expires", error=repr(exc))
                else:
                    await self._fail_unexpectedly(key, lease, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._fail_unexpectedly(key, lease, exc)
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
                current = self._executing.get(key)
                if current is not None and current[0] is execution:
                    del self._executing[key]

    async def _fail_unexpectedly(self, key: RunKey, lease: Lease, exc: Exception) -> None:
        log.exception("run failed unexpectedly", error=repr(exc))
        with contextlib.suppress(Exception):
            await self.database.run(
                self.runs.fail_run, key, lease, None, f"internal error in the scheduler ({type(exc).__name__})"
            )

    async def _heartbeat(self, key: RunKey, lease: Lease, execution: asyncio.Task[object] | None) -> None:
        interval = max(lease.duration_s / 3, 0.01)
        while True:
            await asyncio.sleep(interval)
            try:
                owned = await self.database.run(self.runs.renew_lease, key, lease)
            except Exception as exc:
                log.warning("renewing the lease failed", error=repr(exc))
                continue
            if not owned:
                log.warning("lease lost; abandoning the run")
                if execution is not None:
                    execution.cancel()
                return
