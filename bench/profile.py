"""Benchmark of profile_stub's hot path on PostgreSQL: the three calls a delivery worker makes per batch.

Not a test: it prints microseconds per identity for each call and a ratio against a baseline measured in
the same run.

    .venv/bin/python bench/profile.py [--profiles 50000] [--batch 5000] [--history 0]

profile_stub runs as a subprocess on PostgreSQL (``CARILLON_BENCH_POSTGRES_URL``, default the local
``test`` database; in its own schema, dropped at the end). The bench loads ``--profiles`` profiles (an
email identity, opt-in email consent, a first name) and one capping rule of 10 marketing emails per day,
so that capping is really evaluated. Then, per batch of ``--batch`` identities, it makes the three calls
as the delivery worker does (delivery_svc/eligibility.py's ProfileServiceGateway): ``CheckEligibility``
(check, full profiles), ``CheckEligibility`` with ``reserve`` and message ids ``m-<i>`` (verdicts only),
and ``RecordCommunications`` of the reserved messages; each timed at the client, gRPC included.

CPU: per call, the CPU time of profile_stub's process and of the PostgreSQL backends of its connections
(read from /proc, found by their ``application_name``), summed over the batches, per identity: what a
call costs whatever else the shared machine runs. (The delivery worker makes the "one call" and record.)

Defaults: ``--defaults`` sends RecordCommunications what a batch's communications share (channel,
category, campaign, run, activity, send time) once, in ``defaults``, and each communication only its
profile and message id.

History: ``--history N`` preloads N communications (message ids ``h-<i>``, spread over the profiles, sent
2 to 60 days ago: older than the capping rule counts) after the statistics are taken, as a fast-growing
table's statistics lag behind it; comparing the CPU per identity of a small and a large history shows
whether a batch's reads cost more as the communications grow.

Baseline: the same reads and writes as hand-written SQL through psycopg on the same tables, per batch —
the identity → profile + consent + quarantine read (one statement), the reservation insert and the
reservation's update into a communication (a reservation is a row of ``communications`` with an expiry,
recorded in place: ``INSERT … SELECT unnest(…)``, then ``UPDATE … WHERE message_id = ANY(…)``; message ids ``b-<i>``,
deleted at the end). The baseline of check is the read, of reserve the read plus the reservation
insert, of record the update. Reported: us/identity per call (the median over the batches, so that other work
on a shared machine weighs less), the baseline's, and their ratio (call / baseline). When profile_stub
derives message ids itself (``run``, ``activity`` and ``entity_keys`` in the request), the bench also
times the single call that checks and reserves (full profiles, a second run's message ids) against
the baseline of reserve.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delivery import Service, address, process_cpu_seconds, seed_profiles  # noqa: E402
from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc  # noqa: E402
from carillon.type.v1 import channel_pb2, value_pb2  # noqa: E402
from carillon_chassis.clients import call_metadata  # noqa: E402
from carillon_chassis.values import to_timestamp  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SANDBOX = "bench"
METADATA = call_metadata(SANDBOX)
CALLS = ("check", "reserve", "record")
ONE_CALL = "one call"  # check and reserve together, message ids derived by profile_stub (run, activity)


def _request(batch: range, reserve: bool) -> profile_service_pb2.CheckEligibilityRequest:
    request = profile_service_pb2.CheckEligibilityRequest(
        channel=channel_pb2.CHANNEL_EMAIL,
        category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
        identities=[value_pb2.Identity(namespace="email", value=address(i)) for i in batch],
        reserve=reserve,
        message_ids=[f"m-{i}" for i in batch] if reserve else [],
    )
    if reserve and "omit_profiles" in request.DESCRIPTOR.fields_by_name:  # what the gateway asks for
        request.omit_profiles = True
    return request


class CpuMeter:
    """CPU seconds of profile_stub and of the PostgreSQL backends serving it (found by the
    ``application_name`` of its connections), read from /proc: what a call costs in CPU, whatever
    else runs on the machine."""

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]], pid: int, application: str) -> None:
        self.conn, self.pid, self.application = conn, pid, application
        self.seconds: dict[str, list[float]] = {}  # per call and batch: (profile_stub, PostgreSQL)

    def read(self) -> tuple[float, float]:
        backends = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.application,)
        ).fetchall()
        return process_cpu_seconds(self.pid), sum(process_cpu_seconds(int(str(b[0]))) for b in backends)

    def add(self, name: str, before: tuple[float, float], after: tuple[float, float]) -> None:
        self.seconds.setdefault(f"{name} stub", []).append(after[0] - before[0])
        self.seconds.setdefault(f"{name} pg", []).append(after[1] - before[1])


async def service_batch(
    stub: profile_service_pb2_grpc.ProfileServiceStub, batch: range, meter: CpuMeter, defaults: bool = False
) -> dict[str, float]:
    """The three calls for one batch, as the delivery worker makes them; seconds per call."""
    seconds: dict[str, float] = {}
    cpu = meter.read()
    started = time.perf_counter()
    checked = await stub.CheckEligibility(_request(batch, False), metadata=METADATA, timeout=600)
    seconds["check"] = time.perf_counter() - started
    meter.add("check", cpu, cpu := meter.read())
    profile_ids = [r.profile.name.removeprefix("profiles/") for r in checked.results]
    if any(r.verdict != profile_pb2.VERDICT_ALLOWED for r in checked.results):
        raise SystemExit("a check verdict was not ALLOWED")

    cpu = meter.read()
    started = time.perf_counter()
    reserved = await stub.CheckEligibility(_request(batch, True), metadata=METADATA, timeout=600)
    seconds["reserve"] = time.perf_counter() - started
    meter.add("reserve", cpu, cpu := meter.read())
    if any(not r.reserved for r in reserved.results):
        raise SystemExit("a reservation was not made")

    now = to_timestamp(datetime.now(UTC))
    shared = profile_pb2.Communication(
        channel=channel_pb2.CHANNEL_EMAIL,
        category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
        campaign="campaigns/bench",
        run="campaigns/bench/runs/r1",
        activity="email1",
        send_time=now,
    )
    if defaults:  # what the communications share, sent once
        request = profile_service_pb2.RecordCommunicationsRequest(
            defaults=shared,
            communications=[
                profile_pb2.Communication(profile=f"profiles/{pid}", message_id=f"m-{i}")
                for i, pid in zip(batch, profile_ids, strict=True)
            ],
        )
    else:
        request = profile_service_pb2.RecordCommunicationsRequest(communications=[])
        for i, pid in zip(batch, profile_ids, strict=True):
            item = request.communications.add()
            item.CopyFrom(shared)
            item.profile, item.message_id = f"profiles/{pid}", f"m-{i}"
    cpu = meter.read()
    started = time.perf_counter()
    recorded = await stub.RecordCommunications(request, metadata=METADATA, timeout=600)
    seconds["record"] = time.perf_counter() - started
    meter.add("record", cpu, meter.read())
    if recorded.recorded != len(batch):
        raise SystemExit(f"recorded {recorded.recorded} of {len(batch)}")

    if "run" in profile_service_pb2.CheckEligibilityRequest.DESCRIPTOR.fields_by_name:
        one = _request(batch, False)
        one.reserve, one.run, one.activity = True, "campaigns/bench/runs/r2", "email1"
        one.entity_keys.extend([""] * len(batch))
        cpu = meter.read()
        started = time.perf_counter()
        both = await stub.CheckEligibility(one, metadata=METADATA, timeout=600)
        seconds[ONE_CALL] = time.perf_counter() - started
        meter.add(ONE_CALL, cpu, meter.read())
        if any(not r.reserved or not r.message_id or not r.profile.name for r in both.results):
            raise SystemExit("the one call did not reserve every message with its profile")
    return seconds


READ = """
SELECT v.value, p.profile_id, p.first_name, p.last_name, p.locale, p.time_zone, c.state, q.quarantined
FROM unnest(%(values)s::text[]) AS v(value)
JOIN profile_identities i ON i.sandbox = %(sandbox)s AND i.namespace = 'email' AND i.value = v.value
JOIN profiles p ON p.sandbox = i.sandbox AND p.profile_id = i.profile_id
LEFT JOIN consents c ON c.sandbox = p.sandbox AND c.profile_id = p.profile_id AND c.channel = 'email'
LEFT JOIN address_quarantines q ON q.sandbox = i.sandbox AND q.channel = 'email' AND q.address = i.value
"""
RESERVE = """
INSERT INTO communications (sandbox, message_id, profile_id, channel, category, campaign, run, activity, send_time,
                            expire_time)
SELECT %(sandbox)s, m, p, 'email', 'marketing', '', '', '', now(), now() + interval '1 hour'
FROM unnest(%(messages)s::text[], %(profiles)s::text[]) AS t(m, p)
"""
RECORD = """
UPDATE communications AS c
SET expire_time = NULL, campaign = 'campaigns/bench', run = 'campaigns/bench/runs/r1', activity = 'email1',
    send_time = now()
WHERE c.sandbox = %(sandbox)s AND c.message_id = ANY(%(messages)s::text[]) AND c.expire_time IS NOT NULL
"""


HISTORY = """
INSERT INTO communications (sandbox, message_id, profile_id, channel, category, campaign, run, activity, send_time)
SELECT %(sandbox)s, 'h-' || g, 'p' || lpad((g %% %(profiles)s)::text, 7, '0'), 'email', 'marketing', 'campaigns/old',
       'campaigns/old/runs/r', 'email1', now() - (2 + g %% 59) * interval '1 day'
FROM generate_series(%(start)s, %(stop)s - 1) AS g
"""


def preload_history(conn: psycopg.Connection[tuple[object, ...]], n: int, profiles: int) -> None:
    """``n`` old communications spread over the profiles, inserted in the server (setup, not measured)."""
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        conn.execute(HISTORY, {"sandbox": SANDBOX, "profiles": profiles, "start": start, "stop": stop})


def baseline_batch(conn: psycopg.Connection[tuple[object, ...]], batch: range) -> dict[str, float]:
    """The same reads and writes in hand-written SQL; seconds per call (check = read, reserve = read +
    reservation insert, record = the reservations recorded in place: an update)."""
    seconds: dict[str, float] = {}
    values = [address(i) for i in batch]
    started = time.perf_counter()
    with conn.transaction():
        rows = conn.execute(READ, {"values": values, "sandbox": SANDBOX}).fetchall()
    seconds["check"] = time.perf_counter() - started
    if len(rows) != len(batch):
        raise SystemExit(f"the baseline read {len(rows)} rows for {len(batch)} identities")
    profiles = [str(r[1]) for r in rows]
    messages = [f"b-{i}" for i in batch]

    started = time.perf_counter()
    with conn.transaction():
        conn.execute(READ, {"values": values, "sandbox": SANDBOX}).fetchall()
        conn.execute(RESERVE, {"sandbox": SANDBOX, "messages": messages, "profiles": profiles})
    seconds["reserve"] = time.perf_counter() - started

    started = time.perf_counter()
    with conn.transaction():
        # A join by key, whatever the statistics (a history preloaded after ANALYZE looks empty to the
        # planner, which would hash the whole table).
        conn.execute(
            "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
        )
        conn.execute(RECORD, {"sandbox": SANDBOX, "messages": messages})
    seconds["record"] = time.perf_counter() - started
    seconds[ONE_CALL] = seconds["reserve"]  # the same read and reservation insert
    return seconds


async def measure(
    target: str,
    url: str,
    schema: str,
    n: int,
    batch_size: int,
    pid: int,
    application: str,
    history: int = 0,
    defaults: bool = False,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Per call, the microseconds per identity of each batch: profile_stub's and the baseline's; and
    the CPU seconds of each call per batch (profile_stub's and its PostgreSQL backends')."""
    service: dict[str, list[float]] = {name: [] for name in (*CALLS, ONE_CALL)}
    baseline: dict[str, list[float]] = {name: [] for name in (*CALLS, ONE_CALL)}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
        started = time.perf_counter()
        await seed_profiles(stub, n)
        print(f"profiles loaded in        {time.perf_counter() - started:>10.1f} s (setup, not measured)")
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            conn.execute("ANALYZE")  # the same statistics for both sides
            if history:  # after the statistics: they lag behind a fast-growing table
                started = time.perf_counter()
                preload_history(conn, history, n)
                print(f"history preloaded in      {time.perf_counter() - started:>10.1f} s (setup, not measured)")
            meter = CpuMeter(conn, pid, application)
            for start in range(0, n, batch_size):
                batch = range(start, min(n, start + batch_size))
                for name, seconds in (await service_batch(stub, batch, meter, defaults)).items():
                    service[name].append(seconds / len(batch) * 1e6)
                for name, seconds in baseline_batch(conn, batch).items():
                    baseline[name].append(seconds / len(batch) * 1e6)
            conn.execute("DELETE FROM communications WHERE message_id LIKE 'b-%%'")
    return service, baseline, meter.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=50_000, help="profiles loaded and checked")
    parser.add_argument("--batch", type=int, default=5000, help="identities per call (the delivery batch)")
    parser.add_argument("--history", type=int, default=0, help="old communications preloaded before measuring")
    parser.add_argument(
        "--defaults", action="store_true", help="RecordCommunications sends what a batch shares once, as defaults"
    )
    args = parser.parse_args()
    url = os.environ.get("CARILLON_BENCH_POSTGRES_URL", DEFAULT_URL)
    schema = f"bench_profile_{uuid.uuid4().hex[:8]}"
    application = schema  # names profile_stub's connections, to find their backends
    workdir = Path(tempfile.mkdtemp(prefix="carillon-bench-profile-"))
    profile = Service(
        "profile_stub",
        [],
        {
            "CARILLON_DATA_DIR": str(workdir),
            "CARILLON_PROFILE_DATABASE_URL": f"{url}{'&' if '?' in url else '?'}application_name={application}",
            "CARILLON_PROFILE_DATABASE_SCHEMA": schema,
        },
        workdir,
    )
    try:
        service, baseline, cpu = asyncio.run(
            measure(
                profile.address(),
                url,
                schema,
                args.profiles,
                args.batch,
                profile.popen.pid,
                application,
                args.history,
                args.defaults,
            )
        )
    finally:
        profile.stop()
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"identities                {args.profiles:>10,}  (batches of {args.batch:,}, one capping rule of 10/day)")
    print(f"history                   {args.history:>10,}  (old communications, preloaded without ANALYZE)")
    if args.defaults:
        print("record                    with defaults (what the batch's communications share, sent once)")
    print("us per identity, median over the batches (robust to other work on the machine):")
    print(f"{'call':<10} {'profile_stub':>12} {'baseline':>12} {'ratio':>8}")
    for name in CALLS:
        ours, base = statistics.median(service[name]), statistics.median(baseline[name])
        print(f"{name:<10} {ours:>12.1f} {base:>12.1f} {ours / base:>7.1f}x")
    ours = statistics.median(map(sum, zip(*(service[name] for name in CALLS), strict=True)))
    base = statistics.median(map(sum, zip(*(baseline[name] for name in CALLS), strict=True)))
    print(f"{'total':<10} {ours:>12.1f} {base:>12.1f} {ours / base:>7.1f}x")
    if service[ONE_CALL]:  # a profile_stub that derives message ids: check and reserve in one call
        ours, base = statistics.median(service[ONE_CALL]), statistics.median(baseline[ONE_CALL])
        print(f"{ONE_CALL:<10} {ours:>12.1f} {base:>12.1f} {ours / base:>7.1f}x  (replaces check + reserve)")
        ours = statistics.median(service[ONE_CALL][i] + service["record"][i] for i in range(len(service[ONE_CALL])))
        base = statistics.median(baseline[ONE_CALL][i] + baseline["record"][i] for i in range(len(service[ONE_CALL])))
        print(f"{'total':<10} {ours:>12.1f} {base:>12.1f} {ours / base:>7.1f}x  (one call + record)")
    print("CPU us per identity, summed over the batches (profile_stub's process, its PostgreSQL backends):")
    print(f"{'call':<10} {'profile_stub':>12} {'PostgreSQL':>12} {'both':>8}")
    for name in (*CALLS, ONE_CALL):
        if f"{name} stub" in cpu:
            ours, pg = (sum(cpu[f"{name} {side}"]) / args.profiles * 1e6 for side in ("stub", "pg"))
            print(f"{name:<10} {ours:>12.1f} {pg:>12.1f} {ours + pg:>8.1f}")


if __name__ == "__main__":
    main()
