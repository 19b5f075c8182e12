"""The mbox outbox's claim detects ids written meanwhile by another session in the same insert, and the
batch's mbox entries are written as :func:`mbox_entry` writes them."""

from __future__ import annotations

import json
import mailbox
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from delivery_svc.emails import MESSAGE_ID_HEADER, OutgoingEmail, compose_email
from delivery_svc.providers import OutboxIndex, OutboxMboxProvider, RetryPolicy, deliver_batch, mbox_entry
from tests.races import race

NO_WAIT = RetryPolicy(attempts=1, initial_s=0, max_s=0)


def compose(mid: str, body: str = "Hello", sender: str = "news@example.com") -> OutgoingEmail:
    return compose_email(
        mid, {"text_body": body}, "ada@example.com", default_sender_name="C", default_sender_address=sender
    )


def ids_in_outbox(directory: Path) -> list[str]:
    ids = []
    for path in sorted(directory.glob("*.mbox")):
        ids += [str(message[MESSAGE_ID_HEADER]) for message in mailbox.mbox(path)]
    return sorted(ids)


def test_a_claim_with_an_id_taken_records_nothing_and_says_so(tmp_path: Path) -> None:
    index = OutboxIndex(tmp_path)
    try:
        with index.transaction():
            assert index.claim("a.mbox", tmp_path / ".a.tmp", ["m1", "m2"])
        with index.transaction():
            assert not index.claim("b.mbox", tmp_path / ".b.tmp", ["m3", "m2"])
        assert index.written(["m1", "m2", "m3"]) == {"m1", "m2"}
        files = index.connection.execute("SELECT name FROM files ORDER BY 1").fetchall()
        claims = index.connection.execute("SELECT count(*) FROM claims").fetchone()[0]
    finally:
        index.close()
    assert files == [("a.mbox",)] and claims == 1


def test_a_batch_repeating_written_ids_writes_only_the_new_ones_after_its_claim_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No lookup before writing: the claim of the whole batch fails on the ids written already, and
    # only then are they looked up (under the index's lock) and the file rewritten without them.
    deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)
    checks: list[list[str]] = []
    written = OutboxIndex.written

    def counted(self: OutboxIndex, message_ids: list[str], since: datetime | None = None) -> set[str]:
        checks.append(list(message_ids))
        return written(self, message_ids, since)

    monkeypatch.setattr(OutboxIndex, "written", counted)
    report = deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m3"), compose("m2")], NO_WAIT)

    assert report.sent == ["m1", "m3", "m2"]
    assert checks == [["m1", "m3", "m2"]]  # once, after the claim failed
    assert ids_in_outbox(tmp_path) == ["m1", "m2", "m3"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with sqlite3.connect(tmp_path / OutboxIndex.FILE_NAME) as index:
        assert index.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
        assert index.execute("SELECT count(*) FROM claims").fetchone()[0] == 0


def test_a_fresh_batch_is_claimed_without_looking_its_ids_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    written = OutboxIndex.written

    def counted(self: OutboxIndex, message_ids: list[str], since: datetime | None = None) -> set[str]:
        calls.append(len(message_ids))
        return written(self, message_ids, since)

    monkeypatch.setattr(OutboxIndex, "written", counted)
    report = deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)

    assert report.sent == ["m1", "m2"] and calls == []
    assert ids_in_outbox(tmp_path) == ["m1", "m2"]


def test_a_batch_file_is_the_mbox_entries_of_its_messages(tmp_path: Path) -> None:
    messages = [
        compose("m1", "From the start\n>From quoted\nbody"),
        OutgoingEmail("m2", "bad sender", "ada@example.com", compose("m2", "no final line end").data),
        OutgoingEmail("m3", "news@example.com", "ada@example.com", b"Subject: no id\r\n\r\nFrom here\r\n"),
        compose("m4", "Hello", sender="other@example.com"),
    ]

    deliver_batch(OutboxMboxProvider(tmp_path), messages, NO_WAIT)

    (path,) = tmp_path.glob("*.mbox")
    data = path.read_bytes()
    stamp = data[len(b"From news@example.com ") : data.index(b"\n")]
    assert data == b"".join(mbox_entry(m, stamp) for m in messages)
    assert b"From MAILER-DAEMON " in data and b"\nFrom other@example.com " in data
    assert ids_in_outbox(tmp_path) == ["m1", "m2", "m3", "m4"]


def test_first_attempts_are_listed_for_their_file_not_indexed_one_by_one(tmp_path: Path) -> None:
    report = deliver_batch(
        OutboxMboxProvider(tmp_path),
        [compose("m1"), compose("m2"), compose("m3")],
        NO_WAIT,
        first_attempts={"m1", "m3"},
    )

    assert report.sent == ["m1", "m2", "m3"] and ids_in_outbox(tmp_path) == ["m1", "m2", "m3"]
    with sqlite3.connect(tmp_path / OutboxIndex.FILE_NAME) as index:
        lists = [row[0] for row in index.execute("SELECT message_ids FROM first_attempts")]
        one_by_one = [row[0] for row in index.execute("SELECT message_id FROM messages")]
    assert ([json.loads(listed) for listed in lists], one_by_one) == ([["m1", "m3"]], ["m2"])


def test_a_retry_of_first_attempts_written_before_writes_nothing_again(tmp_path: Path) -> None:
    deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT, first_attempts={"m1", "m2"})

    # The replay of a batch whose ledger rows stayed pending: no first attempts; m3 is new to the outbox.
    report = deliver_batch(OutboxMboxProvider(tmp_path), [compose("m2"), compose("m3"), compose("m1")], NO_WAIT)

    assert report.sent == ["m2", "m3", "m1"]
    assert ids_in_outbox(tmp_path) == ["m1", "m2", "m3"]
    assert len(list(tmp_path.glob("*.mbox"))) == 2


def test_a_first_attempt_another_session_resent_meanwhile_is_not_written_again(tmp_path: Path) -> None:
    # A retry elsewhere (another stream replaying the batch) wrote m2 after this batch's ledger write.
    deliver_batch(OutboxMboxProvider(tmp_path), [compose("m2")], NO_WAIT)

    report = deliver_batch(
        OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT, first_attempts={"m1", "m2"}
    )

    assert report.sent == ["m1", "m2"]
    assert ids_in_outbox(tmp_path) == ["m1", "m2"]


def test_a_claim_of_first_attempts_refuses_an_id_indexed_one_by_one(tmp_path: Path) -> None:
    index = OutboxIndex(tmp_path)
    try:
        with index.transaction():
            assert index.claim("a.mbox", tmp_path / ".a.tmp", ["m1"])
        with index.transaction():
            assert not index.claim("b.mbox", tmp_path / ".b.tmp", ["m2", "m1"], frozenset({"m1", "m2"}))
        with index.transaction():
            assert index.claim("c.mbox", tmp_path / ".c.tmp", ["m2", "m3"], frozenset({"m2", "m3"}))
        with index.transaction():  # a retry of m3 (not a first attempt) is refused: it is in c's list
            assert not index.claim("d.mbox", tmp_path / ".d.tmp", ["m3", "m4"])
        assert index.written(["m1", "m2", "m3", "m4"]) == {"m1", "m2", "m3"}
        files = index.connection.execute("SELECT name FROM files ORDER BY 1").fetchall()
    finally:
        index.close()
    assert files == [("a.mbox",), ("c.mbox",)]


def test_ids_that_are_not_first_attempts_are_looked_up_in_the_lists_of_files_written_since_their_rows(
    tmp_path: Path,
) -> None:
    # File names start with the time they were written; a message cannot be in a file older than its
    # ledger row (less a margin for clock adjustments), so older lists are not read.
    index = OutboxIndex(tmp_path)
    try:
        with index.transaction():
            assert index.claim("20260101T000000000000Z-a.mbox", tmp_path / ".a.tmp", ["m1"], frozenset({"m1"}))
        with index.transaction():
            assert index.claim("20260601T000000000000Z-b.mbox", tmp_path / ".b.tmp", ["m2"], frozenset({"m2"}))
        june = datetime(2026, 6, 1, tzinfo=UTC)
        found_since_june = index.written(["m1", "m2"], june + OutboxIndex.SINCE_MARGIN)  # b's name is the bound
        found_within_the_margin = index.written(["m2"], june + OutboxIndex.SINCE_MARGIN / 2)
        found_ever = index.written(["m1", "m2"])
        with index.transaction():  # a retry of m1 told it cannot be older than June: m1's list is not read
            claimed_since_june = index.claim("c.mbox", tmp_path / ".c.tmp", ["m1"], frozenset(), june)
    finally:
        index.close()
    assert (found_since_june, found_within_the_margin, found_ever) == ({"m2"}, {"m2"}, {"m1", "m2"})
    assert claimed_since_june


def test_sessions_opening_a_new_outbox_index_at_once_all_open_it(tmp_path: Path) -> None:
    # SQLite refuses a second connection's switch to WAL at once ("database is locked") while another
    # makes it; each of 8 sessions racing on 50 new indexes must open all the same.
    failures: list[BaseException] = []
    for attempt in range(50):
        directory = tmp_path / str(attempt)
        directory.mkdir()

        def open_index(_: int, directory: Path = directory) -> None:
            OutboxIndex(directory).close()

        failures += race(8, open_index)

    assert failures == []
