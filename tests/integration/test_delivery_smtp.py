"""The SMTP provider against a real SMTP server (aiosmtpd on a free local port)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from delivery_svc.emails import OutgoingEmail, compose_email
from delivery_svc.providers import (
    PROVIDER_PERMANENT,
    PROVIDER_TRANSIENT,
    RetryPolicy,
    SmtpConfig,
    SmtpProvider,
    deliver_batch,
)

NO_WAIT = RetryPolicy(attempts=2, initial_s=0, max_s=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Handler:
    """Accepts mail, refusing ``reject*`` recipients for good and ``later*`` ones for now."""

    delivered: list[tuple[str, list[str]]] = field(default_factory=list)
    sessions: set[int] = field(default_factory=set)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if address.startswith("reject"):
            return "550 5.1.1 no such user"
        if address.startswith("later"):
            return "451 4.7.1 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.add(id(session))
        self.delivered.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Handler, int]]:
    handler, port = Handler(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


def message(message_id: str, to: str) -> OutgoingEmail:
    return compose_email(
        message_id,
        {"subject": "Hi", "text_body": "Hello"},
        to,
        default_sender_name="Carillon",
        default_sender_address="news@example.com",
    )


def test_a_batch_is_sent_over_one_connection(smtp: tuple[Handler, int]) -> None:
    handler, port = smtp

    report = deliver_batch(
        SmtpProvider(SmtpConfig("127.0.0.1", port)),
        [message(f"m{i}", f"user{i}@example.com") for i in range(3)],
        NO_WAIT,
    )

    assert report.sent == ["m0", "m1", "m2"]
    assert [rcpts for _, rcpts in handler.delivered] == [[f"user{i}@example.com"] for i in range(3)]
    assert len(handler.sessions) == 1


def test_a_refused_recipient_fails_permanently_and_the_batch_goes_on(smtp: tuple[Handler, int]) -> None:
    handler, port = smtp

    report = deliver_batch(
        SmtpProvider(SmtpConfig("127.0.0.1", port)),
        [message("m1", "a@example.com"), message("m2", "reject@example.com"), message("m3", "b@example.com")],
        NO_WAIT,
    )

    assert report.sent == ["m1", "m3"]
    assert report.failed == {"m2": PROVIDER_PERMANENT}
    assert [rcpts for _, rcpts in handler.delivered] == [["a@example.com"], ["b@example.com"]]


def test_a_recipient_deferred_on_every_attempt_fails_as_transient(smtp: tuple[Handler, int]) -> None:
    _handler, port = smtp

    report = deliver_batch(SmtpProvider(SmtpConfig("127.0.0.1", port)), [message("m1", "later@example.com")], NO_WAIT)

    assert report.failed == {"m1": PROVIDER_TRANSIENT}


def test_an_smtp_server_that_cannot_be_reached_leaves_the_batch_unsent() -> None:
    report = deliver_batch(
        SmtpProvider(SmtpConfig("127.0.0.1", free_port(), timeout_s=2)),
        [message("m1", "a@example.com"), message("m2", "b@example.com")],
        NO_WAIT,
    )

    assert report.sent == []
    assert report.unsent == ["m1", "m2"]
