"""Audience evaluation: the exact count of a query's matches and a sample of their keys.

The count is one ``SELECT count(*) FROM <entity> WHERE <filter>`` statement run by the database;
the sample is the first matching primary keys in key order. With ``explain`` the compiled SQL of the
count statement is returned, its bound parameters left as placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from audience_svc.coercion import stored_key_text
from audience_svc.entities import EntityCatalog
from audience_svc.query import AudienceQuery, FilterLimits, compile_filter
from audience_svc.schema import Entity
from carillon_chassis.errors import InvalidArgument

DEFAULT_SAMPLE_SIZE = 10
MAX_SAMPLE_SIZE = 1000


@dataclass(frozen=True)
class Evaluation:
    """The result of evaluating a query."""

    count: int
    sample_keys: list[str]
    sql: str = ""


def sample_size(requested: int, field: str = "sample_size") -> int:
    """The effective sample size: the default for 0; negative or above the maximum is invalid."""
    if requested < 0 or requested > MAX_SAMPLE_SIZE:
        raise InvalidArgument(
            f"{field} must be between 0 and {MAX_SAMPLE_SIZE}", field=field, reason="INVALID_SAMPLE_SIZE"
        )
    return requested or DEFAULT_SAMPLE_SIZE


def resolve_query(
    catalog: EntityCatalog, sandbox: str, query: AudienceQuery, limits: FilterLimits, path: str = "query"
) -> tuple[Entity, sa.ColumnElement[bool]]:
    """The query's dimension and its compiled WHERE expression (NotFound for an unknown dimension)."""
    entity = catalog.get_entity(sandbox, query.dimension, field=f"{path}.dimension")
    return entity, compile_filter(entity, query.filter, limits=limits, path=f"{path}.filter")


class AudienceEvaluator:
    """Counts and samples audiences of the entities of one catalog."""

    def __init__(self, catalog: EntityCatalog, *, limits: FilterLimits | None = None) -> None:
        self.catalog = catalog
        self.database = catalog.database
        self.limits = limits or FilterLimits()

    def evaluate(self, sandbox: str, query: AudienceQuery, *, sample: int = 0, explain: bool = False) -> Evaluation:
        """The exact count of the query's matches, up to ``sample`` of their keys, and optionally the SQL."""
        size = sample_size(sample)
        entity, where = resolve_query(self.catalog, sandbox, query, self.limits)
        table = entity.table
        count_statement = sa.select(sa.func.count()).select_from(table).where(where)
        keys = entity.key_columns()
        sample_statement = sa.select(*keys).where(where).order_by(*keys).limit(size)
        with self.database.engine.connect() as conn:
            count = conn.execute(count_statement).scalar_one()
            rows = conn.execute(sample_statement).all()
        key_attributes = entity.schema.key_attributes
        sample_keys = [stored_key_text(key_attributes, row) for row in rows]
        sql = explain_sql(count_statement, self.database.engine.dialect) if explain else ""
        return Evaluation(count=int(count), sample_keys=sample_keys, sql=sql)


def explain_sql(statement: sa.Select[Any], dialect: sa.Dialect) -> str:
    """The SQL text of ``statement`` for ``dialect``, with every bound parameter as a placeholder."""
    return str(statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True}))
