"""Record ingestion: versioned upserts and deletes, one batch all-or-nothing in one transaction.

A batch is first checked as a whole: every value is coerced strictly to its attribute's type, and
every unknown attribute, missing required attribute or bad value of every change is reported
together (``changes[3].values.age``) before anything is written. Then, within the batch, the changes
of one key collapse to the one with the highest version (the later one on a tie); the others count
as stale. The survivors are written set-based in one transaction:

* upserts as ``INSERT … ON CONFLICT (key) DO UPDATE … WHERE excluded.version > stored.version``,
  so a change whose version is not higher than the stored one is ignored and counted as stale. On
  PostgreSQL the rows first go by ``COPY`` into a temporary staging table (dropped at commit) and one
  ``INSERT … SELECT … ON CONFLICT`` merges them; on SQLite one statement runs for all the rows
  (``executemany``);
* deletes as one parameterized ``DELETE … WHERE key = :key AND version <= :version`` executed for
  all of them, then one count of the keys that survived (their stored version was higher: stale).

By default a batch is all-or-nothing. With ``allow_partial`` the valid changes of a batch are
applied and the invalid ones come back as rejections (their field violations), counted apart.

Deleted records leave no tombstone: a late upsert with a version older than a delete re-creates the
record.

The same changes may arrive as a CSV block, the bulk wire format (:mod:`audience_svc.blocks`), whose
exact path ends in :func:`apply_checked` like a list of changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from audience_svc.coercion import CoercionError, RawValue, value_coercer
from audience_svc.schema import Entity
from audience_svc.violations import invalid_argument
from carillon_chassis.database import Database
from carillon_chassis.errors import FieldViolation, InvalidArgument
from carillon_chassis.values import PyValue

UPSERT = "upsert"
DELETE = "delete"
# Bound parameters per statement: below SQLite's 32766 and PostgreSQL's 65535.
MAX_PARAMETERS = 30000


@dataclass(frozen=True)
class RecordChange:
    """One change of one record: ``upsert`` or ``delete`` (anything else is invalid), with its values."""

    operation: str
    values: Mapping[str, RawValue]


@dataclass
class IngestResult:
    """What a batch (or a whole stream) did; ``rejections`` are the violations of rejected changes."""

    upserted: int = 0
    deleted: int = 0
    ignored_stale: int = 0
    rejected: int = 0
    rejections: list[FieldViolation] = field(default_factory=list)

    def add(self, other: IngestResult) -> None:
        """Add another batch's counts to these (not its rejections: the caller lists those, capped)."""
        self.upserted += other.upserted
        self.deleted += other.deleted
        self.ignored_stale += other.ignored_stale
        self.rejected += other.rejected


@dataclass(frozen=True)
class Checked:
    """A valid change: its operation, key, version and the row to write (every attribute for an upsert)."""

    operation: str
    key: tuple[Any, ...]
    version: Any
    row: dict[str, PyValue]


def check_changes(
    entity: Entity, changes: Sequence[RecordChange], path: str = "changes", *, allow_partial: bool = False
) -> tuple[list[Checked], list[FieldViolation]]:
    """Coerce every change: the valid ones, and the violations of the others.

    Without ``allow_partial`` any violation raises InvalidArgument listing every bad value of every
    change.
    """
    schema = entity.schema
    coercers = {a.name: value_coercer(a) for a in schema.attributes}
    names = list(coercers)
    identity = [*schema.primary_key, schema.version_attribute]
    required_by_operation = {UPSERT: [a.name for a in schema.attributes if not a.nullable], DELETE: identity}
    violations: list[FieldViolation] = []
    checked: list[Checked] = []
    for i, change in enumerate(changes):
        before = len(violations)
        if change.operation not in (UPSERT, DELETE):
            violations.append(FieldViolation(f"{path}[{i}].operation", "the operation must be UPSERT or DELETE"))
            continue
        coerced: dict[str, PyValue] = {}
        for name, raw in change.values.items():
            coerce = coercers.get(name)
            if coerce is None:
                violations.append(FieldViolation(f"{path}[{i}].values.{name}", f"unknown attribute {name!r}"))
                continue
            try:
                coerced[name] = coerce(raw)
            except CoercionError as exc:
                violations.append(FieldViolation(f"{path}[{i}].values.{name}", str(exc)))
        violations += [
            FieldViolation(f"{path}[{i}].values.{name}", f"{name} is required")
            for name in required_by_operation[change.operation]
            if name not in change.values
        ]
        if len(violations) > before:
            continue
        if change.operation == UPSERT:
            row = {name: coerced.get(name) for name in names}
        else:
            row = {name: coerced[name] for name in identity}
        checked.append(
            Checked(
                operation=change.operation,
                key=tuple(coerced[name] for name in schema.primary_key),
                version=coerced[schema.version_attribute],
                row=row,
            )
        )
    if violations and not allow_partial:
        raise refusal(len(changes) - len(checked), len(changes), violations)
    return checked, violations


def refusal(bad_rows: int, rows: int, violations: Sequence[FieldViolation]) -> InvalidArgument:
    """The error of a batch refused whole because ``bad_rows`` of its ``rows`` changes are invalid."""
    return invalid_argument(
        f"{bad_rows} of {rows} changes are invalid; nothing of this batch was written", violations, "INVALID_RECORDS"
    )


def collapse(checked: Sequence[Checked]) -> tuple[list[Checked], int]:
    """One change per key, the highest version winning (the later on a tie); and how many lost."""
    winners: dict[tuple[Any, ...], Checked] = {}
    for change in checked:
        current = winners.get(change.key)
        if current is None or change.version >= current.version:
            winners[change.key] = change
    return list(winners.values()), len(checked) - len(winners)


def apply_changes(
    database: Database, entity: Entity, changes: Sequence[RecordChange], *, allow_partial: bool = False
) -> IngestResult:
    """Check and apply one batch of changes to ``entity`` in one transaction.

    With ``allow_partial`` the invalid changes are left out and reported instead of failing the batch.
    """
    checked, violations = check_changes(entity, changes, allow_partial=allow_partial)
    return apply_checked(database, entity, checked, violations, len(changes))


def apply_checked(
    database: Database, entity: Entity, checked: Sequence[Checked], violations: list[FieldViolation], total: int
) -> IngestResult:
    """Write the ``checked`` changes of a batch of ``total`` in one transaction (the others were rejected)."""
    survivors, superseded = collapse(checked)
    upserts = [c.row for c in survivors if c.operation == UPSERT]
    deletes = [c for c in survivors if c.operation == DELETE]
    result = IngestResult(
        ignored_stale=superseded,
        rejected=total - len(checked),
        rejections=violations,
    )
    if not survivors:
        return result
    with database.engine.begin() as conn:
        if upserts:
            written = _upsert(conn, entity, upserts)
            result.upserted += written
            result.ignored_stale += len(upserts) - written
        if deletes:
            deleted, stale = _delete(conn, entity, deletes)
            result.deleted += deleted
            result.ignored_stale += stale
    return result


def _dialect_insert(conn: sa.Connection) -> Callable[[sa.Table], Any]:
    if conn.dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def _upsert(conn: sa.Connection, entity: Entity, rows: list[dict[str, PyValue]]) -> int:
    """Insert or replace ``rows`` where their version is higher; return how many were written."""
    if conn.dialect.name == "postgresql":
        return _upsert_by_copy(conn, entity, rows)
    table = entity.table
    schema = entity.schema
    # One statement compiled once and executed for every row (executemany): compiling multi-row
    # VALUES statements cost more than running them.
    statement = _dialect_insert(conn)(table)
    statement = statement.on_conflict_do_update(
        index_elements=entity.key_columns(),
        set_={a.name: statement.excluded[a.name] for a in schema.attributes if a.name not in schema.primary_key},
        where=statement.excluded[schema.version_attribute] > table.c[schema.version_attribute],
    )
    result = conn.execution_options(preserve_rowcount=True).execute(statement, rows)
    return int(result.rowcount)


def _upsert_by_copy(conn: sa.Connection, entity: Entity, rows: list[dict[str, PyValue]]) -> int:
    """PostgreSQL: COPY ``rows`` into a temporary staging table, then merge them in one statement.

    The staging table has the entity's columns and types (``LIKE``) but no constraints, and is
    dropped at commit. The batch's keys are unique (see :func:`collapse`), so the merge never
    touches a row twice. Table and column names come from the catalog, never from the request.
    """
    table = entity.table
    schema = entity.schema
    names = [a.name for a in schema.attributes]
    staging = f"stg_{uuid.uuid4().hex}"
    columns = ", ".join(f'"{name}"' for name in names)
    conn.exec_driver_sql(f'CREATE TEMPORARY TABLE "{staging}" (LIKE "{table.name}") ON COMMIT DROP')
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(f'COPY "{staging}" ({columns}) FROM STDIN') as copy:
        for row in rows:
            copy.write_row([row[name] for name in names])
    keys = ", ".join(f'"{name}"' for name in schema.primary_key)
    updates = ", ".join(f'"{name}" = excluded."{name}"' for name in names if name not in schema.primary_key)
    version = schema.version_attribute
    merged = conn.exec_driver_sql(
        f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "{staging}" '
        f"ON CONFLICT ({keys}) DO UPDATE SET {updates} "
        f'WHERE excluded."{version}" > "{table.name}"."{version}"'
    )
    return int(merged.rowcount)


def _delete(conn: sa.Connection, entity: Entity, deletes: list[Checked]) -> tuple[int, int]:
    """Delete records whose stored version is not higher; return (deleted, stale)."""
    table = entity.table
    schema = entity.schema
    keys = entity.key_columns()
    version = table.c[schema.version_attribute]
    statement = table.delete().where(
        *[column == sa.bindparam(f"key_{i}") for i, column in enumerate(keys)],
        version <= sa.bindparam("version"),
    )
    parameters = [
        {**{f"key_{i}": value for i, value in enumerate(change.key)}, "version": change.version} for change in deletes
    ]
    deleted = conn.execution_options(preserve_rowcount=True).execute(statement, parameters).rowcount
    # The keys still present now had a higher stored version: those deletes were stale.
    stale = 0
    per_statement = max(1, MAX_PARAMETERS // len(keys))
    for start in range(0, len(deletes), per_statement):
        chunk = [change.key for change in deletes[start : start + per_statement]]
        matcher = keys[0].in_([k[0] for k in chunk]) if len(keys) == 1 else sa.tuple_(*keys).in_(chunk)
        stale += conn.execute(sa.select(sa.func.count()).select_from(table).where(matcher)).scalar_one()
    return deleted, stale
