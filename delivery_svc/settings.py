"""Settings of delivery_svc, from ``CARILLON_DELIVERY_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from carillon_chassis.settings import ServiceSettings


class DeliverySettings(ServiceSettings):
    """delivery_svc settings: the worker's channel, its profile service and its email provider."""

    model_config = SettingsConfigDict(env_prefix="CARILLON_DELIVERY_", extra="ignore", populate_by_name=True)

    service_name: str = "delivery"
    port: int = 50053
    # The channel this worker serves (email, sms, push, direct_mail); only email is implemented.
    channel: str = "email"
    # The ProfileService, host:port.
    profile_target: str = "127.0.0.1:50054"
    # Deadline of one call to the profile service; past it the batch fails with UNAVAILABLE.
    profile_timeout_s: float = Field(default=30.0, gt=0)
    # Where emails go: files in outbox_dir ("outbox") or an SMTP relay ("smtp").
    email_provider: Literal["outbox", "smtp"] = "outbox"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    # The sender used when a template does not name one.
    sender_address: str = "carillon@localhost"
    sender_name: str = "Carillon"
    # The outbox directory; <data_dir>/outbox when unset.
    outbox_dir: Path | None = None
    # The most recipients one batch of a Send stream may carry.
    max_batch: int = Field(default=10000, ge=1)
    # Attempts per message on transient provider errors, with exponential backoff and jitter.
    send_attempts: int = Field(default=4, ge=1, le=20)
    send_retry_initial_s: float = Field(default=0.5, ge=0)
    send_retry_max_s: float = Field(default=10.0, ge=0)

    def resolved_outbox_dir(self) -> Path:
        """The directory the outbox provider writes ``.eml`` files into."""
        return self.outbox_dir if self.outbox_dir is not None else self.data_dir / "outbox"
