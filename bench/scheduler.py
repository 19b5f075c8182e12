"""Benchmark of scheduler_svc: recurring launches at scale, and the engine's own overhead.

Not a test: it prints timings and ratios measured in the same run.

    .venv/bin/python bench/scheduler.py [--campaigns 1000] [--database-url postgresql+psycopg://...]

(a) **1,000 recurring campaigns due in the same minute.** Each campaign (build audience → email)
    has a daily schedule and is published; its first run is then cancelled and its next launch time
    set to now, which is the state of 1,000 recurring campaigns whose launch time has just come. A
    real :class:`~scheduler_svc.runner.Runner` (the one the server runs) then creates each launch
    time's run (one run per campaign and launch time) and claims it with a lease; its engine only
    records that the run started and succeeds it (no peers). Reported: the time from the first poll
    until every run has started, for two concurrency limits, and the ratio to a baseline measured
    in the same run on the same database: the same number of bare single-row UPDATE transactions
    (the least write work a claim can cost).
(b) **Engine overhead on a 20-activity canvas** (10 build_audience → email pairs; each working set
    1,000 rows, sent in batches of 100). The fake audience spends a fixed 2 ms per build and the
    fake delivery worker 1 ms per batch: that is the activities' own work, whose sum is known. The
    run is executed with an in-memory journal (the engine alone) and with the real run store on the
    database (engine + progress writes: a checkpoint per batch); overhead = wall time - own work.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Sequence
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carillon.audience.v1 import query_pb2  # noqa: E402
from carillon_chassis.database import Database, utcnow  # noqa: E402
from carillon_chassis.values import to_value  # noqa: E402
from scheduler_svc.campaigns import CampaignStore  # noqa: E402
from scheduler_svc.engine import Engine, EngineOptions  # noqa: E402
from scheduler_svc.gateways import Batch, Row, SendHeader, WorkingSetInfo  # noqa: E402
from scheduler_svc.model import (  # noqa: E402
    Ack,
    Activity,
    BuildAudience,
    Canvas,
    ChannelSend,
    ClaimedRun,
    Daily,
    LocalTime,
    Run,
    RunKey,
    RunState,
    Schedule,
    Task,
    TaskState,
    Transition,
)
from scheduler_svc.runner import Runner, StoreJournal  # noqa: E402
from scheduler_svc.runs import Lease, RunStore  # noqa: E402
from scheduler_svc.tables import CAMPAIGNS, MIGRATIONS, RUNS  # noqa: E402
from scheduler_svc.validation import topological_order  # noqa: E402

BUILD_S = 0.002
BATCH_S = 0.001
# Measured time the fakes spent on their own work (asyncio.sleep overshoots its argument a little).
OWN_WORK = {"s": 0.0}


async def work(seconds: float) -> None:
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    OWN_WORK["s"] += time.perf_counter() - start


# -- (a) recurring launches -------------------------------------------------------------------
class StartOnlyEngine:
    """An engine that records when each run started and succeeds it at once (no peers)."""

    def __init__(self, journal: StoreJournal) -> None:
        self.journal = journal
        self.started: dict[RunKey, float] = {}

    async def execute(self, claimed: ClaimedRun) -> RunState:
        self.started[claimed.run.key] = time.perf_counter()
        await self.journal.succeed_run(claimed.run.key)
        return RunState.SUCCEEDED


def two_step(schedule: Schedule) -> Canvas:
    return Canvas(
        activities=[
            Activity("audience", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/customers"))),
            Activity("email", kind=ChannelSend("email", "marketing", "templates/offer", 100, [])),
        ],
        transitions=[Transition("audience", "email")],
        schedule=schedule,
    )


def prepare_due_campaigns(database: Database, count: int) -> CampaignStore:
    """``count`` published daily campaigns whose next launch time is now (and no pending run)."""
    campaigns = CampaignStore(database)
    now = utcnow()
    schedule = Schedule(time_zone="Europe/Stockholm", recurrence=Daily(times=[LocalTime(9, 0)]))
    for i in range(count):
        campaigns.create("bench", f"c{i:05d}", "", two_step(schedule))
        campaigns.publish("bench", f"c{i:05d}", now=now)
    with database.engine.begin() as conn:
        conn.execute(RUNS.update().values(state=RunState.CANCELLED.value, slot_time=None))
        conn.execute(CAMPAIGNS.update().values(next_run_time=now - timedelta(seconds=1)))
    return campaigns


def baseline_updates(database: Database, count: int) -> float:
    """Seconds for ``count`` single-row UPDATE transactions on the runs table."""
    with database.engine.connect() as conn:
        keys = [tuple(r) for r in conn.execute(sa.select(RUNS.c.campaign_id, RUNS.c.run_id).limit(count))]
    start = time.perf_counter()
    for campaign_id, run_id in keys:
        with database.engine.begin() as conn:
            conn.execute(
                RUNS.update()
                .where(RUNS.c.sandbox == "bench", RUNS.c.campaign_id == campaign_id, RUNS.c.run_id == run_id)
                .values(error="")
            )
    return time.perf_counter() - start


async def time_until_all_started(database: Database, campaigns: CampaignStore, count: int, concurrency: int) -> float:
    runs = RunStore(database)
    lease = Lease("bench", 60)
    journal = StoreJournal(database, runs, lease)
    engine = StartOnlyEngine(journal)
    runner = Runner(
        database=database,
        runs=runs,
        engine=engine,  # type: ignore[arg-type]
        lease=lease,
        poll_interval_s=0.01,
        max_concurrent_runs=concurrency,
        campaigns=campaigns,
        misfire_grace_s=300,
    )
    start = time.perf_counter()
    while len(engine.started) < count:
        await runner.poll_once()
        await asyncio.sleep(0.001)
    elapsed = max(engine.started.values()) - start
    while runner.executing:
        await asyncio.sleep(0.001)
    return elapsed


def fresh_database(url: str | None, directory: Path, name: str) -> Database:
    if url:
        database = Database(url, schema=f"bench_sched_{name}_{int(time.time())}", threads=8)
    else:
        database = Database(f"sqlite:///{directory / f'{name}.db'}", threads=8)
    database.migrate(MIGRATIONS)
    return database


def drop(database: Database) -> None:
    if database.is_postgres and database.schema:
        with database.engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{database.schema}" CASCADE'))
    database.close()


async def bench_launches(url: str | None, directory: Path, count: int) -> None:
    print(f"(a) {count} recurring campaigns due in the same minute ({'PostgreSQL' if url else 'SQLite'})")
    for concurrency in (4, 64):
        database = fresh_database(url, directory, f"launch{concurrency}")
        try:
            campaigns = prepare_due_campaigns(database, count)
            elapsed = await time_until_all_started(database, campaigns, count, concurrency)
            with database.engine.connect() as conn:
                created = conn.execute(
                    sa.select(sa.func.count()).select_from(RUNS).where(RUNS.c.slot_time.is_not(None))
                ).scalar_one()
            baseline = baseline_updates(database, count)
        finally:
            drop(database)
        print(
            f"    max_concurrent_runs={concurrency:3d}: all {count} runs started after {elapsed:.2f} s "
            f"({count / elapsed:.0f} runs/s; {created} runs created, one per campaign); "
            f"baseline {count} bare UPDATE transactions {baseline:.2f} s; ratio {elapsed / baseline:.1f}x"
        )


# -- (b) engine overhead ----------------------------------------------------------------------
class TimedAudience:
    """Working sets of ``size`` rows; each build takes BUILD_S (its own work)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows = [
            Row(position=n, entity_key=f"k{n}", identity=("email", f"p{n}@example.com"), values={"t": to_value("x")})
            for n in range(1, size + 1)
        ]

    async def build_working_set(
        self, sandbox: str, run: str, activity: str, query: query_pb2.AudienceQuery
    ) -> WorkingSetInfo:
        await work(BUILD_S)
        return WorkingSetInfo(f"workingSets/{activity}", self.size)

    async def stream_working_set(
        self, sandbox: str, working_set: str, after_position: int, batch_size: int, attributes: Sequence[str]
    ) -> AsyncGenerator[list[Row], None]:
        rows = [r for r in self.rows if r.position > after_position]
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]


class TimedStream:
    """A send stream whose worker takes BATCH_S per batch (its own work) and acknowledges it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Ack | None] = asyncio.Queue()

    async def write(self, batch: Batch) -> None:
        await work(BATCH_S)
        await self.queue.put(Ack(sequence=batch.sequence, sent=len(batch.rows)))

    async def done_writing(self) -> None:
        await self.queue.put(None)

    async def read(self) -> Ack | None:
        return await self.queue.get()

    def cancel(self) -> None:
        pass


class TimedDelivery:
    async def open(self, sandbox: str, header: SendHeader) -> TimedStream:
        return TimedStream()


class MemoryJournal:
    """The engine's journal in memory: the engine alone, without database writes."""

    def __init__(self, run: Run) -> None:
        self.tasks = {t.activity: t for t in run.tasks}

    async def start_task(self, key: RunKey, activity: str, targeted: int | None = None) -> None:
        self.tasks[activity].state = TaskState.RUNNING

    async def record_working_set(self, key: RunKey, activity: str, working_set: str, count: int) -> None:
        task = self.tasks[activity]
        task.state, task.working_set, task.targeted, task.outputs = TaskState.SUCCEEDED, working_set, count, {"": count}

    async def record_ack(self, key: RunKey, activity: str, ack: Ack, after: int = 0) -> None:
        self.tasks[activity].checkpoint = ack.sequence

    async def deferred_batches(self, key: RunKey, activity: str) -> list[object]:
        return []  # no send windows in this canvas

    async def finish_task(self, key: RunKey, activity: str, note: str = "", outputs: object = None) -> None:
        self.tasks[activity].state = TaskState.SUCCEEDED

    async def skip_task(self, key: RunKey, activity: str, reason: str) -> None:
        self.tasks[activity].state = TaskState.SKIPPED

    async def wait_task(self, key: RunKey, activity: str, wake: object) -> None:
        raise AssertionError("no waits in this canvas")

    async def suspend_run(self, key: RunKey, wake: object) -> None:
        raise AssertionError("no waits in this canvas")

    async def fail_task(self, key: RunKey, activity: str, message: str) -> None:
        raise AssertionError(message)

    async def signal_campaign(self, key: RunKey, activity: str, campaign_id: str, parameters: object) -> str:
        raise AssertionError("no signals in this canvas")

    async def suspend_failed_run(self, key: RunKey, activity: str, message: str) -> None:
        raise AssertionError(message)

    async def fail_run(self, key: RunKey, activity: str | None, message: str) -> None:
        raise AssertionError(message)

    async def succeed_run(self, key: RunKey) -> None:
        pass


def twenty_activities() -> Canvas:
    activities: list[Activity] = []
    transitions: list[Transition] = []
    for i in range(10):
        activities.append(Activity(f"b{i}", kind=BuildAudience(query_pb2.AudienceQuery(dimension="entities/c"))))
        activities.append(Activity(f"e{i}", kind=ChannelSend("email", "marketing", "templates/t", 100, [])))
        transitions.append(Transition(f"b{i}", f"e{i}"))
    return Canvas(activities=activities, transitions=transitions)


async def bench_engine(url: str | None, directory: Path, repeats: int) -> None:
    canvas = twenty_activities()
    size = 1000
    own = 10 * BUILD_S + 10 * (size // 100) * BATCH_S
    options = EngineOptions(max_unacked_batches=4, default_batch_size=100)
    print(
        f"(b) engine overhead, 20-activity canvas, nominal own work {own * 1000:.0f} ms per run ({repeats} runs each)"
    )

    memory: list[tuple[float, float]] = []
    for _ in range(repeats):
        now = utcnow()
        run = Run(RunKey("bench", "c", "r"), RunState.RUNNING, now, now, [Task(a) for a in topological_order(canvas)])
        engine = Engine(TimedAudience(size), {"email": TimedDelivery()}, MemoryJournal(run), options)
        OWN_WORK["s"] = 0.0
        start = time.perf_counter()
        assert await engine.execute(ClaimedRun(run, canvas)) == RunState.SUCCEEDED
        memory.append((time.perf_counter() - start, OWN_WORK["s"]))

    database = fresh_database(url, directory, "engine")
    stored: list[tuple[float, float]] = []
    try:
        campaigns, runs = CampaignStore(database), RunStore(database)
        lease = Lease("bench", 60)
        for i in range(repeats):
            campaigns.create("bench", f"e{i}", "", canvas)
            campaigns.publish("bench", f"e{i}")
            (claimed,) = runs.claim_due_runs(lease, 1)
            engine = Engine(
                TimedAudience(size), {"email": TimedDelivery()}, StoreJournal(database, runs, lease), options
            )
            OWN_WORK["s"] = 0.0
            start = time.perf_counter()
            assert await engine.execute(claimed) == RunState.SUCCEEDED
            stored.append((time.perf_counter() - start, OWN_WORK["s"]))
    finally:
        drop(database)

    for label, times in (("engine alone (in-memory journal)", memory), ("engine + run store (checkpoints)", stored)):
        best_total, best_own = min(times)
        overhead = best_total - best_own
        print(
            f"    {label}: {best_total * 1000:.0f} ms per run (best of {repeats}), of which the activities' own "
            f"work {best_own * 1000:.0f} ms; overhead {overhead * 1000:.0f} ms = {overhead / 20 * 1000:.2f} ms "
            f"per activity; ratio wall / own work {best_total / best_own:.2f}x"
        )


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--campaigns", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--database-url", help="a postgresql+psycopg:// URL (default: a temporary SQLite file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        await bench_launches(args.database_url, Path(directory), args.campaigns)
        await bench_engine(args.database_url, Path(directory), args.repeats)


if __name__ == "__main__":
    asyncio.run(main())
