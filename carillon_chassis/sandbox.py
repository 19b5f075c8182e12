"""Sandboxes (tenants): every resource belongs to one, named by call metadata.

A call names its sandbox in the ``x-carillon-sandbox`` metadata key; without it the sandbox is
``prod``. The server interceptor validates the name and stores it for the call; servicers read it with
:func:`current_sandbox` and pass it explicitly to domain code.
"""

from __future__ import annotations

import contextvars
import re

from carillon_chassis.errors import InvalidArgument

SANDBOX_METADATA_KEY = "x-carillon-sandbox"
DEFAULT_SANDBOX = "prod"
_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,29}$")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("carillon_sandbox", default=DEFAULT_SANDBOX)


def validate_sandbox(name: str) -> str:
    """Return ``name`` when it is a valid sandbox name, else raise InvalidArgument naming the key."""
    if not _PATTERN.match(name):
        raise InvalidArgument(
            "sandbox names are 1-30 characters of a-z, 0-9 and _, starting with a letter",
            field=f"metadata.{SANDBOX_METADATA_KEY}",
            reason="INVALID_SANDBOX",
        )
    return name


def current_sandbox() -> str:
    """The sandbox of the call being served."""
    return _current.get()


def set_current_sandbox(name: str) -> None:
    """Set the sandbox of the call being served (done by the interceptor)."""
    _current.set(name)


def sandbox_metadata(sandbox: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that names ``sandbox``, for outbound calls to another service."""
    return ((SANDBOX_METADATA_KEY, sandbox),)
