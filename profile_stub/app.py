"""Wiring of profile_stub: settings → database (migrated) → store → servicer → server."""

from __future__ import annotations

from datetime import timedelta

import grpc

from carillon.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from carillon_chassis.database import Database
from carillon_chassis.server import GrpcServer
from profile_stub import DOMAIN, SERVICE_NAME
from profile_stub.profiles import ProfileStore
from profile_stub.servicer import ProfileServicer
from profile_stub.settings import ProfileSettings
from profile_stub.tables import MIGRATIONS

FULL_NAME = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name


async def build_server(settings: ProfileSettings) -> GrpcServer:
    """Create the database (applying migrations) and a server that is ready to start."""
    database = Database(
        settings.resolved_database_url(), schema=settings.resolved_schema(), threads=settings.db_threads
    )
    database.migrate(MIGRATIONS)
    store = ProfileStore(
        database,
        unknown_consent_allowed=settings.unknown_consent_allowed,
        soft_bounce_limit=settings.soft_bounce_limit,
        reservation_ttl=timedelta(seconds=settings.reservation_ttl_s),
    )
    servicer = ProfileServicer(store, settings.max_eligibility_batch)

    def register(server: grpc.aio.Server) -> list[str]:
        profile_service_pb2_grpc.add_ProfileServiceServicer_to_server(servicer, server)
        return [FULL_NAME]

    server = GrpcServer(
        name=SERVICE_NAME,
        domain=DOMAIN,
        host=settings.host,
        port=settings.port,
        register=register,
        grace_period_s=settings.grace_period_s,
        port_file=settings.port_file,
    )

    async def close() -> None:
        database.close()

    server.on_stop(close)
    return server
