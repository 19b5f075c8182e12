"""Wiring of profile_stub: settings → database (migrated) → store → servicer → server."""

from __future__ import annotations

from datetime import timedelta

from carillon.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from carillon_chassis.server import GrpcServer
from carillon_chassis.wiring import open_database, server_for
from profile_stub import DOMAIN, SERVICE_NAME
from profile_stub.profiles import ProfileStore
from profile_stub.servicer import ProfileServicer
from profile_stub.settings import ProfileSettings
from profile_stub.tables import MIGRATIONS

FULL_NAME = profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name


async def build_server(settings: ProfileSettings) -> GrpcServer:
    """Create the database (applying migrations) and a server that is ready to start."""
    database = open_database(settings, MIGRATIONS, jit=False)
    store = ProfileStore(
        database,
        unknown_consent_allowed=settings.unknown_consent_allowed,
        soft_bounce_limit=settings.soft_bounce_limit,
        reservation_ttl=timedelta(seconds=settings.reservation_ttl_s),
    )
    servicer = ProfileServicer(store, settings.max_eligibility_batch)

    server = server_for(
        settings,
        name=SERVICE_NAME,
        domain=DOMAIN,
        service=FULL_NAME,
        add_servicer=lambda grpc_server: profile_service_pb2_grpc.add_ProfileServiceServicer_to_server(
            servicer, grpc_server
        ),
        database=database,
    )

    return server
