"""Email composition, the outbox provider and the retrying delivery of a batch."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest

from delivery_svc.emails import MESSAGE_ID_HEADER, InvalidAddress, OutgoingEmail, compose_email
from delivery_svc.providers import (
    PROVIDER_PERMANENT,
    PROVIDER_TRANSIENT,
    OutboxProvider,
    PermanentProviderError,
    ProviderUnavailableError,
    RetryPolicy,
    TransientProviderError,
    deliver_batch,
)

NO_WAIT = RetryPolicy(attempts=3, initial_s=0, max_s=0)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def compose(message_id: str = "m1", to: str = "ada@example.com", **parts: str) -> OutgoingEmail:
    return compose_email(
        message_id,
        {"subject": "Hi", "text_body": "Hello", **parts},
        to,
        default_sender_name="Carillon",
        default_sender_address="news@example.com",
    )


def test_an_email_carries_the_message_id_as_message_id_and_idempotency_header() -> None:
    message = parse(compose("m123").data)

    assert message["Message-ID"] == "<m123@carillon>"
    assert message[MESSAGE_ID_HEADER] == "m123"


def test_an_email_with_both_bodies_is_multipart_alternative() -> None:
    message = parse(compose(text_body="plain", html_body="<p>rich</p>").data)

    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("plain",)).get_content().strip() == "plain"  # type: ignore[union-attr]
    assert message.get_body(("html",)).get_content().strip() == "<p>rich</p>"  # type: ignore[union-attr]


def test_an_email_without_a_template_sender_uses_the_default_sender() -> None:
    composed = compose()

    assert composed.envelope_from == "news@example.com"
    assert parse(composed.data)["From"] == "Carillon <news@example.com>"


def test_a_template_sender_replaces_the_default_sender() -> None:
    composed = compose(sender_name="Hotels", sender_address="hotels@example.com")

    assert composed.envelope_from == "hotels@example.com"
    assert parse(composed.data)["From"] == "Hotels <hotels@example.com>"


def test_a_recipient_address_with_a_line_break_is_refused() -> None:
    with pytest.raises(InvalidAddress):
        compose(to="ada@example.com\r\nBcc: eve@example.com")


def test_the_outbox_writes_one_eml_file_per_message_named_by_its_id(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"

    report = deliver_batch(OutboxProvider(outbox), [compose("m1"), compose("m2", to="bob@example.com")], NO_WAIT)

    assert report.sent == ["m1", "m2"]
    assert sorted(p.name for p in outbox.iterdir()) == ["m1.eml", "m2.eml"]
    assert parse((outbox / "m2.eml").read_bytes())["To"] == "bob@example.com"


def test_the_outbox_keeps_the_first_file_of_a_message_sent_twice(tmp_path: Path) -> None:
    provider = OutboxProvider(tmp_path)
    deliver_batch(provider, [compose("m1", subject="first")], NO_WAIT)

    report = deliver_batch(provider, [compose("m1", subject="second")], NO_WAIT)

    assert report.sent == ["m1"]
    assert [p.name for p in tmp_path.iterdir()] == ["m1.eml"]
    assert parse((tmp_path / "m1.eml").read_bytes())["Subject"] == "first"


def test_the_outbox_refuses_a_message_id_that_is_not_a_file_name(tmp_path: Path) -> None:
    report = deliver_batch(OutboxProvider(tmp_path), [compose("../escape")], NO_WAIT)

    assert report.failed == {"../escape": PROVIDER_PERMANENT}
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_outbox_is_an_unavailable_provider(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    report = deliver_batch(OutboxProvider(blocker / "outbox"), [compose("m1")], NO_WAIT)

    assert report.unsent == ["m1"]


@dataclass
class ScriptedProvider:
    """Raises the queued errors of a message id, in order, before accepting it."""

    script: dict[str, list[Exception]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    opened: int = 0
    closed: int = 0

    def open(self) -> ScriptedProvider:
        self.opened += 1
        return self

    def send(self, message: OutgoingEmail) -> None:
        self.attempts[message.message_id] = self.attempts.get(message.message_id, 0) + 1
        queued = self.script.get(message.message_id)
        if queued:
            raise queued.pop(0)

    def close(self) -> None:
        self.closed += 1


def test_a_transient_error_is_retried_until_the_message_is_sent() -> None:
    provider = ScriptedProvider({"m1": [TransientProviderError("451"), TransientProviderError("451")]})

    report = deliver_batch(provider, [compose("m1")], NO_WAIT)

    assert report.sent == ["m1"]
    assert provider.attempts == {"m1": 3}


def test_a_transient_error_that_persists_fails_the_message_after_the_attempts() -> None:
    provider = ScriptedProvider({"m1": [TransientProviderError("451")] * 5})

    report = deliver_batch(provider, [compose("m1"), compose("m2")], NO_WAIT)

    assert report.failed == {"m1": PROVIDER_TRANSIENT}
    assert report.sent == ["m2"]
    assert provider.attempts["m1"] == NO_WAIT.attempts


def test_a_permanent_error_fails_the_message_without_a_retry() -> None:
    provider = ScriptedProvider({"m1": [PermanentProviderError("550")]})

    report = deliver_batch(provider, [compose("m1")], NO_WAIT)

    assert report.failed == {"m1": PROVIDER_PERMANENT}
    assert provider.attempts == {"m1": 1}


def test_an_unavailable_provider_stops_the_batch_and_reports_the_rest_unsent() -> None:
    provider = ScriptedProvider({"m2": [ProviderUnavailableError("refused")] * 5})

    report = deliver_batch(provider, [compose("m1"), compose("m2"), compose("m3")], NO_WAIT)

    assert report.sent == ["m1"]
    assert report.unsent == ["m2", "m3"]
    assert "m3" not in provider.attempts


def test_one_session_serves_the_whole_batch_and_is_closed() -> None:
    provider = ScriptedProvider()

    deliver_batch(provider, [compose("m1"), compose("m2"), compose("m3")], NO_WAIT)

    assert (provider.opened, provider.closed) == (1, 1)
