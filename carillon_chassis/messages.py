"""The identity of a message, shared by the delivery ledger and the profile service's reservations.

A message is one send of one campaign activity's run to one profile (or, for a recipient no profile
has, one identity) and one entity key. Its id is derived from that key, so every attempt of the same
message has the same id: the ledger's primary key, the provider's idempotency key, and the key under
which profile_stub reserves the message's place under the capping rules.
"""

from __future__ import annotations

import hashlib


def profile_key(profile_id: str | None, namespace: str, value: str) -> str:
    """The profile part of a message's key: the profile id, or ``namespace:value`` when no profile exists."""
    return profile_id if profile_id else f"{namespace}:{value}"


def message_id(sandbox: str, run: str, activity: str, profile: str, entity_key: str) -> str:
    """The message id of a key (``profile`` from :func:`profile_key`): stable across attempts, unique per key."""
    raw = "\x1f".join((sandbox, run, activity, profile, entity_key)).encode()
    return "m" + hashlib.sha256(raw).hexdigest()[:32]
