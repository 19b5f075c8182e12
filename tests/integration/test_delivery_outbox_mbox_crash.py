"""Crash tests of the mbox outbox with real processes: a writer process dies (``os._exit``, as under
``kill -9``: no ``finally``, no ``close``) at each step of a batch, or is killed with SIGKILL at an
arbitrary moment; a fresh provider then replays every batch, as the pipeline does for a batch the ledger
has not marked sent. Every message must then be in the outbox exactly once.

Not database-facing: the outbox's only store is its own SQLite index file.
"""

from __future__ import annotations

import json
import mailbox
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from delivery_svc.emails import MESSAGE_ID_HEADER, OutgoingEmail, compose_email
from delivery_svc.providers import OutboxIndex, OutboxMboxProvider, RetryPolicy, deliver_batch

REPO = Path(__file__).resolve().parents[2]
BATCHES, PER_BATCH = 6, 25

WRITER = """
import os
import sys
from pathlib import Path

import delivery_svc.providers as providers
from delivery_svc.emails import compose_email
from delivery_svc.providers import OutboxIndex, OutboxMboxProvider, OutboxMboxSession, RetryPolicy, deliver_batch

directory, crash_at, crash_batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
first = sys.argv[4:] == ["first"]  # each batch told first attempts, as the pipeline tells new ledger rows
batch_number = 0


def dying(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        if batch_number == crash_batch:
            os._exit(137)
        return result
    return wrapper


if crash_at == "after-write":
    OutboxMboxSession._write = dying(OutboxMboxSession._write)
elif crash_at == "after-claim":
    OutboxIndex.claim = dying(OutboxIndex.claim)  # inside the claim's transaction: dies before its commit
elif crash_at == "after-commit":
    providers._place = (lambda place: lambda *a: (os._exit(137) if batch_number == crash_batch else place(*a)))(
        providers._place
    )
elif crash_at == "after-rename":
    OutboxIndex.complete = (lambda complete: lambda self, name: (
        os._exit(137) if batch_number == crash_batch else complete(self, name)
    ))(OutboxIndex.complete)

provider = OutboxMboxProvider(directory)
for batch_number in range(BATCHES):
    batch = [
        compose_email(f"b{batch_number}m{i:02d}", {"text_body": "From me\\nHello"}, "ada@example.com",
                      default_sender_name="C", default_sender_address="news@example.com")
        for i in range(PER_BATCH)
    ]
    report = deliver_batch(
        provider,
        batch,
        RetryPolicy(attempts=1, initial_s=0, max_s=0),
        first_attempts=[m.message_id for m in batch] if first else (),
    )
    assert len(report.sent) == PER_BATCH, report.error
    print(batch_number, flush=True)
""".replace("BATCHES", str(BATCHES)).replace("PER_BATCH", str(PER_BATCH))


def batch(number: int) -> list[OutgoingEmail]:
    return [
        compose_email(
            f"b{number}m{i:02d}",
            {"text_body": "From me\nHello"},
            "ada@example.com",
            default_sender_name="C",
            default_sender_address="news@example.com",
        )
        for i in range(PER_BATCH)
    ]


def every_id() -> list[str]:
    return sorted(f"b{n}m{i:02d}" for n in range(BATCHES) for i in range(PER_BATCH))


def ids_in_outbox(directory: Path) -> list[str]:
    ids: list[str] = []
    for path in directory.glob("*.mbox"):
        box = mailbox.mbox(path, create=False)
        ids.extend(str(message[MESSAGE_ID_HEADER]) for message in box)
        box.close()
    return sorted(ids)


def replay_everything(directory: Path) -> None:
    provider = OutboxMboxProvider(directory)
    for number in range(BATCHES):
        report = deliver_batch(provider, batch(number), RetryPolicy(attempts=1, initial_s=0, max_s=0))
        assert len(report.sent) == PER_BATCH, report.error


def ids_indexed(directory: Path) -> int:
    """How many ids the index holds: one by one, plus those in the files' lists of first attempts."""
    with sqlite3.connect(directory / OutboxIndex.FILE_NAME) as index:
        one_by_one = index.execute("SELECT count(*) FROM messages").fetchone()[0]
        lists = [row[0] for row in index.execute("SELECT message_ids FROM first_attempts")]
    return int(one_by_one) + sum(len(json.loads(listed)) for listed in lists)


@pytest.mark.parametrize("first", [False, True], ids=["retries", "first-attempts"])
@pytest.mark.parametrize(
    ("crash_at", "batches_in_place", "batches_claimed"),
    [("after-write", 3, 3), ("after-claim", 3, 3), ("after-commit", 3, 4), ("after-rename", 4, 4)],
)
def test_a_writer_dying_at_any_step_of_a_batch_leaves_every_message_once_after_the_replay(
    tmp_path: Path, crash_at: str, batches_in_place: int, batches_claimed: int, first: bool
) -> None:
    # With first attempts, the writer's batches are claimed as lists and the replay (which the pipeline
    # does not call first attempts: their ledger rows are pending) must find them there.
    writer = subprocess.run(
        [sys.executable, "-c", WRITER, str(tmp_path), crash_at, "3", "first" if first else "retries"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    before = ids_in_outbox(tmp_path)

    replay_everything(tmp_path)

    assert (writer.returncode, writer.stdout.split()) == (137, ["0", "1", "2"]), writer.stderr
    assert len(before) == batches_in_place * PER_BATCH
    assert ids_in_outbox(tmp_path) == every_id()
    with sqlite3.connect(tmp_path / OutboxIndex.FILE_NAME) as index:
        assert index.execute("SELECT count(*) FROM claims").fetchone()[0] == 0
        listed = index.execute("SELECT count(*) FROM first_attempts").fetchone()[0]
    assert ids_indexed(tmp_path) == BATCHES * PER_BATCH
    assert listed == (batches_claimed if first else 0)


def test_a_writer_killed_at_an_arbitrary_moment_leaves_every_message_once_after_the_replay(tmp_path: Path) -> None:
    for round_number in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), "never", "-1"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        for _ in range(round_number + 1):  # killed during a later batch each round
            writer.stdout.readline()
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)

    replay_everything(tmp_path)

    assert ids_in_outbox(tmp_path) == every_id()
