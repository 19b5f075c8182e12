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
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import grpc

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import query_pb2
from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.delivery.v1 import delivery_service_pb2_grpc as dlv_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.channels import category_value, channel_value
from carillon_chassis.clients import call_metadata
from carillon_chassis.errors import Unavailable, error_from_rpc
from scheduler_svc.model import Ack


@dataclass(frozen=True)
class WorkingSetInfo:
    """A built working set: its name (``workingSets/{working_set}``) and how many records it holds."""

    name: str
    count: int


@dataclass(frozen=True)
class Row:
    """One working-set record: its position, key, the person (namespace, value) and attribute values."""

    position: int
    entity_key: str
    identity: tuple[str, str]
    values: Mapping[str, value_pb2.Value] = field(default_factory=dict)


@dataclass(frozen=True)
class SendHeader:
    """What a send stream delivers: the run's activity, its channel, category and template."""

    campaign: str
    run: str
    activity: str
    channel: str
    category: str
    template: str


@dataclass(frozen=True)
class Batch:
    """A send batch: working-set rows; ``sequence`` is the last row's position."""

    sequence: int
    rows: Sequence[Row]


class AudienceGateway(Protocol):
    """The targeting calls the scheduler makes to audience_svc."""

    async def build_working_set(
        self, sandbox: str, run: str, activity: str, query: query_pb2.AudienceQuery
    ) -> WorkingSetInfo:
        """Build (or return, when it exists) the working set of a run's activity."""
        ...

    def stream_working_set(
        self, sandbox: str, working_set: str, after_position: int, batch_size: int, attributes: Sequence[str]
    ) -> AsyncGenerator[Sequence[Row], None]:
        """The rows of a working set after a position, in batches of at most ``batch_size``."""
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
        self, sandbox: str, run: str, activity: str, query: query_pb2.AudienceQuery
    ) -> WorkingSetInfo:
        request = aud.BuildWorkingSetRequest(run=run, activity=activity, query=query)
        await wait_until_ready(self._channel, self._target, self._connect_timeout_s)
        try:
            reply = await self._stub.BuildWorkingSet(request, metadata=call_metadata(sandbox), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        return WorkingSetInfo(name=reply.working_set.name, count=reply.working_set.count)

    async def stream_working_set(
        self, sandbox: str, working_set: str, after_position: int, batch_size: int, attributes: Sequence[str]
    ) -> AsyncGenerator[Sequence[Row], None]:
        request = aud.StreamWorkingSetRequest(
            working_set=working_set, after_position=after_position, batch_size=batch_size, attributes=attributes
        )
        await wait_until_ready(self._channel, self._target, self._connect_timeout_s)
        call = self._stub.StreamWorkingSet(request, metadata=call_metadata(sandbox))
        try:
            async for reply in call:
                yield [
                    Row(
                        position=r.position,
                        entity_key=r.entity_key,
                        identity=(r.identity.namespace, r.identity.value),
                        values=r.values,
                    )
                    for r in reply.rows
                ]
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()


class GrpcSendStream:
    """SendStream over one bidirectional ``Send`` call."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call

    async def _write(self, request: dlv.SendRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as err:
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
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None

    async def read(self) -> Ack | None:
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        if reply is grpc.aio.EOF:
            return None
        assert isinstance(reply, dlv.SendResponse)
        return Ack(
            sequence=reply.sequence,
            sent=reply.sent,
            already_sent=reply.already_sent,
            skipped=dict(reply.skipped),
            failed=dict(reply.failed),
        )

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
                    )
                )
            )
        except BaseException:
            stream.cancel()
            raise
        return stream
