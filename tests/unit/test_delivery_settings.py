"""delivery_svc settings and its command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from delivery_svc.settings import DeliverySettings

REPO = Path(__file__).resolve().parents[2]


def test_the_outbox_defaults_to_a_directory_under_the_data_dir(tmp_path: Path) -> None:
    settings = DeliverySettings(data_dir=tmp_path)

    assert settings.resolved_outbox_dir() == tmp_path / "outbox"


def test_settings_are_read_from_carillon_delivery_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARILLON_DELIVERY_EMAIL_PROVIDER", "smtp")
    monkeypatch.setenv("CARILLON_DELIVERY_SMTP_PORT", "2525")
    monkeypatch.setenv("CARILLON_DELIVERY_PROFILE_TARGET", "profile:50054")

    settings = DeliverySettings()

    assert (settings.email_provider, settings.smtp_port, settings.profile_target) == ("smtp", 2525, "profile:50054")
    assert (settings.service_name, settings.port, settings.channel) == ("delivery", 50053, "email")


def test_a_worker_for_an_unknown_channel_exits_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "delivery_svc", "--channel", "fax", "--port", "0"],
        cwd=REPO,
        env={"CARILLON_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "'fax'" in result.stderr
    assert "Traceback" not in result.stderr
