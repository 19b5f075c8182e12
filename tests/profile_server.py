"""A real profile_stub server for a test, on the test's database (both backends)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from carillon.profile.v1 import profile_service_pb2_grpc
from profile_stub.app import build_server
from profile_stub.settings import ProfileSettings
from tests.conftest import DatabaseFactory


@contextlib.asynccontextmanager
async def profile_service(
    database_factory: DatabaseFactory, **settings: Any
) -> AsyncIterator[profile_service_pb2_grpc.ProfileServiceStub]:
    """A started profile_stub (``settings``: more ProfileSettings) and a stub on a channel to it; both
    closed at the end."""
    url, schema = database_factory.url_and_schema("profile")
    server = await build_server(ProfileSettings(port=0, database_url=url, database_schema=schema, **settings))
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield profile_service_pb2_grpc.ProfileServiceStub(channel)
    finally:
        await channel.close()
        await server.stop()
