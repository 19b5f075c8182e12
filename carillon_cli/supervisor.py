"""``carillon up``: run the four services as child processes and stop them cleanly.

Each service is started with ``python -m <package>`` (spawn, never fork: gRPC does not survive a
fork), writes its bound port to a port file, and is considered up once gRPC health answers SERVING.
Dependencies start first (audience and profile, then the email delivery worker, then the SMS delivery
worker, then scheduler) so that every service is told the real addresses of its peers — which also
makes ephemeral ports (``--port-base 0``) work. The SMS worker (``delivery_sms``: ``python -m
delivery_svc --channel sms``, port base + 4) shares the delivery database and uses the Twilio-style
provider at ``sms_api_url`` (or the worker's default, with the ``CARILLON_DELIVERY_SMS_*`` settings of
the environment); the scheduler is given both workers as its ``email`` and ``sms`` delivery targets.
On Ctrl-C or SIGTERM every child gets SIGTERM (graceful shutdown) and, after a grace period, SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carillon_cli.endpoints import DEFAULT_PORTS, GRPC_SERVICES, MODULES, Endpoints


class StartupError(RuntimeError):
    """A service did not come up (it exited, or did not answer SERVING in time)."""


@dataclass
class ServiceProcess:
    """One running service."""

    service: str
    process: subprocess.Popen[bytes]
    port_file: Path
    log_file: Path
    port: int = 0


@dataclass
class UpOptions:
    """How to run the services."""

    data_dir: Path = Path("var")
    port_base: int = 50051
    database_url: str | None = None
    email_provider: str = "outbox"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    log_format: str = "console"
    scheduler_poll_s: float = 0.5
    # The Twilio-style API the SMS worker posts to; None leaves the worker's own setting (environment
    # CARILLON_DELIVERY_SMS_API_URL, else its default).
    sms_api_url: str | None = None
    startup_timeout_s: float = 60.0
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def outbox_dir(self) -> Path:
        """Where the outbox email provider writes messages."""
        return (self.data_dir / "outbox").resolve()


def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """The gRPC health status name of ``service`` at ``address`` ("UNREACHABLE" when it does not answer)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# Processes beyond the four services: the SMS delivery worker, its port offset and arguments.
SMS_WORKER = "delivery_sms"
SMS_WORKER_PORT = 50055


class Supervisor:
    """Starts, watches and stops the four service processes."""

    def __init__(self, options: UpOptions) -> None:
        self.options = options
        self.children: dict[str, ServiceProcess] = {}
        self.run_dir = (options.data_dir / "run").resolve()
        self.log_dir = (options.data_dir / "logs").resolve()

    def _port_for(self, service: str) -> int:
        if self.options.port_base == 0:
            return 0
        default = SMS_WORKER_PORT if service == SMS_WORKER else DEFAULT_PORTS[service]
        return self.options.port_base + (default - 50051)

    def _env(self, service: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CARILLON_DATA_DIR": str(self.options.data_dir.resolve()),
                "CARILLON_LOG_FORMAT": self.options.log_format,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.options.database_url:
            env["CARILLON_DATABASE_URL"] = self.options.database_url
        if service in ("delivery", SMS_WORKER):
            env["CARILLON_DELIVERY_PROFILE_TARGET"] = self.address("profile")
            env["CARILLON_DELIVERY_AUDIENCE_TARGET"] = self.address("audience")
            env["CARILLON_DELIVERY_EMAIL_PROVIDER"] = self.options.email_provider
            env["CARILLON_DELIVERY_OUTBOX_DIR"] = str(self.options.outbox_dir)
            env["CARILLON_DELIVERY_SMTP_HOST"] = self.options.smtp_host
            env["CARILLON_DELIVERY_SMTP_PORT"] = str(self.options.smtp_port)
        if service == SMS_WORKER:
            env["CARILLON_DELIVERY_CHANNEL"] = "sms"
            if self.options.sms_api_url:
                env["CARILLON_DELIVERY_SMS_API_URL"] = self.options.sms_api_url
        if service == "scheduler":
            env["CARILLON_SCHEDULER_AUDIENCE_TARGET"] = self.address("audience")
            env["CARILLON_SCHEDULER_DELIVERY_TARGETS"] = json.dumps(
                {"email": self.address("delivery"), "sms": self.address(SMS_WORKER)}
            )
            env["CARILLON_SCHEDULER_POLL_INTERVAL_S"] = str(self.options.scheduler_poll_s)
        env.update(self.options.extra_env)
        return env

    def address(self, service: str) -> str:
        """The address of a started service."""
        return f"127.0.0.1:{self.children[service].port}"

    def endpoints(self) -> Endpoints:
        """The addresses of all four started services."""
        return Endpoints(**{service: self.address(service) for service in MODULES})

    def _spawn(self, service: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.run_dir / f"{service}.port"
        port_file.unlink(missing_ok=True)
        log_file = self.log_dir / f"{service}.log"
        module = MODULES["delivery"] if service == SMS_WORKER else MODULES[service]
        command = [sys.executable, "-m", module, "--port", str(self._port_for(service))]
        if service == SMS_WORKER:
            command += ["--channel", "sms"]
        command += ["--port-file", str(port_file)]
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self._env(service), start_new_session=True
            )
        self.children[service] = ServiceProcess(service, process, port_file, log_file)

    def _await_ready(self, services: list[str]) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        pending = list(services)
        while pending:
            for service in list(pending):
                child = self.children[service]
                if child.process.poll() is not None:
                    tail = child.log_file.read_text(errors="replace")[-2000:]
                    raise StartupError(f"{service} exited with code {child.process.returncode}; log tail:\n{tail}")
                if not child.port and child.port_file.exists():
                    child.port = int(child.port_file.read_text())
                grpc_service = GRPC_SERVICES["delivery" if service == SMS_WORKER else service]
                if child.port and health_status(self.address(service), grpc_service) == "SERVING":
                    pending.remove(service)
            if time.monotonic() > deadline:
                raise StartupError(f"not SERVING after {self.options.startup_timeout_s:.0f}s: {', '.join(pending)}")
            if pending:
                time.sleep(0.1)

    def start(self) -> Endpoints:
        """Start every service in dependency order; return their addresses once all are SERVING."""
        try:
            # The SMS worker after the email worker: both migrate the shared delivery database.
            for wave in (["audience", "profile"], ["delivery"], [SMS_WORKER], ["scheduler"]):
                for service in wave:
                    self._spawn(service)
                self._await_ready(wave)
        except BaseException:
            self.stop()
            raise
        return self.endpoints()

    def dead(self) -> list[str]:
        """Services whose process has exited."""
        return [s for s, child in self.children.items() if child.process.poll() is not None]

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (scheduler first), then SIGKILL what is left after ``grace_s``."""
        order = [s for s in ("scheduler", SMS_WORKER, "delivery", "audience", "profile") if s in self.children]
        for service in order:
            process = self.children[service].process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in order:
            process = self.children[service].process
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
