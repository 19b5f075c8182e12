"""gRPC server bootstrap shared by every service.

:class:`GrpcServer` builds a ``grpc.aio`` server with the chassis interceptor, gRPC health checking
(``SERVING`` for the overall server and each service) and reflection, binds it (port 0 picks a free
port, reported by :attr:`GrpcServer.port` and optionally written to a port file), and shuts down
gracefully: health turns ``NOT_SERVING``, new calls are refused, in-flight calls get a grace period,
then the service's own stop hooks run (background loops, database pools).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from carillon_chassis.interceptors import ServiceInterceptor

log = structlog.get_logger("carillon.server")

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)

StopHook = Callable[[], Awaitable[None]]


class GrpcServer:
    """One service's gRPC server with health, reflection and graceful shutdown."""

    def __init__(
        self,
        *,
        name: str,
        domain: str,
        host: str,
        port: int,
        register: Callable[[grpc.aio.Server], Sequence[str]],
        grace_period_s: float = 10.0,
        port_file: Path | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.requested_port = port
        self.grace_period_s = grace_period_s
        self.port_file = port_file
        self.port = 0
        self._server = grpc.aio.server(interceptors=[ServiceInterceptor(domain)], options=SERVER_OPTIONS)
        self.service_names = list(register(self._server))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server
        )
        self._stop_hooks: list[StopHook] = []
        self._start_hooks: list[StopHook] = []
        self._stopped = asyncio.Event()

    def on_start(self, hook: StopHook) -> None:
        """Run ``hook`` once the server is serving (start background loops here)."""
        self._start_hooks.append(hook)

    def on_stop(self, hook: StopHook) -> None:
        """Run ``hook`` after the server stopped taking calls (stop loops, close pools here)."""
        self._stop_hooks.append(hook)

    @property
    def address(self) -> str:
        """``host:port`` of the bound server, for clients."""
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        """Bind, start serving and mark every service SERVING; return the bound port."""
        self.port = self._server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {self.host}:{self.requested_port}")
        await self._server.start()
        for service in ["", *self.service_names]:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        for hook in self._start_hooks:
            await hook()
        if self.port_file is not None:
            tmp = self.port_file.with_suffix(".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(str(self.port))
            tmp.replace(self.port_file)
        log.info("serving", service=self.name, address=self.address)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let in-flight calls finish, run hooks."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.grace_period_s if grace is None else grace)
        for hook in reversed(self._stop_hooks):
            await hook()
        log.info("stopped", service=self.name)

    async def serve_until_signal(self) -> None:
        """Start, then serve until SIGTERM or SIGINT, then stop gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, wake.set)
        await wake.wait()
        log.info("shutting down", service=self.name, grace_s=self.grace_period_s)
        await self.stop()
