"""Crash safety of the scheduler with real processes, on both database backends.

The four services run as separate processes (``python -m <package> --port 0 --port-file F``, as
``carillon up`` starts them), delivery sends email over SMTP to an in-test aiosmtpd server that
records every message (slowly, so that a channel activity of small batches takes a while). The
scheduler is killed with SIGKILL in the middle of the channel activity, after the first acknowledged
batches, and started again: the restarted process claims the run once its lease has expired and
resumes from the checkpoint. Every expected recipient must have received the email, the delivery
ledger must hold exactly one sent row each, and the SMTP server must have received exactly one message
per recipient. On PostgreSQL, two
scheduler replicas share one database and run the same due campaigns: each run is claimed once and
nobody gets a message twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from carillon.delivery.v1 import delivery_service_pb2 as dlv
from carillon.scheduler.v1 import run_pb2
from carillon.scheduler.v1 import scheduler_service_pb2 as sch
from carillon_cli.demo import BOOKINGS, CUSTOMERS, Demo, demo_campaign, expected_recipients, read_rows
from carillon_cli.endpoints import GRPC_SERVICES, MODULES, Endpoints
from carillon_cli.supervisor import health_status
from tests.conftest import DatabaseFactory
from tests.e2e.conftest import RecordingHandler, free_port

SANDBOX = "crash"
ROOT = Path(__file__).resolve().parents[2]
FINISHED = (run_pb2.RUN_STATE_SUCCEEDED, run_pb2.RUN_STATE_FAILED, run_pb2.RUN_STATE_CANCELLED)


@dataclass
class SlowRecorder(RecordingHandler):
    """Records every message, taking ``delay_s`` per message (a slow provider)."""

    delay_s: float = 0.0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay_s)
        return await super().handle_DATA(server, session, envelope)


@dataclass
class Processes:
    """Services running as child processes, with their logs under ``directory``."""

    directory: Path
    database_factory: DatabaseFactory
    smtp_port: int
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    databases: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def database(self, service: str) -> tuple[str, str | None]:
        if service not in self.databases:
            self.databases[service] = self.database_factory.url_and_schema(service)
        return self.databases[service]

    def env(self, service: str, name: str, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", CARILLON_DATA_DIR=str(self.directory / name))
        url, schema = self.database(service)
        prefix = f"CARILLON_{service.upper()}_"
        env[prefix + "DATABASE_URL"] = url
        if schema:
            env[prefix + "DATABASE_SCHEMA"] = schema
        if service == "delivery":
            env.update(
                CARILLON_DELIVERY_PROFILE_TARGET=self.address("profile"),
                CARILLON_DELIVERY_EMAIL_PROVIDER="smtp",
                CARILLON_DELIVERY_SMTP_HOST="127.0.0.1",
                CARILLON_DELIVERY_SMTP_PORT=str(self.smtp_port),
            )
        if service == "scheduler":
            env.update(
                CARILLON_SCHEDULER_AUDIENCE_TARGET=self.address("audience"),
                CARILLON_SCHEDULER_DELIVERY_TARGETS=json.dumps({"email": self.address("delivery")}),
                CARILLON_SCHEDULER_POLL_INTERVAL_S="0.1",
            )
        env.update(extra)
        return env

    async def start(self, service: str, name: str = "", **extra: str) -> str:
        """Start ``service`` as process ``name`` and wait until it is SERVING; return its address."""
        name = name or service
        port_file = self.directory / f"{name}.port"
        port_file.unlink(missing_ok=True)
        log = (self.directory / f"{name}.log").open("ab")
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", MODULES[service], "--port", "0", "--port-file", str(port_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(service, name, extra),
            cwd=ROOT,
            start_new_session=True,
        )
        log.close()
        async with asyncio.timeout(60):  # a guard against a hang, not a speed requirement
            while True:
                if self.children[name].poll() is not None:
                    raise AssertionError(f"{name} exited:\n{(self.directory / f'{name}.log').read_text()[-3000:]}")
                if port_file.exists() and port_file.read_text().strip():
                    self.ports[name] = int(port_file.read_text())
                    status = await asyncio.to_thread(health_status, self.address(name), GRPC_SERVICES[service])
                    if status == "SERVING":
                        return self.address(name)
                await asyncio.sleep(0.1)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def kill(self, name: str) -> None:
        """SIGKILL: no graceful shutdown, no lease released."""
        process = self.children[name]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.children.values():
            if process.poll() is None:
                process.terminate()
        for process in self.children.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def recorder() -> Iterator[tuple[SlowRecorder, int]]:
    handler = SlowRecorder()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


@contextlib.asynccontextmanager
async def started(
    tmp_path: Path, factory: DatabaseFactory, smtp_port: int, **scheduler_env: str
) -> AsyncIterator[Processes]:
    processes = Processes(tmp_path, factory, smtp_port)
    try:
        await processes.start("audience")
        await processes.start("profile")
        await processes.start("delivery")
        await processes.start("scheduler", **scheduler_env)
        yield processes
    finally:
        processes.stop_all()


def endpoints(processes: Processes, scheduler: str = "scheduler") -> Endpoints:
    return Endpoints(
        audience=processes.address("audience"),
        scheduler=processes.address(scheduler),
        delivery=processes.address("delivery"),
        profile=processes.address("profile"),
    )


async def load_demo_data(demo: Demo) -> None:
    await demo.ensure_entity("customers", CUSTOMERS)
    await demo.ensure_entity("bookings", BOOKINGS)
    await demo.ingest("customers", CUSTOMERS, read_rows("customers"))
    await demo.ingest("bookings", BOOKINGS, read_rows("bookings"))
    await demo.load_profiles()
    await demo.ensure_template()


async def publish(demo: Demo, batch_size: int, request_id: str) -> str:
    campaign = demo_campaign()
    campaign.activities[1].channel.batch_size = batch_size
    created = await demo.campaigns.CreateCampaign(
        sch.CreateCampaignRequest(campaign=campaign, request_id=request_id), metadata=demo.metadata
    )
    published = await demo.campaigns.PublishCampaign(
        sch.PublishCampaignRequest(name=created.campaign.name), metadata=demo.metadata
    )
    return published.run


async def until_finished(demo: Demo, run: str) -> run_pb2.Run:
    async with asyncio.timeout(300):  # a guard against a hang, not a speed requirement
        while True:
            reply = await demo.campaigns.GetRun(sch.GetRunRequest(name=run), metadata=demo.metadata)
            if reply.run.state in FINISHED:
                return reply.run
            await asyncio.sleep(0.1)


async def claims_of(demo: Demo, run: str) -> list[str]:
    """The replicas that claimed the run, in order, from its log."""
    entries: list[str] = []
    token = ""
    while True:
        page = await demo.campaigns.ListRunLogs(
            sch.ListRunLogsRequest(parent=run, page_size=500, page_token=token), metadata=demo.metadata
        )
        entries += [e.message.removeprefix("claimed by replica ") for e in page.entries if "claimed by" in e.message]
        token = page.next_page_token
        if not token:
            return entries


async def test_a_scheduler_killed_mid_send_resumes_and_every_recipient_gets_exactly_one_email(
    tmp_path: Path, database_factory: DatabaseFactory, recorder: tuple[SlowRecorder, int]
) -> None:
    smtp, smtp_port = recorder
    lease = {"CARILLON_SCHEDULER_LEASE_S": "2"}
    first = {"CARILLON_SCHEDULER_REPLICA_ID": "first", **lease}
    async with started(tmp_path, database_factory, smtp_port, **first) as processes:
        demo = Demo(endpoints(processes), sandbox=SANDBOX)
        try:
            await load_demo_data(demo)
            smtp.delay_s = 0.05  # slow sends from now on: the channel activity takes many batches of 2
            run = await publish(demo, batch_size=2, request_id="crash-1")
            async with asyncio.timeout(120):  # a guard against a hang, not a speed requirement
                while True:
                    reply = await demo.campaigns.GetRun(sch.GetRunRequest(name=run), metadata=demo.metadata)
                    email = reply.run.tasks[1]
                    if email.checkpoint > 0:
                        break
                    await asyncio.sleep(0.02)
            assert reply.run.state == run_pb2.RUN_STATE_RUNNING
            processes.kill("scheduler")
            sent_before_restart = len(smtp.messages)

            await processes.start("scheduler", "scheduler-2", CARILLON_SCHEDULER_REPLICA_ID="second", **lease)
            await demo.close()
            demo = Demo(endpoints(processes, "scheduler-2"), sandbox=SANDBOX)
            final = await until_finished(demo, run)
            report = await demo.delivery.GetDeliveryReport(
                dlv.GetDeliveryReportRequest(run=run, activity="email"), metadata=demo.metadata
            )
            claims = await claims_of(demo, run)
        finally:
            await demo.close()

    expected = expected_recipients()
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.error
    assert claims == ["first", "second"]  # the killed replica's run was resumed by the restarted one
    assert 0 < sent_before_restart < len(expected)
    email = final.tasks[1]
    assert email.sent + email.already_sent == len(expected)  # each acknowledged recipient counted once
    assert (report.report.sent, report.report.pending) == (len(expected), 0)  # one ledger row each
    # exactly once at the SMTP server: the delivery worker finishes (and records) the batch it was
    # sending when the scheduler's stream was cut, so the replayed batch finds it in the ledger
    assert Counter(smtp.recipients()) == Counter(expected)


@pytest.mark.postgres
async def test_two_scheduler_replicas_on_postgresql_run_each_due_campaign_once(
    tmp_path: Path, recorder: tuple[SlowRecorder, int]
) -> None:
    smtp, smtp_port = recorder
    factory = DatabaseFactory("postgresql", tmp_path)
    try:
        async with started(tmp_path, factory, smtp_port, CARILLON_SCHEDULER_REPLICA_ID="replica-a") as processes:
            await processes.start("scheduler", "scheduler-b", CARILLON_SCHEDULER_REPLICA_ID="replica-b")
            demo = Demo(endpoints(processes), sandbox=SANDBOX)
            try:
                await load_demo_data(demo)
                runs = [await publish(demo, batch_size=10, request_id=f"twin-{i}") for i in range(6)]
                finals = [await until_finished(demo, run) for run in runs]
                reports = [
                    await demo.delivery.GetDeliveryReport(
                        dlv.GetDeliveryReportRequest(run=run, activity="email"), metadata=demo.metadata
                    )
                    for run in runs
                ]
                claims = [await claims_of(demo, run) for run in runs]
                listed = [
                    await demo.campaigns.ListRuns(
                        sch.ListRunsRequest(parent=run.rsplit("/runs/", 1)[0]), metadata=demo.metadata
                    )
                    for run in runs
                ]
            finally:
                await demo.close()
    finally:
        factory.cleanup()

    expected = expected_recipients()
    assert [f.state for f in finals] == [run_pb2.RUN_STATE_SUCCEEDED] * len(runs)
    assert all(len(c) == 1 for c in claims), claims  # no run was executed by two replicas
    assert [len(page.runs) for page in listed] == [1] * len(runs)
    assert Counter(smtp.recipients()) == Counter({address: len(runs) for address in expected})
    assert [(r.report.sent, r.report.pending) for r in reports] == [(len(expected), 0)] * len(runs)
    assert [f.tasks[1].already_sent for f in finals] == [0] * len(runs)  # no batch was sent twice
