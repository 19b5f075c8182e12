"""``carillon up`` starts an SMS delivery worker beside the four services (real processes, SQLite):
it answers SERVING as a DeliveryService on its own port, is reported at start-up, and stops with the
rest on Ctrl-C."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

from carillon_cli.endpoints import GRPC_SERVICES
from carillon_cli.supervisor import health_status
from tests.e2e.test_cli_up import carillon


def test_up_starts_an_sms_worker_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    process = carillon("up", "--port-base", "0", "--data-dir", str(tmp_path), "--sms-api-url", "http://127.0.0.1:9")
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    serving.wait(timeout=120)  # a guard against a hang, not a speed requirement
    found = [re.search(r"sms\s+(127\.0\.0\.1:\d+)\s+SERVING", line) for line in lines]
    address = next((m.group(1) for m in found if m), "")
    status = health_status(address, GRPC_SERVICES["delivery"]) if address else "UNREACHABLE"

    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    reader.join(timeout=10)
    output = "".join(lines)

    assert serving.is_set(), output
    assert status == "SERVING", output
    assert process.returncode == 0, output
    deadline = time.monotonic() + 10
    while health_status(address, GRPC_SERVICES["delivery"]) != "UNREACHABLE" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health_status(address, GRPC_SERVICES["delivery"]) == "UNREACHABLE"
