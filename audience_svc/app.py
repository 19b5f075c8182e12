"""Wiring of audience_svc: settings → database (migrated) → domain stores → servicer → server.

The server also runs one background task, started once it serves and cancelled when it stops: the
purge of expired working sets and of processed keys past their history window (and the working-set
retention), once at start and then every ``working_set_purge_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import structlog

from audience_svc import DOMAIN, SERVICE_NAME
from audience_svc.audiences import AudienceEvaluator
from audience_svc.entities import EntityCatalog
from audience_svc.incremental import IncrementalBuilder
from audience_svc.query import FilterLimits
from audience_svc.saved_audiences import SavedAudienceStore
from audience_svc.servicer import AudienceServicer
from audience_svc.settings import AudienceSettings
from audience_svc.tables import MIGRATIONS
from audience_svc.working_sets import WorkingSetStore
from carillon.audience.v1 import audience_service_pb2, audience_service_pb2_grpc
from carillon_chassis.server import GrpcServer
from carillon_chassis.wiring import open_database, server_for

FULL_NAME = audience_service_pb2.DESCRIPTOR.services_by_name["AudienceService"].full_name

log = structlog.get_logger("carillon.audience")


async def purge_periodically(
    store: WorkingSetStore, interval_s: float, incremental: IncrementalBuilder | None = None
) -> None:
    """Purge expired working sets (and, with ``incremental``, processed keys past their window) now and
    then every ``interval_s`` seconds, until cancelled."""
    while True:
        try:
            purged = await store.database.run(store.purge_expired)
            if purged:
                log.info("expired working sets purged", count=purged)
            if incremental is not None:
                keys = await store.database.run(incremental.purge_processed_keys)
                if keys:
                    log.info("expired processed keys purged", count=keys)
        except Exception:  # a failed pass must not end the loop; the next one retries
            log.exception("working set purge failed")
        await asyncio.sleep(interval_s)


async def build_server(settings: AudienceSettings) -> GrpcServer:
    """Create the database (applying migrations) and a server that is ready to start."""
    database = open_database(settings, MIGRATIONS)
    limits = FilterLimits(max_depth=settings.max_filter_depth, max_nodes=settings.max_filter_nodes)
    catalog = EntityCatalog(database, max_entities=settings.max_entities, lock_timeout_s=settings.schema_lock_timeout_s)
    evaluator = AudienceEvaluator(catalog, limits=limits)
    working_sets = WorkingSetStore(
        catalog, limits=limits, retention=timedelta(days=settings.working_set_retention_days)
    )
    saved = SavedAudienceStore(catalog, working_sets, limits=limits)
    servicer = AudienceServicer(catalog, evaluator, working_sets, saved)

    server = server_for(
        settings,
        name=SERVICE_NAME,
        domain=DOMAIN,
        service=FULL_NAME,
        add_servicer=lambda grpc_server: audience_service_pb2_grpc.add_AudienceServiceServicer_to_server(
            servicer, grpc_server
        ),
        database=database,
    )
    tasks: list[asyncio.Task[None]] = []

    async def start_purge() -> None:
        tasks.append(
            asyncio.create_task(
                purge_periodically(working_sets, settings.working_set_purge_interval_s, servicer.incremental)
            )
        )

    async def stop_purge() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    server.on_start(start_purge)
    server.on_stop(stop_purge)
    return server
