"""Opaque page tokens and page-size checks for every List RPC.

A token encodes the last key of the previous page (keyset pagination), base64url-wrapped so that
clients treat it as opaque. A token that does not decode is ``INVALID_ARGUMENT`` on ``page_token``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

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


def keyset_page(
    conn: sa.Connection,
    table: sa.Table,
    key: sa.Column[Any],
    where: Sequence[sa.ColumnElement[bool]],
    requested_size: int,
    token: str,
) -> tuple[list[sa.RowMapping], str]:
    """One page of ``table`` rows matching ``where`` in ``key`` order, and the next page's token.

    The token carries the last key of the page ("" on the last page); a token that is not a string
    key is ``INVALID_ARGUMENT`` on ``page_token``.
    """
    limit = page_size(requested_size)
    after = decode_token(token)
    if after is not None and not isinstance(after, str):
        raise InvalidArgument("page_token is not a token returned by this RPC", field="page_token")
    query = sa.select(table).where(*where)
    if after is not None:
        query = query.where(key > after)
    rows = conn.execute(query.order_by(key).limit(limit + 1)).mappings().all()
    next_token = encode_token(rows[limit - 1][key.name]) if len(rows) > limit else ""
    return list(rows[:limit]), next_token
