"""Refused Send streams over a real DeliveryService: the client learns the precise status, whatever it writes.

grpcio's asyncio client reports ``INTERNAL`` instead of the server's status when it is still writing
as the server ends a stream (grpc/grpc#36066). The worker therefore sends the refusal's status as a
last response and ends the stream only once the client has half-closed (or after a grace period).
Every test runs on SQLite and on PostgreSQL (the ``start_stack`` fixture of the server tests).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon_chassis.errors import CarillonError, InvalidArgument
from delivery_svc import servicer
from scheduler_svc.gateways import Batch, GrpcDeliveryGateway, Row, SendHeader
from tests.integration import test_delivery_server as server_tests
from tests.integration.test_delivery_server import (
    HEADER,
    METADATA,
    SANDBOX,
    Stack,
    StartStack,
    free_port,
    seed,
)
from tests.rpc_errors import failure_of

serving = server_tests.start_stack  # the fixture, under a name of this module
BAD_BATCH_FIELD = "batch.recipients[0].identity"


def good_batch(sequence: int) -> dpb.SendRequest:
    """A valid batch of one recipient without a profile (skipped: nothing is sent)."""
    recipient = dpb.Recipient(identity=server_tests.email_identity(f"nobody{sequence}@example.com"))
    return dpb.SendRequest(batch=dpb.RecipientBatch(sequence=sequence, recipients=[recipient]))


def bad_batch(sequence: int) -> dpb.SendRequest:
    """A batch whose recipient has no identity: INVALID_ARGUMENT naming ``BAD_BATCH_FIELD``."""
    return dpb.SendRequest(batch=dpb.RecipientBatch(sequence=sequence, recipients=[dpb.Recipient()]))


def header_with(**changes: str | bool) -> dpb.SendHeader:
    """The tests' header, accepting refusals, with ``changes``."""
    header = dpb.SendHeader()
    header.CopyFrom(HEADER)
    header.accepts_refusal = True
    for name, value in changes.items():
        setattr(header, name, value)
    return header


ACCEPTING = header_with()


def refusal_failure(response: dpb.SendResponse) -> tuple[int, str, list[str]]:
    """The code, ErrorInfo reason and BadRequest field paths of a refusal."""
    reason, fields = "", []
    for detail in response.refusal.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return response.refusal.code, reason, fields


async def refused_while_writing(
    stack: Stack, header: dpb.SendHeader, bad_at: int | None = None
) -> tuple[list[dpb.SendResponse], grpc.aio.AioRpcError]:
    """Write the header, then batches without pause (the one numbered ``bad_at`` invalid) until a
    refusal is read; then half-close. Returns the responses (the refusal last) and the final error."""
    call = stack.delivery.Send(metadata=METADATA)
    refused = asyncio.Event()

    async def write() -> None:
        await call.write(dpb.SendRequest(header=header))
        sequence = 0
        while not refused.is_set():
            sequence += 1
            await call.write(bad_batch(sequence) if sequence == bad_at else good_batch(sequence))

    writer = asyncio.ensure_future(write())
    responses: list[dpb.SendResponse] = []
    try:
        while not refused.is_set():
            response = await call.read()
            assert isinstance(response, dpb.SendResponse), "the stream ended without a refusal"
            responses.append(response)
            if response.HasField("refusal"):
                refused.set()
        await writer  # its last write is drained by the worker: no write fails
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    finally:
        writer.cancel()
        call.cancel()
    return responses, caught.value


async def test_a_bad_batch_mid_stream_is_refused_and_the_stream_ends_with_its_status(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)

    responses, error = await refused_while_writing(stack, ACCEPTING, bad_at=2)

    *acks, refusal = responses
    assert [a.sequence for a in acks] == [1]
    assert refusal_failure(refusal) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_BATCH", [BAD_BATCH_FIELD])
    assert (refusal.sequence, refusal.sent, refusal.HasField("next_window_time")) == (0, 0, False)
    failure = failure_of(error)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_BATCH",
        [BAD_BATCH_FIELD],
    )


async def test_a_header_naming_an_unknown_template_is_refused_with_not_found(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)

    responses, error = await refused_while_writing(stack, header_with(template="templates/missing"))

    (refusal,) = responses
    assert refusal_failure(refusal) == (grpc.StatusCode.NOT_FOUND.value[0], "TEMPLATE_NOT_FOUND", ["header.template"])
    failure = failure_of(error)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.NOT_FOUND,
        "TEMPLATE_NOT_FOUND",
        ["header.template"],
    )


async def test_a_failure_while_batches_are_read_ahead_is_refused_with_its_status(serving: StartStack) -> None:
    # The eligibility call fails in the delivery loop while the read-ahead task waits for more
    # requests: that read must not be cut off, or the stream could not be drained.
    stack = await serving(profile_target=f"127.0.0.1:{free_port()}", profile_timeout_s=1)
    await seed(stack)

    responses, error = await refused_while_writing(stack, ACCEPTING)

    assert [(r.HasField("refusal"), r.refusal.code) for r in responses] == [
        (True, grpc.StatusCode.UNAVAILABLE.value[0])
    ]
    assert failure_of(error).code == grpc.StatusCode.UNAVAILABLE


async def test_the_scheduler_gateway_raises_the_refused_batch_s_error_every_time(serving: StartStack) -> None:
    stack = await serving()
    await seed(stack)
    channel = grpc.aio.insecure_channel(stack.delivery_address)
    gateway = GrpcDeliveryGateway(channel)
    header = SendHeader(
        campaign=HEADER.campaign,
        run=HEADER.run,
        activity=HEADER.activity,
        channel="email",
        category="marketing",
        template=HEADER.template,
    )

    def batch(sequence: int, identity: tuple[str, str]) -> Batch:
        return Batch(sequence, [Row(position=sequence, entity_key="", identity=identity)])

    async def stream_with_a_bad_second_batch() -> list[BaseException]:
        # Like the engine: a writer that writes every batch without waiting, and a reader of the acks.
        stream = await gateway.open(SANDBOX, header)

        async def produce() -> None:
            for sequence in range(1, 60):
                await stream.write(batch(sequence, ("", "") if sequence == 2 else ("email", f"n{sequence}@x.org")))
            await stream.done_writing()

        async def consume() -> None:
            while await stream.read() is not None:
                pass

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(produce())
                group.create_task(consume())
        except BaseExceptionGroup as errors:
            return list(errors.exceptions)
        finally:
            stream.cancel()
        return []

    try:
        outcomes = [await stream_with_a_bad_second_batch() for _ in range(20)]
    finally:
        await channel.close()

    for errors in outcomes:
        assert errors and all(isinstance(e, InvalidArgument) for e in errors), errors
        error = errors[0]
        assert isinstance(error, CarillonError)
        assert (error.reason, [v.field for v in error.violations]) == ("INVALID_BATCH", [BAD_BATCH_FIELD])


async def test_a_client_that_never_half_closes_gets_the_status_after_the_grace_period(
    serving: StartStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer, "REFUSAL_GRACE_S", 0.2)
    stack = await serving()
    await seed(stack)
    call = stack.delivery.Send(metadata=METADATA)
    try:
        await call.write(dpb.SendRequest(header=ACCEPTING))
        await call.write(bad_batch(1))

        refusal = await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), timeout=30)  # neither writing nor half-closing
    finally:
        call.cancel()

    assert isinstance(refusal, dpb.SendResponse) and refusal.HasField("refusal")
    assert failure_of(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_client_that_does_not_accept_refusals_gets_the_status_alone(serving: StartStack) -> None:
    # A scheduler from before refusals would read a refusal as an acknowledgement: it gets none.
    stack = await serving()
    await seed(stack)
    call = stack.delivery.Send(metadata=METADATA)
    try:
        await call.write(dpb.SendRequest(header=header_with(template="templates/missing", accepts_refusal=False)))
        await call.done_writing()  # the header alone: nothing written as the stream ends (grpc/grpc#36066)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    finally:
        call.cancel()

    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.NOT_FOUND,
        "TEMPLATE_NOT_FOUND",
        ["header.template"],
    )
