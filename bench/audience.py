"""Benchmark of audience_svc on PostgreSQL: evaluation and ingestion against hand-written baselines.

Not a test: it prints a table of timings and ratios measured in the same run, against the same data.

    .venv/bin/python bench/audience.py [--scale 0.01] [--repeats 5]

The database comes from ``CARILLON_BENCH_POSTGRES_URL`` (default: the local ``test`` database); the
benchmark works in its own schema, dropped at the end. With scale 1 it generates 1,000,000
customers and 3,000,000 bookings by COPY, then, with audience_svc started in-process on port 0:

(a) evaluates three audiences through the gRPC API (EvaluateAudience, sample_size 1, so the API also
    runs its sample query) and the same questions as hand-written SQL, printing each ratio
    (target: ≤ 1.3);
(b) ingests N rows through IngestRecords twice, as CSV blocks (the bulk format, ``--block-rows``
    rows per request) and as per-row RecordChange messages (5,000 per request), each into its own
    empty entity, and the same rows by a raw COPY into an empty table of the same shape (just before
    and just after the bulk ingestion; their mean is the baseline), printing each throughput ratio
    against the COPY (target for the bulk format: ≥ 0.5); the client's time to build the requests is
    part of the API time and is also reported apart;
(c) measures the time from an ingest call's return to the row being countable by another
    connection;
(d) streams a working set of every customer (batches of 5,000) and reports the peak growth of the
    process's resident memory (server and client share the process) while streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audience_svc.app import build_server
from audience_svc.settings import AudienceSettings
from carillon.audience.v1 import audience_service_pb2 as svc
from carillon.audience.v1 import audience_service_pb2_grpc, entity_pb2, query_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.logging import configure_logging
from carillon_chassis.values import to_timestamp

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
COUNTRIES = ["SE", "FR", "DE", "US", "GB", "ES", "IT", "NL", "NO", "DK", "FI", "PL", "PT", "IE", "BE", "AT", "CH"]
CITIES = ["Paris", "Miami", "Rome", "Berlin", "Oslo", "Madrid", "Lisbon", "Vienna", "Dublin", "Prague"]
TIERS = ["gold", "silver", "bronze"]
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
T = entity_pb2


def attribute(name: str, type_: Any, **extra: Any) -> entity_pb2.Attribute:
    return entity_pb2.Attribute(name=name, type=type_, **extra)


CUSTOMERS = entity_pb2.Entity(
    attributes=[
        attribute("customer_id", T.ATTRIBUTE_TYPE_INTEGER),
        attribute("version", T.ATTRIBUTE_TYPE_INTEGER),
        attribute("email", T.ATTRIBUTE_TYPE_STRING),
        attribute("country", T.ATTRIBUTE_TYPE_STRING),
        attribute("tier", T.ATTRIBUTE_TYPE_ENUM, enum_values=TIERS),
    ],
    primary_key=["customer_id"],
    version_attribute="version",
    identity=entity_pb2.IdentityBinding(attribute="email", namespace="email"),
)
BOOKINGS = entity_pb2.Entity(
    attributes=[
        attribute("booking_id", T.ATTRIBUTE_TYPE_INTEGER),
        attribute("version", T.ATTRIBUTE_TYPE_INTEGER),
        attribute("customer_id", T.ATTRIBUTE_TYPE_INTEGER),
        attribute("city", T.ATTRIBUTE_TYPE_STRING),
        attribute("amount", T.ATTRIBUTE_TYPE_DECIMAL),
        attribute("booked", T.ATTRIBUTE_TYPE_TIMESTAMP),
    ],
    primary_key=["booking_id"],
    version_attribute="version",
    links=[
        entity_pb2.Link(
            name="customer",
            target="entities/customers",
            cardinality=T.LINK_CARDINALITY_MANY_TO_ONE,
            join=[entity_pb2.JoinAttributes(attribute="customer_id", target_attribute="customer_id")],
        )
    ],
)
CUSTOMER_BOOKINGS = entity_pb2.Link(
    name="bookings",
    target="entities/bookings",
    cardinality=T.LINK_CARDINALITY_ONE_TO_MANY,
    join=[entity_pb2.JoinAttributes(attribute="customer_id", target_attribute="customer_id")],
)


def text(value: str) -> value_pb2.Value:
    return value_pb2.Value(string_value=value)


def integer(value: int) -> value_pb2.Value:
    return value_pb2.Value(integer_value=value)


def cond(attribute: str, operator: Any, *values: value_pb2.Value) -> query_pb2.Filter:
    return query_pb2.Filter(condition=query_pb2.Condition(attribute=attribute, operator=operator, values=values))


def customer_lines(first: int, count: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for i in range(first, first + count):
        tier = "gold" if rng.random() < 0.1 else rng.choice(TIERS[1:])
        yield f"{i}\t1\tc{i}@example.com\t{rng.choice(COUNTRIES)}\t{tier}\n"


def booking_lines(count: int, customers: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for i in range(1, count + 1):
        booked = NOW - dt.timedelta(seconds=rng.randrange(365 * 86400))
        amount = f"{rng.randrange(100000) / 100:.2f}"
        yield f"{i}\t1\t{rng.randrange(1, customers + 1)}\t{rng.choice(CITIES)}\t{amount}\t{booked.isoformat()}\n"


def copy_lines(conn: psycopg.Connection[Any], table: str, lines: Iterator[str], chunk: int = 20000) -> None:
    with conn.cursor() as cursor, cursor.copy(f'COPY "{table}" FROM STDIN') as copy:
        buffer: list[str] = []
        for line in lines:
            buffer.append(line)
            if len(buffer) >= chunk:
                copy.write("".join(buffer))
                buffer.clear()
        if buffer:
            copy.write("".join(buffer))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median wall time of ``repeats`` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


async def atimed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    result = await fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


class RssSampler:
    """Samples the process's resident set size every few milliseconds in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def run(args: argparse.Namespace) -> None:
    n = max(1000, int(1_000_000 * args.scale))
    url = os.environ.get("CARILLON_BENCH_POSTGRES_URL", DEFAULT_URL)
    schema = f"bench_audience_{uuid.uuid4().hex[:8]}"
    raw_url = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    settings = AudienceSettings(port=0, database_url=url, database_schema=schema)  # type: ignore[call-arg]
    server = await build_server(settings)
    await server.start()
    conn = psycopg.connect(raw_url, autocommit=True, options=f"-csearch_path={schema}")
    rows: list[tuple[str, str, str]] = []
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = audience_service_pb2_grpc.AudienceServiceStub(channel)
            for entity_id, entity in [
                ("customers", CUSTOMERS),
                ("bookings", BOOKINGS),
                ("imports", CUSTOMERS),
                ("imports_rows", CUSTOMERS),
            ]:
                await stub.CreateEntity(svc.CreateEntityRequest(entity_id=entity_id, entity=entity))
            await stub.UpdateEntity(
                svc.UpdateEntityRequest(
                    entity=entity_pb2.Entity(name="entities/customers", links=[CUSTOMER_BOOKINGS]),
                    update_mask=field_mask_pb2.FieldMask(paths=["links"]),
                )
            )
            tables = dict(conn.execute("SELECT entity_id, table_name FROM entities").fetchall())
            customers_t, bookings_t, imports_t = tables["customers"], tables["bookings"], tables["imports"]
            imports_rows_t = tables["imports_rows"]

            start = time.perf_counter()
            copy_lines(conn, customers_t, customer_lines(1, n, seed=1))
            copy_lines(conn, bookings_t, booking_lines(3 * n, n, seed=2))
            conn.execute(f'ANALYZE "{customers_t}"')
            conn.execute(f'ANALYZE "{bookings_t}"')
            print(f"generated {n:,} customers and {3 * n:,} bookings by COPY in {time.perf_counter() - start:.1f} s")

            # (a) Three audiences: the API against hand-written SQL.
            thirty_days_ago = NOW - dt.timedelta(days=30)
            audiences = [
                (
                    "attribute filter",
                    "customers",
                    query_pb2.Filter(
                        all=query_pb2.FilterList(
                            filters=[
                                cond("country", query_pb2.OPERATOR_EQUAL, text("SE")),
                                cond("tier", query_pb2.OPERATOR_EQUAL, text("gold")),
                            ]
                        )
                    ),
                    f"SELECT count(*) FROM \"{customers_t}\" WHERE country = 'SE' AND tier = 'gold'",
                    (),
                ),
                (
                    "N-1 path",
                    "bookings",
                    cond("customer.country", query_pb2.OPERATOR_EQUAL, text("SE")),
                    f'SELECT count(*) FROM "{bookings_t}" b JOIN "{customers_t}" c ON c.customer_id = b.customer_id '
                    "WHERE c.country = 'SE'",
                    (),
                ),
                (
                    "1-N exists, nested, relative",
                    "customers",
                    query_pb2.Filter(
                        link=query_pb2.LinkCondition(
                            link="bookings",
                            measure=query_pb2.LINK_MEASURE_EXISTS,
                            filter=query_pb2.Filter(
                                all=query_pb2.FilterList(
                                    filters=[
                                        cond(
                                            "amount", query_pb2.OPERATOR_GREATER, value_pb2.Value(decimal_value="900")
                                        ),
                                        cond("booked", query_pb2.OPERATOR_WITHIN_LAST_DAYS, integer(30)),
                                    ]
                                )
                            ),
                        )
                    ),
                    f'SELECT count(*) FROM "{customers_t}" c WHERE EXISTS (SELECT 1 FROM "{bookings_t}" b '
                    "WHERE b.customer_id = c.customer_id AND b.amount > 900 AND b.booked >= %s AND b.booked <= %s)",
                    (thirty_days_ago, NOW),
                ),
            ]
            print()
            print(f"{'(a) audience':34} {'API ms':>10} {'SQL ms':>10} {'ratio':>7} {'count':>10}")
            for label, dimension, filter_, sql, params in audiences:
                request = svc.EvaluateAudienceRequest(
                    query=query_pb2.AudienceQuery(dimension=f"entities/{dimension}", filter=filter_),
                    sample_size=1,
                    reference_time=to_timestamp(NOW),
                )

                async def evaluate(request: svc.EvaluateAudienceRequest = request) -> int:
                    response = await stub.EvaluateAudience(request)
                    return int(response.count)

                def by_hand(sql: str = sql, params: tuple[Any, ...] = params) -> int:
                    row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
                    assert row is not None
                    return int(row[0])

                api_s, api_count = await atimed(evaluate, args.repeats)
                sql_s, sql_count = timed(by_hand, args.repeats)
                assert api_count == sql_count, (label, api_count, sql_count)
                print(f"{label:34} {api_s * 1000:10.1f} {sql_s * 1000:10.1f} {api_s / sql_s:7.2f} {api_count:10,}")

            # (b) Ingestion: the API (bulk CSV blocks, then per-row changes) against a raw COPY of the same rows.
            m = n
            batch = 5000
            lines = list(customer_lines(1, m, seed=3))
            rows = [tuple(line.rstrip("\n").split("\t")) for line in lines]  # type: ignore[misc]
            columns = ["customer_id", "version", "email", "country", "tier"]

            def block_requests() -> Iterator[svc.IngestRecordsRequest]:
                for start_row in range(0, m, args.block_rows):
                    text = "".join([",".join(r) + "\n" for r in rows[start_row : start_row + args.block_rows]])
                    yield svc.IngestRecordsRequest(
                        entity="entities/imports", block=svc.RecordBlock(columns=columns, csv=text)
                    )

            def requests() -> Iterator[svc.IngestRecordsRequest]:
                for start_row in range(0, m, batch):
                    yield svc.IngestRecordsRequest(
                        entity="entities/imports_rows",
                        changes=[
                            svc.RecordChange(
                                values={
                                    "customer_id": integer(int(r[0])),
                                    "version": integer(int(r[1])),
                                    "email": text(r[2]),
                                    "country": text(r[3]),
                                    "tier": text(r[4]),
                                }
                            )
                            for r in rows[start_row : start_row + batch]
                        ],
                    )

            def build_time(make: Callable[[], Iterator[svc.IngestRecordsRequest]]) -> float:
                start = time.perf_counter()
                for _ in make():
                    pass
                return time.perf_counter() - start

            async def ingest(make: Callable[[], Iterator[svc.IngestRecordsRequest]]) -> float:
                async def stream() -> AsyncIterator[svc.IngestRecordsRequest]:
                    for request in make():
                        yield request

                start = time.perf_counter()
                response = await stub.IngestRecords(stream())
                elapsed = time.perf_counter() - start
                assert response.upserted == m, response
                return elapsed

            def checkpoint() -> None:
                """Start a measurement with the WAL of the earlier ones flushed, so none pays for another."""
                with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                    conn.execute("CHECKPOINT")

            def raw_copy(table: str) -> float:
                conn.execute(f'CREATE TABLE "{table}" (LIKE "{imports_t}" INCLUDING ALL)')
                checkpoint()
                start = time.perf_counter()
                copy_lines(conn, table, iter(lines))
                return time.perf_counter() - start

            block_build_s, row_build_s = build_time(block_requests), build_time(requests)
            # The raw COPY runs just before and just after the bulk ingestion (background work of the
            # database, such as autovacuum after the loads above, weighs on both alike); the mean counts.
            # Each measurement starts after a CHECKPOINT (when the role may run one).
            copy_before_s = raw_copy("raw_imports_before")
            checkpoint()
            bulk_s = await ingest(block_requests)
            copy_after_s = raw_copy("raw_imports_after")
            copy_s = (copy_before_s + copy_after_s) / 2
            checkpoint()
            api_s = await ingest(requests)
            for table in (imports_t, imports_rows_t):
                stored = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                assert stored is not None and stored[0] == m, (table, stored)
            print()
            print(f"{'(b) ingestion of ' + format(m, ',') + ' rows':34} {'seconds':>10} {'rows/s':>10} {'vs COPY':>8}")
            print(f"{'raw COPY (mean of the two below)':34} {copy_s:10.2f} {m / copy_s:10,.0f} {1:8.2f}")
            print(f"{'  raw COPY before the bulk API':34} {copy_before_s:10.2f} {m / copy_before_s:10,.0f}")
            print(f"{'  raw COPY after the bulk API':34} {copy_after_s:10.2f} {m / copy_after_s:10,.0f}")
            label = f"API bulk ({args.block_rows:,}-row CSV blocks)"
            print(f"{label:34} {bulk_s:10.2f} {m / bulk_s:10,.0f} {copy_s / bulk_s:8.2f}")
            print(f"{'  of which building the blocks':34} {block_build_s:10.2f}")
            print(f"{'API per-row (RecordChange)':34} {api_s:10.2f} {m / api_s:10,.0f} {copy_s / api_s:8.2f}")
            print(f"{'  of which building the messages':34} {row_build_s:10.2f}")

            # (c) From an ingest call's return to the row being countable by another connection.
            delays = []
            for k in range(20):
                key = 10 * m + k

                async def one(key: int = key) -> AsyncIterator[svc.IngestRecordsRequest]:
                    yield svc.IngestRecordsRequest(
                        entity="entities/imports",
                        changes=[
                            svc.RecordChange(
                                values={
                                    "customer_id": integer(key),
                                    "version": integer(1),
                                    "email": text("x@example.com"),
                                    "country": text("SE"),
                                    "tier": text("gold"),
                                }
                            )
                        ],
                    )

                await stub.IngestRecords(one())
                returned = time.perf_counter()
                attempts = 0
                while True:
                    attempts += 1
                    found = conn.execute(
                        f'SELECT count(*) FROM "{imports_t}" WHERE customer_id = %s', (key,)
                    ).fetchone()
                    if found is not None and found[0] == 1:
                        break
                delays.append((time.perf_counter() - returned, attempts))
            print()
            print(
                "(c) return → countable: median "
                f"{statistics.median(d for d, _ in delays) * 1000:.2f} ms, "
                f"max {max(d for d, _ in delays) * 1000:.2f} ms, "
                f"queries needed: max {max(a for _, a in delays)} (1 = countable by the first query after return)"
            )

            # (d) Memory while streaming a working set of every customer.
            built = await stub.BuildWorkingSet(
                svc.BuildWorkingSetRequest(
                    run="campaigns/bench/runs/r1",
                    activity="everyone",
                    query=query_pb2.AudienceQuery(dimension="entities/customers"),
                )
            )
            baseline = RssSampler.rss()
            streamed = 0
            start = time.perf_counter()
            with RssSampler() as sampler:
                async for page in stub.StreamWorkingSet(
                    svc.StreamWorkingSetRequest(
                        working_set=built.working_set.name, batch_size=5000, attributes=["email", "country"]
                    )
                ):
                    streamed += len(page.rows)
            elapsed = time.perf_counter() - start
            assert streamed == built.working_set.count == n
            print()
            print(
                f"(d) streamed {streamed:,} working-set rows in {elapsed:.1f} s ({streamed / elapsed:,.0f} rows/s); "
                f"RSS before {baseline / 2**20:.0f} MiB, peak growth while streaming "
                f"{(sampler.peak - baseline) / 2**20:.1f} MiB"
            )
    finally:
        conn.close()
        await server.stop(0)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.begin() as cleanup:
            cleanup.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of 1,000,000 customers (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per query (median reported)")
    parser.add_argument("--block-rows", type=int, default=50000, help="rows per CSV block in (b) (default 50000)")
    args = parser.parse_args()
    print(f"audience_svc benchmark, scale {args.scale}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    configure_logging("console", "warning")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
