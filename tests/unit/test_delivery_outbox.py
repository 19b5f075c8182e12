"""The outbox provider's batch durability: files appear only once their batch is durable (``.eml`` format;
the mbox format has tests/unit/test_delivery_outbox_mbox.py), and what both formats guarantee."""

from __future__ import annotations

import email
import email.policy
import mailbox
from dataclasses import dataclass
from pathlib import Path

import pytest

from delivery_svc.emails import OutgoingEmail, compose_email
from delivery_svc.providers import OutboxMboxProvider, OutboxProvider, OutboxSession, RetryPolicy, deliver_batch

NO_WAIT = RetryPolicy(attempts=3, initial_s=0, max_s=0)


def compose(message_id: str, subject: str = "Hi") -> OutgoingEmail:
    return compose_email(
        message_id,
        {"subject": subject, "text_body": "Hello"},
        "ada@example.com",
        default_sender_name="Carillon",
        default_sender_address="news@example.com",
    )


def subjects_in(directory: Path) -> list[str]:
    """The subject of every message in the outbox, whatever its format."""
    subjects = [subject_of(path) for path in directory.glob("*.eml")]
    for path in directory.glob("*.mbox"):
        box = mailbox.mbox(path, create=False)
        subjects.extend(str(message["Subject"]) for message in box)
        box.close()
    return sorted(subjects)


def subject_of(path: Path) -> str:
    return str(email.message_from_bytes(path.read_bytes(), policy=email.policy.default)["Subject"])


def test_a_message_has_no_eml_file_until_its_batch_finishes(tmp_path: Path) -> None:
    session = OutboxProvider(tmp_path).open()
    session.send(compose("m1"))

    before = sorted(p.name for p in tmp_path.glob("*.eml"))
    session.finish()
    session.close()

    assert before == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1.eml"]


def test_a_batch_closed_without_finishing_leaves_no_file(tmp_path: Path) -> None:
    session = OutboxProvider(tmp_path).open()
    session.send(compose("m1"))
    session.send(compose("m2"))

    session.close()

    assert list(tmp_path.iterdir()) == []


def test_a_message_twice_in_one_batch_is_written_once_with_its_first_content(tmp_path: Path) -> None:
    deliver_batch(OutboxProvider(tmp_path), [compose("m1", "first"), compose("m1", "second")], NO_WAIT)

    assert [p.name for p in tmp_path.iterdir()] == ["m1.eml"]
    assert subject_of(tmp_path / "m1.eml") == "first"


@pytest.mark.parametrize("syncfs", [True, False], ids=["one-syncfs-per-batch", "one-fsync-per-file"])
def test_every_message_of_a_batch_is_in_the_outbox_when_the_batch_is_reported_sent(
    tmp_path: Path, syncfs: bool
) -> None:
    messages = [compose(f"m{i:03d}", f"subject {i}") for i in range(120)]

    report = deliver_batch(OutboxProvider(tmp_path, syncfs=syncfs), messages, NO_WAIT)

    assert report.sent == [m.message_id for m in messages]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{i:03d}.eml" for i in range(120)]
    assert subject_of(tmp_path / "m042.eml") == "subject 42"


@dataclass
class LosingSession:
    """An outbox session whose disk loses the batch's temporary files before the batch ends."""

    inner: OutboxSession

    def send(self, message: OutgoingEmail) -> None:
        self.inner.send(message)

    def finish(self) -> None:
        for temporary in self.inner.directory.glob(".*.tmp"):
            temporary.unlink()
        self.inner.finish()

    def close(self) -> None:
        self.inner.close()


@dataclass
class LosingOutbox:
    """An outbox provider on that disk."""

    directory: Path

    def open(self) -> LosingSession:
        return LosingSession(OutboxProvider(self.directory).open())


def test_a_batch_that_cannot_be_made_durable_is_reported_unsent(tmp_path: Path) -> None:
    report = deliver_batch(LosingOutbox(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)

    assert (report.sent, report.unsent) == ([], ["m1", "m2"])
    assert list(tmp_path.glob("*.eml")) == []


@pytest.mark.parametrize("provider", [OutboxProvider, OutboxMboxProvider], ids=["eml", "mbox"])
def test_each_message_is_in_the_outbox_once_after_its_batch_is_replayed_in_part(
    tmp_path: Path, provider: type[OutboxProvider] | type[OutboxMboxProvider]
) -> None:
    deliver_batch(provider(tmp_path), [compose("m1", "one"), compose("m2", "two")], NO_WAIT)

    replay = deliver_batch(provider(tmp_path), [compose("m2", "two again"), compose("m3", "three")], NO_WAIT)

    assert replay.sent == ["m2", "m3"]
    assert subjects_in(tmp_path) == ["one", "three", "two"]
