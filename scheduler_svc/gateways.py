"""The scheduler's ports to the other services, and their gRPC adapters.

The engine talks to audience_svc and to the delivery workers only through the two small protocols
here, so that it runs in unit tests against fakes. The gRPC adapters put the sandbox in the call
metadata of every call and turn a failed call into the matching :class:`CarillonError` (``UNAVAILABLE``
and other transport failures become :class:`Unavailable`, which the engine retries).

Row values and the audience query are the shared contract's messages (``carillon.type.v1.Value``,
``carillon.audience.v1.AudienceQuery``): the scheduler forwards them without interpreting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

import grpc
from google.rpc import status_pb2

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import query_pb2, working_set_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.delivery.v1 import delivery_service_pb2_grpc as dlv_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.channels import category_value, channel_value
from carillon_chassis.clients import call_metadata
from carillon_chassis.errors import Unavailable, error_from_rpc, error_from_status
from carillon_chassis.values import from_timestamp, to_timestamp
from scheduler_svc.model import Ack, Deduplicate, SendWindow, SplitSubset

_COMBINE_OPERATIONS = {
    "union": aud.COMBINE_OPERATION_UNION,
    "intersection": aud.COMBINE_OPERATION_INTERSECTION,
    "exclusion": aud.COMBINE_OPERATION_EXCLUSION,
}
_DEDUPLICATION_METHODS = {
    "": aud.DEDUPLICATION_METHOD_UNSPECIFIED,
    "random": aud.DEDUPLICATION_METHOD_RANDOM,
    "highest": aud.DEDUPLICATION_METHOD_HIGHEST,
    "lowest": aud.DEDUPLICATION_METHOD_LOWEST,
    "non_empty": aud.DEDUPLICATION_METHOD_NON_EMPTY,
    "priority": aud.DEDUPLICATION_METHOD_PRIORITY,
}


def _info(working_set: Any) -> WorkingSetInfo:
    return WorkingSetInfo(name=working_set.name, count=working_set.count, dimension=working_set.dimension)


@dataclass(frozen=True)
class WorkingSetInfo:
    """A built working set: its name (``workingSets/{working_set}``), how many records it holds and
    its dimension (``entities/{entity}``; empty when not known, as for a resumed run)."""

    name: str
    count: int
    dimension: str = ""
    # Matching records an incremental build left out (earlier runs produced them).
    excluded: int = 0


@dataclass(frozen=True)
class Reconciled:
    """The outcome of a reconciliation: the reconciled working set, the unreconciled one when asked
    for, and how many source records matched once, none or several times."""

    reconciled: WorkingSetInfo
    unreconciled: WorkingSetInfo | None
    matched: int
    unmatched: int
    ambiguous: int


@dataclass(frozen=True)
class Row:
    """One working-set record: its position, key, the person (namespace, value) and attribute values."""

    position: int
    entity_key: str
    identity: tuple[str, str]
    values: Mapping[str, value_pb2.Value] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamEnrichment:
    """What a stream adds to each row besides the plain attributes (the enrich activities upstream):
    many-to-one attribute ``paths`` as (alias, path) pairs, aggregates and collections of linked
    records (the audience contract's messages), with the reference time of their relative dates."""

    paths: tuple[tuple[str, str], ...] = ()
    aggregates: tuple[aud.Enrichment, ...] = ()
    collections: tuple[aud.CollectionEnrichment, ...] = ()
    reference_time: datetime | None = None

    def request_attributes(self, attributes: Sequence[str]) -> list[str]:
        """The attributes to request: ``attributes``, then every path not among them, once each."""
        return list(dict.fromkeys([*attributes, *(p for _, p in self.paths)]))

    def rename(self, values: Mapping[str, value_pb2.Value], attributes: Sequence[str]) -> dict[str, value_pb2.Value]:
        """A streamed row's values with each path's value under its alias (a path is kept under its own
        name only when it is one of the plain ``attributes``)."""
        renamed = {k: v for k, v in values.items() if k in attributes or k not in {p for _, p in self.paths}}
        for alias, path in self.paths:
            if path in values:
                renamed[alias] = values[path]
        return renamed


@dataclass(frozen=True)
class SendHeader:
    """What a send stream delivers: the run's activity, its channel, category and template."""

    campaign: str
    run: str
    activity: str
    channel: str
    category: str
    template: str
    rate_limit_per_second: int = 0
    send_window: SendWindow | None = None


@dataclass(frozen=True)
class Batch:
    """A send batch: working-set rows; ``sequence`` is the last row's position."""

    sequence: int
    rows: Sequence[Row]


class AudienceGateway(Protocol):
    """The targeting calls the scheduler makes to audience_svc."""

    async def build_working_set(
        self,
        sandbox: str,
        run: str,
        activity: str,
        query: query_pb2.AudienceQuery,
        incremental: working_set_pb2.Incremental | None = None,
    ) -> WorkingSetInfo:
        """Build (or return, when it exists) the working set of a run's activity (incrementally when asked)."""
        ...

    async def reconcile(
        self,
        sandbox: str,
        run: str,
        activity: str,
        working_set: str,
        target: str,
        pairs: Sequence[tuple[str, str]],
        unreconciled_activity: str,
    ) -> Reconciled:
        """Reconcile a working set with the ``target`` entity on attribute pairs."""
        ...

    def stream_working_set(
        self,
        sandbox: str,
        working_set: str,
        after_position: int,
        batch_size: int,
        attributes: Sequence[str],
        enrichment: StreamEnrichment | None = None,
    ) -> AsyncGenerator[Sequence[Row], None]:
        """The rows of a working set after a position, in batches of at most ``batch_size``, with the
        ``attributes`` and, when given, the ``enrichment`` values (by alias) in their values."""
        ...

    async def read_audience(self, sandbox: str, run: str, activity: str, audience: str) -> WorkingSetInfo:
        """Build (or return) the working set of a run's activity from a saved audience."""
        ...

    async def combine(
        self, sandbox: str, run: str, activity: str, primary: str, others: Sequence[str], operation: str
    ) -> WorkingSetInfo:
        """Build (or return) the working set of ``primary`` combined with ``others`` by ``operation``."""
        ...

    async def change_dimension(
        self, sandbox: str, run: str, activity: str, working_set: str, link: str
    ) -> tuple[WorkingSetInfo, int]:
        """Build (or return) the working set reached through ``link``, with the unmatched source count."""
        ...

    async def split(
        self,
        sandbox: str,
        run: str,
        working_set: str,
        subsets: Sequence[tuple[str, SplitSubset]],
        complement_activity: str,
        overlap: bool,
    ) -> tuple[list[WorkingSetInfo], WorkingSetInfo | None]:
        """Split a working set into ``(activity, subset)`` working sets and an optional complement."""
        ...

    async def deduplicate(
        self, sandbox: str, run: str, activity: str, working_set: str, rule: Deduplicate, removed_activity: str
    ) -> tuple[WorkingSetInfo, WorkingSetInfo | None]:
        """Deduplicate a working set; the removed records too when ``removed_activity`` is set."""
        ...

    async def save_audience(self, sandbox: str, audience_id: str, working_set: str, display_name: str) -> bool:
        """Save a working set's members as a snapshot audience; True when it was created."""
        ...


class SendStream(Protocol):
    """One open send stream to a delivery worker (the header is already sent)."""

    async def write(self, batch: Batch) -> None:
        """Send one batch."""
        ...

    async def done_writing(self) -> None:
        """Say that no more batches follow; the worker acknowledges the rest, then closes."""
        ...

    async def read(self) -> Ack | None:
        """The next acknowledgement, in batch order; None once the worker closed the stream."""
        ...

    def cancel(self) -> None:
        """Abandon the stream (no-op once it is closed)."""
        ...


class DeliveryGateway(Protocol):
    """The delivery worker of one channel."""

    async def open(self, sandbox: str, header: SendHeader) -> SendStream:
        """Open a send stream and send its header."""
        ...


async def wait_until_ready(channel: grpc.aio.Channel, target: str, timeout_s: float | None) -> None:
    """Wait for the channel to connect; UNAVAILABLE (retried by the engine) after ``timeout_s``.

    The chassis channels wait for readiness on every call, so without this bound a call to a peer
    that is down (or a wrong address) would wait forever instead of failing with a clear message.
    """
    if timeout_s is None:
        return
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
    except TimeoutError:
        raise Unavailable(f"{target} cannot be reached (waited {timeout_s:g}s)", reason="PEER_UNREACHABLE") from None


class GrpcAudienceGateway:
    """AudienceGateway over an AudienceService channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        target: str = "audience_svc",
        *,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = None,
    ) -> None:
        self._channel = channel
        self._stub = aud_grpc.AudienceServiceStub(channel)
        self._target = f"audience_svc at {target}"
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s

    async def build_working_set(
        self,
        sandbox: str,
        run: str,
        activity: str,
        query: query_pb2.AudienceQuery,
        incremental: working_set_pb2.Incremental | None = None,
    ) -> WorkingSetInfo:
        request = aud.BuildWorkingSetRequest(run=run, activity=activity, query=query, incremental=incremental)
        await wait_until_ready(self._channel, self._target, self._connect_timeout_s)
        try:
            reply = await self._stub.BuildWorkingSet(request, metadata=call_metadata(sandbox), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return dataclasses.replace(_info(reply.working_set), excluded=reply.excluded)

    async def reconcile(
        self,
        sandbox: str,
        run: str,
        activity: str,
        working_set: str,
        target: str,
        pairs: Sequence[tuple[str, str]],
        unreconciled_activity: str,
    ) -> Reconciled:
        request = aud.ReconcileWorkingSetRequest(
            run=run,
            activity=activity,
            working_set=working_set,
            target=target,
            pairs=[working_set_pb2.ReconciliationPair(source_attribute=a, target_attribute=b) for a, b in pairs],
            unreconciled_activity=unreconciled_activity,
        )
        reply = await self._unary(self._stub.ReconcileWorkingSet, request, sandbox)
        return Reconciled(
            reconciled=_info(reply.working_set),
            unreconciled=_info(reply.unreconciled) if reply.HasField("unreconciled") else None,
            matched=reply.matched,
            unmatched=reply.unmatched,
            ambiguous=reply.ambiguous,
        )

    async def _unary(self, method: Any, request: Any, sandbox: str) -> Any:
        await wait_until_ready(self._channel, self._target, self._connect_timeout_s)
        try:
            return await method(request, metadata=call_metadata(sandbox), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None

    async def read_audience(self, sandbox: str, run: str, activity: str, audience: str) -> WorkingSetInfo:
        request = aud.BuildWorkingSetRequest(run=run, activity=activity, audience=audience)
        return _info((await self._unary(self._stub.BuildWorkingSet, request, sandbox)).working_set)

    async def combine(
        self, sandbox: str, run: str, activity: str, primary: str, others: Sequence[str], operation: str
    ) -> WorkingSetInfo:
        request = aud.CombineWorkingSetsRequest(
            run=run, activity=activity, primary=primary, others=others, operation=_COMBINE_OPERATIONS[operation]
        )
        return _info((await self._unary(self._stub.CombineWorkingSets, request, sandbox)).working_set)

    async def change_dimension(
        self, sandbox: str, run: str, activity: str, working_set: str, link: str
    ) -> tuple[WorkingSetInfo, int]:
        request = aud.ChangeDimensionRequest(run=run, activity=activity, working_set=working_set, link=link)
        reply = await self._unary(self._stub.ChangeDimension, request, sandbox)
        return _info(reply.working_set), int(reply.unmatched)

    async def split(
        self,
        sandbox: str,
        run: str,
        working_set: str,
        subsets: Sequence[tuple[str, SplitSubset]],
        complement_activity: str,
        overlap: bool,
    ) -> tuple[list[WorkingSetInfo], WorkingSetInfo | None]:
        request = aud.SplitWorkingSetRequest(
            run=run, working_set=working_set, complement_activity=complement_activity, overlap=overlap
        )
        for activity, subset in subsets:
            added = request.subsets.add(activity=activity, limit=subset.limit, limit_percent=subset.limit_percent)
            if subset.filter is not None:
                added.filter.CopyFrom(subset.filter)
            added.order_by.extend(aud.SortKey(attribute=a, descending=d) for a, d in subset.order_by)
        reply = await self._unary(self._stub.SplitWorkingSet, request, sandbox)
        complement = _info(reply.complement) if reply.HasField("complement") else None
        return [_info(w) for w in reply.subsets], complement

    async def deduplicate(
        self, sandbox: str, run: str, activity: str, working_set: str, rule: Deduplicate, removed_activity: str
    ) -> tuple[WorkingSetInfo, WorkingSetInfo | None]:
        request = aud.DeduplicateWorkingSetRequest(
            run=run,
            activity=activity,
            working_set=working_set,
            fields=rule.fields,
            keep=rule.keep,
            method=_DEDUPLICATION_METHODS[rule.method],
            attribute=rule.attribute,
            priority=rule.priority,
            complement_activity=removed_activity,
        )
        reply = await self._unary(self._stub.DeduplicateWorkingSet, request, sandbox)
        removed = _info(reply.complement) if reply.HasField("complement") else None
        return _info(reply.working_set), removed

    async def save_audience(self, sandbox: str, audience_id: str, working_set: str, display_name: str) -> bool:
        request = aud.SaveAudienceRequest(audience_id=audience_id, working_set=working_set, display_name=display_name)
        return bool((await self._unary(self._stub.SaveAudience, request, sandbox)).created)

    async def stream_working_set(
        self,
        sandbox: str,
        working_set: str,
        after_position: int,
        batch_size: int,
        attributes: Sequence[str],
        enrichment: StreamEnrichment | None = None,
    ) -> AsyncGenerator[Sequence[Row], None]:
        request = aud.StreamWorkingSetRequest(
            working_set=working_set, after_position=after_position, batch_size=batch_size, attributes=attributes
        )
        if enrichment is not None:
            del request.attributes[:]
            request.attributes.extend(enrichment.request_attributes(attributes))
            request.enrichments.extend(enrichment.aggregates)
            request.collections.extend(enrichment.collections)
            if enrichment.reference_time is not None:
                request.reference_time.CopyFrom(to_timestamp(enrichment.reference_time))
        await wait_until_ready(self._channel, self._target, self._connect_timeout_s)
        call = self._stub.StreamWorkingSet(request, metadata=call_metadata(sandbox))
        try:
            async for reply in call:
                yield [
                    Row(
                        position=r.position,
                        entity_key=r.entity_key,
                        identity=(r.identity.namespace, r.identity.value),
                        values=r.values if enrichment is None else enrichment.rename(r.values, attributes),
                    )
                    for r in reply.rows
                ]
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()


class GrpcSendStream:
    """SendStream over one bidirectional ``Send`` call.

    A worker that refuses the stream (a bad header or batch) says why in a last response, then ends
    the stream with that status once the client half-closes: grpcio's asyncio client reports INTERNAL
    instead of the status it received when it is still writing as the stream ends (grpc/grpc#36066).
    So a refusal stops the writing, and from then on every call raises the refusal's error, whichever
    of the engine's writer and reader comes first."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self._refusal: status_pb2.Status | None = None

    def _raise_if_refused(self) -> None:
        if self._refusal is not None:
            raise error_from_status(self._refusal)

    async def _write(self, request: dlv.SendRequest) -> None:
        self._raise_if_refused()
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as err:
            self._raise_if_refused()  # a write cut off by the refusal read meanwhile
            raise error_from_rpc(err) from None

    async def write(self, batch: Batch) -> None:
        recipients = [
            dlv.Recipient(
                identity=value_pb2.Identity(namespace=row.identity[0], value=row.identity[1]),
                entity_key=row.entity_key,
                target=row.values,
            )
            for row in batch.rows
        ]
        await self._write(dlv.SendRequest(batch=dlv.RecipientBatch(sequence=batch.sequence, recipients=recipients)))

    async def done_writing(self) -> None:
        self._raise_if_refused()
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None

    async def read(self) -> Ack | None:
        self._raise_if_refused()
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        if reply is grpc.aio.EOF:
            return None
        assert isinstance(reply, dlv.SendResponse)
        if reply.HasField("refusal"):
            refusal = reply.refusal
            self._refusal = status_pb2.Status(code=refusal.code, message=refusal.message, details=refusal.details)
            await self._stop_writing()
            self._raise_if_refused()
        return Ack(
            sequence=reply.sequence,
            sent=reply.sent,
            already_sent=reply.already_sent,
            skipped=dict(reply.skipped),
            failed=dict(reply.failed),
            deferred=reply.deferred,
            next_window_time=from_timestamp(reply.next_window_time) if reply.HasField("next_window_time") else None,
        )

    async def _stop_writing(self) -> None:
        """Half-close after a refusal, so that the worker ends the stream with the refusal's status.

        Whatever fails here (the call ending meanwhile, which grpcio may report as an error of its
        core) changes nothing: the refusal's error is what the caller gets."""
        with contextlib.suppress(Exception):
            await self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()


class GrpcDeliveryGateway:
    """DeliveryGateway over a DeliveryService channel (one channel's worker)."""

    def __init__(
        self, channel: grpc.aio.Channel, target: str = "delivery_svc", *, connect_timeout_s: float | None = None
    ) -> None:
        self._channel = channel
        self._stub = dlv_grpc.DeliveryServiceStub(channel)
        self._target = f"the delivery worker at {target}"
        self._connect_timeout_s = connect_timeout_s

    async def open(self, sandbox: str, header: SendHeader) -> SendStream:
        await wait_until_ready(self._channel, self._target, self._connect_timeout_s)
        stream = GrpcSendStream(self._stub.Send(metadata=call_metadata(sandbox)))
        try:
            await stream._write(
                dlv.SendRequest(
                    header=dlv.SendHeader(
                        campaign=header.campaign,
                        run=header.run,
                        activity=header.activity,
                        channel=cast(channel_pb2.Channel.ValueType, channel_value(header.channel)),
                        category=cast(channel_pb2.MessageCategory.ValueType, category_value(header.category)),
                        template=header.template,
                        rate_limit_per_second=header.rate_limit_per_second,
                        accepts_refusal=True,
                        send_window=None
                        if header.send_window is None
                        else dlv.SendWindow(
                            start_local_time=header.send_window.start_local_time,
                            end_local_time=header.send_window.end_local_time,
                            days_of_week=header.send_window.days,
                            default_time_zone=header.send_window.default_time_zone,
                        ),
                    )
                )
            )
        except BaseException:
            stream.cancel()
            raise
        return stream
