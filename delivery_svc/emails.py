"""Composing the RFC 5322 email of one rendered message.

Every email carries ``Message-ID: <{message id}@carillon>`` and ``X-Carillon-Message-Id: {message id}``,
the provider idempotency key, so that a message sent twice after a crash is recognisable downstream.

Messages are built with the ``email.mime`` classes and the compat32 policy, serialised with CRLF line
ends: about four times faster than ``EmailMessage`` with the SMTP policy, which dominated the cost of a
send. Non-ASCII headers are RFC 2047 encoded; ASCII bodies are 7-bit, others UTF-8 (base64).
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.header import Header
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr

from carillon_chassis.database import utcnow

MESSAGE_ID_HEADER = "X-Carillon-Message-Id"
MESSAGE_ID_DOMAIN = "carillon"
# A deliberately plain check: one @, no whitespace, control characters, quotes or angle brackets.
_ADDRESS = re.compile(r"^[^@\s<>\"(),;:\\\x00-\x1f\x7f]+@[^@\s<>\"(),;:\\\x00-\x1f\x7f]+$")
MAX_ADDRESS_CHARS = 320


class InvalidAddress(ValueError):
    """The recipient's address cannot be put in an email."""


@dataclass(frozen=True)
class OutgoingEmail:
    """One email ready for a provider: its id, its SMTP envelope and its RFC 5322 bytes (CRLF)."""

    message_id: str
    envelope_from: str
    recipient: str
    data: bytes


def is_valid_address(address: str) -> bool:
    """Whether ``address`` looks like a single plain mailbox address."""
    return len(address) <= MAX_ADDRESS_CHARS and _ADDRESS.match(address) is not None


def compose_email(
    message_id: str,
    parts: Mapping[str, str],
    recipient: str,
    *,
    default_sender_name: str,
    default_sender_address: str,
) -> OutgoingEmail:
    """The email of rendered ``parts`` (subject, html_body, text_body, sender_name, sender_address).

    Raises InvalidAddress for a bad recipient address and ValueError for a bad rendered sender.
    """
    if not is_valid_address(recipient):
        raise InvalidAddress(f"not a valid email address: {recipient!r}")
    sender_address = parts.get("sender_address") or default_sender_address
    sender_name = parts.get("sender_name") or default_sender_name
    if not is_valid_address(sender_address):
        raise ValueError(f"not a valid sender address: {sender_address!r}")
    text, html = parts.get("text_body", ""), parts.get("html_body", "")
    message: MIMEBase
    if text and html:
        message = MIMEMultipart("alternative")
        message.attach(MIMEText(text, "plain", _charset(text)))
        message.attach(MIMEText(html, "html", _charset(html)))
    else:
        message = MIMEText(text or html, "plain" if text else "html", _charset(text or html))
    message["From"] = formataddr((sender_name, sender_address), charset="utf-8")
    message["To"] = recipient
    message["Subject"] = _header(parts.get("subject", ""))  # type: ignore[assignment]
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = f"<{message_id}@{MESSAGE_ID_DOMAIN}>"
    message[MESSAGE_ID_HEADER] = message_id
    return OutgoingEmail(message_id, sender_address, recipient, message.as_bytes(policy=_CRLF))


_CRLF = email.policy.compat32.clone(linesep="\r\n")


def _charset(body: str) -> str:
    """7-bit ASCII bodies stay readable; anything else is UTF-8 (base64)."""
    return "us-ascii" if body.isascii() else "utf-8"


def _header(value: str) -> str | Header:
    """A header value: as is when ASCII without line breaks, else RFC 2047 encoded."""
    if value.isascii() and "\r" not in value and "\n" not in value:
        return value
    return Header(value, "utf-8")
