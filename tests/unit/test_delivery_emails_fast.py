"""The plain string assembly of an email is byte for byte the ``email.mime`` build it replaces.

Both builders get the same headers and the same random state (the multipart boundary is a random
draw); the string assembly may decline (None), never differ.
"""

from __future__ import annotations

import email
import email.policy
import random
import sys
from email.utils import format_datetime, formataddr

from hypothesis import given, settings
from hypothesis import strategies as st

from carillon_chassis.database import utcnow
from delivery_svc.emails import MESSAGE_ID_DOMAIN, MESSAGE_ID_HEADER, _mime_bytes, _plain_bytes, compose_email

DATE = "Sun, 29 Nov 2026 10:00:00 +0000"
# Pieces that exercise the edges: line ends, whitespace, non-ASCII, MIME-looking lines, quoting.
PIECES = [
    "Hello",
    "Ada",
    " ",
    "  ",
    "\t",
    "\r\n",
    "\n",
    "\r",
    "\r\r\n",
    "From the start",
    "--",
    "=?utf-8?q?x?=",
    '"quoted"',
    "a,b;c",
    "\\",
    "é",
    "Zoë",
    "日本",
    "\u2028",
    "\x0b",
    "\x00",
    "x" * 40,
    "y" * 1200,
    "<p>Hi</p>",
    ".",
]


def headers(
    message_id: str, sender_name: str, sender: str, recipient: str, subject: str
) -> tuple[tuple[str, str], ...]:
    """The headers compose_email hands to both builders, with a fixed date."""
    return (
        ("From", formataddr((sender_name, sender), charset="utf-8")),
        ("To", recipient),
        ("Subject", subject),
        ("Date", DATE),
        ("Message-ID", f"<{message_id}@{MESSAGE_ID_DOMAIN}>"),
        (MESSAGE_ID_HEADER, message_id),
    )


def both(seed: int, hdrs: tuple[tuple[str, str], ...], text: str, html: str) -> tuple[bytes, bytes | None]:
    """(the email.mime build, the string assembly) from the same random state."""
    random.seed(seed)
    mime = _mime_bytes(hdrs, text, html)
    random.seed(seed)
    plain = _plain_bytes(hdrs, text, html)
    return mime, plain


def generated(rng: random.Random, *, most: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, most)))


def test_the_string_assembly_is_byte_identical_to_the_mime_build_over_generated_emails() -> None:
    rng = random.Random(20261129)
    assembled = declined = 0
    for case in range(3000):
        # Half the cases keep to plain ASCII words so that the string assembly is really exercised.
        plain_only = case % 2 == 0

        def pick(most: int, plain_only: bool = plain_only) -> str:
            if plain_only:
                return " ".join(rng.choice(["Hi", "Ada", "news", "x" * 9]) for _ in range(most))
            return generated(rng, most=most)

        subject = pick(rng.randint(0, 12))
        name = pick(rng.randint(0, 6))
        text = pick(rng.randint(0, 8)) if rng.random() < 0.8 else ""
        html = pick(rng.randint(0, 8)) if rng.random() < 0.8 else ""
        hdrs = headers(f"m{case:032x}", name, "news@example.com", f"p{case}@example.com", subject)
        mime, plain = both(case, hdrs, text, html)
        if plain is None:
            declined += 1
        else:
            assembled += 1
            assert plain == mime, (subject, name, text, html)
    assert assembled > 0 and declined > 0


PIECE = st.sampled_from(PIECES) | st.text(max_size=4) | st.sampled_from(["Hi", "Ada", " "])


@settings(max_examples=300, deadline=None)
@given(
    subject=st.lists(PIECE, max_size=6).map("".join),
    name=st.lists(PIECE, max_size=4).map("".join),
    text=st.lists(PIECE, max_size=6).map("".join),
    html=st.lists(PIECE, max_size=6).map("".join),
    seed=st.integers(0, 2**32),
)
def test_the_string_assembly_never_differs_from_the_mime_build(
    subject: str, name: str, text: str, html: str, seed: int
) -> None:
    mime, plain = both(seed, headers("m1", name, "news@example.com", "ada@example.com", subject), text, html)

    assert plain is None or plain == mime


def test_an_ascii_email_with_short_headers_is_assembled_as_a_string() -> None:
    hdrs = headers("m1", "Carillon", "news@example.com", "ada@example.com", "Ada, your stay at the Ritz")
    cases = [("Hello Ada\nline 2\n", "<p>Hello Ada</p>"), ("Hello", ""), ("", "<p>Hi</p>\r\n"), ("", "")]

    results = [both(7, hdrs, text, html) for text, html in cases]

    assert [plain == mime for mime, plain in results] == [True, True, True, True]


def test_non_ascii_folded_or_edge_whitespace_headers_and_non_ascii_bodies_take_the_mime_build() -> None:
    declined = {
        "non-ASCII subject": (headers("m1", "Carillon", "n@example.com", "a@example.com", "Zoë"), "Hi", ""),
        "long subject": (headers("m1", "Carillon", "n@example.com", "a@example.com", "word " * 20), "Hi", ""),
        "trailing space": (headers("m1", "Carillon", "n@example.com", "a@example.com", "Hi "), "Hi", ""),
        "line break": (headers("m1", "Carillon", "n@example.com", "a@example.com", "Hi\r\nthere"), "Hi", ""),
        "long encoded name": (headers("m1", "Zoë " * 8, "n@example.com", "a@example.com", "Hi"), "Hi", ""),
        "non-ASCII body": (headers("m1", "Carillon", "n@example.com", "a@example.com", "Hi"), "Hi", "<p>é</p>"),
    }

    assert {label: _plain_bytes(*args) for label, args in declined.items()} == dict.fromkeys(declined)


def test_a_body_line_equal_to_the_drawn_boundary_gets_the_generators_suffixed_boundary() -> None:
    random.seed(42)
    drawn = "=" * 15 + f"{random.randrange(sys.maxsize):0{len(repr(sys.maxsize - 1))}d}" + "=="
    hdrs = headers("m1", "Carillon", "news@example.com", "ada@example.com", "Hi")
    html = f"<p>Hi</p>\n--{drawn}"

    mime, plain = both(42, hdrs, "Hi", html)

    assert plain == mime
    assert f'boundary="{drawn}.0"'.encode() in mime


def test_a_composed_email_reads_back_with_its_headers_and_both_bodies() -> None:
    before = utcnow().replace(microsecond=0)
    outgoing = compose_email(
        "m1",
        {"subject": "Your stay", "text_body": "Hello\n", "html_body": "<p>Hello</p>", "sender_name": "Ritz"},
        "ada@example.com",
        default_sender_name="Carillon",
        default_sender_address="news@example.com",
    )

    message = email.message_from_bytes(outgoing.data, policy=email.policy.default)
    bodies = [(part.get_content_type(), part.get_content()) for part in message.iter_parts()]
    assert (message["From"], message["To"], message["Subject"], message[MESSAGE_ID_HEADER]) == (
        "Ritz <news@example.com>",
        "ada@example.com",
        "Your stay",
        "m1",
    )
    assert message["Message-ID"] == "<m1@carillon>"
    assert message["Date"].datetime >= before
    assert bodies == [("text/plain", "Hello\r\n"), ("text/html", "<p>Hello</p>")]
    assert format_datetime(message["Date"].datetime) == message["Date"]
