"""The entity catalog: creating, reading and listing entities, each backed by its own table.

Creating an entity validates the schema first (bad input writes nothing), then, in one transaction,
checks the sandbox's entity limit and the id, inserts the catalog row and creates the table
``ent_<random hex>``. The catalog row is written before the table so that SQLite's driver has opened
the transaction when the ``CREATE TABLE`` runs: both commit or roll back together on both backends.

Links can be added to an existing entity (:meth:`EntityCatalog.add_links`): that is how two
entities come to link to each other (the second one to be created declares its link at creation,
the first one gets the reverse link added afterwards). Nullable attributes can be appended
(:meth:`EntityCatalog.update_schema`): the table gets ``ALTER TABLE … ADD COLUMN`` in the
transaction that updates the catalog row, and existing records read NULL. Nothing else of a schema
changes: a removed, changed or reordered attribute, or a new non-nullable one, is refused
(INCOMPATIBLE_SCHEMA_CHANGE). Resolved entities are cached per process for a few seconds, so a
change made through another replica becomes visible here within ``cache_ttl_s``.

Schema changes (creating an entity, updating one) wait at most ``lock_timeout_s`` for the locks of
tables in use (``ALTER TABLE`` takes PostgreSQL's ACCESS EXCLUSIVE lock, which would otherwise queue
every later reader of the table behind a long reader): ``SET LOCAL lock_timeout`` on PostgreSQL, the
connection's busy timeout (restored afterwards) on SQLite. A wait that times out is UNAVAILABLE
(reason SCHEMA_LOCK_TIMEOUT), nothing is changed and the call can be retried.

The built-in entity ``message_logs`` (:data:`~audience_svc.schema.MESSAGE_LOGS_SCHEMA`) is created
in a sandbox the first time it is needed (read, listed, linked to or written), with its index on
``(identity_namespace, identity_value)``. It does not count against ``max_entities``; users cannot
create, change or ingest into it. A sandbox whose ``message_logs`` is a user entity created before
the built-in one existed (its schema is not :data:`~audience_svc.schema.MESSAGE_LOGS_SCHEMA`) keeps
it as an ordinary entity (read, queried, changed, ingested into); there the built-in features are
refused with FAILED_PRECONDITION (reason MESSAGE_LOGS_SHADOWED): recording message logs and
following the built-in link (:func:`~audience_svc.schema.checked_link_target`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator

import sqlalchemy as sa

from audience_svc.schema import (
    MESSAGE_LOGS,
    MESSAGE_LOGS_INDEX,
    MESSAGE_LOGS_SCHEMA,
    ONE_TO_MANY,
    Attribute,
    Entity,
    EntitySchema,
    Link,
    column_type,
    definition_from_json,
    definition_to_json,
    is_built_in_message_logs,
    link_index_name,
    link_target_violations,
    message_logs_shadowed,
    validate_schema,
)
from audience_svc.tables import EntityRow
from audience_svc.violations import invalid_argument
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from carillon_chassis.pagination import keyset_page

_entities: sa.Table = EntityRow.__table__  # type: ignore[attr-defined]


class EntityCatalog:
    """The entities of one database, across sandboxes."""

    def __init__(
        self, database: Database, *, max_entities: int = 200, cache_ttl_s: float = 5.0, lock_timeout_s: float = 5.0
    ) -> None:
        self.database = database
        self.max_entities = max_entities
        self.cache_ttl_s = cache_ttl_s
        self.lock_timeout_s = lock_timeout_s
        self._cache: dict[tuple[str, str], tuple[float, Entity]] = {}
        self._lock = threading.Lock()

    def create_entity(self, sandbox: str, entity_id: str, schema: EntitySchema) -> Entity:
        """Validate ``schema`` and its links, then create the entity, its table and indexes in one transaction.

        A one-to-many link needs an index on the target's join attributes: it is created on the
        target's table (unless it exists) in the same transaction.
        """
        if entity_id == MESSAGE_LOGS:
            raise InvalidArgument(
                f"{MESSAGE_LOGS!r} is the built-in entity of message logs; choose another id",
                field="entity_id",
                reason="RESERVED_ENTITY_ID",
            )
        validate_schema(entity_id, schema)
        targets = self._checked_link_targets(sandbox, entity_id, schema)
        entity = _new_entity(sandbox, entity_id, schema)
        try:
            with self._schema_change(entity_id) as conn:
                count = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(_entities)
                    .where(_entities.c.sandbox == sandbox, _entities.c.entity_id != MESSAGE_LOGS)
                ).scalar_one()
                if count >= self.max_entities:
                    raise ResourceExhausted(
                        f"the sandbox already has {count} entities; max_entities is {self.max_entities}",
                        reason="ENTITY_LIMIT_REACHED",
                        metadata={"limit": "max_entities", "value": str(self.max_entities)},
                    )
                if self._exists(conn, sandbox, entity_id):
                    raise self._already_exists(entity_id)
                _create_in_catalog(conn, entity)
                _create_link_indexes(conn, entity, schema.links, targets, own_table_created=True)
        except sa.exc.IntegrityError as exc:
            raise self._already_exists(entity_id) from exc
        return entity

    def add_links(self, sandbox: str, entity_id: str, links: tuple[Link, ...], *, field: str = "entity") -> Entity:
        """Give an entity new links: ``links`` is its complete list, the existing links first, unchanged.

        The new links are validated like those of a new entity; their indexes are created with the
        catalog update, in one transaction. Removing or changing a link is refused
        (INCOMPATIBLE_SCHEMA_CHANGE).
        """
        return self.update_schema(sandbox, entity_id, links=links, field=field)

    def update_schema(
        self,
        sandbox: str,
        entity_id: str,
        *,
        attributes: tuple[Attribute, ...] | None = None,
        links: tuple[Link, ...] | None = None,
        field: str = "entity",
    ) -> Entity:
        """Append attributes and/or links to an entity (None: that part stays as it is).

        ``attributes`` and ``links`` are complete lists: the existing ones first, unchanged and in
        order, then the new ones. New attributes must be nullable (existing records have no value).
        The catalog row, the new columns (``ALTER TABLE … ADD COLUMN``) and the new links' indexes
        change in one transaction; a concurrent change of the same entity is FAILED_PRECONDITION.
        """
        current = self._load(sandbox, entity_id, field)
        if is_built_in_message_logs(current):
            raise FailedPrecondition(
                f"{MESSAGE_LOGS!r} is the built-in entity of message logs; its schema cannot be changed",
                field=f"{field}.name",
                reason="BUILT_IN_ENTITY",
            )
        with self.database.engine.connect() as conn:
            # The definition exactly as stored (an older release wrote it without links): the
            # update below only applies when it is still this text.
            stored = conn.execute(
                sa.select(_entities.c.definition).where(
                    _entities.c.sandbox == sandbox, _entities.c.entity_id == entity_id
                )
            ).scalar_one()
        if definition_from_json(stored, current.schema.display_name) != current.schema:
            current = self._load(sandbox, entity_id, field)
        schema = current.schema
        added_attributes: tuple[Attribute, ...] = ()
        if attributes is not None:
            _check_appended_attributes(schema.attributes, attributes, field)
            added_attributes = attributes[len(schema.attributes) :]
            schema = dataclasses.replace(schema, attributes=attributes)
        added_links: tuple[Link, ...] = ()
        if links is not None:
            existing = schema.links
            if links[: len(existing)] != existing:
                raise InvalidArgument(
                    "links can only be added: the existing links must come first, unchanged and in order",
                    field=f"{field}.links",
                    reason="INCOMPATIBLE_SCHEMA_CHANGE",
                )
            added_links = links[len(existing) :]
            schema = dataclasses.replace(schema, links=links)
        validate_schema(entity_id, schema, current.schema)
        targets = self._checked_link_targets(sandbox, entity_id, schema)
        if not added_attributes and not added_links:
            return current
        updated = dataclasses.replace(current, schema=schema, update_time=utcnow())
        with self._schema_change(entity_id) as conn:
            # The catalog row first, so that SQLite's driver has opened the transaction before the
            # ALTER TABLE: both commit or roll back together.
            changed = conn.execute(
                _entities.update()
                .where(
                    _entities.c.sandbox == sandbox,
                    _entities.c.entity_id == entity_id,
                    _entities.c.definition == stored,
                )
                .values(definition=definition_to_json(schema), update_time=updated.update_time)
            ).rowcount
            if changed != 1:
                raise FailedPrecondition(
                    f"entity {entity_id!r} changed while its schema was being updated; read it and retry",
                    field=field,
                    reason="CONCURRENT_SCHEMA_CHANGE",
                )
            for attribute in added_attributes:
                _add_column(conn, current.table_name, attribute)
            _create_link_indexes(conn, updated, added_links, targets, own_table_created=False)
        with self._lock:
            self._cache[(sandbox, entity_id)] = (time.monotonic(), updated)
        return updated

    def get_entity(self, sandbox: str, entity_id: str, *, field: str = "name") -> Entity:
        """The entity ``entity_id`` of ``sandbox``; NotFound naming ``field`` when there is none."""
        with self._lock:
            cached = self._cache.get((sandbox, entity_id))
        if cached is not None and time.monotonic() - cached[0] < self.cache_ttl_s:
            return cached[1]
        return self._load(sandbox, entity_id, field)

    def writable_entity(self, sandbox: str, entity_id: str, *, field: str = "entity") -> Entity:
        """The entity ``entity_id``, which records may be ingested into (not the built-in message logs).

        FAILED_PRECONDITION (BUILT_IN_ENTITY) for ``message_logs``, which only RecordMessageLogs writes
        (unless it is a user entity that took the id before the built-in one existed).
        """
        entity = self.get_entity(sandbox, entity_id, field=field)
        if is_built_in_message_logs(entity):
            raise FailedPrecondition(
                f"{MESSAGE_LOGS!r} is the built-in entity of message logs; record them with RecordMessageLogs",
                field=field,
                reason="BUILT_IN_ENTITY",
            )
        return entity

    def _load(self, sandbox: str, entity_id: str, field: str) -> Entity:
        """The entity as stored now (bypassing the cache, which it refreshes)."""
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(_entities).where(_entities.c.sandbox == sandbox, _entities.c.entity_id == entity_id)
                )
                .mappings()
                .first()
            )
        if row is None and entity_id == MESSAGE_LOGS:
            return self._message_logs_entity(sandbox)
        if row is None:
            raise NotFound(f"entity {entity_id!r} does not exist", field=field, reason="ENTITY_NOT_FOUND")
        entity = _entity_of(row)
        with self._lock:
            cached = self._cache.get((sandbox, entity_id))
            if cached is not None and cached[1].schema == entity.schema:
                entity = cached[1]  # keep the built table of the cached copy
            self._cache[(sandbox, entity_id)] = (time.monotonic(), entity)
        return entity

    def message_logs(self, sandbox: str) -> Entity:
        """The built-in entity ``message_logs`` of ``sandbox``, created (table and index) when missing.

        FAILED_PRECONDITION (MESSAGE_LOGS_SHADOWED) when the sandbox's ``message_logs`` is a user entity.
        """
        entity = self._message_logs_entity(sandbox)
        if not is_built_in_message_logs(entity):
            raise message_logs_shadowed()
        return entity

    def _message_logs_entity(self, sandbox: str) -> Entity:
        """The sandbox's entity ``message_logs``: the built-in one, created when missing, or a user entity
        that took the id before the built-in one existed."""
        with self._lock:
            cached = self._cache.get((sandbox, MESSAGE_LOGS))
        if cached is not None:
            return cached[1]  # its schema never changes
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(_entities).where(_entities.c.sandbox == sandbox, _entities.c.entity_id == MESSAGE_LOGS)
                )
                .mappings()
                .first()
            )
        if row is not None:
            entity = _entity_of(row)
        else:
            entity = _new_entity(sandbox, MESSAGE_LOGS, MESSAGE_LOGS_SCHEMA)
            try:
                with self.database.engine.begin() as conn:
                    _create_in_catalog(conn, entity)
                    names = list(MESSAGE_LOGS_INDEX)
                    sa.Index(link_index_name(entity.table_name, names), *[entity.table.c[n] for n in names]).create(
                        conn
                    )
            except sa.exc.IntegrityError:
                # Another caller created it at the same moment: use theirs.
                return self._load(sandbox, MESSAGE_LOGS, "name")
        with self._lock:
            self._cache[(sandbox, MESSAGE_LOGS)] = (time.monotonic(), entity)
        return entity

    def list_entities(self, sandbox: str, size: int = 0, token: str = "") -> tuple[list[Entity], str]:
        """One page of entities in id order, and the token of the next page ("" on the last one).

        The built-in ``message_logs`` is listed like the others (it is created first when missing).
        """
        self._message_logs_entity(sandbox)
        with self.database.engine.connect() as conn:
            rows, next_token = keyset_page(
                conn, _entities, _entities.c.entity_id, [_entities.c.sandbox == sandbox], size, token
            )
        return [_entity_of(row) for row in rows], next_token

    @contextlib.contextmanager
    def _schema_change(self, entity_id: str) -> Iterator[sa.Connection]:
        """A transaction for schema changes whose lock waits last at most ``lock_timeout_s``.

        PostgreSQL: ``SET LOCAL lock_timeout``; SQLite: the connection's busy timeout, restored
        afterwards. A wait that times out rolls the transaction back and is UNAVAILABLE (reason
        SCHEMA_LOCK_TIMEOUT): retryable.
        """
        timeout_ms = max(1, round(self.lock_timeout_s * 1000))
        with self.database.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            previous: int | None = None
            if conn.dialect.name == "sqlite" and raw is not None:
                cursor = raw.cursor()
                previous = int(cursor.execute("PRAGMA busy_timeout").fetchone()[0])
                cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
                cursor.close()
            try:
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        conn.execute(sa.text(f"SET LOCAL lock_timeout = '{timeout_ms}ms'"))
                    yield conn
            except sa.exc.OperationalError as exc:
                if not _lock_timed_out(exc):
                    raise
                raise Unavailable(
                    f"the schema change of entity {entity_id!r} waited more than {self.lock_timeout_s:g} s "
                    "(schema_lock_timeout_s) for a table in use by other work; nothing was changed, retry later",
                    reason="SCHEMA_LOCK_TIMEOUT",
                    metadata={"limit": "schema_lock_timeout_s", "value": f"{self.lock_timeout_s:g}"},
                ) from exc
            finally:
                if previous is not None and raw is not None:
                    cursor = raw.cursor()
                    cursor.execute(f"PRAGMA busy_timeout = {previous}")
                    cursor.close()

    def _checked_link_targets(self, sandbox: str, entity_id: str, schema: EntitySchema) -> dict[str, Entity | None]:
        """The link targets (as :meth:`_link_targets`), once the links' target halves are checked."""
        targets = self._link_targets(sandbox, entity_id, schema)
        violations = link_target_violations(
            schema, {t: schema if t == entity_id else (e.schema if e else None) for t, e in targets.items()}
        )
        if violations:
            raise invalid_argument(f"the entity's links have {len(violations)} problem(s)", violations, "INVALID_LINK")
        return targets

    def _link_targets(self, sandbox: str, entity_id: str, schema: EntitySchema) -> dict[str, Entity | None]:
        """Each link target's entity (None for the entity itself, or for an unknown target)."""
        found: dict[str, Entity | None] = {}
        for link in schema.links:
            if link.target in found or not link.target:
                continue
            if link.target == entity_id:
                found[link.target] = None
                continue
            try:
                found[link.target] = self.get_entity(sandbox, link.target)
            except NotFound:
                found[link.target] = None
        return found

    @staticmethod
    def _exists(conn: sa.Connection, sandbox: str, entity_id: str) -> bool:
        found = conn.execute(
            sa.select(_entities.c.entity_id).where(_entities.c.sandbox == sandbox, _entities.c.entity_id == entity_id)
        ).first()
        return found is not None

    @staticmethod
    def _already_exists(entity_id: str) -> AlreadyExists:
        return AlreadyExists(f"entity {entity_id!r} already exists", field="entity_id", reason="ENTITY_ALREADY_EXISTS")


def _create_link_indexes(
    conn: sa.Connection,
    entity: Entity,
    links: tuple[Link, ...],
    targets: dict[str, Entity | None],
    *,
    own_table_created: bool,
) -> None:
    """Create the indexes ``links`` need on the "many" side, unless they exist.

    A many-to-one link indexes this entity's join attributes (a new table got them with its
    definition); a one-to-many link indexes the target's join attributes.
    """
    for link in links:
        if link.cardinality == ONE_TO_MANY:
            target = targets.get(link.target)
            table = entity.table if target is None else target.table
            names = [pair.target_attribute for pair in link.join]
        elif own_table_created:
            continue
        else:
            table = entity.table
            names = [pair.attribute for pair in link.join]
        sa.Index(link_index_name(table.name, names), *[table.c[n] for n in names]).create(conn, checkfirst=True)


def _check_appended_attributes(existing: tuple[Attribute, ...], attributes: tuple[Attribute, ...], field: str) -> None:
    """Raise INCOMPATIBLE_SCHEMA_CHANGE naming each attribute that is not a plain nullable append."""
    found: list[FieldViolation] = []
    for i, old in enumerate(existing):
        path = f"{field}.attributes[{i}]"
        if i >= len(attributes):
            found.append(FieldViolation(path, f"attribute {old.name!r} cannot be removed"))
        elif attributes[i] != old:
            found.append(
                FieldViolation(path, f"attribute {old.name!r} cannot be changed, renamed or moved; append new ones")
            )
    for i in range(len(existing), len(attributes)):
        if not attributes[i].nullable:
            found.append(
                FieldViolation(
                    f"{field}.attributes[{i}].nullable",
                    f"a new attribute must be nullable: the existing records have no value for {attributes[i].name!r}",
                )
            )
    if found:
        raise invalid_argument(
            f"the attribute change has {len(found)} incompatible part(s)", found, "INCOMPATIBLE_SCHEMA_CHANGE"
        )


def _add_column(conn: sa.Connection, table_name: str, attribute: Attribute) -> None:
    """``ALTER TABLE … ADD COLUMN`` of one nullable attribute (names quoted, the type compiled)."""
    quote = conn.dialect.identifier_preparer.quote
    type_sql = column_type(attribute.type).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE {quote(table_name)} ADD COLUMN {quote(attribute.name)} {type_sql}"))


def _lock_timed_out(exc: sa.exc.OperationalError) -> bool:
    """Whether ``exc`` is a lock wait that timed out (PostgreSQL's lock_not_available, SQLite's busy)."""
    return getattr(exc.orig, "sqlstate", None) == "55P03" or "database is locked" in str(exc.orig)


def _entity_of(row: sa.RowMapping) -> Entity:
    return Entity(
        sandbox=row["sandbox"],
        entity_id=row["entity_id"],
        schema=definition_from_json(row["definition"], row["display_name"]),
        table_name=row["table_name"],
        create_time=as_utc(row["create_time"]),
        update_time=as_utc(row["update_time"]),
    )


def _new_entity(sandbox: str, entity_id: str, schema: EntitySchema) -> Entity:
    """A new entity of ``schema``, with a fresh table name, created now (not stored yet)."""
    now = utcnow()
    return Entity(
        sandbox=sandbox,
        entity_id=entity_id,
        schema=schema,
        table_name=f"ent_{uuid.uuid4().hex}",
        create_time=now,
        update_time=now,
    )


def _create_in_catalog(conn: sa.Connection, entity: Entity) -> None:
    """Store ``entity``'s catalog row and create its table, in the caller's transaction."""
    conn.execute(
        _entities.insert().values(
            sandbox=entity.sandbox,
            entity_id=entity.entity_id,
            table_name=entity.table_name,
            display_name=entity.schema.display_name,
            definition=definition_to_json(entity.schema),
            create_time=entity.create_time,
            update_time=entity.update_time,
        )
    )
    entity.table.create(conn)
