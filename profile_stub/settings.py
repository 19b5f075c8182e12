"""Settings of profile_stub, from ``CARILLON_PROFILE_*`` environment variables."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from carillon_chassis.settings import ServiceSettings


class ProfileSettings(ServiceSettings):
    """profile_stub settings: the common ones plus the consent policy for unknown consent."""

    model_config = SettingsConfigDict(env_prefix="CARILLON_PROFILE_", extra="ignore", populate_by_name=True)

    service_name: str = "profile"
    port: int = 50054
    # Channels on which a profile with no recorded consent may receive marketing messages.
    # By default every channel requires an explicit opt-in.
    unknown_consent_allowed: list[str] = []
    max_eligibility_batch: int = 10000
