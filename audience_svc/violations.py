"""Building INVALID_ARGUMENT errors that list many field violations, within gRPC's metadata limits.

The rich status travels in the call's trailing metadata, which gRPC clients accept only up to a few
kilobytes (8 KiB soft, 16 KiB hard by default): a batch with thousands of bad rows would otherwise
reach the client as RESOURCE_EXHAUSTED with no details at all. So at most
:data:`MAX_LISTED_VIOLATIONS` violations are listed, in request order; ``ErrorInfo.metadata`` always
carries ``violations_total``, and the message says when the list was cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from carillon_chassis.errors import FieldViolation, InvalidArgument

MAX_LISTED_VIOLATIONS = 50


def invalid_argument(message: str, violations: Sequence[FieldViolation], reason: str) -> InvalidArgument:
    """An InvalidArgument listing the first violations, with the total count in its metadata."""
    total = len(violations)
    if total > MAX_LISTED_VIOLATIONS:
        message = f"{message}; the first {MAX_LISTED_VIOLATIONS} of {total} problems are listed"
    return InvalidArgument(
        message,
        violations=violations[:MAX_LISTED_VIOLATIONS],
        reason=reason,
        metadata={"violations_total": str(total)},
    )
