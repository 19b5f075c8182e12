"""Typed settings read from the environment, shared by every service.

Each service subclasses :class:`ServiceSettings` with its own ``env_prefix`` (for example
``CARILLON_AUDIENCE_``) and defaults. A few settings are shared by all services and read without the
prefix: ``CARILLON_DATA_DIR``, ``CARILLON_DATABASE_URL``, ``CARILLON_LOG_FORMAT`` and
``CARILLON_LOG_LEVEL``. A service-specific variable wins over the shared one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Settings every service has: where it listens, its database, logging and shutdown grace."""

    model_config = SettingsConfigDict(env_prefix="CARILLON_SERVICE_", extra="ignore", populate_by_name=True)

    service_name: str = "service"
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    data_dir: Path = Field(default_factory=lambda: Path(os.environ.get("CARILLON_DATA_DIR", "./var")))
    database_url: str | None = None
    database_schema: str | None = None
    log_format: Literal["console", "json"] = Field(
        default_factory=lambda: os.environ.get("CARILLON_LOG_FORMAT", "console")  # type: ignore[arg-type]
    )
    log_level: str = Field(default_factory=lambda: os.environ.get("CARILLON_LOG_LEVEL", "info"))
    grace_period_s: float = 10.0
    db_threads: int = Field(default=8, ge=1, le=64)
    port_file: Path | None = None

    def resolved_database_url(self) -> str:
        """The database URL: the service's own, else the shared one, else a SQLite file in data_dir."""
        url = self.database_url or os.environ.get("CARILLON_DATABASE_URL")
        if url:
            return url
        return f"sqlite:///{(self.data_dir / f'{self.service_name}.db').resolve()}"

    def resolved_schema(self) -> str:
        """The PostgreSQL schema that holds the service's tables (``carillon_<service>`` by default)."""
        return self.database_schema or f"carillon_{self.service_name}"
