"""The chassis server over a real channel: error mapping for every handler kind, sandboxes, health."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carillon_chassis.errors import InvalidArgument
from carillon_chassis.sandbox import current_sandbox
from carillon_chassis.server import GrpcServer
from tests.rpc_errors import failure_of


async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise InvalidArgument("bad thing", field="thing", reason="BAD_THING")


async def boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ValueError("secret internals")


async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return current_sandbox().encode()


async def stream_then_fail(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"one"
    raise InvalidArgument("stopped", field="after_position")


async def upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        raise InvalidArgument("rejected", field="changes[0]")
    return b""


def register(server: grpc.aio.Server) -> list[str]:
    handlers = {
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Boom": grpc.unary_unary_rpc_method_handler(boom),
        "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
        "Stream": grpc.unary_stream_rpc_method_handler(stream_then_fail),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Probe", handlers)])
    return ["test.Probe"]


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = GrpcServer(name="probe", domain="probe.carillon.dev", host="127.0.0.1", port=0, register=register)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as chan:
        yield chan
    await server.stop(0)


async def test_a_domain_error_becomes_its_status_with_error_info_and_field(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Probe/Fail")(b"")
    failure = failure_of(caught.value)
    assert (failure.code, failure.reason, failure.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_THING",
        "probe.carillon.dev",
    )
    assert failure.fields == ["thing"]


async def test_an_unexpected_exception_is_internal_without_leaking_its_text(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Probe/Boom")(b"")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


async def test_a_server_stream_delivers_what_it_yielded_then_the_error(channel: grpc.aio.Channel) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in channel.unary_stream("/test.Probe/Stream")(b""):
            received.append(item)
    assert received == [b"one"]
    assert failure_of(caught.value).fields == ["after_position"]


async def test_a_client_stream_error_is_mapped_too(channel: grpc.aio.Channel) -> None:
    async def requests() -> AsyncIterator[bytes]:
        yield b"x"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.stream_unary("/test.Probe/Upload")(requests())
    assert failure_of(caught.value).fields == ["changes[0]"]


async def test_the_sandbox_comes_from_metadata_and_defaults_to_prod(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary("/test.Probe/WhoAmI")
    assert await call(b"") == b"prod"
    assert await call(b"", metadata=(("x-carillon-sandbox", "staging"),)) == b"staging"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"", metadata=(("x-carillon-sandbox", "No Such!"),))
    assert failure_of(caught.value).fields == ["metadata.x-carillon-sandbox"]


async def test_health_is_serving_then_not_serving_after_stop() -> None:
    server = GrpcServer(name="probe", domain="probe", host="127.0.0.1", port=0, register=register)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as chan:
        health = health_pb2_grpc.HealthStub(chan)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="test.Probe"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="test.Probe"), timeout=2)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_a_peer_error_keeps_its_reason_and_fields_when_turned_into_a_local_error(
    channel: grpc.aio.Channel,
) -> None:
    from carillon_chassis.errors import error_from_rpc

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/test.Probe/Fail")(b"")

    local = error_from_rpc(caught.value)

    assert isinstance(local, InvalidArgument)
    assert local.reason == "BAD_THING"
    assert [v.field for v in local.violations] == ["thing"]
    assert local.metadata["peer_domain"] == "probe.carillon.dev"
