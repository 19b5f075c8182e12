"""The error hierarchy of every service and its mapping to rich gRPC statuses.

Domain code raises a :class:`CarillonError` subclass; each class carries its gRPC status code. The
server interceptor turns it into a ``google.rpc.Status`` with an ``ErrorInfo`` (reason and domain)
and, for bad input, a ``BadRequest`` listing every offending field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (``entity.attributes[2].type``) and what is wrong."""

    field: str
    description: str


class CarillonError(Exception):
    """Base of every error a service raises on purpose; maps to one gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: Iterable[FieldViolation] = (),
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        found = list(violations)
        if field is not None:
            found.insert(0, FieldViolation(field, message))
        self.violations: list[FieldViolation] = found
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(CarillonError):
    """The request is malformed or refers to something that cannot exist (bad field values)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(CarillonError):
    """A named resource does not exist in the caller's sandbox."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(CarillonError):
    """A resource with the requested id already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(CarillonError):
    """The request is valid but the resource's state does not allow it (an illegal transition)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(CarillonError):
    """A guardrail or quota is reached; the message names the limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "LIMIT_EXCEEDED"


class Aborted(CarillonError):
    """A concurrent change got in the way (a transaction conflict, a resource replaced meanwhile);
    retrying the call may succeed."""

    code = grpc.StatusCode.ABORTED
    default_reason = "CONCURRENT_CHANGE"


class Unavailable(CarillonError):
    """A dependency (another service, the database) cannot be reached; retrying may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DEPENDENCY_UNAVAILABLE"


# Status details travel in trailing metadata, which clients cap at 8-16 KiB: list at most this many
# field violations and say how many there were in the ErrorInfo metadata (``violations_total``).
MAX_REPORTED_VIOLATIONS = 50


def to_status(error: CarillonError, domain: str) -> status_pb2.Status:
    """Build the ``google.rpc.Status`` for ``error``, with ErrorInfo and BadRequest details."""
    metadata = dict(error.metadata)
    message = error.message
    violations = error.violations
    if len(violations) > MAX_REPORTED_VIOLATIONS:
        metadata.setdefault("violations_total", str(len(violations)))
        message = f"{message} (first {MAX_REPORTED_VIOLATIONS} of {len(violations)} problems listed)"
        violations = violations[:MAX_REPORTED_VIOLATIONS]
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=metadata)
    details = [info]
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description[:500])
                for v in violations
            ]
        )
        details.append(bad)
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=error.code.value[0], message=message, details=packed)


def internal_status(message: str) -> status_pb2.Status:
    """The status sent for an unexpected failure (a bug), without leaking its text."""
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message)


def error_from_rpc(err: grpc.RpcError) -> CarillonError:
    """Turn a status received from another service into the matching local error class.

    The peer's ErrorInfo reason and metadata and its BadRequest field violations are kept, so a
    caller can report exactly what the other service refused (see :func:`error_from_status`).
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    text = err.details() if hasattr(err, "details") else str(err)
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError, TypeError):
        status = None
    if status is None:  # no rich details: the call's code and message alone
        status = status_pb2.Status(code=code.value[0], message=str(text))
    return error_from_status(status)


def error_from_status(status: status_pb2.Status) -> CarillonError:
    """Turn a ``google.rpc.Status`` received from another service into the matching local error class.

    The class follows the code: the codes of bad input and of a missing or conflicting resource keep
    their class, every other code (a transport failure, an unexpected error) becomes
    :class:`Unavailable`, which callers retry. The peer's ErrorInfo reason and metadata (plus its
    domain as ``peer_domain``) and its BadRequest field violations are kept. A status can arrive
    without a call failing: a Send stream's refusal is a message of the stream.
    """
    mapping: dict[int, type[CarillonError]] = {
        cls.code.value[0]: cls
        for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted)
    }
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    cls = mapping.get(status.code, Unavailable)
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason or None
            metadata = {**dict(info.metadata), "peer_domain": info.domain}
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return cls(f"{code.name}: {status.message}", reason=reason, violations=violations, metadata=metadata)
