"""Settings of delivery_svc, from ``CARILLON_DELIVERY_*`` environment variables."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from carillon_chassis.settings import ServiceSettings

DEFAULT_RETRY_WINDOW_H = {"email": 84.0, "sms": 24.0, "push": 6.0, "direct_mail": 24.0}


class DeliverySettings(ServiceSettings):
    """delivery_svc settings: the worker's channel, its profile service and its email provider."""

    model_config = SettingsConfigDict(env_prefix="CARILLON_DELIVERY_", extra="ignore", populate_by_name=True)

    service_name: str = "delivery"
    port: int = 50053
    # The channel this worker serves (email, sms, push, direct_mail); every channel is implemented.
    channel: str = "email"
    # The ProfileService, host:port.
    profile_target: str = "127.0.0.1:50054"
    # Deadline of one call to the profile service; past it the batch fails with UNAVAILABLE.
    profile_timeout_s: float = Field(default=30.0, gt=0)
    # The AudienceService, host:port, which receives the message logs (sent, failed, delivered,
    # opened, clicked, bounced); empty: no message logs are kept.
    audience_target: str = "127.0.0.1:50051"
    # Deadline of one RecordMessageLogs call.
    audience_timeout_s: float = Field(default=30.0, gt=0)
    # How often pending message logs are flushed (they are also flushed after every batch), and the
    # longest wait between two attempts at a log audience_svc did not take (doubling from the interval).
    message_log_interval_s: float = Field(default=1.0, gt=0)
    message_log_retry_max_s: float = Field(default=60.0, gt=0)
    # Where emails go: files in outbox_dir ("outbox") or an SMTP relay ("smtp").
    email_provider: Literal["outbox", "smtp"] = "outbox"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    # The Twilio-style SMS API: base URL, account id and auth token; the SMS sender id or number.
    sms_api_url: str = "https://api.twilio.com"
    sms_account: str = ""
    sms_token: SecretStr | None = None
    sms_sender: str = ""
    sms_timeout_s: float = Field(default=30.0, gt=0)
    # The push API: "fcm" (FCM v1 style) or "apns" (APNs style), its base URL and bearer token, the
    # FCM project id and the APNs topic (bundle id).
    push_provider: Literal["fcm", "apns"] = "fcm"
    push_api_url: str = "https://fcm.googleapis.com"
    push_token: SecretStr | None = None
    push_project: str = ""
    push_topic: str = ""
    push_timeout_s: float = Field(default=30.0, gt=0)
    # Direct-mail extracts: the directory (<data_dir>/extracts when unset), the file name prefix, the
    # delimiter, whether a header line is written, rows per file (the files of one run and activity
    # continue across its batches) and an optional sort column (each file is sorted on it).
    extract_dir: Path | None = None
    extract_prefix: str = Field(default="extract", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    extract_delimiter: str = Field(default=",", min_length=1, max_length=1)
    extract_header: bool = True
    extract_max_rows: int = Field(default=200_000, ge=1)
    extract_sort_column: str = ""
    # The sender used when a template does not name one.
    sender_address: str = "carillon@localhost"
    sender_name: str = "Carillon"
    # The outbox directory; <data_dir>/outbox when unset.
    outbox_dir: Path | None = None
    # How the outbox writes emails: "eml", one <message id>.eml file per message, or "mbox", one mboxrd
    # file per batch, with a SQLite index of the ids written (.outbox-index.sqlite) so none is written twice.
    outbox_format: Literal["eml", "mbox"] = "eml"
    # The most recipients one batch of a Send stream may carry.
    max_batch: int = Field(default=10000, ge=1)
    # Attempts per message on transient provider errors, with exponential backoff and jitter.
    send_attempts: int = Field(default=4, ge=1, le=20)
    send_retry_initial_s: float = Field(default=0.5, ge=0)
    send_retry_max_s: float = Field(default=10.0, ge=0)
    # How long after its first attempt a message that failed transiently (or was interrupted) is
    # retried when its batch is replayed; the channel's default when unset (email 84 h, SMS 24 h,
    # push 6 h, direct mail 24 h).
    retry_window_h: float | None = Field(default=None, gt=0)
    # The highest rate limit a Send header may ask for, messages per second.
    max_rate_per_second: int = Field(default=2000, ge=1)
    # The provider's own limit, messages per second across every activity of this worker; 0 = none.
    provider_rate_per_second: float = Field(default=0, ge=0)

    def resolved_retry_window(self) -> timedelta:
        """The retry window of the worker's channel."""
        hours = self.retry_window_h or DEFAULT_RETRY_WINDOW_H.get(self.channel, 24.0)
        return timedelta(hours=hours)

    def resolved_outbox_dir(self) -> Path:
        """The directory the outbox provider writes its ``.eml`` or ``.mbox`` files into."""
        return self.outbox_dir if self.outbox_dir is not None else self.data_dir / "outbox"
