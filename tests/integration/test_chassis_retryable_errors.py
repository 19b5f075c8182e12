"""Database errors that retrying may cure reach clients as ABORTED or UNAVAILABLE, not INTERNAL.

Real errors from real databases: a row lock refused (``FOR UPDATE NOWAIT``) on PostgreSQL, SQLite's
writer lock held past the busy timeout, and a unique violation (a bug or a user's mistake, never
"retryable"), classified by :func:`retryable_error` and mapped by the server interceptor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from carillon_chassis.database import retryable_error
from carillon_chassis.interceptors import ServiceInterceptor
from tests.conftest import POSTGRES_URL


@contextlib.contextmanager
def engines(backend: str, tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine, str]]:
    """Two engines on one fresh database (the second one does not wait for locks), and a table name."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'locks.db'}"
        first = sa.create_engine(url, poolclass=sa.pool.NullPool)
        second = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"timeout": 0})
        table = "items"
    else:
        first = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
        second = first
        table = f"items_{tmp_path.name[-12:].replace('-', '_').lower()}"
    with first.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)"))
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (1, 'one')"))
    try:
        yield first, second, table
    finally:
        with first.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {table}"))
        first.dispose()
        second.dispose()


def lock_conflict(backend: str, tmp_path: Path) -> sa.exc.DBAPIError:
    """The error of a write that finds the row (PostgreSQL) or the database (SQLite) locked by another."""
    with engines(backend, tmp_path) as (first, second, table), first.connect() as holder:
        if backend == "sqlite":
            holder.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            holder.begin()
            holder.execute(sa.text(f"SELECT id FROM {table} WHERE id = 1 FOR UPDATE"))
        try:
            with second.begin() as conn:
                if backend == "sqlite":
                    conn.execute(sa.text(f"UPDATE {table} SET name = 'two' WHERE id = 1"))
                else:
                    conn.execute(sa.text(f"SELECT id FROM {table} WHERE id = 1 FOR UPDATE NOWAIT"))
        except sa.exc.DBAPIError as exc:
            return exc
        finally:
            holder.rollback()
    raise AssertionError("the second writer was not refused")


def unique_violation(backend: str, tmp_path: Path) -> sa.exc.DBAPIError:
    with engines(backend, tmp_path) as (first, _, table):
        try:
            with first.begin() as conn:
                conn.execute(sa.text(f"INSERT INTO {table} VALUES (1, 'again')"))
        except sa.exc.DBAPIError as exc:
            return exc
    raise AssertionError("the duplicate key was accepted")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_lock_conflict_is_retryable_with_its_reason(backend: str, tmp_path: Path) -> None:
    error = retryable_error(lock_conflict(backend, tmp_path))

    assert error is not None
    if backend == "sqlite":
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_BUSY")
    else:
        assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, "LOCK_NOT_AVAILABLE")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_unique_violation_is_not_retryable(backend: str, tmp_path: Path) -> None:
    assert retryable_error(unique_violation(backend, tmp_path)) is None


def test_an_error_that_is_not_from_the_database_is_not_retryable() -> None:
    assert retryable_error(ValueError("no")) is None


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_the_interceptor_reports_a_lock_conflict_as_retryable_not_internal(backend: str, tmp_path: Path) -> None:
    conflict = lock_conflict(backend, tmp_path)

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise conflict

    server = grpc.aio.server(interceptors=[ServiceInterceptor("test.carillon.dev")], options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Locks", {"Write": grpc.unary_unary_rpc_method_handler(handler)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/test.Locks/Write")(b"")
    finally:
        await server.stop(0)

    expected = grpc.StatusCode.UNAVAILABLE if backend == "sqlite" else grpc.StatusCode.ABORTED
    assert raised.value.code() == expected
    assert "retry" in (raised.value.details() or "")
