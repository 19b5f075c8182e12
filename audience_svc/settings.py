"""Settings of audience_svc, from ``CARILLON_AUDIENCE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from carillon_chassis.settings import ServiceSettings


class AudienceSettings(ServiceSettings):
    """audience_svc settings: the common ones plus the guardrails of the targeting data plane."""

    model_config = SettingsConfigDict(env_prefix="CARILLON_AUDIENCE_", extra="ignore", populate_by_name=True)

    service_name: str = "audience"
    port: int = Field(default=50051, ge=0, le=65535)
    # At most this many entities (entity tables) per sandbox.
    max_entities: int = Field(default=200, ge=1)
    # Working sets are purged this many days after they were built.
    working_set_retention_days: float = Field(default=5, gt=0)
    # A query's filter tree may nest at most this deep (the root node is at depth 1).
    max_filter_depth: int = Field(default=32, ge=1)
    # A query's filter tree may hold at most this many nodes (conditions and lists alike).
    max_filter_nodes: int = Field(default=1000, ge=1)
    # How often expired working sets (and processed keys past their window) are purged, in seconds.
    working_set_purge_interval_s: float = Field(default=3600, gt=0)
    # A schema change (CreateEntity, UpdateEntity) waits at most this long for the lock of a table in
    # use, then fails UNAVAILABLE (SCHEMA_LOCK_TIMEOUT, retryable) instead of queueing all its traffic.
    schema_lock_timeout_s: float = Field(default=5, gt=0)
