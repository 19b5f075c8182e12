"""The AudienceService servicer: translates protobuf requests to domain calls and back.

No SQL here: every call reads the caller's sandbox, converts the request to domain values, runs the
domain code on the database worker pool and converts the result. Domain errors propagate to the
chassis interceptor, which maps them to rich gRPC statuses.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Mapping

import grpc
from google.protobuf import timestamp_pb2

from audience_svc.audiences import AudienceEvaluator, Evaluation, sample_size
from audience_svc.coercion import Malformed, RawValue
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import DELETE, UPSERT, IngestResult, RecordChange, apply_changes
from audience_svc.query import (
    Aggregate,
    AllOf,
    AnyOf,
    AudienceQuery,
    Bindings,
    Condition,
    EmptyFilter,
    Filter,
    LinkCondition,
    Negate,
)
from audience_svc.saved_audiences import DEFINITION, SavedAudience, SavedAudienceStore
from audience_svc.schema import (
    MANY_TO_ONE,
    ONE_TO_MANY,
    Attribute,
    Entity,
    EntitySchema,
    IdentityBinding,
    JoinPair,
    Link,
)
from audience_svc.working_sets import Subset, WorkingSet, WorkingSetRecord, WorkingSetStore, batch_size
from carillon.audience.v1 import (
    audience_pb2,
    audience_service_pb2,
    audience_service_pb2_grpc,
    entity_pb2,
    query_pb2,
    working_set_pb2,
)
from carillon.type.v1 import value_pb2
from carillon_chassis.errors import CarillonError, InvalidArgument
from carillon_chassis.names import parse_name
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.values import from_timestamp, from_value, to_timestamp, to_value, to_value_map

ATTRIBUTE_TYPE_NAMES: dict[entity_pb2.AttributeType.ValueType, str] = {
    entity_pb2.ATTRIBUTE_TYPE_STRING: "string",
    entity_pb2.ATTRIBUTE_TYPE_INTEGER: "integer",
    entity_pb2.ATTRIBUTE_TYPE_DECIMAL: "decimal",
    entity_pb2.ATTRIBUTE_TYPE_BOOLEAN: "boolean",
    entity_pb2.ATTRIBUTE_TYPE_DATE: "date",
    entity_pb2.ATTRIBUTE_TYPE_TIMESTAMP: "timestamp",
    entity_pb2.ATTRIBUTE_TYPE_ENUM: "enum",
}
ATTRIBUTE_TYPE_VALUES: dict[str, entity_pb2.AttributeType.ValueType] = {
    name: value for value, name in ATTRIBUTE_TYPE_NAMES.items()
}

OPERATOR_NAMES: dict[int, str] = {
    query_pb2.OPERATOR_EQUAL: "equal",
    query_pb2.OPERATOR_NOT_EQUAL: "not_equal",
    query_pb2.OPERATOR_LESS: "less",
    query_pb2.OPERATOR_LESS_OR_EQUAL: "less_or_equal",
    query_pb2.OPERATOR_GREATER: "greater",
    query_pb2.OPERATOR_GREATER_OR_EQUAL: "greater_or_equal",
    query_pb2.OPERATOR_IN: "in",
    query_pb2.OPERATOR_NOT_IN: "not_in",
    query_pb2.OPERATOR_IS_NULL: "is_null",
    query_pb2.OPERATOR_IS_NOT_NULL: "is_not_null",
    query_pb2.OPERATOR_LIKE: "like",
    query_pb2.OPERATOR_STARTS_WITH: "starts_with",
    query_pb2.OPERATOR_CONTAINS: "contains",
    query_pb2.OPERATOR_BETWEEN: "between",
    query_pb2.OPERATOR_WITHIN_LAST_DAYS: "within_last_days",
    query_pb2.OPERATOR_WITHIN_NEXT_DAYS: "within_next_days",
}

MEASURE_NAMES: dict[int, str] = {
    query_pb2.LINK_MEASURE_EXISTS: "exists",
    query_pb2.LINK_MEASURE_NOT_EXISTS: "not_exists",
    query_pb2.LINK_MEASURE_COUNT: "count",
    query_pb2.LINK_MEASURE_SUM: "sum",
    query_pb2.LINK_MEASURE_AVG: "avg",
    query_pb2.LINK_MEASURE_MIN: "min",
    query_pb2.LINK_MEASURE_MAX: "max",
}

CARDINALITY_NAMES: dict[int, str] = {
    entity_pb2.LINK_CARDINALITY_MANY_TO_ONE: MANY_TO_ONE,
    entity_pb2.LINK_CARDINALITY_ONE_TO_MANY: ONE_TO_MANY,
}
CARDINALITY_VALUES: dict[str, entity_pb2.LinkCardinality.ValueType] = {
    MANY_TO_ONE: entity_pb2.LINK_CARDINALITY_MANY_TO_ONE,
    ONE_TO_MANY: entity_pb2.LINK_CARDINALITY_ONE_TO_MANY,
}

CHANGE_OPERATIONS: dict[int, str] = {
    audience_service_pb2.CHANGE_OPERATION_UNSPECIFIED: UPSERT,
    audience_service_pb2.CHANGE_OPERATION_UPSERT: UPSERT,
    audience_service_pb2.CHANGE_OPERATION_DELETE: DELETE,
}

COMBINE_OPERATIONS: dict[int, str] = {
    audience_service_pb2.COMBINE_OPERATION_UNION: "union",
    audience_service_pb2.COMBINE_OPERATION_INTERSECTION: "intersection",
    audience_service_pb2.COMBINE_OPERATION_EXCLUSION: "exclusion",
}

DEDUPLICATION_METHODS: dict[int, str] = {
    audience_service_pb2.DEDUPLICATION_METHOD_RANDOM: "random",
    audience_service_pb2.DEDUPLICATION_METHOD_HIGHEST: "highest",
    audience_service_pb2.DEDUPLICATION_METHOD_LOWEST: "lowest",
    audience_service_pb2.DEDUPLICATION_METHOD_NON_EMPTY: "non_empty",
    audience_service_pb2.DEDUPLICATION_METHOD_PRIORITY: "priority",
}

# At most this many problems of rejected changes are listed in an IngestRecords response.
MAX_LISTED_REJECTIONS = 1000

_DECIMAL_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def raw_value(value: value_pb2.Value) -> RawValue:
    """The Python value of a Value message as sent, or :class:`Malformed` when it cannot be read."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return Malformed("unset", "the value has no kind set (use null_value for NULL)")
    if kind == "decimal_value" and not _DECIMAL_TEXT.match(value.decimal_value):
        return Malformed("decimal", f"{value.decimal_value!r} is not a decimal number")
    if kind == "date_value" and not _DATE_TEXT.match(value.date_value):
        return Malformed("date", f"{value.date_value!r} is not a date in YYYY-MM-DD form")
    try:
        return from_value(value)
    except (ValueError, ArithmeticError):
        return Malformed(kind.removesuffix("_value"), f"the {kind} is out of range or invalid")


def _link_target(name: str) -> str:
    """The entity id of a link target name ``entities/{entity}``; "" (a violation later) when malformed."""
    prefix = "entities/"
    return name[len(prefix) :] if name.startswith(prefix) and "/" not in name[len(prefix) :] else ""


def schema_from_proto(message: entity_pb2.Entity) -> EntitySchema:
    """The domain schema of an Entity message (its name and output-only fields are ignored)."""
    return EntitySchema(
        links=tuple(
            Link(
                name=link.name,
                target=_link_target(link.target),
                cardinality=CARDINALITY_NAMES.get(link.cardinality, ""),
                join=tuple(JoinPair(pair.attribute, pair.target_attribute) for pair in link.join),
            )
            for link in message.links
        ),
        attributes=tuple(
            Attribute(
                name=a.name,
                type=ATTRIBUTE_TYPE_NAMES.get(a.type, ""),
                nullable=a.nullable,
                enum_values=tuple(a.enum_values),
            )
            for a in message.attributes
        ),
        primary_key=tuple(message.primary_key),
        version_attribute=message.version_attribute,
        identity=(
            IdentityBinding(message.identity.attribute, message.identity.namespace)
            if message.HasField("identity")
            else None
        ),
        display_name=message.display_name,
    )


def entity_to_proto(entity: Entity) -> entity_pb2.Entity:
    """The Entity message of a stored entity."""
    schema = entity.schema
    message = entity_pb2.Entity(
        name=entity.name,
        display_name=schema.display_name,
        attributes=[
            entity_pb2.Attribute(
                name=a.name,
                type=ATTRIBUTE_TYPE_VALUES.get(a.type, entity_pb2.ATTRIBUTE_TYPE_UNSPECIFIED),
                nullable=a.nullable,
                enum_values=list(a.enum_values),
            )
            for a in schema.attributes
        ],
        primary_key=list(schema.primary_key),
        version_attribute=schema.version_attribute,
        links=[
            entity_pb2.Link(
                name=link.name,
                target=f"entities/{link.target}",
                cardinality=CARDINALITY_VALUES[link.cardinality],
                join=[
                    entity_pb2.JoinAttributes(attribute=p.attribute, target_attribute=p.target_attribute)
                    for p in link.join
                ],
            )
            for link in schema.links
        ],
    )
    if schema.identity is not None:
        message.identity.CopyFrom(
            entity_pb2.IdentityBinding(attribute=schema.identity.attribute, namespace=schema.identity.namespace)
        )
    if entity.create_time is not None:
        message.create_time.CopyFrom(to_timestamp(entity.create_time))
    if entity.update_time is not None:
        message.update_time.CopyFrom(to_timestamp(entity.update_time))
    return message


def filter_from_proto(message: query_pb2.Filter) -> Filter:
    """The domain filter tree of a Filter message (depth is bounded by protobuf's parser)."""
    kind = message.WhichOneof("kind")
    if kind == "condition":
        condition = message.condition
        return Condition(
            attribute=condition.attribute,
            operator=OPERATOR_NAMES.get(condition.operator, ""),
            values=tuple(raw_value(v) for v in condition.values),
            parameter=condition.parameter,
        )
    if kind == "link":
        link = message.link
        return LinkCondition(
            link=link.link,
            measure=MEASURE_NAMES.get(link.measure, ""),
            attribute=link.attribute,
            operator=OPERATOR_NAMES.get(link.operator, "") if link.operator else "",
            values=tuple(raw_value(v) for v in link.values),
            parameter=link.parameter,
            filter=filter_from_proto(link.filter) if link.HasField("filter") else None,
        )
    if kind == "all":
        return AllOf(tuple(filter_from_proto(f) for f in message.all.filters))
    if kind == "any":
        return AnyOf(tuple(filter_from_proto(f) for f in message.any.filters))
    if kind == "negate":
        return Negate(filter_from_proto(message.negate))
    return EmptyFilter()


def query_from_proto(message: query_pb2.AudienceQuery, field: str = "query") -> AudienceQuery:
    """The domain query of an AudienceQuery message; its dimension must be ``entities/{entity}``."""
    (entity_id,) = parse_name(message.dimension, "entities", field=f"{field}.dimension")
    return AudienceQuery(
        dimension=entity_id,
        filter=filter_from_proto(message.filter) if message.HasField("filter") else None,
    )


OPERATOR_VALUES = {name: value for value, name in OPERATOR_NAMES.items()}
MEASURE_VALUES = {name: value for value, name in MEASURE_NAMES.items()}


def filter_to_proto(node: Filter) -> query_pb2.Filter:
    """The Filter message of a domain filter tree (the inverse of :func:`filter_from_proto`)."""
    if isinstance(node, Condition):
        return query_pb2.Filter(
            condition=query_pb2.Condition(
                attribute=node.attribute,
                operator=OPERATOR_VALUES.get(node.operator, query_pb2.OPERATOR_UNSPECIFIED),  # type: ignore[arg-type]
                values=[to_value(v) for v in node.values],
                parameter=node.parameter,
            )
        )
    if isinstance(node, LinkCondition):
        link = query_pb2.LinkCondition(
            link=node.link,
            measure=MEASURE_VALUES.get(node.measure, query_pb2.LINK_MEASURE_UNSPECIFIED),  # type: ignore[arg-type]
            attribute=node.attribute,
            operator=OPERATOR_VALUES.get(node.operator, query_pb2.OPERATOR_UNSPECIFIED),  # type: ignore[arg-type]
            values=[to_value(v) for v in node.values],
            parameter=node.parameter,
        )
        if node.filter is not None:
            link.filter.CopyFrom(filter_to_proto(node.filter))
        return query_pb2.Filter(link=link)
    if isinstance(node, AllOf):
        return query_pb2.Filter(all=query_pb2.FilterList(filters=[filter_to_proto(f) for f in node.filters]))
    if isinstance(node, AnyOf):
        return query_pb2.Filter(any=query_pb2.FilterList(filters=[filter_to_proto(f) for f in node.filters]))
    if isinstance(node, Negate):
        return query_pb2.Filter(negate=filter_to_proto(node.filter))
    return query_pb2.Filter()


def audience_to_proto(audience: SavedAudience) -> audience_pb2.Audience:
    """The Audience message of a saved audience."""
    message = audience_pb2.Audience(
        name=audience.name,
        display_name=audience.display_name,
        kind=audience_pb2.AUDIENCE_KIND_DEFINITION
        if audience.kind == DEFINITION
        else audience_pb2.AUDIENCE_KIND_SNAPSHOT,
        dimension=f"entities/{audience.entity_id}",
        member_count=audience.member_count,
        create_time=to_timestamp(audience.create_time),
        update_time=to_timestamp(audience.update_time),
    )
    if audience.query is not None:
        message.query.dimension = f"entities/{audience.query.dimension}"
        if audience.query.filter is not None:
            message.query.filter.CopyFrom(filter_to_proto(audience.query.filter))
    return message


def bindings_from_proto(
    reference_time: timestamp_pb2.Timestamp | None, parameters: Mapping[str, query_pb2.ParameterValue]
) -> Bindings:
    """The execution bindings of a request: its reference time (None: now) and parameter values."""
    return Bindings(
        reference_time=from_timestamp(reference_time) if reference_time is not None else None,
        parameters={name: tuple(raw_value(v) for v in value.values) for name, value in parameters.items()},
    )


def working_set_to_proto(working_set: WorkingSet) -> working_set_pb2.WorkingSet:
    """The WorkingSet message of a domain working set."""
    return working_set_pb2.WorkingSet(
        name=working_set.name,
        run=working_set.run,
        activity=working_set.activity,
        dimension=working_set.dimension,
        count=working_set.count,
        create_time=to_timestamp(working_set.create_time),
        expire_time=to_timestamp(working_set.expire_time),
    )


def record_to_proto(record: WorkingSetRecord) -> working_set_pb2.WorkingSetRow:
    """The WorkingSetRow message of one streamed record (identity left empty without a binding)."""
    row = working_set_pb2.WorkingSetRow(
        position=record.position, entity_key=record.entity_key, values=to_value_map(record.values)
    )
    if record.identity is not None:
        row.identity.CopyFrom(value_pb2.Identity(namespace=record.identity[0], value=record.identity[1]))
    return row


class AudienceServicer(audience_service_pb2_grpc.AudienceServiceServicer):
    """AudienceService over the entity catalog, the evaluator and the working-set store."""

    def __init__(
        self,
        catalog: EntityCatalog,
        evaluator: AudienceEvaluator,
        working_sets: WorkingSetStore,
        saved: SavedAudienceStore | None = None,
    ) -> None:
        self.catalog = catalog
        self.evaluator = evaluator
        self.working_sets = working_sets
        self.saved = saved or SavedAudienceStore(catalog, working_sets, limits=evaluator.limits)
        self.database = catalog.database

    @staticmethod
    def _source(has_query: bool, query: query_pb2.AudienceQuery, audience: str) -> tuple[AudienceQuery | None, str]:
        """The ad-hoc query or the saved audience id of a request (exactly one must be set)."""
        if has_query == bool(audience):
            raise InvalidArgument("set exactly one of query and audience", field="query" if has_query else "audience")
        if audience:
            (audience_id,) = parse_name(audience, "audiences", field="audience")
            return None, audience_id
        return query_from_proto(query), ""

    async def CreateEntity(
        self, request: audience_service_pb2.CreateEntityRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.CreateEntityResponse:
        entity = await self.database.run(
            self.catalog.create_entity, current_sandbox(), request.entity_id, schema_from_proto(request.entity)
        )
        return audience_service_pb2.CreateEntityResponse(entity=entity_to_proto(entity))

    async def GetEntity(
        self, request: audience_service_pb2.GetEntityRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.GetEntityResponse:
        (entity_id,) = parse_name(request.name, "entities")
        entity = await self.database.run(self.catalog.get_entity, current_sandbox(), entity_id)
        return audience_service_pb2.GetEntityResponse(entity=entity_to_proto(entity))

    async def UpdateEntity(
        self, request: audience_service_pb2.UpdateEntityRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.UpdateEntityResponse:
        (entity_id,) = parse_name(request.entity.name, "entities", field="entity.name")
        paths = list(request.update_mask.paths)
        if paths != ["links"]:
            raise InvalidArgument(
                "only the links of an entity can be updated (update_mask must be exactly ['links'])",
                field="update_mask",
                reason="UNSUPPORTED_UPDATE_MASK",
            )
        links = schema_from_proto(request.entity).links
        entity = await self.database.run(self.catalog.add_links, current_sandbox(), entity_id, links)
        return audience_service_pb2.UpdateEntityResponse(entity=entity_to_proto(entity))

    async def ListEntities(
        self, request: audience_service_pb2.ListEntitiesRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.ListEntitiesResponse:
        entities, token = await self.database.run(
            self.catalog.list_entities, current_sandbox(), request.page_size, request.page_token
        )
        return audience_service_pb2.ListEntitiesResponse(
            entities=[entity_to_proto(e) for e in entities], next_page_token=token
        )

    async def IngestRecords(
        self,
        request_iterator: AsyncIterator[audience_service_pb2.IngestRecordsRequest],
        context: grpc.aio.ServicerContext,
    ) -> audience_service_pb2.IngestRecordsResponse:
        sandbox = current_sandbox()
        total = IngestResult()
        batches = 0
        entity: Entity | None = None
        entity_name = ""
        rejections: list[audience_service_pb2.RejectedChange] = []
        async for request in request_iterator:
            try:
                if entity is None:
                    (entity_id,) = parse_name(request.entity, "entities", field="entity")
                    entity = await self.database.run(self.catalog.get_entity, sandbox, entity_id, field="entity")
                    entity_name = request.entity
                elif request.entity != entity_name:
                    raise InvalidArgument(
                        f"every batch of a stream must name {entity_name}", field="entity", reason="ENTITY_MISMATCH"
                    )
                changes = [
                    RecordChange(
                        operation=CHANGE_OPERATIONS.get(change.operation, ""),
                        values={name: raw_value(value) for name, value in change.values.items()},
                    )
                    for change in request.changes
                ]
                result = await self.database.run(
                    apply_changes, self.database, entity, changes, allow_partial=request.allow_partial
                )
            except CarillonError as exc:
                # Earlier batches stay applied: tell the client which batch failed.
                exc.metadata.setdefault("batch_index", str(batches))
                exc.metadata.setdefault("batches_applied", str(batches))
                raise
            total.add(result)
            rejections.extend(
                audience_service_pb2.RejectedChange(batch_index=batches, field=v.field, description=v.description)
                for v in result.rejections[: MAX_LISTED_REJECTIONS - len(rejections)]
            )
            batches += 1
        return audience_service_pb2.IngestRecordsResponse(
            batches=batches,
            upserted=total.upserted,
            deleted=total.deleted,
            ignored_stale=total.ignored_stale,
            rejected=total.rejected,
            rejections=rejections,
        )

    async def EvaluateAudience(
        self, request: audience_service_pb2.EvaluateAudienceRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.EvaluateAudienceResponse:
        bindings = bindings_from_proto(
            request.reference_time if request.HasField("reference_time") else None, request.parameters
        )
        query, audience_id = self._source(request.HasField("query"), request.query, request.audience)
        sandbox = current_sandbox()

        def evaluate() -> Evaluation:
            if query is not None:
                return self.evaluator.evaluate(
                    sandbox,
                    query,
                    sample=request.sample_size,
                    explain=request.explain,
                    bindings=bindings,
                    distribution_attribute=request.distribution_attribute,
                )
            size = sample_size(request.sample_size)
            entity, where = self.saved.resolve(sandbox, audience_id, bindings)
            return self.evaluator.evaluate_where(entity, where, size, request.explain, request.distribution_attribute)

        evaluation = await self.database.run(evaluate)
        return audience_service_pb2.EvaluateAudienceResponse(
            count=evaluation.count,
            sample_keys=evaluation.sample_keys,
            sql=evaluation.sql,
            distribution=[
                audience_service_pb2.ValueCount(value=to_value(value), count=count)
                for value, count in evaluation.distribution
            ],
        )

    async def BuildWorkingSet(
        self, request: audience_service_pb2.BuildWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.BuildWorkingSetResponse:
        bindings = bindings_from_proto(
            request.reference_time if request.HasField("reference_time") else None, request.parameters
        )
        query, audience_id = self._source(request.HasField("query"), request.query, request.audience)
        sandbox = current_sandbox()

        def build() -> WorkingSet:
            resolved = self.saved.resolve(sandbox, audience_id, bindings) if audience_id else None
            return self.working_sets.build(sandbox, request.run, request.activity, query, bindings, resolved=resolved)

        working_set = await self.database.run(build)
        return audience_service_pb2.BuildWorkingSetResponse(working_set=working_set_to_proto(working_set))

    async def CreateAudience(
        self, request: audience_service_pb2.CreateAudienceRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.CreateAudienceResponse:
        if not request.audience.HasField("query"):
            raise InvalidArgument("a definition audience needs a query", field="audience.query")
        query = query_from_proto(request.audience.query, field="audience.query")
        audience = await self.database.run(
            self.saved.create_definition,
            current_sandbox(),
            request.audience_id,
            request.audience.display_name,
            query,
        )
        return audience_service_pb2.CreateAudienceResponse(audience=audience_to_proto(audience))

    async def SaveAudience(
        self, request: audience_service_pb2.SaveAudienceRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.SaveAudienceResponse:
        (working_set_id,) = parse_name(request.working_set, "workingSets", field="working_set")
        audience, created = await self.database.run(
            self.saved.save_working_set, current_sandbox(), request.audience_id, working_set_id, request.display_name
        )
        return audience_service_pb2.SaveAudienceResponse(audience=audience_to_proto(audience), created=created)

    async def GetAudience(
        self, request: audience_service_pb2.GetAudienceRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.GetAudienceResponse:
        (audience_id,) = parse_name(request.name, "audiences")
        audience = await self.database.run(self.saved.get, current_sandbox(), audience_id)
        return audience_service_pb2.GetAudienceResponse(audience=audience_to_proto(audience))

    async def ListAudiences(
        self, request: audience_service_pb2.ListAudiencesRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.ListAudiencesResponse:
        audiences, token = await self.database.run(
            self.saved.list, current_sandbox(), request.page_size, request.page_token
        )
        return audience_service_pb2.ListAudiencesResponse(
            audiences=[audience_to_proto(a) for a in audiences], next_page_token=token
        )

    async def DeleteAudience(
        self, request: audience_service_pb2.DeleteAudienceRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.DeleteAudienceResponse:
        (audience_id,) = parse_name(request.name, "audiences")
        await self.database.run(self.saved.delete, current_sandbox(), audience_id)
        return audience_service_pb2.DeleteAudienceResponse()

    async def CombineWorkingSets(
        self, request: audience_service_pb2.CombineWorkingSetsRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.CombineWorkingSetsResponse:
        (primary,) = parse_name(request.primary, "workingSets", field="primary")
        others = [parse_name(o, "workingSets", field=f"others[{i}]")[0] for i, o in enumerate(request.others)]
        operation = COMBINE_OPERATIONS.get(request.operation, "")
        working_set = await self.database.run(
            self.working_sets.combine, current_sandbox(), request.run, request.activity, primary, others, operation
        )
        return audience_service_pb2.CombineWorkingSetsResponse(working_set=working_set_to_proto(working_set))

    async def ChangeDimension(
        self, request: audience_service_pb2.ChangeDimensionRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.ChangeDimensionResponse:
        (source,) = parse_name(request.working_set, "workingSets", field="working_set")
        working_set, unmatched = await self.database.run(
            self.working_sets.change_dimension, current_sandbox(), request.run, request.activity, source, request.link
        )
        return audience_service_pb2.ChangeDimensionResponse(
            working_set=working_set_to_proto(working_set), unmatched=unmatched
        )

    async def SplitWorkingSet(
        self, request: audience_service_pb2.SplitWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.SplitWorkingSetResponse:
        (source,) = parse_name(request.working_set, "workingSets", field="working_set")
        bindings = bindings_from_proto(
            request.reference_time if request.HasField("reference_time") else None, request.parameters
        )
        subsets = [
            Subset(
                activity=subset.activity,
                filter=filter_from_proto(subset.filter) if subset.HasField("filter") else None,
                limit=subset.limit,
                limit_percent=subset.limit_percent,
                order_by=tuple((key.attribute, key.descending) for key in subset.order_by),
            )
            for subset in request.subsets
        ]
        built, complement = await self.database.run(
            functools.partial(
                self.working_sets.split,
                current_sandbox(),
                request.run,
                source,
                subsets,
                complement_activity=request.complement_activity,
                overlap=request.overlap,
                bindings=bindings,
            )
        )
        response = audience_service_pb2.SplitWorkingSetResponse(subsets=[working_set_to_proto(w) for w in built])
        if complement is not None:
            response.complement.CopyFrom(working_set_to_proto(complement))
        return response

    async def DeduplicateWorkingSet(
        self, request: audience_service_pb2.DeduplicateWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.DeduplicateWorkingSetResponse:
        (source,) = parse_name(request.working_set, "workingSets", field="working_set")
        result, complement = await self.database.run(
            functools.partial(
                self.working_sets.deduplicate,
                current_sandbox(),
                request.run,
                request.activity,
                source,
                list(request.fields),
                keep=request.keep or 1,
                method=DEDUPLICATION_METHODS.get(request.method, "lowest"),
                attribute=request.attribute,
                priority=tuple(raw_value(v) for v in request.priority),
                complement_activity=request.complement_activity,
            )
        )
        response = audience_service_pb2.DeduplicateWorkingSetResponse(working_set=working_set_to_proto(result))
        if complement is not None:
            response.complement.CopyFrom(working_set_to_proto(complement))
        return response

    async def GetWorkingSet(
        self, request: audience_service_pb2.GetWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.GetWorkingSetResponse:
        (working_set_id,) = parse_name(request.name, "workingSets")
        working_set = await self.database.run(self.working_sets.get, current_sandbox(), working_set_id)
        return audience_service_pb2.GetWorkingSetResponse(working_set=working_set_to_proto(working_set))

    async def StreamWorkingSet(
        self, request: audience_service_pb2.StreamWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[audience_service_pb2.StreamWorkingSetResponse]:
        (working_set_id,) = parse_name(request.working_set, "workingSets", field="working_set")
        size = batch_size(request.batch_size)
        if request.after_position < 0:
            raise InvalidArgument("after_position must not be negative", field="after_position")
        aggregates = tuple(
            Aggregate(
                alias=e.alias,
                link=e.link,
                measure=MEASURE_NAMES.get(e.measure, ""),
                attribute=e.attribute,
                filter=filter_from_proto(e.filter) if e.HasField("filter") else None,
            )
            for e in request.enrichments
        )
        bindings = bindings_from_proto(request.reference_time if request.HasField("reference_time") else None, {})
        plan = await self.database.run(
            functools.partial(
                self.working_sets.open_stream,
                current_sandbox(),
                working_set_id,
                list(request.attributes),
                aggregates=aggregates,
                bindings=bindings,
            )
        )
        after = request.after_position
        while True:
            records = await self.database.run(self.working_sets.read_batch, plan, after, size)
            if records:
                yield audience_service_pb2.StreamWorkingSetResponse(rows=[record_to_proto(r) for r in records])
            if len(records) < size:
                return
            after = records[-1].position
