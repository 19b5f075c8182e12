"""The outbox provider's mbox format: one mboxrd file per batch, each message id written at most once.

The ids written live in a SQLite index in the outbox directory, never in memory: a provider opened
afresh on the directory (a new process) knows every id written before.
"""

from __future__ import annotations

import mailbox
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

import delivery_svc.providers as providers
from delivery_svc.app import build_provider
from delivery_svc.emails import MESSAGE_ID_HEADER, OutgoingEmail, compose_email
from delivery_svc.providers import (
    OutboxIndex,
    OutboxMboxProvider,
    OutboxProvider,
    ProviderUnavailableError,
    RetryPolicy,
    deliver_batch,
    mbox_message_ids,
)
from delivery_svc.settings import DeliverySettings

REPO = Path(__file__).resolve().parents[2]
NO_WAIT = RetryPolicy(attempts=3, initial_s=0, max_s=0)


class Crash(BaseException):
    """The process dies here."""


def compose(message_id: str, subject: str = "Hi", body: str = "Hello") -> OutgoingEmail:
    return compose_email(
        message_id,
        {"subject": subject, "text_body": body},
        "ada@example.com",
        default_sender_name="Carillon",
        default_sender_address="news@example.com",
    )


def mbox_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.mbox"))


def ids_in_outbox(directory: Path) -> list[str]:
    """Every message id of every mbox file, read with Python's mailbox module."""
    ids: list[str] = []
    for path in mbox_files(directory):
        box = mailbox.mbox(path, create=False)
        ids.extend(str(message[MESSAGE_ID_HEADER]) for message in box)
        box.close()
    return sorted(ids)


def unquote_mboxrd(payload: str) -> str:
    return re.sub(r"^>(>*From )", r"\1", payload, flags=re.MULTILINE)


def test_a_batch_is_written_as_one_mbox_file_holding_each_message(tmp_path: Path) -> None:
    messages = [compose(f"m{i:03d}", f"subject {i}") for i in range(50)]

    report = deliver_batch(OutboxMboxProvider(tmp_path), messages, NO_WAIT)

    (path,) = mbox_files(tmp_path)
    read = list(mailbox.mbox(path, create=False))
    assert report.sent == [m.message_id for m in messages]
    assert re.fullmatch(r"\d{8}T\d{12}Z-[0-9a-f]{16}\.mbox", path.name)
    assert [str(m[MESSAGE_ID_HEADER]) for m in read] == [m.message_id for m in messages]
    assert str(read[7]["Subject"]) == "subject 7"
    assert read[7].get_from().startswith("news@example.com ")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_the_mbox_file_appears_only_when_the_batch_finishes(tmp_path: Path) -> None:
    session = OutboxMboxProvider(tmp_path).open()
    session.send(compose("m1"))

    before = mbox_files(tmp_path)
    session.finish()
    session.close()

    assert before == []
    assert ids_in_outbox(tmp_path) == ["m1"]


def test_a_batch_closed_without_finishing_leaves_no_mbox_file(tmp_path: Path) -> None:
    session = OutboxMboxProvider(tmp_path).open()
    session.send(compose("m1"))

    session.close()

    assert mbox_files(tmp_path) == []
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_from_lines_of_a_body_round_trip_through_pythons_mbox_reader(tmp_path: Path) -> None:
    body = "From the desk of Ada\n>From quoted already\nFrom \nplain line"
    messages = [compose("m1", body=body), compose("m2", body="From here too")]

    deliver_batch(OutboxMboxProvider(tmp_path), messages, NO_WAIT)

    (path,) = mbox_files(tmp_path)
    read = list(mailbox.mbox(path, create=False))
    assert len(read) == 2
    first = read[0].get_payload()
    assert isinstance(first, str)
    assert ">From the desk" in first  # quoted on disk, so not a message separator
    assert unquote_mboxrd(first).rstrip("\n") == body
    assert str(read[1][MESSAGE_ID_HEADER]) == "m2"


def test_a_replayed_batch_writes_nothing_new_and_reports_its_messages_sent(tmp_path: Path) -> None:
    messages = [compose(f"m{i}") for i in range(5)]
    deliver_batch(OutboxMboxProvider(tmp_path), messages, NO_WAIT)
    (first,) = mbox_files(tmp_path)
    content = first.read_bytes()

    replay = deliver_batch(OutboxMboxProvider(tmp_path), messages, NO_WAIT)

    assert replay.sent == [m.message_id for m in messages]
    assert mbox_files(tmp_path) == [first]
    assert first.read_bytes() == content


def test_a_batch_with_some_ids_already_written_writes_only_the_others(tmp_path: Path) -> None:
    provider = OutboxMboxProvider(tmp_path)
    deliver_batch(provider, [compose("m1"), compose("m2")], NO_WAIT)

    report = deliver_batch(provider, [compose("m2"), compose("m3"), compose("m1"), compose("m4")], NO_WAIT)

    assert report.sent == ["m2", "m3", "m1", "m4"]
    assert len(mbox_files(tmp_path)) == 2
    assert ids_in_outbox(tmp_path) == ["m1", "m2", "m3", "m4"]


def test_a_message_twice_in_one_batch_is_written_once_with_its_first_content(tmp_path: Path) -> None:
    deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1", "first"), compose("m1", "second")], NO_WAIT)

    (path,) = mbox_files(tmp_path)
    box = mailbox.mbox(path, create=False)
    assert [str(m["Subject"]) for m in box] == ["first"]


def test_a_provider_opened_afresh_knows_every_id_written_before_from_the_index_on_disk(tmp_path: Path) -> None:
    for batch in range(3):
        deliver_batch(OutboxMboxProvider(tmp_path), [compose(f"b{batch}-{i}") for i in range(4)], NO_WAIT)
    with sqlite3.connect(tmp_path / OutboxIndex.FILE_NAME) as index:
        indexed = index.execute("SELECT count(*) FROM messages").fetchone()[0]

    deliver_batch(
        OutboxMboxProvider(tmp_path), [compose(f"b{batch}-{i}") for batch in range(3) for i in range(4)], NO_WAIT
    )

    assert indexed == 12
    assert len(mbox_files(tmp_path)) == 3


def test_a_crash_between_the_claim_and_the_rename_is_rolled_forward_at_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    place = providers._place

    def crash(*_: object) -> None:
        raise Crash

    monkeypatch.setattr(providers, "_place", crash)
    with pytest.raises(Crash):
        deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)
    monkeypatch.setattr(providers, "_place", place)
    before = mbox_files(tmp_path)

    replay = deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2"), compose("m3")], NO_WAIT)

    assert before == []
    assert replay.sent == ["m1", "m2", "m3"]
    assert len(mbox_files(tmp_path)) == 2  # the interrupted batch's file, then m3's
    assert ids_in_outbox(tmp_path) == ["m1", "m2", "m3"]
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_crash_between_the_rename_and_the_index_commit_writes_nothing_again_on_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_: object) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(OutboxIndex, "complete", crash)
        with pytest.raises(Crash):
            deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)
    (written,) = mbox_files(tmp_path)

    replay = deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)

    assert replay.sent == ["m1", "m2"]
    assert mbox_files(tmp_path) == [written]
    with sqlite3.connect(tmp_path / OutboxIndex.FILE_NAME) as index:
        assert index.execute("SELECT count(*) FROM claims").fetchone()[0] == 0


def test_mbox_files_the_index_does_not_know_are_indexed_at_the_first_open(tmp_path: Path) -> None:
    deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)
    for leftover in tmp_path.glob(OutboxIndex.FILE_NAME + "*"):
        leftover.unlink()  # the index is lost: the files are the truth

    replay = deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2"), compose("m3")], NO_WAIT)

    assert replay.sent == ["m1", "m2", "m3"]
    assert ids_in_outbox(tmp_path) == ["m1", "m2", "m3"]


def test_a_message_without_its_id_header_gets_one_so_the_file_can_be_reindexed(tmp_path: Path) -> None:
    bare = OutgoingEmail("m9", "news@example.com", "ada@example.com", b"Subject: bare\r\n\r\nFrom me\r\n")

    deliver_batch(OutboxMboxProvider(tmp_path), [bare], NO_WAIT)

    (path,) = mbox_files(tmp_path)
    assert mbox_message_ids(path) == ["m9"]
    assert ids_in_outbox(tmp_path) == ["m9"]


def test_concurrent_sessions_with_overlapping_ids_write_each_id_once(tmp_path: Path) -> None:
    barrier = threading.Barrier(4)
    reports = []

    def worker(offset: int) -> None:
        provider = OutboxMboxProvider(tmp_path)
        barrier.wait()
        reports.append(deliver_batch(provider, [compose(f"m{offset + i:03d}") for i in range(40)], NO_WAIT))

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in (0, 10, 20, 30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(len(r.sent) for r in reports) == [40, 40, 40, 40]
    assert ids_in_outbox(tmp_path) == [f"m{i:03d}" for i in range(70)]


WORKER = """
import sys
from pathlib import Path
from delivery_svc.emails import compose_email
from delivery_svc.providers import OutboxMboxProvider, RetryPolicy, deliver_batch

directory, offset = Path(sys.argv[1]), int(sys.argv[2])
provider = OutboxMboxProvider(directory)
sent = 0
for start in range(0, 60, 6):  # ten batches of six, overlapping the other processes' ids
    batch = [
        compose_email(f"m{offset + i:03d}", {"text_body": "Hello"}, "ada@example.com",
                      default_sender_name="C", default_sender_address="news@example.com")
        for i in range(start, start + 6)
    ]
    report = deliver_batch(provider, batch, RetryPolicy(attempts=1, initial_s=0, max_s=0))
    assert not report.unsent, report.error
    sent += len(report.sent)
print(sent)
"""


def test_processes_sharing_the_directory_write_each_id_once(tmp_path: Path) -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(offset)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for offset in (0, 20, 40)
    ]
    # The count is a worker's last line: before it, a worker may log that it completed a file another
    # worker had claimed and not yet put in place (the roll-forward at each open, a legitimate race).
    outputs = [worker.communicate(timeout=120)[0].strip().splitlines()[-1:] for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0, 0]
    assert outputs == [["60"], ["60"], ["60"]]
    assert ids_in_outbox(tmp_path) == [f"m{i:03d}" for i in range(100)]


def test_an_outbox_whose_index_cannot_be_opened_reports_the_batch_unsent(tmp_path: Path) -> None:
    (tmp_path / OutboxIndex.FILE_NAME).mkdir()

    report = deliver_batch(OutboxMboxProvider(tmp_path), [compose("m1"), compose("m2")], NO_WAIT)

    assert (report.sent, report.unsent) == ([], ["m1", "m2"])
    assert mbox_files(tmp_path) == []


def test_an_open_that_fails_raises_provider_unavailable(tmp_path: Path) -> None:
    (tmp_path / "outbox").write_text("a file where the directory should be")

    with pytest.raises(ProviderUnavailableError):
        OutboxMboxProvider(tmp_path / "outbox").open()


def test_the_outbox_format_defaults_to_one_eml_file_per_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CARILLON_DELIVERY_OUTBOX_FORMAT", raising=False)

    settings = DeliverySettings(data_dir=tmp_path)

    assert settings.outbox_format == "eml"
    assert isinstance(build_provider(settings), OutboxProvider)


def test_the_outbox_format_variable_mbox_builds_the_mbox_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARILLON_DELIVERY_OUTBOX_FORMAT", "mbox")

    provider = build_provider(DeliverySettings(data_dir=tmp_path))

    assert isinstance(provider, OutboxMboxProvider)
    assert provider.directory == tmp_path / "outbox"


def test_an_unknown_outbox_format_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARILLON_DELIVERY_OUTBOX_FORMAT", "maildir")

    with pytest.raises(ValidationError) as caught:
        DeliverySettings()

    assert [error["loc"] for error in caught.value.errors()] == [("outbox_format",)]


def test_a_worker_with_an_unknown_outbox_format_exits_at_start_naming_the_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "delivery_svc", "--port", "0"],
        cwd=REPO,
        env={"CARILLON_DATA_DIR": str(tmp_path), "CARILLON_DELIVERY_OUTBOX_FORMAT": "maildir", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "outbox_format" in result.stderr
    assert "'maildir'" in result.stderr
