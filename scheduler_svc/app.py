"""Wiring of scheduler_svc: settings → database (migrated) → stores, gateways, engine, runner → server.

On SQLite, a lock file beside the database keeps a second scheduler replica from starting
(:mod:`scheduler_svc.single_replica`); on PostgreSQL any number of replicas share the work through
leases. The runner starts once the server is serving and stops before the peer channels and the database
close (stop hooks run in reverse order of registration).
"""

from __future__ import annotations

from datetime import timedelta

from carillon.scheduler.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc
from carillon_chassis.clients import open_channel
from carillon_chassis.database import Database
from carillon_chassis.server import GrpcServer
from carillon_chassis.wiring import server_for
from scheduler_svc import DOMAIN, SERVICE_NAME
from scheduler_svc.campaigns import CampaignStore
from scheduler_svc.engine import Engine, EngineOptions
from scheduler_svc.gateways import DeliveryGateway, GrpcAudienceGateway, GrpcDeliveryGateway
from scheduler_svc.lifecycle import Lifecycle
from scheduler_svc.runner import Runner, StoreJournal
from scheduler_svc.runs import Lease, RunStore
from scheduler_svc.servicer import CampaignServicer
from scheduler_svc.settings import SchedulerSettings
from scheduler_svc.single_replica import ReplicaLockError, SingleReplicaLock
from scheduler_svc.tables import MIGRATIONS
from scheduler_svc.validation import Limits

FULL_NAME = scheduler_service_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name


async def build_server(settings: SchedulerSettings) -> GrpcServer:
    """Create the database (applying migrations), the runner and a server that is ready to start."""
    database = Database(
        settings.resolved_database_url(), schema=settings.resolved_schema(), threads=settings.db_threads
    )
    replica_lock: SingleReplicaLock | None = None
    if not database.is_postgres:
        replica_lock = SingleReplicaLock(settings.resolved_database_url())
        try:
            replica_lock.acquire()
        except ReplicaLockError:
            database.close()
            raise
    database.migrate(MIGRATIONS)
    limits = Limits(
        max_activities=settings.max_activities,
        max_channel_activities=settings.max_channel_activities,
        min_schedule_interval_minutes=settings.min_schedule_interval_minutes,
        max_rate_per_second=settings.max_rate_per_second,
    )
    campaigns = CampaignStore(database, limits)
    runs = RunStore(database)
    lifecycle = Lifecycle(campaigns, settings.signal_min_interval_s)
    servicer = CampaignServicer(campaigns, runs, lifecycle, settings.watch_interval_s)

    audience_channel = open_channel(settings.audience_target)
    delivery_channels = {channel: open_channel(target) for channel, target in settings.delivery_targets.items()}
    deliveries: dict[str, DeliveryGateway] = {
        channel: GrpcDeliveryGateway(delivery_channels[channel], target, connect_timeout_s=settings.connect_timeout_s)
        for channel, target in settings.delivery_targets.items()
    }
    lease = Lease(owner=settings.replica_id, duration_s=settings.lease_s)
    engine = Engine(
        GrpcAudienceGateway(
            audience_channel,
            settings.audience_target,
            timeout_s=settings.call_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
        ),
        deliveries,
        StoreJournal(database, runs, lease, lifecycle),
        EngineOptions(
            max_unacked_batches=settings.max_unacked_batches,
            default_batch_size=settings.default_batch_size,
            activity_attempts=settings.activity_attempts,
        ),
    )
    runner = Runner(
        database=database,
        runs=runs,
        engine=engine,
        lease=lease,
        poll_interval_s=settings.poll_interval_s,
        max_concurrent_runs=settings.max_concurrent_runs,
        campaigns=campaigns,
        misfire_grace_s=settings.misfire_grace_s,
        lifecycle=lifecycle,
        archived_retention=timedelta(days=settings.archived_retention_days),
        purge_interval_s=settings.purge_interval_s,
    )

    server = server_for(
        settings,
        name=SERVICE_NAME,
        domain=DOMAIN,
        service=FULL_NAME,
        add_servicer=lambda grpc_server: scheduler_service_pb2_grpc.add_CampaignServiceServicer_to_server(
            servicer, grpc_server
        ),
        database=database,
    )

    async def close_channels() -> None:
        for channel in [audience_channel, *delivery_channels.values()]:
            await channel.close()

    async def release_replica_lock() -> None:
        if replica_lock is not None:
            replica_lock.release()

    server.on_stop(release_replica_lock)
    server.on_stop(close_channels)
    server.on_start(runner.start)
    server.on_stop(runner.stop)
    return server
