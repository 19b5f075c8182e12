"""Audience evaluation: the exact count of a query's matches, a sample of their keys, a distribution.

The count is one ``SELECT count(*) FROM <entity> WHERE <filter>`` statement run by the database;
the sample is the first matching primary keys in key order. The distribution of an attribute is one
``SELECT attribute, count(*) … GROUP BY attribute ORDER BY count(*) DESC, attribute LIMIT 20``
(NULL is a value like the others, ordered last among ties). The attribute may be a dot path through
many-to-one links (``hotel.city``): each hop is a LEFT OUTER JOIN on the target's whole primary key,
so every matching record still counts once, under NULL when it has no linked record; a one-to-many
link in the path is refused. With ``explain`` the compiled SQL of the
count statement is returned, its bound parameters left as placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from audience_svc.coercion import from_database, stored_key_text
from audience_svc.entities import EntityCatalog
from audience_svc.query import AudienceQuery, Bindings, FilterLimits, compile_filter, join_condition
from audience_svc.schema import ONE_TO_MANY, Attribute, Entity
from carillon_chassis.errors import InvalidArgument, NotFound
from carillon_chassis.values import PyValue

DEFAULT_SAMPLE_SIZE = 10
MAX_SAMPLE_SIZE = 1000
DISTRIBUTION_SIZE = 20


@dataclass(frozen=True)
class Evaluation:
    """The result of evaluating a query; ``distribution`` holds (value, count) pairs, most frequent first."""

    count: int
    sample_keys: list[str]
    sql: str = ""
    distribution: list[tuple[PyValue, int]] = field(default_factory=list)


def sample_size(requested: int, field: str = "sample_size") -> int:
    """The effective sample size: the default for 0; negative or above the maximum is invalid."""
    if requested < 0 or requested > MAX_SAMPLE_SIZE:
        raise InvalidArgument(
            f"{field} must be between 0 and {MAX_SAMPLE_SIZE}", field=field, reason="INVALID_SAMPLE_SIZE"
        )
    return requested or DEFAULT_SAMPLE_SIZE


def resolve_query(
    catalog: EntityCatalog,
    sandbox: str,
    query: AudienceQuery,
    limits: FilterLimits,
    path: str = "query",
    bindings: Bindings | None = None,
) -> tuple[Entity, sa.ColumnElement[bool]]:
    """The query's dimension and its compiled WHERE expression (NotFound for an unknown dimension).

    Links are followed to the entities of the same sandbox; ``bindings`` gives the reference time
    and parameter values.
    """
    entity = catalog.get_entity(sandbox, query.dimension, field=f"{path}.dimension")

    def resolve(entity_id: str) -> Entity | None:
        try:
            return catalog.get_entity(sandbox, entity_id)
        except NotFound:
            return None

    where = compile_filter(
        entity, query.filter, limits=limits, path=f"{path}.filter", resolve=resolve, bindings=bindings
    )
    return entity, where


class AudienceEvaluator:
    """Counts and samples audiences of the entities of one catalog."""

    def __init__(self, catalog: EntityCatalog, *, limits: FilterLimits | None = None) -> None:
        self.catalog = catalog
        self.database = catalog.database
        self.limits = limits or FilterLimits()

    def evaluate(
        self,
        sandbox: str,
        query: AudienceQuery,
        *,
        sample: int = 0,
        explain: bool = False,
        bindings: Bindings | None = None,
        distribution_attribute: str = "",
    ) -> Evaluation:
        """The exact count of the query's matches, up to ``sample`` of their keys, optionally the SQL
        and the distribution of ``distribution_attribute`` (an attribute of the dimension, or a dot
        path through many-to-one links)."""
        size = sample_size(sample)
        entity, where = resolve_query(self.catalog, sandbox, query, self.limits, bindings=bindings)
        return self.evaluate_where(entity, where, size, explain, distribution_attribute)

    def evaluate_where(
        self,
        entity: Entity,
        where: sa.ColumnElement[bool],
        size: int,
        explain: bool = False,
        distribution_attribute: str = "",
    ) -> Evaluation:
        """Count, sample and describe the records of ``entity`` matching ``where``."""
        distribution_statement = None
        attribute_type = ""
        if distribution_attribute:
            source, column, attribute = self._distribution_column(entity, distribution_attribute)
            attribute_type = attribute.type
            frequency = sa.func.count().label("frequency")
            distribution_statement = (
                sa.select(column, frequency)
                .select_from(source)
                .where(where)
                .group_by(column)
                .order_by(frequency.desc(), column.asc().nulls_last())
                .limit(DISTRIBUTION_SIZE)
            )
        table = entity.table
        count_statement = sa.select(sa.func.count()).select_from(table).where(where)
        keys = entity.key_columns()
        sample_statement = sa.select(*keys).where(where).order_by(*keys).limit(size)
        with self.database.engine.connect() as conn:
            count = conn.execute(count_statement).scalar_one()
            rows = conn.execute(sample_statement).all()
            distribution: list[tuple[PyValue, int]] = []
            if distribution_statement is not None:
                distribution = [
                    (from_database(attribute_type, value), int(frequency))
                    for value, frequency in conn.execute(distribution_statement).all()
                ]
        key_attributes = entity.schema.key_attributes
        sample_keys = [stored_key_text(key_attributes, row) for row in rows]
        sql = explain_sql(count_statement, self.database.engine.dialect) if explain else ""
        return Evaluation(count=int(count), sample_keys=sample_keys, sql=sql, distribution=distribution)

    def _distribution_column(
        self, entity: Entity, path: str, field: str = "distribution_attribute"
    ) -> tuple[sa.FromClause, sa.ColumnElement[Any], Attribute]:
        """The FROM clause (the dimension, LEFT JOINed along many-to-one hops), the column and the
        attribute of a distribution attribute or dot path; InvalidArgument naming ``field`` when bad."""
        *link_names, leaf = path.split(".")
        if len(link_names) > self.limits.max_path_links:
            raise InvalidArgument(
                f"{path!r} goes through {len(link_names)} links; at most {self.limits.max_path_links} are allowed "
                "(max_path_links)",
                field=field,
                reason="PATH_TOO_LONG",
            )
        current: Entity = entity
        table: sa.FromClause = entity.table
        source: sa.FromClause = entity.table
        for name in link_names:
            link = current.schema.link(name)
            if link is None:
                raise InvalidArgument(
                    f"in {path!r}, {name!r} is not a link of entity {current.entity_id!r}",
                    field=field,
                    reason="UNKNOWN_LINK",
                )
            if link.cardinality == ONE_TO_MANY:
                raise InvalidArgument(
                    f"in {path!r}, {name!r} is a one-to-many link of entity {current.entity_id!r}: a distribution "
                    "follows many-to-one links only",
                    field=field,
                    reason="ONE_TO_MANY_PATH",
                )
            try:
                target = self.catalog.get_entity(entity.sandbox, link.target, field=field)
            except NotFound as exc:
                raise InvalidArgument(
                    f"in {path!r}, the target {link.target!r} of link {name!r} does not exist",
                    field=field,
                    reason="UNKNOWN_LINK",
                ) from exc
            inner = target.table.alias()
            source = source.outerjoin(inner, join_condition(link, table, inner))
            current, table = target, inner
        attribute = current.schema.attribute(leaf)
        if attribute is None:
            raise InvalidArgument(
                f"unknown attribute {leaf!r} of entity {current.entity_id!r}",
                field=field,
                reason="UNKNOWN_ATTRIBUTE",
            )
        return source, table.c[attribute.name], attribute


def explain_sql(statement: sa.Select[Any], dialect: sa.Dialect) -> str:
    """The SQL text of ``statement`` for ``dialect``, with every bound parameter as a placeholder."""
    return str(statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True}))
