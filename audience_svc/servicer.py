"""The AudienceService servicer: translates protobuf requests to domain calls and back.

No SQL here: every call reads the caller's sandbox, converts the request to domain values, runs the
domain code on the database worker pool and converts the result. Domain errors propagate to the
chassis interceptor, which maps them to rich gRPC statuses.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import AsyncIterator, Mapping

import grpc
from google.protobuf import timestamp_pb2

from audience_svc.audiences import AudienceEvaluator, Evaluation, sample_size
from audience_svc.blocks import RecordBlock
from audience_svc.coercion import Malformed, RawValue
from audience_svc.collection_enrichment import Collection
from audience_svc.entities import EntityCatalog
from audience_svc.incremental import (
    DEFAULT_HISTORY_WINDOW,
    MAX_HISTORY_WINDOW,
    IncrementalBuild,
    IncrementalBuilder,
    IncrementalMode,
)
from audience_svc.incremental import ProcessedKeys as IncrementalProcessedKeys
from audience_svc.incremental import Watermark as IncrementalWatermark
from audience_svc.ingest import DELETE, UPSERT, IngestResult, RecordChange
from audience_svc.ingest_stream import IngestStream
from audience_svc.message_logs import MessageLog, MessageLogRecorder
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
from audience_svc.reconciliation import Reconciliation, reconcile
from audience_svc.saved_audiences import DEFINITION, Resolved, SavedAudience, SavedAudienceStore
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
from audience_svc.violations import invalid_argument
from audience_svc.working_sets import Subset, WorkingSet, WorkingSetRecord, WorkingSetStore, batch_size
from carillon.audience.v1 import (
    audience_pb2,
    audience_service_pb2,
    audience_service_pb2_grpc,
    entity_pb2,
    message_log_pb2,
    query_pb2,
    working_set_pb2,
)
from carillon.type.v1 import value_pb2
from carillon_chassis.channels import channel_name
from carillon_chassis.errors import CarillonError, FieldViolation, InvalidArgument
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

MESSAGE_STATUS_NAMES: dict[int, str] = {
    message_log_pb2.MESSAGE_STATUS_SENT: "sent",
    message_log_pb2.MESSAGE_STATUS_DELIVERED: "delivered",
    message_log_pb2.MESSAGE_STATUS_OPENED: "opened",
    message_log_pb2.MESSAGE_STATUS_CLICKED: "clicked",
    message_log_pb2.MESSAGE_STATUS_BOUNCED: "bounced",
    message_log_pb2.MESSAGE_STATUS_FAILED: "failed",
}

# The update_mask paths of UpdateEntity that can change (the others are refused as incompatible).
UPDATABLE_ENTITY_FIELDS = ("attributes", "links")
FIXED_ENTITY_FIELDS = ("primary_key", "version_attribute", "identity")

# At most this many problems of rejected changes are listed in an IngestRecords response.
MAX_LISTED_REJECTIONS = 1000

_DECIMAL_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def raw_value(value: value_pb2.Value) -> RawValue:
    """The Python value of a Value message as sent, or :class:`Malformed` when it cannot be read."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":  # the most common kinds first, read directly
        return value.string_value
    if kind == "integer_value":
        return value.integer_value
    if kind is None:
        return Malformed("unset", "the value has no kind set (use null_value for NULL)")
    if kind in ("list_value", "struct_value"):
        return Malformed(kind.removesuffix("_value"), "lists and structs are not attribute values")
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


def timestamp_from_proto(stamp: timestamp_pb2.Timestamp, field: str, reason: str = "INVALID_TIMESTAMP") -> dt.datetime:
    """The UTC datetime of a Timestamp; INVALID_ARGUMENT naming ``field`` when it is out of range
    (before year 1, after year 9999, or nanos outside 0-999,999,999)."""
    try:
        return from_timestamp(stamp)
    except ValueError as exc:
        raise InvalidArgument(
            f"{field} must be a valid timestamp between years 1 and 9999", field=field, reason=reason
        ) from exc


def bindings_from_proto(
    reference_time: timestamp_pb2.Timestamp | None, parameters: Mapping[str, query_pb2.ParameterValue]
) -> Bindings:
    """The execution bindings of a request: its reference time (None: now) and parameter values."""
    return Bindings(
        reference_time=timestamp_from_proto(reference_time, "reference_time") if reference_time is not None else None,
        parameters={name: tuple(raw_value(v) for v in value.values) for name, value in parameters.items()},
    )


_NO_DEFAULTS = message_log_pb2.MessageLog()


def message_log_from_proto(
    message: message_log_pb2.MessageLog,
    field: str = "log",
    defaults: message_log_pb2.MessageLog = _NO_DEFAULTS,
) -> MessageLog:
    """The domain message log of a MessageLog message (unset enums become "" for validation), its unset
    status, campaign, run, activity, channel and event time taken from ``defaults``; INVALID_ARGUMENT
    naming ``{field}.event_time`` when the event time is out of range."""
    timed = message if message.HasField("event_time") else defaults
    event_time = (
        timestamp_from_proto(timed.event_time, f"{field}.event_time", "INVALID_MESSAGE_LOGS")
        if timed.HasField("event_time")
        else None
    )
    return MessageLog(
        message_id=message.message_id,
        status=MESSAGE_STATUS_NAMES.get(message.status or defaults.status, ""),
        campaign=message.campaign or defaults.campaign,
        run=message.run or defaults.run,
        activity=message.activity or defaults.activity,
        channel=channel_name(message.channel or defaults.channel),
        identity_namespace=message.identity.namespace,
        identity_value=message.identity.value,
        profile_id=message.profile_id,
        entity_key=message.entity_key,
        event_time=event_time,
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
    for alias, linked in record.collections.items():
        row.values[alias].CopyFrom(to_value(linked))
    return row


def incremental_from_proto(message: working_set_pb2.Incremental) -> IncrementalMode:
    """The domain mode of an Incremental message; INVALID_ARGUMENT when no mode is set."""
    kind = message.WhichOneof("mode")
    if kind == "processed_keys":
        keys = message.processed_keys
        window = DEFAULT_HISTORY_WINDOW
        if keys.HasField("history_window"):
            if abs(keys.history_window.seconds) > MAX_HISTORY_WINDOW.total_seconds():
                raise InvalidArgument(
                    f"the history window must be between 0 and {MAX_HISTORY_WINDOW.days} days",
                    field="incremental.processed_keys.history_window",
                    reason="INVALID_INCREMENTAL",
                )
            window = keys.history_window.ToTimedelta()
        return IncrementalProcessedKeys(history_window=window)
    if kind == "watermark":
        mark = message.watermark
        initial = (
            timestamp_from_proto(mark.initial_time, "incremental.watermark.initial_time", "INVALID_INCREMENTAL")
            if mark.HasField("initial_time")
            else None
        )
        return IncrementalWatermark(attribute=mark.attribute, initial=initial)
    raise InvalidArgument("set processed_keys or watermark", field="incremental.mode", reason="INVALID_INCREMENTAL")


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
        self.message_logs = MessageLogRecorder(catalog)
        self.incremental = IncrementalBuilder(working_sets)
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
        fixed = [path for path in paths if path in FIXED_ENTITY_FIELDS]
        if fixed:
            raise InvalidArgument(
                f"the {fixed[0]} of an existing entity cannot change",
                field=f"entity.{fixed[0]}",
                reason="INCOMPATIBLE_SCHEMA_CHANGE",
            )
        if not paths or any(path not in UPDATABLE_ENTITY_FIELDS for path in paths):
            raise InvalidArgument(
                "update_mask lists the fields to update: attributes and/or links",
                field="update_mask",
                reason="UNSUPPORTED_UPDATE_MASK",
            )
        schema = schema_from_proto(request.entity)
        entity = await self.database.run(
            functools.partial(
                self.catalog.update_schema,
                current_sandbox(),
                entity_id,
                attributes=schema.attributes if "attributes" in paths else None,
                links=schema.links if "links" in paths else None,
            )
        )
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
        stream: IngestStream | None = None
        entity_name = ""
        try:
            async for request in request_iterator:
                try:
                    if stream is None:
                        (entity_id,) = parse_name(request.entity, "entities", field="entity")
                        entity = await self.database.run(
                            self.catalog.writable_entity, sandbox, entity_id, field="entity"
                        )
                        stream = IngestStream(self.database, entity, max_rejections=MAX_LISTED_REJECTIONS)
                        entity_name = request.entity
                    elif request.entity != entity_name:
                        raise InvalidArgument(
                            f"every batch of a stream must name {entity_name}", field="entity", reason="ENTITY_MISMATCH"
                        )
                    if request.HasField("block"):
                        if request.changes:
                            raise InvalidArgument(
                                "a batch carries either changes or a block", field="block", reason="INVALID_RECORDS"
                            )
                        block = RecordBlock(columns=tuple(request.block.columns), text=request.block.csv)
                        await stream.add_block(block, allow_partial=request.allow_partial)
                    else:
                        changes = [
                            RecordChange(
                                operation=CHANGE_OPERATIONS.get(change.operation, ""),
                                values={name: raw_value(value) for name, value in change.values.items()},
                            )
                            for change in request.changes
                        ]
                        await stream.add_changes(changes, allow_partial=request.allow_partial)
                except CarillonError as exc:
                    self._failed_batch(exc, stream)
                    raise
            if stream is not None:
                try:
                    await stream.finish()
                except CarillonError as exc:
                    self._failed_batch(exc, stream)
                    raise
        finally:
            if stream is not None:
                await stream.close()
        total = stream.total if stream is not None else IngestResult()
        return audience_service_pb2.IngestRecordsResponse(
            batches=stream.batches if stream is not None else 0,
            upserted=total.upserted,
            deleted=total.deleted,
            ignored_stale=total.ignored_stale,
            rejected=total.rejected,
            rejections=[
                audience_service_pb2.RejectedChange(batch_index=index, field=v.field, description=v.description)
                for index, v in (stream.rejections if stream is not None else [])
            ],
        )

    @staticmethod
    def _failed_batch(exc: CarillonError, stream: IngestStream | None) -> None:
        """Earlier batches stay applied: tell the client which batch failed."""
        applied = str(stream.batches if stream is not None else 0)
        exc.metadata.setdefault("batch_index", applied)
        exc.metadata.setdefault("batches_applied", applied)

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
            return self.saved.read(
                sandbox,
                audience_id,
                lambda resolved: self.evaluator.evaluate_where(
                    *resolved, size, request.explain, request.distribution_attribute
                ),
                bindings,
            )

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
        mode = incremental_from_proto(request.incremental) if request.HasField("incremental") else None

        def build(resolved: Resolved | None) -> IncrementalBuild:
            if mode is not None:
                return self.incremental.build(
                    sandbox, request.run, request.activity, query, mode, bindings, resolved=resolved
                )
            working_set = self.working_sets.build(
                sandbox, request.run, request.activity, query, bindings, resolved=resolved
            )
            return IncrementalBuild(working_set, 0)

        def build_from_source() -> IncrementalBuild:
            # A saved audience is read through the store, which reads it again if a save replaces it meanwhile.
            return self.saved.read(sandbox, audience_id, build, bindings) if audience_id else build(None)

        built = await self.database.run(build_from_source)
        return audience_service_pb2.BuildWorkingSetResponse(
            working_set=working_set_to_proto(built.working_set), excluded=built.excluded
        )

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

    async def ReconcileWorkingSet(
        self, request: audience_service_pb2.ReconcileWorkingSetRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.ReconcileWorkingSetResponse:
        (source,) = parse_name(request.working_set, "workingSets", field="working_set")
        (target,) = parse_name(request.target, "entities", field="target")
        result: Reconciliation = await self.database.run(
            functools.partial(
                reconcile,
                self.working_sets,
                current_sandbox(),
                request.run,
                request.activity,
                source,
                target,
                [(pair.source_attribute, pair.target_attribute) for pair in request.pairs],
                unreconciled_activity=request.unreconciled_activity,
            )
        )
        response = audience_service_pb2.ReconcileWorkingSetResponse(
            working_set=working_set_to_proto(result.working_set),
            matched=result.matched,
            unmatched=result.unmatched,
            ambiguous=result.ambiguous,
        )
        if result.unreconciled is not None:
            response.unreconciled.CopyFrom(working_set_to_proto(result.unreconciled))
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
        collections = tuple(
            Collection(
                alias=c.alias,
                link=c.link,
                limit=c.limit,
                order_by=tuple((key.attribute, key.descending) for key in c.order_by),
                attributes=tuple(c.attributes),
                filter=filter_from_proto(c.filter) if c.HasField("filter") else None,
            )
            for c in request.collections
        )
        bindings = bindings_from_proto(request.reference_time if request.HasField("reference_time") else None, {})
        plan = await self.database.run(
            functools.partial(
                self.working_sets.open_stream,
                current_sandbox(),
                working_set_id,
                list(request.attributes),
                aggregates=aggregates,
                collections=collections,
                bindings=bindings,
            )
        )

        def read(after: int) -> tuple[list[working_set_pb2.WorkingSetRow], int]:
            # Read and convert in the thread pool: a batch with collections is large to convert.
            records = self.working_sets.read_batch(plan, after, size)
            return [record_to_proto(r) for r in records], records[-1].position if records else after

        after = request.after_position
        while True:
            rows, last = await self.database.run(read, after)
            if rows:
                yield audience_service_pb2.StreamWorkingSetResponse(rows=rows)
            if len(rows) < size:
                return
            after = last

    async def RecordMessageLogs(
        self, request: audience_service_pb2.RecordMessageLogsRequest, context: grpc.aio.ServicerContext
    ) -> audience_service_pb2.RecordMessageLogsResponse:
        logs: list[MessageLog] = []
        defaults = request.defaults
        own = {
            "message_id": bool(defaults.message_id),
            "identity": defaults.HasField("identity"),
            "profile_id": bool(defaults.profile_id),
            "entity_key": bool(defaults.entity_key),
        }
        violations = [
            FieldViolation(f"defaults.{name}", f"{name} is each log's own; it cannot be a default")
            for name, set_ in own.items()
            if set_
        ]
        for i, log in enumerate(request.logs):
            try:
                logs.append(message_log_from_proto(log, f"logs[{i}]", defaults))
            except InvalidArgument as exc:
                violations += exc.violations
        if violations:
            raise invalid_argument(
                f"{len(violations)} problem(s) in the message logs; nothing was recorded",
                violations,
                "INVALID_MESSAGE_LOGS",
            )
        result = await self.database.run(self.message_logs.record, current_sandbox(), logs)
        return audience_service_pb2.RecordMessageLogsResponse(recorded=result.recorded, duplicates=result.duplicates)
