"""The committed protobuf code must match a fresh generation from protos/ (no stale stubs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_contracts() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_has_a_typed_stub() -> None:
    stubs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "carillon").rglob("*_service_pb2_grpc.pyi"))
    assert stubs == [
        "carillon/audience/v1/audience_service_pb2_grpc.pyi",
        "carillon/delivery/v1/delivery_service_pb2_grpc.pyi",
        "carillon/profile/v1/profile_service_pb2_grpc.pyi",
        "carillon/scheduler/v1/scheduler_service_pb2_grpc.pyi",
    ]
