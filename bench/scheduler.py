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
(b) **Engine overhead on a 20-activity chain.** The activities run one after another (build →
    split → wait → email → deduplicate → test → fork → email → save → ... → email → end; each
    working set 1,000 rows, sent in batches of 100), so the wall time is the sum of their own work
    plus what the engine adds. The fake audience spends a fixed 2 ms per build and 1 ms per other
    targeting call, the fake delivery worker 1 ms per batch: that is the activities' own work,
    measured as it happens. The run is executed with an in-memory journal (the engine alone) and
    with the real run store on the database (engine + progress writes: a checkpoint per batch);
    overhead = wall time - own work, reported per activity. The fakes share the engine's event
    loop, so their sleeps end late while the engine (or the store's threads) keep it busy, which
    swells the own work they measure; the overhead is therefore also given against the same sleeps
    timed on an idle loop (what a peer in another process would take).
(b') **Parallel speedup on a 20-activity forked canvas** (build → fork → 9 branches of
    deduplicate → email, run concurrently by the engine): the sum of the activities' own work over
    the wall time, next to the ideal (the sum of own work over its critical path).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carillon.audience.v1 import query_pb2, working_set_pb2  # noqa: E402
from carillon.type.v1 import value_pb2  # noqa: E402
from carillon_chassis.database import Database, utcnow  # noqa: E402
from carillon_chassis.logging import configure_logging  # noqa: E402
from carillon_chassis.values import to_value  # noqa: E402
from scheduler_svc.campaigns import CampaignStore  # noqa: E402
from scheduler_svc.engine import Engine, EngineOptions, RunJournal  # noqa: E402
from scheduler_svc.gateways import Batch, Reconciled, Row, SendHeader, StreamEnrichment, WorkingSetInfo  # noqa: E402
from scheduler_svc.model import (  # noqa: E402
    Ack,
    Activity,
    ActivityKind,
    Branch,
    BranchTest,
    BuildAudience,
    Canvas,
    ChannelSend,
    ClaimedRun,
    Condition,
    Daily,
    Deduplicate,
    DeferredBatch,
    End,
    Fork,
    LocalTime,
    Run,
    RunKey,
    RunState,
    SaveAudience,
    Schedule,
    Split,
    SplitSubset,
    Task,
    Transition,
    Wait,
)
from scheduler_svc.runner import Runner, StoreJournal  # noqa: E402
from scheduler_svc.runs import Lease, RunStore  # noqa: E402
from scheduler_svc.tables import CAMPAIGNS, MIGRATIONS, RUNS  # noqa: E402
from scheduler_svc.validation import topological_order  # noqa: E402

BUILD_S = 0.002
TARGET_S = 0.001
BATCH_S = 0.001
# Measured time the fakes spent on each activity's own work (asyncio.sleep overshoots its argument a little),
# and the durations they asked for.
OWN_WORK: dict[str, float] = {}
ASKED: dict[str, list[float]] = {}


async def work(seconds: float, activity: str) -> None:
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    OWN_WORK[activity] = OWN_WORK.get(activity, 0.0) + time.perf_counter() - start
    ASKED.setdefault(activity, []).append(seconds)


async def idle_sleeps(samples: int = 100) -> dict[float, float]:
    """What each fake's ``asyncio.sleep`` takes on an otherwise idle event loop (the median of ``samples``)."""
    idle: dict[float, float] = {}
    for seconds in sorted({BUILD_S, TARGET_S, BATCH_S}):
        taken = []
        for _ in range(samples):
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            taken.append(time.perf_counter() - start)
        idle[seconds] = statistics.median(taken)
    return idle


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
def work_key(activity: str) -> str:
    """The activity a working set's activity id belongs to (a named output's is ``{activity}--{output}``)."""
    return activity.split("--", 1)[0]


class TimedAudience:
    """Working sets of ``size`` rows; a build takes BUILD_S and every other targeting call TARGET_S (own work)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows = [
            Row(position=n, entity_key=f"k{n}", identity=("email", f"p{n}@example.com"), values={"t": to_value("x")})
            for n in range(1, size + 1)
        ]

    def _info(self, activity: str) -> WorkingSetInfo:
        return WorkingSetInfo(f"workingSets/{activity}", self.size)

    async def build_working_set(
        self,
        sandbox: str,
        run: str,
        activity: str,
        query: query_pb2.AudienceQuery,
        incremental: working_set_pb2.Incremental | None = None,
    ) -> WorkingSetInfo:
        await work(BUILD_S, activity)
        return self._info(activity)

    async def reconcile(
        self,
        sandbox: str,
        run: str,
        activity: str,
        working_set: str,
        target: str,
        pairs: Sequence[tuple[str, str]],
        unreconciled_activity: str,
    ) -> Reconciled:
        raise AssertionError("no reconciliation in these canvases")

    async def stream_working_set(
        self,
        sandbox: str,
        working_set: str,
        after_position: int,
        batch_size: int,
        attributes: Sequence[str],
        enrichment: StreamEnrichment | None = None,
    ) -> AsyncGenerator[Sequence[Row], None]:
        rows = [r for r in self.rows if r.position > after_position]
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]

    async def read_audience(self, sandbox: str, run: str, activity: str, audience: str) -> WorkingSetInfo:
        raise AssertionError("no read_audience in these canvases")

    async def combine(
        self, sandbox: str, run: str, activity: str, primary: str, others: Sequence[str], operation: str
    ) -> WorkingSetInfo:
        raise AssertionError("no combine in these canvases")

    async def change_dimension(
        self, sandbox: str, run: str, activity: str, working_set: str, link: str
    ) -> tuple[WorkingSetInfo, int]:
        raise AssertionError("no change_dimension in these canvases")

    async def split(
        self,
        sandbox: str,
        run: str,
        working_set: str,
        subsets: Sequence[tuple[str, SplitSubset]],
        complement_activity: str,
        overlap: bool,
    ) -> tuple[list[WorkingSetInfo], WorkingSetInfo | None]:
        await work(TARGET_S, work_key(subsets[0][0]))
        return [self._info(activity) for activity, _ in subsets], None

    async def deduplicate(
        self, sandbox: str, run: str, activity: str, working_set: str, rule: Deduplicate, removed_activity: str
    ) -> tuple[WorkingSetInfo, WorkingSetInfo | None]:
        await work(TARGET_S, activity)
        return self._info(activity), None

    async def save_audience(self, sandbox: str, audience_id: str, working_set: str, display_name: str) -> bool:
        await work(TARGET_S, audience_id)  # the bench names each saved audience after its activity
        return True


class TimedStream:
    """A send stream whose worker takes BATCH_S per batch (its own work) and acknowledges it."""

    def __init__(self, activity: str) -> None:
        self.activity = activity
        self.queue: asyncio.Queue[Ack | None] = asyncio.Queue()

    async def write(self, batch: Batch) -> None:
        await work(BATCH_S, self.activity)
        await self.queue.put(Ack(sequence=batch.sequence, sent=len(batch.rows)))

    async def done_writing(self) -> None:
        await self.queue.put(None)

    async def read(self) -> Ack | None:
        return await self.queue.get()

    def cancel(self) -> None:
        pass


class TimedDelivery:
    async def open(self, sandbox: str, header: SendHeader) -> TimedStream:
        return TimedStream(header.activity)


class MemoryJournal:
    """The engine's journal in memory: the engine alone, without database writes (the engine keeps
    the task states itself)."""

    async def start_task(self, key: RunKey, activity: str, targeted: int | None = None) -> None:
        pass

    async def record_working_set(self, key: RunKey, activity: str, working_set: str, count: int) -> None:
        pass

    async def record_outputs(
        self, key: RunKey, activity: str, outputs: Mapping[str, tuple[str, int]], note: str = ""
    ) -> None:
        pass

    async def record_ack(self, key: RunKey, activity: str, ack: Ack, after: int = 0) -> None:
        pass

    async def deferred_batches(self, key: RunKey, activity: str) -> list[DeferredBatch]:
        return []  # no send windows in these canvases

    async def await_confirmation(self, key: RunKey, activity: str, deadline: datetime) -> None:
        raise AssertionError("no confirmations in these canvases")

    async def skip_recipients(self, key: RunKey, activity: str, reason: str, count: int) -> None:
        raise AssertionError("no skipped recipients in these canvases")

    async def record_replay(self, key: RunKey, activity: str, ack: Ack) -> None:
        raise AssertionError("no replays in these canvases")

    async def exclude_deferred(self, key: RunKey, activity: str, reason: str) -> int:
        raise AssertionError("no deferred recipients in these canvases")

    async def finish_task(
        self, key: RunKey, activity: str, note: str = "", outputs: Mapping[str, int] | None = None
    ) -> None:
        pass

    async def skip_task(self, key: RunKey, activity: str, reason: str) -> None:
        pass

    async def wait_task(self, key: RunKey, activity: str, wake: datetime) -> None:
        raise AssertionError("no pending waits in these canvases")

    async def suspend_run(self, key: RunKey, wake: datetime) -> None:
        raise AssertionError("no pending waits in these canvases")

    async def fail_task(self, key: RunKey, activity: str, message: str) -> None:
        raise AssertionError(message)

    async def signal_campaign(
        self, key: RunKey, activity: str, campaign_id: str, parameters: Mapping[str, value_pb2.Value]
    ) -> str:
        raise AssertionError("no signals in these canvases")

    async def suspend_failed_run(self, key: RunKey, activity: str, message: str) -> None:
        raise AssertionError(message)

    async def fail_run(self, key: RunKey, activity: str | None, message: str) -> None:
        raise AssertionError(message)

    async def succeed_run(self, key: RunKey) -> None:
        pass


# The kinds of the bench's canvases (audience and delivery faked by the classes above).
PAST = datetime(2000, 1, 1, tzinfo=UTC)


def build() -> BuildAudience:
    return BuildAudience(query_pb2.AudienceQuery(dimension="entities/c"))


def split() -> Split:
    return Split(subsets=[SplitSubset(output="a")])


def dedup() -> Deduplicate:
    return Deduplicate(fields=["email"], method="random")


def email() -> ChannelSend:
    return ChannelSend("email", "marketing", "templates/t", 100, [])


def chain_canvas() -> Canvas:
    """20 activities that run one after another: each starts when the previous one finished. A test's
    default output (never taken) ends in an end activity, which is skipped; the others lie on the chain."""
    steps: list[tuple[str, ActivityKind, str]] = [  # (activity, kind, output of the previous one taken)
        ("b", build(), ""),
        ("s1", split(), ""),
        ("w1", Wait(until=PAST), "a"),
        ("m1", email(), ""),
        ("d1", dedup(), ""),
        ("t1", BranchTest(branches=[Branch("go", Condition(">=", "1"))], default_output="none"), ""),
        ("f1", Fork(), "go"),
        ("m2", email(), ""),
        ("sv1", SaveAudience(audience_id="sv1"), ""),
        ("w2", Wait(until=PAST), ""),
        ("m3", email(), ""),
        ("s2", split(), ""),
        ("d2", dedup(), "a"),
        ("m4", email(), ""),
        ("w3", Wait(until=PAST), ""),
        ("d3", dedup(), ""),
        ("f2", Fork(), ""),
        ("m5", email(), ""),
        ("e", End(), ""),
    ]
    activities = [Activity(a, kind=kind) for a, kind, _ in steps] + [Activity("x1", kind=End())]
    transitions = [Transition(steps[i - 1][0], a, output) for i, (a, _, output) in enumerate(steps) if i]
    transitions.append(Transition("t1", "x1", "none"))
    return Canvas(activities=activities, transitions=transitions)


def forked_canvas() -> Canvas:
    """20 activities: a build, a fork, then 9 branches (deduplicate -> email) that run at the same time."""
    activities = [Activity("b", kind=build()), Activity("f", kind=Fork())]
    transitions = [Transition("b", "f")]
    for i in range(9):
        activities += [Activity(f"d{i}", kind=dedup()), Activity(f"m{i}", kind=email())]
        transitions += [Transition("f", f"d{i}"), Transition(f"d{i}", f"m{i}")]
    return Canvas(activities=activities, transitions=transitions)


def critical_path(canvas: Canvas, own: Mapping[str, float]) -> float:
    """The longest chain of the activities' own work (the shortest wall time any scheduling allows)."""
    finish: dict[str, float] = {}
    for activity in topological_order(canvas):
        before = [finish[t.source] for t in canvas.transitions if t.target == activity]
        finish[activity] = max(before, default=0.0) + own.get(activity, 0.0)
    return max(finish.values())


@dataclass(frozen=True)
class Measure:
    """One run of a canvas: its wall time and each activity's own work, as measured in the fakes and as the
    same sleeps take on an idle event loop."""

    wall: float
    own: dict[str, float]
    idle: dict[str, float]

    @property
    def work(self) -> float:
        return sum(self.own.values())

    @property
    def idle_work(self) -> float:
        return sum(self.idle.values())

    @property
    def overhead(self) -> float:
        return self.wall - self.work

    @property
    def idle_overhead(self) -> float:
        return self.wall - self.idle_work


async def timed(engine: Engine, claimed: ClaimedRun, idle: Mapping[float, float]) -> Measure:
    OWN_WORK.clear()
    ASKED.clear()
    start = time.perf_counter()
    assert await engine.execute(claimed) == RunState.SUCCEEDED
    wall = time.perf_counter() - start
    return Measure(wall, dict(OWN_WORK), {a: sum(idle[s] for s in asked) for a, asked in ASKED.items()})


def engine_for(journal: RunJournal, size: int) -> Engine:
    options = EngineOptions(max_unacked_batches=4, default_batch_size=100)
    return Engine(TimedAudience(size), {"email": TimedDelivery()}, journal, options)


async def measure(
    url: str | None, directory: Path, canvas: Canvas, name: str, repeats: int, size: int, idle: Mapping[float, float]
) -> dict[str, list[Measure]]:
    """``repeats`` runs of ``canvas`` with the in-memory journal, then with the run store on the database."""
    memory: list[Measure] = []
    for _ in range(repeats):
        now = utcnow()
        run = Run(RunKey("bench", "c", "r"), RunState.RUNNING, now, now, [Task(a) for a in topological_order(canvas)])
        memory.append(await timed(engine_for(MemoryJournal(), size), ClaimedRun(run, canvas), idle))

    database = fresh_database(url, directory, name)
    stored: list[Measure] = []
    try:
        campaigns, runs = CampaignStore(database), RunStore(database)
        lease = Lease("bench", 60)
        for i in range(repeats):
            campaigns.create("bench", f"e{i}", "", canvas)
            campaigns.publish("bench", f"e{i}")
            (claimed,) = runs.claim_due_runs(lease, 1)
            stored.append(await timed(engine_for(StoreJournal(database, runs, lease), size), claimed, idle))
    finally:
        drop(database)
    backend = "PostgreSQL" if url else "SQLite"
    return {"engine alone (in-memory journal)": memory, f"engine + run store on {backend}": stored}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def bench_engine(url: str | None, directory: Path, repeats: int) -> None:
    size = 1000
    batches = size // 100
    idle = await idle_sleeps()
    chain = chain_canvas()
    count = len(chain.activities)
    nominal = BUILD_S + 6 * TARGET_S + 5 * batches * BATCH_S
    print(
        f"(b) engine overhead, {count}-activity chain (each activity starts when the previous one finished: "
        f"build, 2 splits, 3 deduplications, a test, 2 forks, a save, 3 waits already due, 5 emails of {batches} "
        f"batches, 2 ends); nominal own work {ms(nominal)} per run; on an idle event loop a "
        f"{BUILD_S * 1000:.0f} ms sleep takes {ms(idle[BUILD_S])}, a {BATCH_S * 1000:.0f} ms one {ms(idle[BATCH_S])}; "
        f"best (least overhead) and median of {repeats} runs"
    )
    for label, runs in (await measure(url, directory, chain, "chain", repeats, size, idle)).items():
        best = min(runs, key=lambda m: m.overhead)
        median = statistics.median(m.overhead for m in runs)
        best_idle = min(runs, key=lambda m: m.idle_overhead)
        median_idle = statistics.median(m.idle_overhead for m in runs)
        print(
            f"    {label}: wall {ms(best.wall)}, activities' own work measured in the fakes {ms(best.work)}; "
            f"overhead {ms(best.overhead)} = {ms(best.overhead / count)} per activity "
            f"(median {ms(median)} = {ms(median / count)} per activity)\n"
            f"        against the same work on an idle loop ({ms(best_idle.idle_work)}; the fakes' wake-ups are "
            f"late while the engine is busy): overhead {ms(best_idle.idle_overhead)} = "
            f"{ms(best_idle.idle_overhead / count)} per activity (median {ms(median_idle)} = "
            f"{ms(median_idle / count)} per activity)"
        )

    forked = forked_canvas()
    nominal_sum = BUILD_S + 9 * (TARGET_S + batches * BATCH_S)
    nominal_path = BUILD_S + TARGET_S + batches * BATCH_S
    print(
        f"(b') parallel speedup, {len(forked.activities)}-activity forked canvas (build -> fork -> 9 branches of "
        f"deduplicate -> email); nominal own work {ms(nominal_sum)}, its critical path {ms(nominal_path)} "
        f"(ideal speedup {nominal_sum / nominal_path:.1f}x); best (shortest wall) of {repeats} runs"
    )
    for label, runs in (await measure(url, directory, forked, "forked", repeats, size, idle)).items():
        best = min(runs, key=lambda m: m.wall)
        path = critical_path(forked, best.idle)
        print(
            f"    {label}: wall {ms(best.wall)} vs sum of the activities' own work {ms(best.work)} measured in "
            f"the fakes ({ms(best.idle_work)} on an idle loop): parallel speedup {best.work / best.wall:.1f}x "
            f"({best.idle_work / best.wall:.1f}x on idle-loop work; ideal {best.idle_work / path:.1f}x, the "
            f"critical path of idle-loop work being {ms(path)})"
        )


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--campaigns", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--database-url", help="a postgresql+psycopg:// URL (default: a temporary SQLite file)")
    args = parser.parse_args(argv)
    configure_logging("console", "warning")  # the engine's info lines would swamp the output (and the timings)
    with tempfile.TemporaryDirectory() as directory:
        await bench_launches(args.database_url, Path(directory), args.campaigns)
        await bench_engine(args.database_url, Path(directory), args.repeats)


if __name__ == "__main__":
    asyncio.run(main())
