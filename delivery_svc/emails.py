"""Composing the RFC 5322 email of one rendered message.

Every email carries ``Message-ID: <{message id}@carillon>`` and ``X-Carillon-Message-Id: {message id}``,
the provider idempotency key, so that a message sent twice after a crash is recognisable downstream.

Messages are built with the ``email.mime`` classes and the compat32 policy, serialised with CRLF line
ends: about four times faster than ``EmailMessage`` with the SMTP policy, which dominated the cost of a
send. Non-ASCII headers are RFC 2047 encoded; ASCII bodies are 7-bit, others UTF-8 (base64).

The common case (ASCII bodies, short printable ASCII headers) is assembled directly as a string, byte for
byte what the ``email.mime`` path produces (same header order, same CRLF line ends, the same random
multipart boundary drawn the same way) at a tenth of its cost: compat32 header folding and a regular
expression compiled per boundary were most of the time. Anything else takes the ``email.mime`` path;
tests/unit/test_delivery_emails_fast.py checks the two against each other. :func:`compose_email` checks
only what varies per message (recipient, subject, message id, bodies): the From header of a sender and
the Date header of a second are checked once (tests/unit/test_delivery_fast_emails.py).
"""

from __future__ import annotations

import email.policy
import functools
import random
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr

MESSAGE_ID_HEADER = "X-Carillon-Message-Id"
MESSAGE_ID_DOMAIN = "carillon"
# A deliberately plain check: one @, no whitespace, control characters, quotes or angle brackets.
_ADDRESS = re.compile(r"^[^@\s<>\"(),;:\\\x00-\x1f\x7f]+@[^@\s<>\"(),;:\\\x00-\x1f\x7f]+$")
MAX_ADDRESS_CHARS = 320


class InvalidAddress(ValueError):
    """The recipient's address cannot be put in an email."""


@dataclass(slots=True)
class OutgoingEmail:
    """One email ready for a provider: its id, its SMTP envelope and its RFC 5322 bytes (CRLF).

    Read-only by convention: not frozen, whose ``__init__`` costs four times as much (one per message)."""

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
    sender, plain_sender = _sender(sender_name, sender_address)
    subject = parts.get("subject", "")
    text, html = parts.get("text_body", ""), parts.get("html_body", "")
    date, plain_date = _date_header()
    if plain_sender and plain_date and _plain_message(recipient, subject, message_id, text, html):
        data = _assemble(
            f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\nDate: {date}\r\n"
            f"Message-ID: <{message_id}@{MESSAGE_ID_DOMAIN}>\r\n{MESSAGE_ID_HEADER}: {message_id}\r\n",
            text,
            html,
        )
    else:
        headers = (
            ("From", sender),
            ("To", recipient),
            ("Subject", subject),
            ("Date", date),
            ("Message-ID", f"<{message_id}@{MESSAGE_ID_DOMAIN}>"),
            (MESSAGE_ID_HEADER, message_id),
        )
        data = _mime_bytes(headers, text, html)
    return OutgoingEmail(message_id, sender_address, recipient, data)


@functools.lru_cache(maxsize=256)
def _sender(name: str, address: str) -> tuple[str, bool]:
    """The From header of a sender and whether it is written as is (the same few senders for every
    message of a batch); ValueError for a bad address."""
    if not is_valid_address(address):
        raise ValueError(f"not a valid sender address: {address!r}")
    header = formataddr((name, address), charset="utf-8")
    return header, _plain_header("From", header)


_date: tuple[int, str, bool] = (-1, "", False)  # the Date header of the current second, and whether it is plain


def _date_header() -> tuple[str, bool]:
    """The Date header of now (whole seconds, so formatted once per second) and whether it is plain."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        value = format_datetime(datetime.fromtimestamp(second, UTC))
        _date = (second, value, _plain_header("Date", value))
    return _date[1], _date[2]


def _plain_message(recipient: str, subject: str, message_id: str, text: str, html: str) -> bool:
    """Whether :func:`_plain_bytes` assembles a message with these per-message values (``recipient`` a
    valid address): :func:`_plain_header` of To, Subject, Message-ID and X-Carillon-Message-Id, and ASCII
    bodies, evaluated at once."""
    joined = recipient + subject + message_id
    return (
        joined.isascii()
        and joined.isprintable()  # no tab either: edge whitespace can only be spaces
        and len(recipient) <= _MAX_TO
        and len(subject) <= _MAX_SUBJECT
        and len(message_id) <= _MAX_MESSAGE_ID
        and not subject.startswith(" ")
        and not subject.endswith(" ")
        and not message_id.startswith(" ")
        and not message_id.endswith(" ")
        and text.isascii()
        and html.isascii()
    )


Headers = tuple[tuple[str, str], ...]
"""(name, value) of the headers after the content headers, in order."""


def _mime_bytes(headers: Headers, text: str, html: str) -> bytes:
    """The email built with the ``email.mime`` classes and serialised with the compat32 policy (any input)."""
    message: MIMEBase
    if text and html:
        message = MIMEMultipart("alternative")
        message.attach(MIMEText(text, "plain", _charset(text)))
        message.attach(MIMEText(html, "html", _charset(html)))
    else:
        message = MIMEText(text or html, "plain" if text else "html", _charset(text or html))
    for name, value in headers:
        message[name] = _header(value) if name == "Subject" else value  # type: ignore[assignment]
    return message.as_bytes(policy=_CRLF)


# compat32 folds a header line longer than this, and may rewrite one with leading or trailing whitespace.
_MAX_HEADER_LINE = 78
# The longest values of the per-message headers that it writes as they are.
_MAX_TO = _MAX_HEADER_LINE - len("To: ")
_MAX_SUBJECT = _MAX_HEADER_LINE - len("Subject: ")
_MAX_MESSAGE_ID = _MAX_HEADER_LINE - max(len(f"Message-ID: <@{MESSAGE_ID_DOMAIN}>"), len(f"{MESSAGE_ID_HEADER}: "))
# Header lines of an ASCII text part as compat32 writes them, by subtype.
_PART_HEADERS = {
    subtype: (
        f'Content-Type: text/{subtype}; charset="us-ascii"\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: 7bit\r\n'
    )
    for subtype in ("plain", "html")
}
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))  # as email.generator.Generator._make_boundary
_BOUNDARY_BITS = sys.maxsize.bit_length()
_getrandbits = random.getrandbits


def _plain_header(name: str, value: str) -> bool:
    """Whether compat32 writes ``name: value`` as is: printable ASCII, short, no edge whitespace."""
    return (
        value.isascii()
        and value.isprintable()
        and len(name) + 2 + len(value) <= _MAX_HEADER_LINE
        and value == value.strip(" \t")
    )


def _crlf(body: str) -> str:
    """Every line end (CRLF, CR or LF) as CRLF, as the generator writes a body."""
    if "\r" in body:
        body = body.replace("\r\n", "\n").replace("\r", "\n")
    return body.replace("\n", "\r\n")


def _boundary(text: str) -> str:
    """The multipart boundary the generator picks for parts flattened to ``text`` (same random draw)."""
    draw = _getrandbits(_BOUNDARY_BITS)  # random.randrange(sys.maxsize), as randrange draws it
    while draw >= sys.maxsize:
        draw = _getrandbits(_BOUNDARY_BITS)
    boundary = f"==============={draw:0{_BOUNDARY_DIGITS}d}=="
    if "--" + boundary not in text:
        return boundary
    candidate, counter = boundary, 0
    while re.search("^--" + re.escape(candidate) + "(--)?$", text, flags=re.MULTILINE):
        candidate = f"{boundary}.{counter}"
        counter += 1
    return candidate


def _plain_bytes(headers: Headers, text: str, html: str) -> bytes | None:
    """The email assembled as a string when its bodies are ASCII and its headers plain; else None.

    Byte for byte what :func:`_mime_bytes` returns for the same input and random state.
    """
    if not (text.isascii() and html.isascii()) or not all(_plain_header(n, v) for n, v in headers):
        return None
    return _assemble("".join(f"{name}: {value}\r\n" for name, value in headers), text, html)


def _assemble(lines: str, text: str, html: str) -> bytes:
    """The email of header ``lines`` (each ending with CRLF) that compat32 writes as they are and of ASCII
    bodies, as the generator writes it."""
    if text and html:
        first = _PART_HEADERS["plain"] + "\r\n" + _crlf(text)
        second = _PART_HEADERS["html"] + "\r\n" + _crlf(html)
        boundary = _boundary(first + "\r\n" + second)
        data = (
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\nMIME-Version: 1.0\r\n{lines}\r\n'
            f"--{boundary}\r\n{first}\r\n--{boundary}\r\n{second}\r\n--{boundary}--\r\n"
        )
    else:
        data = _PART_HEADERS["plain" if text else "html"] + lines + "\r\n" + _crlf(text or html)
    return data.encode("ascii")


_CRLF = email.policy.compat32.clone(linesep="\r\n")


def _charset(body: str) -> str:
    """7-bit ASCII bodies stay readable; anything else is UTF-8 (base64)."""
    return "us-ascii" if body.isascii() else "utf-8"


def _header(value: str) -> str | Header:
    """A header value: as is when ASCII without line breaks, else RFC 2047 encoded."""
    if value.isascii() and "\r" not in value and "\n" not in value:
        return value
    return Header(value, "utf-8")
