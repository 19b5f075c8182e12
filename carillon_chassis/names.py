"""Resource names and ids: parsing ``collection/{id}`` names and validating ids.

Ids are 1-63 characters of lower case letters, digits, ``-`` and ``_``, starting with a letter. A
malformed name is the caller's mistake: :class:`InvalidArgument` naming the field.
"""

from __future__ import annotations

import re
import uuid

from carillon_chassis.errors import InvalidArgument

ID_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ID_RULE = "ids are 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter"


def validate_id(value: str, field: str) -> str:
    """Return ``value`` when it is a valid id, else raise InvalidArgument naming ``field``."""
    if not ID_PATTERN.match(value):
        raise InvalidArgument(f"{field}: {ID_RULE}; got {value!r}", field=field, reason="INVALID_ID")
    return value


def parse_name(name: str, *collections: str, field: str = "name") -> list[str]:
    """Split ``name`` of the form ``c1/{id1}/c2/{id2}`` into its ids, checking the collections."""
    parts = name.split("/")
    expected = "/".join(f"{c}/{{{c[:-1]}}}" for c in collections)
    if len(parts) != 2 * len(collections) or any(parts[2 * i] != c for i, c in enumerate(collections)):
        raise InvalidArgument(f"{field} must look like {expected}; got {name!r}", field=field, reason="INVALID_NAME")
    ids = parts[1::2]
    for value in ids:
        validate_id(value, field)
    return ids


def new_id(prefix: str = "") -> str:
    """A fresh random id (valid under ID_PATTERN), optionally with a readable prefix."""
    return f"{prefix or 'x'}{uuid.uuid4().hex[:20]}"
