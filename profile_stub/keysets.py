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
statement for the batch, where an executemany runs one statement per row), an executemany on SQLite. A
column with the same value in every row (the sandbox, a reservation's times) is one scalar parameter.

An array of strings travels as one string joined with the unit separator (U+001F) and is split by
``string_to_array`` in the server: psycopg's list adaptation costs about 0.8 us per element, which made
array parameters a fifth of profile_stub's time per batch. Integers and timezone-aware datetimes travel
the same way, as their text, cast in the server to the column's array type. A value that contains the
separator (or a lone empty string, which the split cannot tell from no value), or of another type, falls
back to a real array parameter.

Reads by key do not trust the planner with ``column = ANY(:keys)`` either: until PostgreSQL has analyzed
a fast-growing table it estimates that each key matches 0.5 % of the rows, so thousands of keys look
like the whole table, and it reads the sandbox's whole index range and filters it (each batch costs more
as the communications grow). :func:`per_key` reads one index probe (or one index range) per key instead,
through a LATERAL subquery that the planner cannot flatten into a join, whatever the statistics say;
:func:`delete_per_key` deletes the rows it finds so, by their row ids, in the same statement, and
:func:`update_per_key` updates them so.

Rows read by thousands come back through :func:`fetch_rows`: on PostgreSQL, psycopg's tuples straight
from the cursor, without a SQLAlchemy Row around each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
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
_UNIQUE_VIOLATION = "23505"


def _joined(values: Sequence[Any], element_type: sa.types.TypeEngine[Any]) -> str | None:
    """``values`` as one string of the texts PostgreSQL parses back to them, joined with the unit
    separator, or None when they cannot travel so: strings as they are, integers and timezone-aware
    datetimes by their ``str``; not a string that contains the separator, nor a lone empty string. (The
    checks run in C, by ``map``, ``set`` and ``str.count``: a Python loop over each value cost a
    microsecond per recipient per batch, measured.)"""
    if not values:
        return ""
    types = set(map(type, values))
    if isinstance(element_type, sa.String) and types == {str}:
        joined = _SEPARATOR.join(values)
        if joined.count(_SEPARATOR) != len(values) - 1 or joined == "":  # a separator inside, or [""]
            return None
        return joined
    if isinstance(element_type, sa.Integer) and types == {int}:
        return _SEPARATOR.join(map(str, values))
    aware = isinstance(element_type, sa.DateTime) and element_type.timezone
    if aware and types == {datetime} and all(v.tzinfo is not None for v in values):
        return _SEPARATOR.join(map(str, values))
    return None


def array_of(values: Sequence[Any], element_type: sa.types.TypeEngine[Any]) -> sa.ColumnElement[Any]:
    """A PostgreSQL array expression of ``values``: a joined string split in the server for strings,
    integers and aware datetimes (cast to the element type), an array parameter otherwise."""
    if isinstance(element_type, sa.TypeDecorator):  # SQLModel's AutoString, for one
        element_type = element_type.impl_instance
    joined = _joined(values, element_type)
    if joined is not None:
        split = sa.func.string_to_array(
            sa.bindparam(None, joined, type_=sa.Text), sa.literal_column("chr(31)"), type_=postgresql.ARRAY(sa.Text())
        )
        if isinstance(element_type, sa.String):
            return split
        return sa.cast(split, postgresql.ARRAY(element_type))
    return sa.bindparam(None, list(values), type_=postgresql.ARRAY(element_type))


def one_of(column: sa.ColumnElement[Any], keys: Sequence[str], postgres: bool) -> sa.ColumnElement[bool]:
    """``column`` is one of ``keys``: one array on PostgreSQL, an ``IN`` list on SQLite."""
    if postgres:
        return column == sa.any_(array_of(list(keys), sa.Text()))
    return column.in_(list(keys))


KeyMatch = Callable[[sa.ColumnElement[Any]], sa.ColumnElement[bool]]


def per_key(
    conn: sa.Connection,
    keys: Sequence[str],
    query: Callable[[KeyMatch], sa.Select[Any]],
    *,
    unique: bool = False,
    sandbox: tuple[sa.ColumnElement[Any], str] | None = None,
) -> sa.Select[Any]:
    """The rows of ``query(match)`` whose key is one of ``keys``, where ``match(column)`` is the condition
    "``column`` is the key" (``keys``: one slice of :func:`key_chunks`).

    On PostgreSQL, ``unnest(keys)`` joined LATERAL to the query with each key as a parameter: one index
    probe per key (``unique``: ``LIMIT 1``) or one index range per key (``OFFSET 0``), since a subquery
    with a LIMIT or an OFFSET is never flattened into a join (which the planner could hash, or turn back
    into a filter over the sandbox's whole range). The query's columns keep their names; the caller
    orders the result.

    ``sandbox`` (a column and its value; not with ``unique``) keeps the rows of one sandbox, checked
    outside the probe (an OFFSET keeps the condition out of the subquery): for a lookup by a column that
    leads an index of its own (the profile id) in a table whose primary key leads with the sandbox. Inside,
    before the table's first ANALYZE, the planner cannot tell the condition on the sandbox from that on the
    key, and may read the sandbox's whole range by the primary key for each key. On SQLite, ``IN`` lists."""
    if conn.dialect.name != "postgresql":
        select = query(lambda column: column.in_(list(keys)))
        return select.where(sandbox[0] == sandbox[1]) if sandbox is not None else select
    if sandbox is not None and unique:
        raise ValueError("the sandbox is checked outside the probe only when a key has several rows")
    asked = sa.func.unnest(array_of(list(keys), sa.Text())).table_valued("key").render_derived(name="asked")
    inner = query(lambda column: column == asked.c.key)
    if sandbox is not None:
        inner = inner.add_columns(sandbox[0].label("of_sandbox"))
    found = (inner.limit(1) if unique else inner.offset(0)).lateral("found")
    select = sa.select(*(column for column in found.c if column.key != "of_sandbox"))
    select = select.select_from(asked).join(found, sa.true())
    return select.where(found.c.of_sandbox == sandbox[1]) if sandbox is not None else select


class _Tid(sa.types.UserDefinedType[str]):
    """PostgreSQL's row id type, for the array of row ids :func:`delete_per_key` deletes."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "tid"


def delete_per_key(
    conn: sa.Connection,
    table: sa.Table,
    keys: Sequence[str],
    where: Callable[[KeyMatch], Sequence[sa.ColumnElement[bool]]],
    returning: Sequence[str],
    *,
    unique: bool = False,
    sandbox: tuple[sa.ColumnElement[Any], str] | None = None,
) -> Sequence[Sequence[Any]]:
    """Delete the rows of ``table`` that match the conditions ``where(match)`` for one of ``keys``
    (``match``, ``unique`` and ``sandbox`` as in :func:`per_key`) and return their ``returning`` columns.

    On PostgreSQL, one statement: the rows are found key by key (:func:`per_key`), and deleted by their
    row ids (``ctid = ANY(the ids found)``), a TID scan. (A delete by ``column = ANY(:keys)`` filtered the
    sandbox's whole index range; a join with the keys may be hashed.) The row ids are those of the
    statement's own snapshot, so they cannot have been reused. The planner costs each row id as a page
    read at random, and would rather scan a table of up to four times as many pages as the rows deleted:
    sequential scans are off for this statement only (restored after it, within the transaction). On
    SQLite, one delete with an ``IN`` list."""
    columns = [table.c[name] for name in returning]
    if conn.dialect.name != "postgresql":
        conditions = list(where(lambda column: column.in_(list(keys))))
        if sandbox is not None:
            conditions.append(sandbox[0] == sandbox[1])
        return fetch_rows(conn, table.delete().where(*conditions).returning(*columns))
    ctid = sa.literal_column("ctid", type_=_Tid)
    found = per_key(
        conn, keys, lambda match: sa.select(ctid.label("row")).where(*where(match)), unique=unique, sandbox=sandbox
    ).subquery("rows")
    # (An array, not a subquery: ``ctid = ANY(SELECT …)`` would be planned as a join.)
    row_ids = sa.cast(sa.select(sa.func.array_agg(found.c.row)).scalar_subquery(), postgresql.ARRAY(_Tid()))
    setting = "enable_seqscan"
    ((previous, _),) = fetch_rows(
        conn, sa.select(sa.func.current_setting(setting), sa.func.set_config(setting, "off", True))
    )
    deleted = fetch_rows(conn, table.delete().where(ctid == sa.any_(row_ids)).returning(*columns))
    conn.execute(sa.select(sa.func.set_config(setting, previous, True)))
    return deleted


def update_per_key(
    conn: sa.Connection,
    table: sa.Table,
    keys: Mapping[str, Sequence[str]],
    where: Sequence[sa.ColumnElement[bool]],
    values: Mapping[str, Sequence[Any]],
) -> list[str]:
    """PostgreSQL: update the rows of ``table`` whose columns equal one of the ``keys`` (given column by
    column: the first column a key, no key twice, and the other columns values the row must also hold)
    and that meet the conditions ``where`` (at most one row per key), setting ``values`` (given column by
    column too, one value per key). Returns the first column's keys of the rows updated.

    One statement, as :func:`delete_per_key`: the rows are found key by key (a LATERAL probe per key with
    ``LIMIT 1``, as :func:`per_key` with ``unique``) and updated by their row ids: ``ctid = ANY(the ids
    found)``, a TID scan that visits them in page order, when every row gets the same values (each one
    scalar parameter: a batch of the delivery worker); otherwise joined to the probes, each row getting its
    own values (a TID scan per row, a third slower). (``column = ANY(:keys)`` may be planned as a read of
    the sandbox's whole range.) A row updated by a concurrent transaction since this statement's snapshot
    has a new row id and is left out (READ COMMITTED). Setting no indexed column keeps the update
    heap-only."""
    if conn.dialect.name != "postgresql":
        raise ValueError("update_per_key is for PostgreSQL")
    names = list(keys)
    shared = all(list(column).count(column[0]) == len(column) for column in values.values())  # (in C)
    row_names = names if shared else [*names, *values]
    arrays = (array_of(list({**keys, **values}[name]), table.c[name].type) for name in row_names)
    asked = sa.func.unnest(*arrays).table_valued(*row_names).render_derived(name="asked")
    ctid = sa.literal_column("ctid", type_=_Tid)
    found = (
        sa.select(ctid.label("row"))
        .where(*(table.c[name] == asked.c[name] for name in names), *where)
        .limit(1)
        .lateral("found")
    )
    if shared:
        # (An array, not a subquery: ``ctid = ANY(SELECT …)`` would be planned as a join.)
        rows = sa.select(found.c.row).select_from(asked).join(found, sa.true()).subquery("rows")
        row_ids = sa.cast(sa.select(sa.func.array_agg(rows.c.row)).scalar_subquery(), postgresql.ARRAY(_Tid()))
        constants = {
            name: sa.cast(sa.bindparam(None, column[0], type_=table.c[name].type), table.c[name].type)
            for name, column in values.items()
        }
        statement = table.update().where(ctid == sa.any_(row_ids)).values(constants)
    else:
        key = names[0]
        given = (
            sa.select(found.c.row, asked.c[key], *(asked.c[name] for name in values))
            .select_from(asked)
            .join(found, sa.true())
            .subquery("given")
        )
        statement = (
            table.update()
            .where(ctid == given.c.row, table.c[key] == given.c[key])  # (the key: the join's, for SQLAlchemy)
            .values({name: given.c[name] for name in values})
        )
    setting = "enable_seqscan"  # (see delete_per_key)
    ((previous, _),) = fetch_rows(
        conn, sa.select(sa.func.current_setting(setting), sa.func.set_config(setting, "off", True))
    )
    updated = [str(row[0]) for row in fetch_rows(conn, statement.returning(table.c[names[0]]))]
    conn.execute(sa.select(sa.func.set_config(setting, previous, True)))
    return updated


def fetch_rows(conn: sa.Connection, statement: sa.Executable) -> Sequence[Sequence[Any]]:
    """Every row of ``statement`` as plain tuples: on PostgreSQL straight from the driver's cursor
    (psycopg builds them in C; SQLAlchemy's Row objects cost as much again, and these columns need no
    result processing), on SQLite as SQLAlchemy's rows."""
    result = conn.execute(statement)
    if conn.dialect.name != "postgresql":
        return result.all()
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


def custom_plans(conn: sa.Connection) -> None:
    """Plan every statement of the current transaction with its actual parameters, and run it without JIT
    compilation (PostgreSQL; a no-op on SQLite). A connection opened with those settings already (the
    chassis opens every PostgreSQL connection with custom plans) needs no statement: its settings are
    read once per connection and remembered with it.

    JIT: the per-key reads of a batch (:func:`per_key`) are nested loops over thousands of keys, whose
    estimated cost grows with the tables until it passes ``jit_above_cost``; compiling, inlining and
    optimizing such a statement then cost 95 ms per batch of 5,000 keys (measured at 400,000
    communications), for a statement that runs in 15."""
    if conn.dialect.name != "postgresql":
        return
    info = conn.connection.info  # lives as long as the driver's connection, across checkouts
    if "transaction_settings" not in info:
        plan_cache_mode, jit = conn.exec_driver_sql(
            "SELECT current_setting('plan_cache_mode'), current_setting('jit')"
        ).one()
        info["transaction_settings"] = [
            name
            for name, needed in (("plan_cache_mode", plan_cache_mode != "force_custom_plan"), ("jit", jit != "off"))
            if needed
        ]
    if info["transaction_settings"]:
        values = {"plan_cache_mode": "force_custom_plan", "jit": "off"}
        settings = (sa.func.set_config(name, values[name], True) for name in info["transaction_settings"])
        conn.execute(sa.select(*settings))


def insert_rows(
    conn: sa.Connection,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    *,
    skip_conflicts: bool = False,
    replace_conflicts: bool = False,
    replace_where: sa.ColumnElement[bool] | None = None,
    conflicts_unlikely: bool = False,
) -> int:
    """Insert ``rows`` (dicts with the same keys, no key twice) in their order: ``INSERT … SELECT
    unnest(:column array), …`` on PostgreSQL, an executemany on SQLite; with ``skip_conflicts``, a row
    whose primary key exists is left out (``ON CONFLICT DO NOTHING``); with ``replace_conflicts``, it
    replaces the existing row's other columns (``ON CONFLICT DO UPDATE``), only where the existing row
    matches ``replace_where`` when given (and is left as it is otherwise). Returns how many rows were
    inserted or replaced (PostgreSQL; on SQLite, how many were given).

    With ``conflicts_unlikely`` (and one of the two), PostgreSQL first tries a plain ``INSERT`` in a
    savepoint, and only if a key exists after all rolls it back and inserts with the ``ON CONFLICT``
    clause: the same rows in the end, but a speculative insertion costs the server half as much again
    per row as a plain one (measured: 5.6 against 8.4-9.4 us per row), for the price of two statements
    per batch."""
    if not rows:
        return 0
    if conflicts_unlikely and (skip_conflicts or replace_conflicts) and conn.dialect.name == "postgresql":
        try:
            with conn.begin_nested():
                return insert_rows(conn, table, rows)
        except sa.exc.IntegrityError as exc:
            if getattr(exc.orig, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
        return insert_rows(
            conn,
            table,
            rows,
            skip_conflicts=skip_conflicts,
            replace_conflicts=replace_conflicts,
            replace_where=replace_where,
        )

    def on_conflict(insert: Any) -> Any:
        if replace_conflicts:
            keys = [column.name for column in table.primary_key.columns]
            return insert.on_conflict_do_update(
                index_elements=keys,
                set_={name: insert.excluded[name] for name in rows[0] if name not in keys},
                where=replace_where,
            )
        return insert.on_conflict_do_nothing() if skip_conflicts else insert

    if conn.dialect.name != "postgresql":
        statement = on_conflict(sqlite.insert(table))
        for start in range(0, len(rows), SQLITE_CHUNK):
            conn.execute(statement, list(rows[start : start + SQLITE_CHUNK]))
        return len(rows)
    columns = list(rows[0])
    values = {name: [row[name] for row in rows] for name in columns}
    # A column with one value for every row is one scalar parameter (the sandbox, the channel, the
    # reservation's times), as long as another column still gives the number of rows.
    constant = {name for name, column in values.items() if column.count(column[0]) == len(column)}  # (in C)
    if constant == set(columns) and len(rows) > 1:
        constant.discard(columns[0])
    selected = [
        sa.cast(sa.bindparam(None, values[name][0], type_=table.c[name].type), table.c[name].type)
        if name in constant
        else sa.func.unnest(array_of(values[name], table.c[name].type))
        for name in columns
    ]
    statement = on_conflict(postgresql.insert(table).from_select(columns, sa.select(*selected)))
    return int(conn.execute(statement.execution_options(preserve_rowcount=True)).rowcount)
