"""Conditions matching a column against a batch of keys, fast on both backends.

The eligibility check, the communication history and the reservations look rows up by thousands of
keys per call. How they do it matters on PostgreSQL:

- an ``IN`` list of hundreds of bound parameters is a different statement for every list length,
  costs SQLAlchemy a per-parameter rendering step, and once psycopg prepares it (from its fifth
  execution on a connection) PostgreSQL may keep a *generic* plan. On a table without statistics yet
  (profiles loaded a moment ago) that plan scans every row of the sandbox and compares each with the
  whole list: 150 ms per 500 keys on 20,000 profiles, 20 times the custom plan (measured).
- ``column = ANY(:keys)`` with one array parameter is a single statement for every batch size and
  costs one parameter to bind. :func:`custom_plans` makes PostgreSQL plan each execution with the
  actual array (``plan_cache_mode = force_custom_plan`` for the transaction), so the planner never
  falls back to the generic plan above.

On SQLite, whose number of bound parameters is limited, keys go in ``IN`` lists of at most 500.

Rows are inserted the same way: :func:`insert_rows` sends one array per column on PostgreSQL (one
statement for the batch, where an executemany runs one statement per row), an executemany on SQLite.

An array of strings travels as one string joined with the unit separator (U+001F) and is split by
``string_to_array`` in the server: psycopg's list adaptation costs about 0.8 us per element, which made
array parameters a fifth of profile_stub's time per batch. A value that contains the separator (or a
lone empty string, which the split cannot tell from no value) falls back to a real array parameter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

T = TypeVar("T")

SQLITE_CHUNK = 500
POSTGRES_CHUNK = 20_000


def key_chunks(keys: Sequence[T], postgres: bool) -> Iterator[Sequence[T]]:
    """``keys`` in slices small enough for one statement of the backend (one slice per batch on
    PostgreSQL, 500 keys on SQLite)."""
    size = POSTGRES_CHUNK if postgres else SQLITE_CHUNK
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


_SEPARATOR = "\x1f"


def array_of(values: Sequence[Any], element_type: sa.types.TypeEngine[Any]) -> sa.ColumnElement[Any]:
    """A PostgreSQL array expression of ``values``: a joined string split in the server for strings, an
    array parameter otherwise."""
    if (
        isinstance(element_type, sa.String)
        and all(type(v) is str and _SEPARATOR not in v for v in values)
        and values != [""]
    ):
        joined = sa.bindparam(None, _SEPARATOR.join(values), type_=sa.Text)
        return sa.func.string_to_array(joined, sa.literal_column("chr(31)"), type_=postgresql.ARRAY(element_type))
    return sa.bindparam(None, list(values), type_=postgresql.ARRAY(element_type))


def one_of(column: sa.ColumnElement[Any], keys: Sequence[str], postgres: bool) -> sa.ColumnElement[bool]:
    """``column`` is one of ``keys``: one array on PostgreSQL, an ``IN`` list on SQLite."""
    if postgres:
        return column == sa.any_(array_of(list(keys), sa.Text()))
    return column.in_(list(keys))


def custom_plans(conn: sa.Connection) -> None:
    """Plan every statement of the current transaction with its actual parameters (PostgreSQL; a no-op
    on SQLite)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SET LOCAL plan_cache_mode = force_custom_plan"))


def insert_rows(
    conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]], *, skip_conflicts: bool = False
) -> None:
    """Insert ``rows`` (dicts with the same keys) in their order: ``INSERT … SELECT unnest(:column array),
    …`` on PostgreSQL, an executemany on SQLite; with ``skip_conflicts``, a row whose key exists is left
    out (``ON CONFLICT DO NOTHING``)."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        statement = sqlite.insert(table).on_conflict_do_nothing() if skip_conflicts else table.insert()
        for start in range(0, len(rows), SQLITE_CHUNK):
            conn.execute(statement, list(rows[start : start + SQLITE_CHUNK]))
        return
    columns = list(rows[0])
    arrays = [sa.func.unnest(array_of([row[name] for row in rows], table.c[name].type)) for name in columns]
    insert = postgresql.insert(table).from_select(columns, sa.select(*arrays))
    conn.execute(insert.on_conflict_do_nothing() if skip_conflicts else insert)
