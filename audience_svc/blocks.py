"""Ingestion of record blocks: the bulk wire format, CSV text with the column names given once.

A block carries the same changes as a list of ``RecordChange`` (see :mod:`audience_svc.ingest`) and
is applied with the same semantics: all-or-nothing unless ``allow_partial``, the highest version of a
key wins (the later row on a tie), deletes honour versions, and every bad row is reported with its
index (``block.rows[3].values.age``). Row ``i`` of a block means exactly the change whose values are
its cells (NULL for an unquoted empty cell), except that a delete reads only its key and version
cells; the differential tests hold both formats to this.

The text is RFC 4180 CSV (``,``; ``"`` quotes, ``""`` inside quotes; records end with ``\\n``,
``\\r\\n`` or ``\\r``); an unquoted empty field is NULL and ``""`` the empty string; values follow the
grammars of :func:`audience_svc.coercion.text_parser`.

Two ways to apply a block, with identical results:

* **Exact** (SQLite always; PostgreSQL when the fast path declines): the text is split into rows in
  Python, every cell parsed by its column's precompiled parser, and the valid changes written like
  any batch (:func:`audience_svc.ingest.apply_checked`).
* **Fast** (PostgreSQL): Python never touches a value. The text goes as it is into
  ``COPY … FROM STDIN (FORMAT csv)`` into a temporary all-text staging table, and one query checks
  every row against the text grammars (NULLs, enum lists, canonical integers, regular expressions
  without counted repetitions, which PostgreSQL runs slowly). Then, in the same transaction, a
  block of upserts whose first key is new is appended by a second ``COPY`` of the same text into
  the entity's table (a stored or repeated key breaks the primary key: that COPY is rolled back to
  a savepoint); any other block is merged by one statement that casts, keeps the winner of each
  key, inserts the new keys, updates the older versions and deletes.

The fast path only accepts what the exact path accepts: its checks are the same grammars or
stricter, and any data error (a refused row, a failed cast, a malformed CSV row, a key inserted
concurrently) rolls the transaction back and hands the block to the exact path, which then finds
and reports each problem precisely. Texts whose CSV PostgreSQL could read differently from the
exact path (a quote that is not at a field boundary, a ``\\.`` line) go to the exact path directly.

A block is applied in two steps so that a stream can overlap them (see
:mod:`audience_svc.ingest_stream`): :func:`prepare_block` stages and checks it on a connection of its
own while the previous batch is written, :func:`finish_block` writes it once that batch committed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa

from audience_svc.coercion import CoercionError, TextParser, text_parser
from audience_svc.ingest import DELETE, UPSERT, Checked, IngestResult, apply_checked, refusal
from audience_svc.schema import Attribute, Entity, EntitySchema
from audience_svc.violations import invalid_argument
from carillon_chassis.database import Database
from carillon_chassis.errors import FieldViolation
from carillon_chassis.values import PyValue

OP_COLUMN = "_op"
OPERATIONS = {"": UPSERT, "u": UPSERT, "upsert": UPSERT, "d": DELETE, "delete": DELETE}

# One CSV field at a position: a quoted field (group 1, quotes still doubled) or an unquoted one.
_FIELD = re.compile(r'"((?:[^"]|"")*)"|([^,"\r\n]*)')
_LINE_END = re.compile(r"[\r\n]")
# A line holding only \. may end the data of a COPY in PostgreSQL's CSV reader: such text is not sent.
_END_OF_DATA = re.compile(r"(?:^|[\r\n])\\\.(?:[\r\n]|$)")
# A quoted field that starts and ends at field boundaries; removing them all from well-formed CSV
# leaves no quote, so a quote that remains marks text PostgreSQL might read differently.
_BOUNDED_QUOTED_FIELD = re.compile(r'(?:^|(?<=[,\r\n]))"(?:[^"]|"")*"(?=[,\r\n]|$)', re.MULTILINE)


@dataclass(frozen=True)
class RecordBlock:
    """A block of changes: the column names and the CSV text of the rows (no header line)."""

    columns: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class _Column:
    index: int
    attribute: Attribute
    parse: TextParser


@dataclass(frozen=True)
class Layout:
    """A block's columns resolved against the entity's schema."""

    width: int
    op_index: int | None
    columns: tuple[_Column, ...]
    # The columns a delete reads (key and version), and what upserts / deletes lack entirely.
    delete_columns: tuple[_Column, ...]
    missing_for_upsert: tuple[str, ...]
    missing_for_delete: tuple[str, ...]

    @property
    def staged(self) -> list[str]:
        """The column names in block order, ``_op`` included."""
        names = [c.attribute.name for c in self.columns]
        if self.op_index is not None:
            names.insert(self.op_index, OP_COLUMN)
        return names


def layout_of(schema: EntitySchema, columns: Sequence[str], path: str = "block") -> Layout:
    """Resolve the column names; an unknown or repeated name (or no column at all) fails the whole block."""
    violations: list[FieldViolation] = []
    seen: set[str] = set()
    resolved: list[_Column] = []
    op_index: int | None = None
    if not columns:
        violations.append(FieldViolation(f"{path}.columns", "a block needs its column names"))
    for j, name in enumerate(columns):
        if name in seen:
            violations.append(FieldViolation(f"{path}.columns[{j}]", f"the column {name!r} is repeated"))
            continue
        seen.add(name)
        if name == OP_COLUMN:
            op_index = j
            continue
        attribute = schema.attribute(name)
        if attribute is None:
            violations.append(FieldViolation(f"{path}.columns[{j}]", f"unknown attribute {name!r}"))
            continue
        resolved.append(_Column(j, attribute, text_parser(attribute.type, attribute.enum_values)))
    if violations:
        raise invalid_argument(
            "the block's columns are invalid; nothing of this batch was written", violations, "INVALID_RECORDS"
        )
    identity = {*schema.primary_key, schema.version_attribute}
    return Layout(
        width=len(columns),
        op_index=op_index,
        columns=tuple(resolved),
        delete_columns=tuple(c for c in resolved if c.attribute.name in identity),
        missing_for_upsert=tuple(a.name for a in schema.attributes if not a.nullable and a.name not in seen),
        missing_for_delete=tuple(n for n in [*schema.primary_key, schema.version_attribute] if n not in seen),
    )


def split_rows(text: str) -> list[list[str | None] | None]:
    """The CSV records of ``text``, each a list of cells (None for NULL), or None for a malformed one."""
    if '"' not in text:
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines[-1] == "":
            lines.pop()
        return [[cell or None for cell in line.split(",")] for line in lines]
    rows: list[list[str | None] | None] = []
    pos, end = 0, len(text)
    while pos < end:
        row: list[str | None] | None = []
        while True:
            match = _FIELD.match(text, pos)
            assert match is not None  # the unquoted alternative matches the empty string
            quoted, plain = match.group(1), match.group(2)
            assert row is not None
            row.append(quoted.replace('""', '"') if quoted is not None else plain or None)
            pos = match.end()
            if pos >= end:
                break
            char = text[pos]
            if char == ",":
                pos += 1
                continue
            if char == "\n" or char == "\r":
                pos += 2 if text.startswith("\r\n", pos) else 1
                break
            # A quote inside an unquoted field, text after a closing quote, or an unclosed quote:
            # the record is malformed; resume at the next line.
            row = None
            found = _LINE_END.search(text, pos)
            pos = end if found is None else found.end() + (1 if text.startswith("\r\n", found.start()) else 0)
            break
        rows.append(row)
    return rows


def check_rows(
    entity: Entity,
    layout: Layout,
    rows: Sequence[list[str | None] | None],
    path: str = "block",
    *,
    allow_partial: bool = False,
) -> tuple[list[Checked], list[FieldViolation]]:
    """Parse and check every row: the valid changes and the violations of the others.

    Without ``allow_partial`` any violation raises InvalidArgument listing every bad row.
    """
    schema = entity.schema
    key_names = schema.primary_key
    version_name = schema.version_attribute
    attribute_names = [a.name for a in schema.attributes]
    violations: list[FieldViolation] = []
    checked: list[Checked] = []
    for i, row in enumerate(rows):
        where = f"{path}.rows[{i}]"
        if row is None:
            violations.append(FieldViolation(where, "the row is not well-formed CSV (a stray or unclosed quote)"))
            continue
        if len(row) != layout.width:
            violations.append(FieldViolation(where, f"the row has {len(row)} fields for {layout.width} columns"))
            continue
        operation = UPSERT
        if layout.op_index is not None:
            op_text = row[layout.op_index]
            found = OPERATIONS.get((op_text or "").lower())
            if found is None:
                violations.append(
                    FieldViolation(f"{where}.operation", f"the operation must be u or d, not {op_text!r}")
                )
                continue
            operation = found
        before = len(violations)
        values: dict[str, PyValue] = {}
        for column in layout.columns if operation == UPSERT else layout.delete_columns:
            attribute = column.attribute
            cell = row[column.index]
            if cell is None:
                if attribute.nullable:
                    values[attribute.name] = None
                else:
                    violations.append(
                        FieldViolation(f"{where}.values.{attribute.name}", f"{attribute.name} must not be null")
                    )
                continue
            try:
                values[attribute.name] = column.parse(cell)
            except CoercionError as exc:
                violations.append(FieldViolation(f"{where}.values.{attribute.name}", str(exc)))
        missing = layout.missing_for_upsert if operation == UPSERT else layout.missing_for_delete
        violations += [FieldViolation(f"{where}.values.{name}", f"{name} is required") for name in missing]
        if len(violations) > before:
            continue
        checked.append(
            Checked(
                operation=operation,
                key=tuple(values[name] for name in key_names),
                version=values[version_name],
                row={name: values.get(name) for name in attribute_names} if operation == UPSERT else values,
            )
        )
    if violations and not allow_partial:
        raise refusal(len(rows) - len(checked), len(rows), violations)
    return checked, violations


@dataclass
class PreparedBlock:
    """A block taken as far as it goes before its turn to be written.

    On PostgreSQL a block the fast path may read is staged and checked in an open transaction of its
    own connection, so that this work overlaps the writing of the previous block of the stream;
    otherwise nothing is held. Finish it with :func:`finish_block` or drop it with :func:`discard_block`.
    """

    entity: Entity
    layout: Layout
    block: RecordBlock
    allow_partial: bool
    connection: sa.Connection | None = None
    transaction: sa.RootTransaction | None = None
    rows: int = 0


def prepare_block(
    database: Database, entity: Entity, block: RecordBlock, *, allow_partial: bool = False
) -> PreparedBlock:
    """Resolve the columns (a bad one raises InvalidArgument) and, on PostgreSQL, stage and check the rows."""
    layout = layout_of(entity.schema, block.columns)
    prepared = PreparedBlock(entity, layout, block, allow_partial)
    if block.text and database.is_postgres and _fast_path_may_read(layout, block.text):
        connection = database.engine.connect()
        transaction = connection.begin()
        try:
            prepared.rows = _stage(connection, entity, layout, block.text)
        except _Declined:
            transaction.rollback()
            connection.close()
            return prepared
        except BaseException:
            transaction.rollback()
            connection.close()
            raise
        prepared.connection, prepared.transaction = connection, transaction
    return prepared


def finish_block(database: Database, prepared: PreparedBlock) -> IngestResult:
    """Write a prepared block in one transaction: by COPY when it was staged clean, else the exact path."""
    connection, transaction = prepared.connection, prepared.transaction
    if connection is not None and transaction is not None:
        prepared.connection = prepared.transaction = None
        try:
            result = _write_staged(connection, prepared.entity, prepared.layout, prepared.block.text, prepared.rows)
            transaction.commit()
            return result
        except _Declined:
            transaction.rollback()
        except BaseException:
            transaction.rollback()
            raise
        finally:
            connection.close()
    if not prepared.block.text:
        return IngestResult()
    rows = split_rows(prepared.block.text)
    checked, violations = check_rows(prepared.entity, prepared.layout, rows, allow_partial=prepared.allow_partial)
    return apply_checked(database, prepared.entity, checked, violations, len(rows))


def discard_block(prepared: PreparedBlock) -> None:
    """Roll back and release what a prepared block holds (its stream failed before its turn)."""
    connection, transaction = prepared.connection, prepared.transaction
    prepared.connection = prepared.transaction = None
    if connection is not None and transaction is not None:
        transaction.rollback()
        connection.close()


def apply_block(database: Database, entity: Entity, block: RecordBlock, *, allow_partial: bool = False) -> IngestResult:
    """Check and apply one block of changes to ``entity`` in one transaction (see the module doc)."""
    return finish_block(database, prepare_block(database, entity, block, allow_partial=allow_partial))


class _Declined(Exception):
    """The fast path gives the block to the exact path (its transaction was rolled back)."""


def _fast_path_may_read(layout: Layout, text: str) -> bool:
    """Whether PostgreSQL's CSV reader is sure to read ``text`` as :func:`split_rows` does."""
    if layout.missing_for_upsert or layout.missing_for_delete:
        return False
    if "\\." in text and _END_OF_DATA.search(text):
        return False
    return '"' not in text or '"' not in _BOUNDED_QUOTED_FIELD.sub("", text)


_STAGING = "carillon_ingest_block"
_OP_TEXT = f"lower(coalesce(\"{OP_COLUMN}\", ''))"
# PostgreSQL's regular expressions are slow with counted repetitions ({4}): digits are spelled out
# and lengths checked apart.
_D = "[0-9]"
# at most 28 characters (exact in Python's 28 digits) and 10 digits after the point
_DECIMAL_SQL = r"'^[+-]?[0-9]+(\.[0-9]?[0-9]?[0-9]?[0-9]?[0-9]?[0-9]?[0-9]?[0-9]?[0-9]?[0-9]?)?$'"
_DATE_SQL = f"'^{_D * 4}-{_D * 2}-{_D * 2}$'"
_TIMESTAMP_SQL = (
    f"'^{_D * 4}-{_D * 2}-{_D * 2}[T ]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9][0-9]?[0-9]?[0-9]?[0-9]?[0-9]?)?(Z|[+-](0[0-9]|1[0-4]):[0-5][0-9])$'"
)
_CASTS = {"integer": "bigint", "decimal": "numeric", "boolean": "boolean", "date": "date", "timestamp": "timestamptz"}


def _valid_sql(attribute: Attribute, column: str, params: dict[str, Any]) -> str:
    """A condition true only for a non-null text the exact path accepts (stricter where simpler)."""
    kind = attribute.type
    if kind == "string":
        return "TRUE"  # PostgreSQL text never holds NUL: COPY refuses it, and the exact path reports it
    if kind == "enum":
        params[f"enum_{attribute.name}"] = list(attribute.enum_values)
        return f"{column} = ANY(%(enum_{attribute.name})s::text[])"
    if kind == "integer":  # the canonical form only (no "+", no leading zeros); other text fails the cast
        return f"{column}::bigint::text = {column}"
    if kind == "decimal":
        return f"(length({column}) <= 28 AND {column} ~ {_DECIMAL_SQL})"
    if kind == "boolean":
        return f"lower({column}) IN ('true', 'false', 't', 'f', '1', '0')"
    if kind == "date":  # an impossible date (02-30) fails its cast below, which declines the block
        return f"({column} ~ {_DATE_SQL} AND left({column}, 4) <> '0000')"
    # timestamps of the years 1 and 9999 may leave Python's range once in UTC: the exact path decides
    return f"({column} ~ {_TIMESTAMP_SQL} AND left({column}, 4) NOT IN ('0000', '0001', '9999'))"


def _row_sql(entity: Entity, layout: Layout, params: dict[str, Any]) -> tuple[str, str, list[str]]:
    """For a staged row: the condition that it is valid, whether it is a delete, and its casts."""
    identity = {*entity.schema.primary_key, entity.schema.version_attribute}
    has_op = layout.op_index is not None
    is_delete = f"{_OP_TEXT} IN ('d', 'delete')" if has_op else "FALSE"
    checks = [f"{_OP_TEXT} IN ('', 'u', 'upsert', 'd', 'delete')"] if has_op else []
    other_checks: list[str] = []
    casts = []
    for column in layout.columns:
        attribute = column.attribute
        name = f'"{attribute.name}"'
        valid = _valid_sql(attribute, name, params)
        check = f"({name} IS NULL OR {valid})" if attribute.nullable else f"({name} IS NOT NULL AND {valid})"
        cast = f"{name}::{_CASTS[attribute.type]}" if attribute.type in _CASTS else name
        if attribute.name in identity:
            checks.append(check)
        else:
            other_checks.append(check)
            if has_op:  # a delete ignores the other cells: never cast them
                cast = f"CASE WHEN {is_delete} THEN NULL ELSE {cast} END"
        casts.append(f"{cast} AS {name}")
    if other_checks:
        checks.append(f"({is_delete} OR ({' AND '.join(other_checks)}))" if has_op else " AND ".join(other_checks))
    return " AND ".join(checks) or "TRUE", is_delete, casts


def _merge_sql(entity: Entity, layout: Layout, params: dict[str, Any]) -> str:
    """One statement: check every staged row, cast, keep each key's winner, insert, update and delete."""
    schema = entity.schema
    table = f'"{entity.table.name}"'
    version = f'"{schema.version_attribute}"'
    keys = [f'"{name}"' for name in schema.primary_key]
    has_op = layout.op_index is not None
    row_ok, is_delete, casts = _row_sql(entity, layout, params)
    present = {c.attribute.name for c in layout.columns}
    names = [a.name for a in schema.attributes]
    values = ", ".join(f'w."{n}"' if n in present else "NULL" for n in names)
    updated = [n for n in names if n not in schema.primary_key]
    same_key = " AND ".join(f"t.{k} = w.{k}" for k in keys)
    stored = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    # Keys outside the stored range of the leading key column (appended ids, an empty table) need
    # no index probe: min and max come from the primary-key index once per statement.
    lead = keys[0]
    in_range = f"s.{lead} BETWEEN (SELECT min({lead}) FROM {table}) AND (SELECT max({lead}) FROM {table})"
    if updated:
        sets = ", ".join(f'"{n}" = ' + (f'w."{n}"' if n in present else "NULL") for n in updated)
        update = (
            f"UPDATE {table} t SET {sets} FROM w WHERE NOT w._d AND w._stored IS NOT NULL AND {same_key} "
            f"AND w.{version} > t.{version} RETURNING 1"
        )
    else:
        update = "SELECT 1 WHERE FALSE"
    if has_op:
        delete = (
            f"DELETE FROM {table} t USING w WHERE w._d AND w._stored IS NOT NULL AND {same_key} "
            f"AND t.{version} <= w.{version} RETURNING 1"
        )
    else:  # no operation column: no deletes, and no scan looking for them
        delete = "SELECT 1 WHERE FALSE"
    # A row the checks refuse makes the cast of its text fail: the statement stops, the block declines.
    # The insert (its rows all new at the statement's snapshot) inserts every row it selects or fails
    # (a key inserted concurrently), so its count is read from w.
    return f"""
WITH w AS MATERIALIZED (
  SELECT s.*, CASE WHEN {in_range} THEN (SELECT t.{version} FROM {table} t WHERE {stored}) END AS _stored
  FROM (
    SELECT DISTINCT ON ({", ".join(keys)}) *
    FROM (
      SELECT ctid AS _r, {is_delete} AS _d, {", ".join(casts)}
      FROM {_STAGING}
      WHERE CASE WHEN {row_ok} THEN TRUE ELSE ('invalid row ' || ctid::text)::boolean END
    ) r
    ORDER BY {", ".join(keys)}, {version} DESC, _r DESC
  ) s
),
ins AS (
  INSERT INTO {table} ({", ".join(f'"{n}"' for n in names)})
  SELECT {values} FROM w WHERE NOT w._d AND w._stored IS NULL
),
upd AS ({update}),
del AS ({delete})
SELECT count(*), count(*) FILTER (WHERE _d), count(*) FILTER (WHERE _d AND _stored > {version}),
       count(*) FILTER (WHERE NOT _d AND _stored IS NULL), (SELECT count(*) FROM upd), (SELECT count(*) FROM del)
FROM w"""


def _stage(conn: sa.Connection, entity: Entity, layout: Layout, text: str) -> int:
    """COPY the text into the all-text staging table and check every row; return the row count.

    The staging rows are in the order of the text (a fresh table filled by one COPY), so ``ctid``
    breaks version ties in favour of the later row. Raises :class:`_Declined` when a row is bad or
    PostgreSQL cannot read the text.
    """
    staged = [f'"{name}"' for name in layout.staged]
    params: dict[str, Any] = {}
    row_ok, _, _ = _row_sql(entity, layout, params)
    driver = conn.connection.driver_connection
    assert driver is not None
    with _declining():
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE {_STAGING} ({', '.join(f'{name} text' for name in staged)}) ON COMMIT DROP"
        )
        with driver.cursor() as cursor:
            with cursor.copy(f"COPY {_STAGING} ({', '.join(staged)}) FROM STDIN (FORMAT csv)") as copy:
                copy.write(text)
            rows = int(cursor.rowcount)
        bad = conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM {_STAGING} WHERE NOT ({row_ok}))", params)
        if bad.scalar_one():
            raise _Declined
    return rows


def _write_staged(conn: sa.Connection, entity: Entity, layout: Layout, text: str, rows: int) -> IngestResult:
    """Write the staged (and checked) rows: appended by a second COPY when they are new, else merged."""
    with _declining():
        if layout.op_index is None and _append(conn, entity, layout, text):
            return IngestResult(upserted=rows)
        params: dict[str, Any] = {}
        counts = conn.exec_driver_sql(_merge_sql(entity, layout, params), params).one()
    winners, deletes, stale_deletes, inserted, updated, deleted = (int(n) for n in counts)
    upserts = winners - deletes
    return IngestResult(
        upserted=inserted + updated,
        deleted=deleted,
        ignored_stale=(rows - winners) + (upserts - inserted - updated) + stale_deletes,
    )


def _append(conn: sa.Connection, entity: Entity, layout: Layout, text: str) -> bool:
    """Try the cheapest write of checked upserts: COPY the text a second time, into the entity's table.

    Tried when the block's first key is not stored yet (a bulk load of new records, not updates); the
    checked text reads to the same values in PostgreSQL's readers. A key already stored, or one
    repeated in the block, breaks the primary key: the COPY is rolled back to its savepoint and the
    merge takes over.
    """
    schema = entity.schema
    table = f'"{entity.table.name}"'
    first = " AND ".join(
        f't."{c.attribute.name}" = s."{c.attribute.name}"::{_CASTS.get(c.attribute.type, "text")}'
        for c in layout.delete_columns
        if c.attribute.name in schema.primary_key
    )
    stored = conn.exec_driver_sql(
        f"SELECT EXISTS (SELECT 1 FROM {table} t, (SELECT * FROM {_STAGING} LIMIT 1) s WHERE {first})"
    ).scalar_one()
    if stored:
        return False
    driver = conn.connection.driver_connection
    assert driver is not None
    columns = ", ".join(f'"{c.attribute.name}"' for c in layout.columns)
    conn.exec_driver_sql("SAVEPOINT carillon_append")
    try:
        with driver.cursor() as cursor, cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT csv)") as copy:
            copy.write(text)
    except psycopg.errors.UniqueViolation:
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT carillon_append")
        return False
    conn.exec_driver_sql("RELEASE SAVEPOINT carillon_append")
    return True


@contextmanager
def _declining() -> Iterator[None]:
    """Turn a data error (a refused row, a failed cast, unreadable CSV, a key written concurrently) into _Declined."""
    try:
        yield
    except (psycopg.errors.DataError, psycopg.errors.UniqueViolation, psycopg.errors.NotNullViolation) as exc:
        raise _Declined from exc
    except sa.exc.DBAPIError as exc:
        declined = psycopg.errors.DataError | psycopg.errors.UniqueViolation | psycopg.errors.NotNullViolation
        if isinstance(exc.orig, declined):
            raise _Declined from exc
        raise
