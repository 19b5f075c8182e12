"""Opaque page tokens and page-size checks for every List RPC.

A token encodes the last key of the previous page (keyset pagination), base64url-wrapped so that
clients treat it as opaque. A token that does not decode is ``INVALID_ARGUMENT`` on ``page_token``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from carillon_chassis.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int, field: str = "page_size") -> int:
    """The effective page size: the default for 0, an error for a negative size, capped at the max."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", field=field)
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_token(last_key: Any) -> str:
    """Encode the last key of a page as an opaque token."""
    raw = json.dumps({"k": last_key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, field: str = "page_token") -> Any:
    """Decode a token made by :func:`encode_token`; None for the empty token."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode()))["k"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("page_token is not a token returned by this RPC", field=field) from exc
