"""Server interceptor: request ids, sandboxes, structured log context, one summary line per RPC,
and the mapping of domain errors to rich gRPC statuses.

Every handler kind (unary and streaming, both directions) is wrapped the same way: the call's
metadata is read (``x-request-id``, ``x-carillon-sandbox``), the structlog context is bound, the
handler runs, and a :class:`CarillonError` becomes its status code with ``google.rpc`` details. A
database error that retrying may cure (a transaction conflict, a busy or unreachable database) is
ABORTED or UNAVAILABLE (:func:`carillon_chassis.database.retryable_error`). Any other exception is a
bug: it is logged with its traceback and reported as ``INTERNAL`` without leaking its text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from grpc_status import rpc_status

from carillon_chassis.database import retryable_error
from carillon_chassis.errors import CarillonError, internal_status, to_status
from carillon_chassis.sandbox import (
    DEFAULT_SANDBOX,
    SANDBOX_METADATA_KEY,
    set_current_sandbox,
    validate_sandbox,
)

REQUEST_ID_METADATA_KEY = "x-request-id"
_QUIET_SERVICES = ("/grpc.health.", "/grpc.reflection.")

log = structlog.get_logger("carillon.rpc")


class _CallScope:
    """The per-call bookkeeping shared by the four handler wrappers."""

    def __init__(self, method: str, domain: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.domain = domain
        self.context = context
        self.started = time.perf_counter()
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self.request_id = metadata.get(REQUEST_ID_METADATA_KEY) or uuid.uuid4().hex
        self.raw_sandbox = metadata.get(SANDBOX_METADATA_KEY, DEFAULT_SANDBOX)
        structlog.contextvars.bind_contextvars(request_id=self.request_id, rpc=method, sandbox=self.raw_sandbox)

    def enter(self) -> None:
        """Validate and install the call's sandbox (raises InvalidArgument for a bad name)."""
        set_current_sandbox(validate_sandbox(self.raw_sandbox))

    async def fail(self, exc: BaseException) -> None:
        """Abort the call with the status that ``exc`` maps to."""
        retryable = retryable_error(exc)
        if retryable is not None:
            log.warning("database error", error=repr(exc), reason=retryable.reason)
            exc = retryable
        if isinstance(exc, CarillonError):
            status = to_status(exc, self.domain)
            self.summary(exc.code, reason=exc.reason)
        else:
            log.exception("unhandled error", error=repr(exc))
            status = internal_status("internal error; see the server log for request " + self.request_id)
            self.summary(grpc.StatusCode.INTERNAL)
        converted = rpc_status.to_status(status)
        await self.context.abort(converted.code, converted.details, converted.trailing_metadata)

    def summary(self, code: grpc.StatusCode, **extra: Any) -> None:
        """Log the one line that summarizes the call."""
        if self.method.startswith(_QUIET_SERVICES):
            return
        elapsed_ms = round((time.perf_counter() - self.started) * 1000, 2)
        level = log.info if code == grpc.StatusCode.OK else log.warning
        level("rpc finished", code=code.name, duration_ms=elapsed_ms, **extra)


_PASS_THROUGH = (grpc.aio.AbortError,)


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every RPC of a server with request context, logging and error mapping."""

    def __init__(self, domain: str) -> None:
        self.domain = domain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        domain = self.domain
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                scope = _CallScope(method, domain, context)
                try:
                    scope.enter()
                    response = await inner(request, context)
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    await scope.fail(exc)
                    raise
                scope.summary(grpc.StatusCode.OK)
                return response

            unary_factory = (
                grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            )
            return unary_factory(unary_response, handler.request_deserializer, handler.response_serializer)
        inner_stream = handler.unary_stream or handler.stream_stream
        is_unary_request = handler.unary_stream is not None

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            scope = _CallScope(method, domain, context)
            try:
                scope.enter()
                async for response in inner_stream(request, context):
                    yield response
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                await scope.fail(exc)
                raise
            scope.summary(grpc.StatusCode.OK)

        factory = grpc.unary_stream_rpc_method_handler if is_unary_request else grpc.stream_stream_rpc_method_handler
        return factory(streaming, handler.request_deserializer, handler.response_serializer)
