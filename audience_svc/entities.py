"""The entity catalog: creating, reading and listing entities, each backed by its own table.

Creating an entity validates the schema first (bad input writes nothing), then, in one transaction,
checks the sandbox's entity limit and the id, inserts the catalog row and creates the table
``ent_<random hex>``. The catalog row is written before the table so that SQLite's driver has opened
the transaction when the ``CREATE TABLE`` runs: both commit or roll back together on both backends.

Schemas never change once created, so resolved entities are cached per process.
"""

from __future__ import annotations

import threading
import uuid

import sqlalchemy as sa

from audience_svc.schema import Entity, EntitySchema, definition_from_json, definition_to_json, validate_schema
from audience_svc.tables import EntityRow
from carillon_chassis.database import Database, as_utc, utcnow
from carillon_chassis.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from carillon_chassis.pagination import decode_token, encode_token, page_size

_entities: sa.Table = EntityRow.__table__  # type: ignore[attr-defined]


class EntityCatalog:
    """The entities of one database, across sandboxes."""

    def __init__(self, database: Database, *, max_entities: int = 200) -> None:
        self.database = database
        self.max_entities = max_entities
        self._cache: dict[tuple[str, str], Entity] = {}
        self._lock = threading.Lock()

    def create_entity(self, sandbox: str, entity_id: str, schema: EntitySchema) -> Entity:
        """Validate ``schema``, then create the entity and its table in one transaction."""
        validate_schema(entity_id, schema)
        now = utcnow()
        entity = Entity(
            sandbox=sandbox,
            entity_id=entity_id,
            schema=schema,
            table_name=f"ent_{uuid.uuid4().hex}",
            create_time=now,
            update_time=now,
        )
        try:
            with self.database.engine.begin() as conn:
                count = conn.execute(
                    sa.select(sa.func.count()).select_from(_entities).where(_entities.c.sandbox == sandbox)
                ).scalar_one()
                if count >= self.max_entities:
                    raise ResourceExhausted(
                        f"the sandbox already has {count} entities; max_entities is {self.max_entities}",
                        reason="ENTITY_LIMIT_REACHED",
                        metadata={"limit": "max_entities", "value": str(self.max_entities)},
                    )
                if self._exists(conn, sandbox, entity_id):
                    raise self._already_exists(entity_id)
                conn.execute(
                    _entities.insert().values(
                        sandbox=sandbox,
                        entity_id=entity_id,
                        table_name=entity.table_name,
                        display_name=schema.display_name,
                        definition=definition_to_json(schema),
                        create_time=now,
                        update_time=now,
                    )
                )
                entity.table.create(conn)
        except sa.exc.IntegrityError as exc:
            raise self._already_exists(entity_id) from exc
        return entity

    def get_entity(self, sandbox: str, entity_id: str, *, field: str = "name") -> Entity:
        """The entity ``entity_id`` of ``sandbox``; NotFound naming ``field`` when there is none."""
        with self._lock:
            cached = self._cache.get((sandbox, entity_id))
        if cached is not None:
            return cached
        with self.database.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(_entities).where(_entities.c.sandbox == sandbox, _entities.c.entity_id == entity_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"entity {entity_id!r} does not exist", field=field, reason="ENTITY_NOT_FOUND")
        entity = _entity_of(row)
        with self._lock:
            self._cache[(sandbox, entity_id)] = entity
        return entity

    def list_entities(self, sandbox: str, size: int = 0, token: str = "") -> tuple[list[Entity], str]:
        """One page of entities in id order, and the token of the next page ("" on the last one)."""
        limit = page_size(size)
        after = decode_token(token)
        if after is not None and not isinstance(after, str):
            raise InvalidArgument("page_token is not a token returned by this RPC", field="page_token")
        query = sa.select(_entities).where(_entities.c.sandbox == sandbox)
        if after is not None:
            query = query.where(_entities.c.entity_id > after)
        with self.database.engine.connect() as conn:
            rows = conn.execute(query.order_by(_entities.c.entity_id).limit(limit + 1)).mappings().all()
        entities = [_entity_of(row) for row in rows[:limit]]
        next_token = encode_token(entities[-1].entity_id) if len(rows) > limit else ""
        return entities, next_token

    @staticmethod
    def _exists(conn: sa.Connection, sandbox: str, entity_id: str) -> bool:
        found = conn.execute(
            sa.select(_entities.c.entity_id).where(_entities.c.sandbox == sandbox, _entities.c.entity_id == entity_id)
        ).first()
        return found is not None

    @staticmethod
    def _already_exists(entity_id: str) -> AlreadyExists:
        return AlreadyExists(f"entity {entity_id!r} already exists", field="entity_id", reason="ENTITY_ALREADY_EXISTS")


def _entity_of(row: sa.RowMapping) -> Entity:
    return Entity(
        sandbox=row["sandbox"],
        entity_id=row["entity_id"],
        schema=definition_from_json(row["definition"], row["display_name"]),
        table_name=row["table_name"],
        create_time=as_utc(row["create_time"]),
        update_time=as_utc(row["update_time"]),
    )
