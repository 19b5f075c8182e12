"""Where the four services listen, as the CLI sees them.

Each address comes from a command-line option, else ``CARILLON_<SERVICE>_TARGET``, else the default
port on 127.0.0.1 (audience 50051, scheduler 50052, delivery 50053, profile 50054).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_PORTS = {"audience": 50051, "scheduler": 50052, "delivery": 50053, "profile": 50054}
SERVICES = tuple(DEFAULT_PORTS)
MODULES = {
    "audience": "audience_svc",
    "scheduler": "scheduler_svc",
    "delivery": "delivery_svc",
    "profile": "profile_stub",
}
GRPC_SERVICES = {
    "audience": "carillon.audience.v1.AudienceService",
    "scheduler": "carillon.scheduler.v1.CampaignService",
    "delivery": "carillon.delivery.v1.DeliveryService",
    "profile": "carillon.profile.v1.ProfileService",
}


@dataclass(frozen=True)
class Endpoints:
    """``host:port`` of each service."""

    audience: str
    scheduler: str
    delivery: str
    profile: str

    def of(self, service: str) -> str:
        """The address of ``service`` (one of SERVICES)."""
        address: str = getattr(self, service)
        return address

    @classmethod
    def from_env(cls, **given: str | None) -> Endpoints:
        """Addresses from explicit values, the environment, or the defaults."""
        values = {}
        for service, port in DEFAULT_PORTS.items():
            values[service] = (
                given.get(service) or os.environ.get(f"CARILLON_{service.upper()}_TARGET") or f"127.0.0.1:{port}"
            )
        return cls(**values)
