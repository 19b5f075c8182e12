"""Crash test with real processes: ``kill -9`` the email worker in the middle of a batch, restart it,
replay the whole Send stream, and count what the SMTP server received.

profile_stub and ``python -m delivery_svc --channel email`` run as subprocesses (configured through
the environment, as in the README's configuration table) on the test's database backend; the SMTP
server is an in-test aiosmtpd server that records every message. The worker is killed when the SMTP
server accepts a message in the middle of a batch, i.e. after SMTP accepted it and (unless the
worker is faster than the kill) before the worker marked it sent in the ledger.

What is guaranteed, and asserted: every recipient's message is received, each Message-ID (the ledger
id, also the provider idempotency key) belongs to exactly one recipient, and no recipient receives two
different messages. At the raw SMTP level (an SMTP relay honours no idempotency key), the worker marks
each message sent in the ledger as soon as SMTP accepted it, before sending the next one, so only the
message in flight when the process died (accepted but not yet marked) is sent again on replay, with the
same Message-ID: the test asserts at most one raw repeat and prints their number.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller

from carillon.delivery.v1 import delivery_service_pb2 as dpb
from carillon.delivery.v1 import delivery_service_pb2_grpc, template_pb2
from carillon.profile.v1 import profile_pb2, profile_service_pb2, profile_service_pb2_grpc
from carillon.type.v1 import channel_pb2, value_pb2
from carillon_chassis.clients import call_metadata
from tests.conftest import DatabaseFactory
from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
METADATA = call_metadata("crash")
RECIPIENTS = 600
BATCH_SIZE = 25
KILL_AT = 10 * BATCH_SIZE + 13  # the 13th message of the 11th batch
HEADER = dpb.SendHeader(
    campaign="campaigns/crash",
    run="campaigns/crash/runs/r1",
    activity="email1",
    channel=channel_pb2.CHANNEL_EMAIL,
    category=channel_pb2.MESSAGE_CATEGORY_MARKETING,
    template="templates/hello",
)
STARTUP_TIMEOUT_S = 60.0


@dataclass
class Recorder:
    """An aiosmtpd handler recording (recipient, Message-ID) and signalling the kill point."""

    received: list[tuple[str, str, str]] = field(default_factory=list)
    kill_point: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append((rcpt, str(message["Message-ID"]), str(message["Subject"])))
            if len(self.received) >= KILL_AT:
                self.kill_point.set()
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Recorder, int]]:
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    yield recorder, port
    controller.stop()


class Process:
    """A service subprocess that reports its bound port through a port file."""

    def __init__(self, module: str, args: list[str], env: dict[str, str], port_file: Path, log: Path) -> None:
        port_file.unlink(missing_ok=True)
        self.port_file = port_file
        self._log = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", "--port-file", str(port_file), *args],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def address(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the process exited with {self.popen.returncode}")
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text:
                return f"127.0.0.1:{text}"
            time.sleep(0.05)
        raise TimeoutError("the process did not start")

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


def batches() -> list[dpb.RecipientBatch]:
    addresses = [f"person{i:04d}@example.com" for i in range(RECIPIENTS)]
    return [
        dpb.RecipientBatch(
            sequence=start // BATCH_SIZE,
            recipients=[
                dpb.Recipient(identity=value_pb2.Identity(namespace="email", value=a), entity_key="")
                for a in addresses[start : start + BATCH_SIZE]
            ],
        )
        for start in range(0, RECIPIENTS, BATCH_SIZE)
    ]


async def stream(items: list[dpb.RecipientBatch]) -> AsyncIterator[dpb.SendRequest]:
    yield dpb.SendRequest(header=HEADER)
    for batch in items:
        yield dpb.SendRequest(batch=batch)


async def test_kill_9_mid_batch_then_replay_delivers_every_message_once_by_message_id(
    database_factory: DatabaseFactory,
    smtp: tuple[Recorder, int],
    processes: list[Process],
    tmp_path: Path,
) -> None:
    recorder, smtp_port = smtp
    profile_url, profile_schema = database_factory.url_and_schema("profile")
    delivery_url, delivery_schema = database_factory.url_and_schema("delivery")
    base_env = {"CARILLON_DATA_DIR": str(tmp_path), "CARILLON_LOG_FORMAT": "json"}
    profile_env = {**base_env, "CARILLON_PROFILE_DATABASE_URL": profile_url}
    if profile_schema:
        profile_env["CARILLON_PROFILE_DATABASE_SCHEMA"] = profile_schema
    profile = Process("profile_stub", [], profile_env, tmp_path / "profile.port", tmp_path / "profile.log")
    processes.append(profile)
    profile_address = await asyncio.to_thread(profile.address)
    delivery_env = {
        **base_env,
        "CARILLON_DELIVERY_DATABASE_URL": delivery_url,
        "CARILLON_DELIVERY_PROFILE_TARGET": profile_address,
        "CARILLON_DELIVERY_EMAIL_PROVIDER": "smtp",
        "CARILLON_DELIVERY_SMTP_HOST": "127.0.0.1",
        "CARILLON_DELIVERY_SMTP_PORT": str(smtp_port),
        "CARILLON_DELIVERY_SENDER_ADDRESS": "news@example.com",
    }
    if delivery_schema:
        delivery_env["CARILLON_DELIVERY_DATABASE_SCHEMA"] = delivery_schema

    def start_worker() -> Process:
        worker = Process(
            "delivery_svc",
            ["--channel", "email"],
            delivery_env,
            tmp_path / "delivery.port",
            tmp_path / "delivery.log",
        )
        processes.append(worker)
        return worker

    worker = start_worker()
    delivery_address = await asyncio.to_thread(worker.address)

    async with grpc.aio.insecure_channel(profile_address) as channel:
        profiles = profile_service_pb2_grpc.ProfileServiceStub(channel)
        await profiles.UpsertProfiles(
            profile_service_pb2.UpsertProfilesRequest(
                profiles=[
                    profile_pb2.Profile(
                        name=f"profiles/p{i:04d}",
                        first_name=f"P{i}",
                        identities=[value_pb2.Identity(namespace="email", value=f"person{i:04d}@example.com")],
                        consents=[
                            profile_pb2.Consent(
                                channel=channel_pb2.CHANNEL_EMAIL, state=profile_pb2.CONSENT_STATE_OPTED_IN
                            )
                        ],
                    )
                    for i in range(RECIPIENTS)
                ]
            ),
            metadata=METADATA,
        )

    async with grpc.aio.insecure_channel(delivery_address) as channel:
        delivery = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
        await delivery.CreateTemplate(
            dpb.CreateTemplateRequest(
                template_id="hello",
                template=template_pb2.Template(
                    channel=channel_pb2.CHANNEL_EMAIL,
                    email=template_pb2.EmailContent(subject="Hi {{ profile.first_name }}", text_body="Hello."),
                ),
            ),
            metadata=METADATA,
        )
        acks: list[dpb.SendResponse] = []

        async def drive() -> None:
            async for ack in delivery.Send(stream(batches()), metadata=METADATA):
                acks.append(ack)

        task = asyncio.create_task(drive())
        assert await asyncio.to_thread(recorder.kill_point.wait, STARTUP_TIMEOUT_S)
        worker.kill9()
        with pytest.raises(grpc.aio.AioRpcError):
            await task
    received_before_restart = len(recorder.received)
    acked_before_kill = len(acks)

    worker = start_worker()
    delivery_address = await asyncio.to_thread(worker.address)
    async with grpc.aio.insecure_channel(delivery_address) as channel:
        delivery = delivery_service_pb2_grpc.DeliveryServiceStub(channel)
        replay = [ack async for ack in delivery.Send(stream(batches()), metadata=METADATA)]

    assert acked_before_kill < RECIPIENTS // BATCH_SIZE
    assert received_before_restart >= KILL_AT
    assert len(replay) == RECIPIENTS // BATCH_SIZE
    assert sum(a.sent + a.already_sent for a in replay) == RECIPIENTS
    assert all(not a.failed and not a.skipped for a in replay)
    by_message_id = {mid: rcpt for rcpt, mid, _ in recorder.received}
    ids_per_recipient = Counter(by_message_id.values())
    assert len(by_message_id) == RECIPIENTS  # every message received, once per Message-ID
    assert set(ids_per_recipient) == {f"person{i:04d}@example.com" for i in range(RECIPIENTS)}
    assert set(ids_per_recipient.values()) == {1}  # nobody got two different messages
    for rcpt, mid, _ in recorder.received:
        assert by_message_id[mid] == rcpt
    raw_duplicates = len(recorder.received) - RECIPIENTS
    assert 0 <= raw_duplicates <= 1  # only the message in flight at the kill can repeat, same Message-ID
    print(f"raw SMTP duplicates after kill -9 (same Message-ID): {raw_duplicates}")
