"""The AudienceService servicer: translates protobuf requests to domain calls and back.

No SQL here: every call reads the caller's sandbox, converts the request to domain values, runs the
domain code on the database worker pool and converts the result. Domain errors propagate to the
chassis interceptor, which maps them to rich gRPC statuses.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc

from audience_svc.audiences import AudienceEvaluator
from audience_svc.coercion import Malformed, RawValue
from audience_svc.entities import EntityCatalog
from audience_svc.ingest import DELETE, UPSERT, IngestResult, RecordChange, apply_changes
from audience_svc.query import AllOf, AnyOf, AudienceQuery, Condition, EmptyFilter, Filter, Negate
from audience_svc.schema import Attribute, Entity, EntitySchema, IdentityBinding
from audience_svc.working_sets import WorkingSet, WorkingSetRecord, WorkingSetStore, batch_size
from carillon.audience.v1 import (
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
from carillon_chassis.values import from_value, to_timestamp, to_value_map

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
}

CHANGE_OPERATIONS: dict[int, str] = {
    audience_service_pb2.CHANGE_OPERATION_UNSPECIFIED: UPSERT,
    audience_service_pb2.CHANGE_OPERATION_UPSERT: UPSERT,
    audience_service_pb2.CHANGE_OPERATION_DELETE: DELETE,
}

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


def schema_from_proto(message: entity_pb2.Entity) -> EntitySchema:
    """The domain schema of an Entity message (its name and output-only fields are ignored)."""
    return EntitySchema(
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

    def __init__(self, catalog: EntityCatalog, evaluator: AudienceEvaluator, working_sets: WorkingSetStore) -> None:
        self.catalog = catalog
        self.evaluator = evaluator
        self.working_sets = working_sets
        self.database = catalog.database

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
                result = await self.database.run(apply_changes, self.database, entity, changes)
            except CarillonError as exc:
                # Earlier batches stay applied: tell the client which batch failed.
                exc.metadata.setdefault("batch_index", str(batches))
                exc.metadata.setdefault("batches_applied", str(batches))
                raise
            total.add(result)
            batches += 1
        return audience_service_pb2.IngestRecordsResponse(
            batches=batches, upserted=total.upserted, deleted=total.deleted, ignored_stale=total.ignored_stale
        )

    async def EvaluateAudience(
        self, request: audience_service_pb2.EvaluateAudienceRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.EvaluateAudienceResponse:
        query = query_from_proto(request.query)
        evaluation = await self.database.run(
            self.evaluator.evaluate, current_sandbox(), query, sample=request.sample_size, explain=request.explain
        )
        return audience_service_pb2.EvaluateAudienceResponse(
            count=evaluation.count, sample_keys=evaluation.sample_keys, sql=evaluation.sql
        )

    async def BuildWorkingSet(
        self, request: audience_service_pb2.BuildWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.BuildWorkingSetResponse:
        query = query_from_proto(request.query)
        working_set = await self.database.run(
            self.working_sets.build, current_sandbox(), request.run, request.activity, query
        )
        return audience_service_pb2.BuildWorkingSetResponse(working_set=working_set_to_proto(working_set))

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
        plan = await self.database.run(
            self.working_sets.open_stream, current_sandbox(), working_set_id, list(request.attributes)
        )
        after = request.after_position
        while True:
            records = await self.database.run(self.working_sets.read_batch, plan, after, size)
            if records:
                yield audience_service_pb2.StreamWorkingSetResponse(rows=[record_to_proto(r) for r in records])
            if len(records) < size:
                return
            after = records[-1].position
