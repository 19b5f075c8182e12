"""The shared enums of ``carillon.type.v1`` as the lower-case names domain code uses.

``CHANNEL_EMAIL`` is ``"email"``, ``MESSAGE_CATEGORY_MARKETING`` is ``"marketing"``; an unset enum
maps to ``""`` so that domain validation can name the field.
"""

from __future__ import annotations

from carillon.type.v1 import channel_pb2

CHANNEL_NAMES: dict[int, str] = {
    channel_pb2.CHANNEL_EMAIL: "email",
    channel_pb2.CHANNEL_SMS: "sms",
    channel_pb2.CHANNEL_PUSH: "push",
    channel_pb2.CHANNEL_DIRECT_MAIL: "direct_mail",
}
CHANNEL_VALUES: dict[str, int] = {name: value for value, name in CHANNEL_NAMES.items()}

CATEGORY_NAMES: dict[int, str] = {
    channel_pb2.MESSAGE_CATEGORY_MARKETING: "marketing",
    channel_pb2.MESSAGE_CATEGORY_TRANSACTIONAL: "transactional",
}
CATEGORY_VALUES: dict[str, int] = {name: value for value, name in CATEGORY_NAMES.items()}


def channel_name(value: int) -> str:
    """The domain name of a Channel enum value ("" when unset or unknown)."""
    return CHANNEL_NAMES.get(value, "")


def channel_value(name: str) -> int:
    """The Channel enum value of a domain name (CHANNEL_UNSPECIFIED when unknown)."""
    return CHANNEL_VALUES.get(name, channel_pb2.CHANNEL_UNSPECIFIED)


def category_name(value: int) -> str:
    """The domain name of a MessageCategory enum value ("" when unset or unknown)."""
    return CATEGORY_NAMES.get(value, "")


def category_value(name: str) -> int:
    """The MessageCategory enum value of a domain name (UNSPECIFIED when unknown)."""
    return CATEGORY_VALUES.get(name, channel_pb2.MESSAGE_CATEGORY_UNSPECIFIED)
