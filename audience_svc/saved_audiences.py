"""Saved audiences (the audience portal): definitions evaluated when read, or snapshots of members.

* A **definition** stores a query (see :mod:`audience_svc.definitions`); it is checked when saved
  (parameters may stay unbound: they are bound when the audience is evaluated or built).
* A **snapshot** stores the primary keys of a working set's members in its own table
  (``aud_<hex>``: one column per key attribute). Saving a working set under an id **creates or
  overwrites** the audience: the new members replace the old ones (never appended), in one
  transaction that also drops the previous snapshot table.

Ids are unique per sandbox. Either kind resolves to the dimension and one WHERE expression
(:meth:`SavedAudienceStore.resolve`), so evaluation, distribution and working-set builds treat a
saved audience exactly like an ad-hoc query.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from audience_svc.audiences import resolve_query
from audience_svc.definitions import query_from_json, query_to_json
from audience_svc.entities import EntityCatalog
from audience_svc.query import AudienceQuery, Bindings, FilterLimits
from audience_svc.schema import Entity, column_type
from audience_svc.tables import SavedAudienceRow
from audience_svc.working_sets import WorkingSetStore, working_set_table
from carillon_chassis.database import as_utc, utcnow
from carillon_chassis.errors import AlreadyExists, InvalidArgument, NotFound
from carillon_chassis.names import validate_id
from carillon_chassis.pagination import keyset_page

_saved: sa.Table = SavedAudienceRow.__table__  # type: ignore[attr-defined]
DEFINITION = "definition"
SNAPSHOT = "snapshot"
MAX_DISPLAY_NAME = 200


@dataclass(frozen=True)
class SavedAudience:
    """A saved audience as the domain sees it (``query`` only for a definition)."""

    sandbox: str
    audience_id: str
    display_name: str
    entity_id: str
    kind: str
    query: AudienceQuery | None
    member_count: int
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        """The resource name, ``audiences/{audience}``."""
        return f"audiences/{self.audience_id}"


def snapshot_table(table_name: str, entity: Entity) -> sa.Table:
    """The Core table of a snapshot of ``entity``: one column per key attribute, the key itself."""
    columns = [
        sa.Column(f"k{i}", column_type(a.type), nullable=False)
        for i, a in enumerate(entity.schema.key_attributes, start=1)
    ]
    return sa.Table(table_name, sa.MetaData(), *columns, sa.PrimaryKeyConstraint(*[c.name for c in columns]))


def _check_display_name(display_name: str) -> None:
    if len(display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(
            f"display names have at most {MAX_DISPLAY_NAME} characters", field="audience.display_name"
        )


class SavedAudienceStore:
    """The saved audiences of one database."""

    def __init__(
        self, catalog: EntityCatalog, working_sets: WorkingSetStore, *, limits: FilterLimits | None = None
    ) -> None:
        self.catalog = catalog
        self.working_sets = working_sets
        self.database = catalog.database
        self.limits = limits or FilterLimits()

    def create_definition(
        self, sandbox: str, audience_id: str, display_name: str, query: AudienceQuery
    ) -> SavedAudience:
        """Save ``query`` as the definition ``audience_id``; AlreadyExists when the id is taken."""
        validate_id(audience_id, "audience_id")
        _check_display_name(display_name)
        resolve_query(
            self.catalog, sandbox, query, self.limits, path="audience.query", bindings=Bindings(allow_unbound=True)
        )
        now = utcnow()
        try:
            with self.database.engine.begin() as conn:
                conn.execute(
                    _saved.insert().values(
                        sandbox=sandbox,
                        audience_id=audience_id,
                        display_name=display_name,
                        entity_id=query.dimension,
                        kind=DEFINITION,
                        definition=query_to_json(query),
                        table_name="",
                        member_count=0,
                        create_time=now,
                        update_time=now,
                    )
                )
        except sa.exc.IntegrityError as exc:
            raise AlreadyExists(
                f"audience {audience_id!r} already exists", field="audience_id", reason="AUDIENCE_ALREADY_EXISTS"
            ) from exc
        return self.get(sandbox, audience_id)

    def save_working_set(
        self, sandbox: str, audience_id: str, working_set_id: str, display_name: str = ""
    ) -> tuple[SavedAudience, bool]:
        """Save a working set's members as the snapshot ``audience_id``, creating or overwriting it.

        Returns the audience and whether it was created (False: an existing audience was replaced).
        """
        validate_id(audience_id, "audience_id")
        _check_display_name(display_name)
        working_set = self.working_sets.get(sandbox, working_set_id, field="working_set")
        entity = self.catalog.get_entity(sandbox, working_set.entity_id, field="working_set")
        source = working_set_table(self.working_sets.table_name(sandbox, working_set_id), entity)
        keys = [f"k{i}" for i in range(1, len(entity.schema.primary_key) + 1)]
        table = snapshot_table(f"aud_{uuid.uuid4().hex}", entity)
        now = utcnow()
        with self.database.engine.begin() as conn:
            # The catalog statements come first so that SQLite's driver has begun the transaction
            # before the DDL: old table, new table, members and catalog row change together.
            previous = conn.execute(
                sa.select(_saved.c.table_name, _saved.c.create_time).where(
                    _saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id
                )
            ).first()
            conn.execute(_saved.delete().where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
            conn.execute(
                _saved.insert().values(
                    sandbox=sandbox,
                    audience_id=audience_id,
                    display_name=display_name,
                    entity_id=entity.entity_id,
                    kind=SNAPSHOT,
                    definition="",
                    table_name=table.name,
                    member_count=0,
                    create_time=now if previous is None else previous.create_time,
                    update_time=now,
                )
            )
            if previous is not None and previous.table_name:
                conn.execute(sa.schema.DropTable(sa.Table(previous.table_name, sa.MetaData()), if_exists=True))
            table.create(conn)
            copied = conn.execution_options(preserve_rowcount=True).execute(
                table.insert().from_select(keys, sa.select(*[source.c[k] for k in keys]))
            )
            conn.execute(
                _saved.update()
                .where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id)
                .values(member_count=copied.rowcount)
            )
        return self.get(sandbox, audience_id), previous is None

    def get(self, sandbox: str, audience_id: str, *, field: str = "name") -> SavedAudience:
        """One saved audience; NotFound naming ``field`` when there is none."""
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(sa.select(_saved).where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"audience {audience_id!r} does not exist", field=field, reason="AUDIENCE_NOT_FOUND")
        return _audience_of(row)

    def list(self, sandbox: str, size: int = 0, token: str = "") -> tuple[list[SavedAudience], str]:
        """One page of saved audiences in id order, and the next page's token ("" on the last page)."""
        with self.database.engine.connect() as conn:
            rows, next_token = keyset_page(
                conn, _saved, _saved.c.audience_id, [_saved.c.sandbox == sandbox], size, token
            )
        return [_audience_of(row) for row in rows], next_token

    def delete(self, sandbox: str, audience_id: str) -> None:
        """Delete a saved audience (and a snapshot's member table); NotFound when there is none."""
        with self.database.engine.begin() as conn:
            row = conn.execute(
                sa.select(_saved.c.table_name).where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id)
            ).first()
            if row is None:
                raise NotFound(f"audience {audience_id!r} does not exist", field="name", reason="AUDIENCE_NOT_FOUND")
            conn.execute(_saved.delete().where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
            if row.table_name:
                conn.execute(sa.schema.DropTable(sa.Table(row.table_name, sa.MetaData()), if_exists=True))

    def resolve(
        self, sandbox: str, audience_id: str, bindings: Bindings | None = None, *, field: str = "audience"
    ) -> tuple[Entity, sa.ColumnElement[bool]]:
        """The dimension of a saved audience and the WHERE expression of its members."""
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(sa.select(_saved).where(_saved.c.sandbox == sandbox, _saved.c.audience_id == audience_id))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"audience {audience_id!r} does not exist", field=field, reason="AUDIENCE_NOT_FOUND")
        if row["kind"] == DEFINITION:
            query = query_from_json(row["definition"])
            return resolve_query(self.catalog, sandbox, query, self.limits, path=field, bindings=bindings)
        entity = self.catalog.get_entity(sandbox, row["entity_id"], field=field)
        members = snapshot_table(row["table_name"], entity).alias()
        keys = entity.key_columns()
        found = (
            sa.select(sa.literal(1))
            .select_from(members)
            .where(*[members.c[f"k{i}"] == column for i, column in enumerate(keys, start=1)])
            .correlate_except(members)
            .exists()
        )
        return entity, found


def _audience_of(row: sa.RowMapping) -> SavedAudience:
    create_time = as_utc(row["create_time"])
    update_time = as_utc(row["update_time"])
    assert create_time is not None and update_time is not None
    return SavedAudience(
        sandbox=row["sandbox"],
        audience_id=row["audience_id"],
        display_name=row["display_name"],
        entity_id=row["entity_id"],
        kind=row["kind"],
        query=query_from_json(row["definition"]) if row["kind"] == DEFINITION else None,
        member_count=int(row["member_count"]),
        create_time=create_time,
        update_time=update_time,
    )
