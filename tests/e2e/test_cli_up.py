"""The quick start itself, with real processes: ``carillon up --demo`` on embedded SQLite.

``make run`` is ``carillon up --demo``; these tests run the same command with free ports and a
temporary data directory, check the demo's messages in the outbox, and check that Ctrl-C (SIGINT)
stops every service process cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from email import message_from_bytes, policy
from pathlib import Path

from carillon_cli.demo import expected_recipients
from carillon_cli.endpoints import GRPC_SERVICES
from carillon_cli.supervisor import health_status

ROOT = Path(__file__).resolve().parents[2]


def carillon(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARILLON_")}
    return subprocess.Popen(
        [sys.executable, "-m", "carillon_cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,  # type: ignore[call-overload]
    )


def test_up_with_demo_delivers_the_demo_emails_to_the_outbox(tmp_path: Path) -> None:
    process = carillon("up", "--demo", "--exit-after-demo", "--port-base", "0", "--data-dir", str(tmp_path))
    output, _ = process.communicate(timeout=240)

    assert process.returncode == 0, output
    assert "RUN_STATE_SUCCEEDED" in output
    files = sorted((tmp_path / "outbox").glob("*.eml"))
    recipients = [message_from_bytes(f.read_bytes(), policy=policy.default)["To"].addresses[0].addr_spec for f in files]
    assert Counter(recipients) == Counter(expected_recipients())


def test_ctrl_c_stops_every_service(tmp_path: Path) -> None:
    process = carillon("up", "--port-base", "0", "--data-dir", str(tmp_path))
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 120
    ports: dict[str, int] = {}
    while time.monotonic() < deadline and len(ports) < 4:
        for service in GRPC_SERVICES:
            port_file = run_dir / f"{service}.port"
            if port_file.exists() and port_file.read_text():
                ports[service] = int(port_file.read_text())
        time.sleep(0.2)
    assert len(ports) == 4, "services did not start"
    while time.monotonic() < deadline and any(
        health_status(f"127.0.0.1:{port}", GRPC_SERVICES[s]) != "SERVING" for s, port in ports.items()
    ):
        time.sleep(0.2)

    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 0, output
    assert "stopping the services" in output
    for service, port in ports.items():
        assert health_status(f"127.0.0.1:{port}", GRPC_SERVICES[service]) == "UNREACHABLE"
