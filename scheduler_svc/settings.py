"""Settings of scheduler_svc, from ``CARILLON_SCHEDULER_*`` environment variables.

``CARILLON_SCHEDULER_DELIVERY_TARGETS`` is JSON, for example ``{"email": "127.0.0.1:50053"}``: the
address of the delivery worker of each channel. A channel activity whose channel has no worker here
fails its run with a clear message.
"""

from __future__ import annotations

import os
import socket
import uuid

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from carillon_chassis.channels import CHANNEL_VALUES
from carillon_chassis.settings import ServiceSettings


def default_replica_id() -> str:
    """A replica id unique to this process: host name, process id and a random suffix."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class SchedulerSettings(ServiceSettings):
    """scheduler_svc settings: peers, the runner's pacing and leases, and the canvas guardrails."""

    model_config = SettingsConfigDict(env_prefix="CARILLON_SCHEDULER_", extra="ignore", populate_by_name=True)

    service_name: str = "scheduler"
    port: int = Field(default=50052, ge=0, le=65535)
    # The audience service (BuildWorkingSet, StreamWorkingSet), ``host:port``.
    audience_target: str = "127.0.0.1:50051"
    # The delivery worker of each channel (``email``, ``sms``, ``push``, ``direct_mail``), ``host:port``.
    delivery_targets: dict[str, str] = Field(default_factory=lambda: {"email": "127.0.0.1:50053"})
    # How often the runner looks for due runs, in seconds.
    poll_interval_s: float = Field(default=1.0, gt=0)
    # Send batches streamed to a delivery worker ahead of its acknowledgements (back-pressure).
    max_unacked_batches: int = Field(default=4, ge=1, le=1000)
    # Recipients per send batch when a channel activity does not set its own batch size.
    default_batch_size: int = Field(default=5000, ge=1, le=10000)
    # How long a claimed run belongs to this replica without renewal, in seconds.
    lease_s: float = Field(default=60, gt=0)
    # Runs this replica executes at the same time.
    max_concurrent_runs: int = Field(default=4, ge=1, le=256)
    # Attempts of one activity when a peer is unavailable (each resumes from the checkpoint).
    activity_attempts: int = Field(default=3, ge=1, le=20)
    # Deadline of a unary call to a peer (BuildWorkingSet can be a large INSERT ... SELECT), in seconds.
    call_timeout_s: float = Field(default=600, gt=0)
    # How long an activity waits for a peer to accept a connection before the attempt is UNAVAILABLE.
    connect_timeout_s: float = Field(default=30, gt=0)
    # Guardrails: activities and channel activities per campaign.
    max_activities: int = Field(default=500, ge=1)
    max_channel_activities: int = Field(default=10, ge=1)
    # The shortest time between two launch times of a day in a schedule, in minutes.
    min_schedule_interval_minutes: int = Field(default=15, ge=1, le=1440)
    # A launch time missed by more than this (the scheduler was down) gets no run: the campaign rolls
    # over to its next launch time instead of running a burst of catch-up runs. In seconds.
    misfire_grace_s: float = Field(default=300, ge=0)
    # A signal-scheduled campaign accepts at most one SignalCampaign per this many seconds.
    signal_min_interval_s: float = Field(default=3600, ge=0)
    # How often WatchRun reads a watched run's progress, in seconds.
    watch_interval_s: float = Field(default=0.5, gt=0)
    # The highest rate limit (messages per second) a channel activity may ask for; raise it together
    # with the delivery workers' CARILLON_DELIVERY_MAX_RATE_PER_SECOND.
    max_rate_per_second: int = Field(default=2000, ge=1)
    # Archived campaigns are deleted, with their runs, this many days after they were archived.
    archived_retention_days: float = Field(default=90, gt=0)
    # How often the purge of expired archived campaigns runs, in seconds.
    purge_interval_s: float = Field(default=3600, gt=0)
    # This replica's id, the owner of the leases it takes; unique per process by default.
    replica_id: str = Field(default_factory=default_replica_id, min_length=1, max_length=100)

    @field_validator("delivery_targets")
    @classmethod
    def _known_channels(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CHANNEL_VALUES))
        if unknown:
            raise ValueError(f"unknown channels {unknown}; expected some of {sorted(CHANNEL_VALUES)}")
        empty = sorted(channel for channel, target in value.items() if not target)
        if empty:
            raise ValueError(f"channels {empty} have an empty address")
        return value
