"""compose_email checks only the per-message headers and assembles the common case directly: its bytes are
the ``email.mime`` build's for the same headers and random state, and read back as what was composed."""

from __future__ import annotations

import email
import email.policy
import random
import re
from email.utils import formataddr

import pytest

from delivery_svc import emails
from delivery_svc.emails import (
    MESSAGE_ID_DOMAIN,
    MESSAGE_ID_HEADER,
    _mime_bytes,
    _plain_bytes,
    _plain_message,
    compose_email,
)

PIECES = [
    "Hi",
    "Ada",
    " ",
    "\t",
    "\r\n",
    "\n",
    "\r",
    "From the start",
    "From ",
    ">From x",
    "é",
    "Zoë",
    "日本",
    "x" * 40,
]
PIECES += ["y" * 1200, "<p>Hi</p>", "--", "=?utf-8?q?x?=", '"q"', "\u2028", "\x0b", "."]
SENDERS = [("Carillon", "news@example.com"), ("Zoë's Hotel", "zoe@example.com"), ("A, B", "ab@example.com")]
SENDERS += [("x" * 70, "long@example.com"), ("", "plain@example.com")]
RECIPIENTS = ["ada@example.com", "zoë@example.com", "p" * 70 + "@example.com", "a+b@example.org"]
MESSAGE_IDS = ["m" + "0" * 32, "m" * 55, "m" * 56, "id with space", " lead", "é1"]


def composed(seed: int, mid: str, parts: dict[str, str], recipient: str, sender: tuple[str, str]) -> bytes:
    random.seed(seed)
    return compose_email(mid, parts, recipient, default_sender_name=sender[0], default_sender_address=sender[1]).data


def reference(seed: int, mid: str, parts: dict[str, str], recipient: str, sender: tuple[str, str], date: str) -> bytes:
    """The email.mime build of the same message (the Date header given, as compose_email wrote it)."""
    headers = (
        ("From", formataddr(sender, charset="utf-8")),
        ("To", recipient),
        ("Subject", parts.get("subject", "")),
        ("Date", date),
        ("Message-ID", f"<{mid}@{MESSAGE_ID_DOMAIN}>"),
        (MESSAGE_ID_HEADER, mid),
    )
    random.seed(seed)
    return _mime_bytes(headers, parts.get("text_body", ""), parts.get("html_body", ""))


def date_of(data: bytes) -> str:
    found = re.search(rb"^Date: (.*?)\r\n", data, flags=re.MULTILINE)
    assert found is not None
    return found.group(1).decode("ascii")


def test_composed_emails_are_the_mime_build_byte_for_byte_over_generated_messages() -> None:
    rng = random.Random(1129)
    for case in range(1500):
        plain_only = case % 2 == 0

        def pick(most: int, plain_only: bool = plain_only) -> str:
            words = ["Hi", "Ada", "news", "x" * 9] if plain_only else PIECES
            return " ".join(rng.choice(words) for _ in range(rng.randint(0, most)))

        parts = {"subject": pick(12), "text_body": pick(8) if rng.random() < 0.8 else ""}
        parts["html_body"] = pick(8) if rng.random() < 0.8 or not parts["text_body"] else ""
        sender = rng.choice(SENDERS)
        recipient, mid = rng.choice(RECIPIENTS), rng.choice(MESSAGE_IDS)
        data = composed(case, mid, parts, recipient, sender)

        assert data == reference(case, mid, parts, recipient, sender, date_of(data)), (parts, sender, recipient, mid)


def test_the_per_message_check_is_the_plain_assembly_check_of_the_same_headers() -> None:
    rng = random.Random(7)
    subjects = ["", "Hi", " Hi", "Hi ", "Hi\t", "é", "a" * 69, "a" * 70, "x\ny", "\x7f"]
    for _ in range(2000):
        recipient, subject, mid = rng.choice(RECIPIENTS), rng.choice(subjects), rng.choice(MESSAGE_IDS)
        text, html = rng.choice(["", "Hi", "é"]), rng.choice(["", "<p>", "日本"])
        headers = (
            ("From", "Carillon <news@example.com>"),
            ("To", recipient),
            ("Subject", subject),
            ("Date", "Sun, 29 Nov 2026 10:00:00 +0000"),
            ("Message-ID", f"<{mid}@{MESSAGE_ID_DOMAIN}>"),
            (MESSAGE_ID_HEADER, mid),
        )

        assert _plain_message(recipient, subject, mid, text, html) == (_plain_bytes(headers, text, html) is not None)


def test_tricky_messages_read_back_as_composed() -> None:
    parts = {
        "subject": "Zoë, your stay — " + "long " * 20,
        "sender_name": "Hôtel Ritz",
        "text_body": "From the start\r\nline two\rline three\n" + "z" * 1200,
        "html_body": "<p>Zoë</p>\n",
    }
    data = compose_email(
        "m1", parts, "ada@example.com", default_sender_name="C", default_sender_address="n@example.com"
    )

    message = email.message_from_bytes(data.data, policy=email.policy.default)
    bodies = [part.get_content() for part in message.iter_parts()]
    assert str(message["Subject"]) == parts["subject"]
    assert str(message["From"]) == "Hôtel Ritz <n@example.com>"
    assert message[MESSAGE_ID_HEADER] == "m1"
    assert bodies[0].replace("\r\n", "\n") == "From the start\nline two\nline three\n" + "z" * 1200
    assert bodies[1] == "<p>Zoë</p>\n"


def test_a_bad_rendered_sender_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ValueError, match="sender"):
            compose_email(
                "m1",
                {"sender_address": "not an address"},
                "a@example.com",
                default_sender_name="C",
                default_sender_address="n@example.com",
            )


def test_the_date_header_is_the_current_second() -> None:
    before = email.utils.format_datetime(emails.datetime.now(emails.UTC).replace(microsecond=0))
    date, plain = emails._date_header()
    after = email.utils.format_datetime(emails.datetime.now(emails.UTC).replace(microsecond=0))

    assert date in (before, after) and plain
