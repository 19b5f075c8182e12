"""The wiring every service's ``build_server`` shares: its migrated database and its gRPC server.

A service's ``app.py`` builds its own domain objects between these two calls::

    database = open_database(settings, MIGRATIONS)
    ...domain objects and the servicer...
    server = server_for(settings, name=SERVICE_NAME, domain=DOMAIN, service=FULL_NAME,
                        add_servicer=lambda s: add_FooServicer_to_server(servicer, s), database=database)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from carillon_chassis.database import Database, Migration
from carillon_chassis.server import GrpcServer
from carillon_chassis.settings import ServiceSettings


def open_database(settings: ServiceSettings, migrations: Sequence[Migration], *, jit: bool = True) -> Database:
    """The service's database from its settings, with every pending migration applied.

    ``jit=False`` for a service whose statements are many small key lookups per batch (delivery_svc,
    profile_stub): once the tables grow, a per-key nested loop over thousands of keys passes PostgreSQL's
    ``jit_above_cost`` and, planned anew for every batch, was compiled anew too (95 ms per batch of
    5,000 keys at 400,000 rows, for a statement that ran in 15)."""
    database = Database(
        settings.resolved_database_url(), schema=settings.resolved_schema(), threads=settings.db_threads, jit=jit
    )
    database.migrate(migrations)
    return database


def server_for(
    settings: ServiceSettings,
    *,
    name: str,
    domain: str,
    service: str,
    add_servicer: Callable[[grpc.aio.Server], None],
    database: Database | None = None,
) -> GrpcServer:
    """A server for one gRPC service, configured from ``settings``; it closes ``database`` on stop."""

    def register(server: grpc.aio.Server) -> list[str]:
        add_servicer(server)
        return [service]

    server = GrpcServer(
        name=name,
        domain=domain,
        host=settings.host,
        port=settings.port,
        register=register,
        grace_period_s=settings.grace_period_s,
        port_file=settings.port_file,
    )
    if database is not None:

        async def close_database() -> None:
            database.close()

        server.on_stop(close_database)
    return server
