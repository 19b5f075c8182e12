"""Email providers behind one interface, and the retrying delivery of a batch through one of them.

A provider opens a session per batch (an SMTP provider keeps one connection for the whole batch)
whose ``send`` either returns or raises :class:`TransientProviderError` (may succeed if retried),
:class:`ProviderUnavailableError` (a transient error of the provider itself: it cannot be reached or
used) or :class:`PermanentProviderError` (retrying cannot help). :func:`deliver_batch` retries transient
errors with tenacity (exponential backoff with jitter); a message still failing is ``failed`` with
reason ``PROVIDER_TRANSIENT`` or ``PROVIDER_PERMANENT``, but an unavailable provider stops the batch:
the messages not sent stay pending in the ledger for the next attempt.

Providers are synchronous and run on a worker thread, never on the event loop.

- :class:`OutboxProvider` writes each email as ``<message id>.eml`` into a directory (a temporary file
  renamed into place, so a file is complete or absent; an existing file means already sent). A batch
  is made durable once, at its end, before it is reported sent: its temporary files are flushed with
  one ``syncfs`` of the outbox's filesystem (one ``fsync`` per file where ``syncfs`` is missing),
  renamed into place, and the directory is synced.
- :class:`OutboxMboxProvider` writes each batch as one mboxrd file ``<UTC time>-<hash of its ids>.mbox``
  (a file creation per batch instead of per message): a temporary file, synced, its ids claimed in a
  SQLite index in the directory (:class:`OutboxIndex`, checked in bulk first: an id already written is
  not written again, by any process sharing the directory), renamed into place, the directory synced.
  An interrupted session's claimed file is put in place at the next open.
- :class:`SmtpProvider` sends over SMTP with smtplib, optionally with STARTTLS and login.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import smtplib
import sqlite3
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar, cast

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from delivery_svc.emails import MESSAGE_ID_HEADER, OutgoingEmail
from delivery_svc.throttle import Clock, SystemClock, TokenBucket

log = structlog.get_logger("carillon.delivery.providers")

PROVIDER_PERMANENT = "PROVIDER_PERMANENT"
PROVIDER_TRANSIENT = "PROVIDER_TRANSIENT"
_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class ProviderError(Exception):
    """A provider could not send one message."""


class TransientProviderError(ProviderError):
    """Sending may succeed if retried (a 4xx reply, a greylisted recipient)."""


class ProviderUnavailableError(TransientProviderError):
    """The provider itself cannot be reached or used (connection, TLS, login, disk)."""


class PermanentProviderError(ProviderError):
    """Retrying cannot help (a 5xx reply, a rejected recipient)."""


class ProviderSession(Protocol):
    """The sending side of a provider for one batch."""

    def send(self, message: OutgoingEmail) -> None:
        """Send one email or raise a ProviderError."""

    def close(self) -> None:
        """Release what the session holds (connections); never raises."""


class EmailProvider(Protocol):
    """A way to deliver emails."""

    def open(self) -> ProviderSession:
        """A session for one batch; connecting may be deferred to the first send."""
        ...


class OutgoingMessage(Protocol):
    """What every channel's outgoing message has: its id (the idempotency key) and its recipient."""

    @property
    def message_id(self) -> str:
        """The ledger id."""
        ...

    @property
    def recipient(self) -> str:
        """The address, phone number, device token or postal key."""
        ...


M = TypeVar("M", bound=OutgoingMessage, contravariant=True)
M_co = TypeVar("M_co", bound=OutgoingMessage)


class MessageSession(Protocol[M]):
    """The sending side of any channel's provider for one batch."""

    def send(self, message: M) -> None:
        """Send one message or raise a ProviderError."""

    def close(self) -> None:
        """Release what the session holds; never raises."""


class MessageProvider(Protocol[M]):
    """A way to deliver one channel's messages."""

    def open(self) -> MessageSession[M]:
        """A session for one batch."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """How transient provider errors are retried: attempts per message and the backoff bounds within
    one batch, and the window (from a message's first ledger write) within which a replay retries a
    message that failed transiently or was interrupted."""

    attempts: int = 4
    initial_s: float = 0.5
    max_s: float = 10.0
    window: timedelta = timedelta(hours=84)


@dataclass
class DeliveryReport:
    """The outcome of a batch: sent ids, failed ids with their reason, and ids left unsent."""

    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unsent: list[str] = field(default_factory=list)
    error: str = ""


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    log.warning("provider send failed; retrying", attempt=state.attempt_number, error=repr(error))


def deliver_batch(
    provider: MessageProvider[M_co],
    messages: Sequence[M_co],
    policy: RetryPolicy,
    *,
    throttles: Sequence[TokenBucket | None] = (),
    clock: Clock | None = None,
    on_sent: Callable[[str], None] | None = None,
    first_attempts: Collection[str] = (),
    others_since: datetime | None = None,
) -> DeliveryReport:
    """Send ``messages`` in order through one session, retrying transient errors (blocking).

    Every attempt first takes a token from each bucket of ``throttles`` (the activity's and the
    provider's); backoff and throttling sleep on ``clock``. ``on_sent`` is called with each message's id
    as soon as the provider accepted it, before the next message is sent (an exception it raises ends
    the batch). ``first_attempts``: the ids of messages that no earlier attempt can have sent, and
    ``others_since``: no earlier attempt can have sent the others before then, told to a session that
    can use them (``expect_first_attempts``: the mbox outbox then indexes them more cheaply).
    """
    clock = clock or SystemClock()
    buckets = [b for b in throttles if b is not None]
    report = DeliveryReport()
    if not messages:
        return report
    try:
        session = provider.open()
    except ProviderUnavailableError as exc:
        report.unsent = [m.message_id for m in messages]
        report.error = str(exc)
        return report
    expect = getattr(session, "expect_first_attempts", None)
    if expect is not None and (first_attempts or others_since is not None):
        expect(first_attempts, others_since=others_since)
    # One Retrying for the batch: each iteration over it starts a fresh retry state (the object costs
    # as much to build as one attempt's bookkeeping, so building one per message doubled the overhead).
    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(multiplier=policy.initial_s, max=policy.max_s, jitter=policy.initial_s),
        retry=retry_if_exception_type(TransientProviderError),
        before_sleep=_log_retry,
        sleep=clock.sleep,
        reraise=True,
    )
    try:
        for index, message in enumerate(messages):
            try:
                first: TransientProviderError | None = None
                try:  # the first attempt outside tenacity: its bookkeeping costs more than most sends
                    for bucket in buckets:
                        bucket.acquire()
                    session.send(message)
                except TransientProviderError as exc:
                    first = exc
                if first is not None:
                    for attempt in retrying:
                        with attempt:
                            if first is not None:  # tenacity's attempt 1 is the one that just failed
                                failed, first = first, None
                                raise failed
                            for bucket in buckets:
                                bucket.acquire()
                            session.send(message)
            except ProviderUnavailableError as exc:
                report.unsent = [m.message_id for m in messages[index:]]
                report.error = str(exc)
                break
            except TransientProviderError as exc:
                report.failed[message.message_id] = PROVIDER_TRANSIENT
                log.warning("message failed", message_id=message.message_id, error=str(exc))
            except PermanentProviderError as exc:
                report.failed[message.message_id] = PROVIDER_PERMANENT
                log.warning("message failed", message_id=message.message_id, error=str(exc))
            else:
                report.sent.append(message.message_id)
                if on_sent is not None:
                    on_sent(message.message_id)
        finish = getattr(session, "finish", None)
        if finish is not None and report.sent:
            try:
                finish()  # a provider that writes the batch at its end (direct-mail extracts)
            except ProviderUnavailableError as exc:
                report.unsent = report.sent + report.unsent
                report.sent = []
                report.error = str(exc)
    finally:
        session.close()
    return report


# -- outbox -------------------------------------------------------------------------------------
class OutboxProvider:
    """Writes every email as ``<message id>.eml`` into a directory; ``syncfs=False`` syncs each file of a
    batch instead of the filesystem once (as where ``syncfs`` does not exist)."""

    def __init__(self, directory: Path, *, syncfs: bool = True) -> None:
        self.directory = directory
        self.syncfs = syncfs

    def open(self) -> OutboxSession:
        """A session writing into the directory (created when missing)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProviderUnavailableError(f"cannot create the outbox {self.directory}: {exc}") from exc
        return OutboxSession(self.directory, syncfs=self.syncfs)


class OutboxSession:
    """One batch of outbox writes, durable at :meth:`finish`.

    ``send`` writes a message's bytes to a temporary file; ``finish`` flushes every temporary file of
    the batch at once, renames them into place and syncs the directory, so that the batch costs one
    filesystem sync instead of one ``fsync`` per message, and a file is still complete or absent. Only
    then does :func:`deliver_batch` report the messages sent (and the ledger mark them): a crash before
    the end of ``finish`` leaves them pending, to be written again on replay. ``close`` removes the
    temporary files of a batch that did not finish.
    """

    def __init__(self, directory: Path, *, syncfs: bool = True) -> None:
        self.directory = directory
        self.syncfs = syncfs
        self._pending: dict[str, Path] = {}  # message id -> its temporary file, until finish

    def send(self, message: OutgoingEmail) -> None:
        """Write the email to a temporary file; a final file already there means it was sent before."""
        if not _SAFE_FILE_NAME.match(message.message_id):
            raise PermanentProviderError(f"message id {message.message_id!r} is not a safe file name")
        if message.message_id in self._pending or self._final(message.message_id).exists():
            return
        temporary = self.directory / f".{message.message_id}.{uuid.uuid4().hex}.tmp"
        try:
            with temporary.open("xb") as handle:
                handle.write(message.data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise ProviderUnavailableError(f"cannot write {temporary}: {exc}") from exc
        self._pending[message.message_id] = temporary

    def finish(self) -> None:
        """Make the batch durable: flush the temporary files, rename them into place, sync the directory.

        Raises ProviderUnavailableError when the disk fails; the batch is then reported unsent."""
        if not self._pending:
            return
        try:
            descriptor = os.open(self.directory, os.O_RDONLY)
            try:
                if not (self.syncfs and _syncfs(descriptor)):
                    for temporary in self._pending.values():
                        _fsync_file(temporary)
                for message_id, temporary in self._pending.items():
                    final = self._final(message_id)
                    if final.exists():  # written meanwhile by another session: keep the first file
                        temporary.unlink()
                    else:
                        os.replace(temporary, final)
                self._pending.clear()
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise ProviderUnavailableError(f"cannot make the outbox {self.directory} durable: {exc}") from exc

    def close(self) -> None:
        """Remove the temporary files of a batch that did not finish."""
        for temporary in self._pending.values():
            with contextlib.suppress(OSError):
                temporary.unlink()
        self._pending.clear()

    def _final(self, message_id: str) -> Path:
        return self.directory / f"{message_id}.eml"


class OutboxIndex:
    """The SQLite index of an mbox outbox: which message ids its files hold, so that none is written twice.

    ``.outbox-index.sqlite`` in the outbox directory (WAL journal, ``synchronous=FULL``, a busy timeout so
    that the sessions of several threads and processes on one host queue for its write lock) holds
    ``files`` (every ``.mbox`` file the index knows, by name), ``messages`` (message id, primary key, and
    the file holding it), ``first_attempts`` (per file, the JSON array of its messages that no earlier
    attempt can have sent: see :meth:`claim`) and ``claims`` (the files whose ids are claimed but which may not
    be in place yet, with their temporary name). The ids live on disk, never in a set in memory: memory
    does not grow with the number of messages ever sent. One connection per session, closed with it.

    Why two ways of keeping ids: an id is 33 random characters, so a batch's ids land on as many index
    pages as it has ids once the index outgrows the cache, and every such page is written again at each
    commit (measured: a 5,000-id insert costs 7 ms of CPU into an empty index, 42 ms at 300,000 ids).
    The pipeline knows which messages are first attempts (their ledger rows were written for this
    batch, and the ledger's commits are durable): nothing can have written them before, so they need no
    lookup, only a record that a later retry (a replay after a crash between the file and the ledger's
    mark) can find; a retry reads every list (its cost grows with the outbox: see docs/architecture.md).
    A version before the lists knows only ``messages``: to go back to one, copy the lists there first
    (``INSERT OR IGNORE INTO messages SELECT value, file_id FROM first_attempts, json_each(message_ids)``).
    """

    FILE_NAME = ".outbox-index.sqlite"
    CHUNK = 500  # ids per IN (...) query

    def __init__(self, directory: Path, *, busy_timeout_s: float = 60.0) -> None:
        self.directory = directory
        self.connection = sqlite3.connect(
            directory / self.FILE_NAME, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            _write_ahead_log(self.connection, busy_timeout_s)
            self.connection.execute("PRAGMA synchronous=FULL")
            self.connection.executescript(
                "CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
                "CREATE TABLE IF NOT EXISTS messages (message_id TEXT PRIMARY KEY, file_id INTEGER NOT NULL)"
                " WITHOUT ROWID;"
                "CREATE TABLE IF NOT EXISTS claims (file_id INTEGER PRIMARY KEY, temporary TEXT NOT NULL);"
                "CREATE TABLE IF NOT EXISTS first_attempts (file_id INTEGER PRIMARY KEY, message_ids TEXT NOT NULL);"
            )
        except sqlite3.Error:
            self.connection.close()
            raise

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()

    def written(self, message_ids: Sequence[str], since: datetime | None = None) -> set[str]:
        """The ids among ``message_ids`` that a file of the outbox holds (or is about to hold); ``since``:
        none of them can be in a file written before then (see :meth:`claim`)."""
        return self._indexed(message_ids) | self._in_first_attempts(message_ids, since)

    def _indexed(self, message_ids: Sequence[str]) -> set[str]:
        """The ids among ``message_ids`` indexed one by one (``messages``)."""
        found: set[str] = set()
        if self.connection.execute("SELECT 1 FROM messages LIMIT 1").fetchone() is None:
            return found
        for start in range(0, len(message_ids), self.CHUNK):
            chunk = message_ids[start : start + self.CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self.connection.execute(f"SELECT message_id FROM messages WHERE message_id IN ({marks})", chunk)
            found.update(row[0] for row in rows)
        return found

    # Files are named by the time they were written; a file named up to this much before ``since`` is
    # still read (clock adjustments between the ledger's write and the file's).
    SINCE_MARGIN = timedelta(minutes=10)

    def _in_first_attempts(self, message_ids: Sequence[str], since: datetime | None = None) -> set[str]:
        """The ids among ``message_ids`` that a file holds as first attempts: the lists of every file
        written since ``since`` (all without it) are read, a file at a time, which only a batch holding
        messages that are not first attempts pays."""
        wanted = set(message_ids)
        found: set[str] = set()
        if since is None:
            rows = self.connection.execute("SELECT message_ids FROM first_attempts")
        else:
            rows = self.connection.execute(
                "SELECT message_ids FROM first_attempts JOIN files ON files.id = first_attempts.file_id"
                " WHERE files.name >= ?",
                (f"{since.astimezone(UTC) - self.SINCE_MARGIN:%Y%m%dT%H%M%S%fZ}",),
            )
        for (listed,) in rows:
            found.update(wanted.intersection(json.loads(listed)))
        return found

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction, begun with the write lock taken (``BEGIN IMMEDIATE``)."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def claim(
        self,
        name: str,
        temporary: Path,
        message_ids: Sequence[str],
        first_attempts: AbstractSet[str] = frozenset(),
        others_since: datetime | None = None,
    ) -> bool:
        """Record (in the caller's transaction) that file ``name``, now at ``temporary``, holds the ids
        (distinct), unless the index holds one of them already: then nothing is recorded and the answer
        is False.

        ``first_attempts``: the ids among them that no earlier attempt can have sent (the ledger wrote
        their rows for this batch). They are recorded as one list for the file, with no index entry each
        (an insert at a random place of an index that outgrows the cache cost more than the rest of the
        write), and checked only against the ids indexed one by one, which a first attempt cannot meet
        unless another session resent it meanwhile. The other ids are indexed one by one, by one insert
        that detects an id taken, instead of a lookup of every id before the insert, and checked against
        the files' lists of first attempts (``others_since``: of the files written since then; none of
        the other ids can have been written before, their ledger rows being younger)."""
        connection = self.connection
        others = [m for m in message_ids if m not in first_attempts] if first_attempts else list(message_ids)
        if first_attempts and self._indexed([m for m in message_ids if m in first_attempts]):
            return False
        if others and self._in_first_attempts(others, others_since):
            return False
        connection.execute("SAVEPOINT claim")
        file_id = connection.execute("INSERT INTO files (name) VALUES (?)", (name,)).lastrowid
        connection.execute("INSERT INTO claims (file_id, temporary) VALUES (?, ?)", (file_id, temporary.name))
        if len(others) < len(message_ids):
            listed = json.dumps([m for m in message_ids if m in first_attempts])
            connection.execute("INSERT INTO first_attempts (file_id, message_ids) VALUES (?, ?)", (file_id, listed))
        inserted = connection.executemany(  # in key order: neighbouring ids share index pages
            "INSERT OR IGNORE INTO messages (message_id, file_id) VALUES (?, ?)",
            ((m, file_id) for m in sorted(others)),
        ).rowcount
        if others and inserted != len(others):
            connection.execute("ROLLBACK TO claim")
        connection.execute("RELEASE claim")
        return not others or inserted == len(others)

    def complete(self, name: str) -> None:
        """The claimed file ``name`` is in place: drop its claim (committed at once)."""
        self.connection.execute("DELETE FROM claims WHERE file_id = (SELECT id FROM files WHERE name = ?)", (name,))

    def claims(self) -> list[tuple[str, str]]:
        """The claimed files not known to be in place: (file name, temporary name)."""
        rows = self.connection.execute(
            "SELECT files.name, claims.temporary FROM claims JOIN files ON files.id = claims.file_id ORDER BY 1"
        )
        return [(str(name), str(temporary)) for name, temporary in rows]

    def unknown(self, names: Sequence[str]) -> list[str]:
        """The file names among ``names`` that the index does not know."""
        known: set[str] = set()
        for start in range(0, len(names), self.CHUNK):
            chunk = names[start : start + self.CHUNK]
            marks = ",".join("?" * len(chunk))
            known.update(
                row[0] for row in self.connection.execute(f"SELECT name FROM files WHERE name IN ({marks})", chunk)
            )
        return [name for name in names if name not in known]

    def adopt(self, name: str, message_ids: Sequence[str]) -> None:
        """Index a file the index did not know (in one transaction); an id already indexed keeps its file."""
        with self.transaction():
            if self.connection.execute("SELECT 1 FROM files WHERE name = ?", (name,)).fetchone() is not None:
                return  # adopted meanwhile by another session
            cursor = self.connection.execute("INSERT INTO files (name) VALUES (?)", (name,))
            self.connection.executemany(
                "INSERT OR IGNORE INTO messages (message_id, file_id) VALUES (?, ?)",
                ((m, cursor.lastrowid) for m in message_ids),
            )


def _write_ahead_log(connection: sqlite3.Connection, busy_timeout_s: float) -> None:
    """Put the index in WAL mode. Sessions opening a new index at once race for it, and SQLite refuses
    the switch with "database is locked" at once rather than waiting for the other (its busy timeout
    does not apply): tried again until the busy timeout has passed."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


class OutboxMboxProvider:
    """Writes each batch of emails as one mboxrd file ``<UTC time>-<hash of its ids>.mbox`` into a
    directory, each message id at most once ever (see :class:`OutboxMboxSession` and :class:`OutboxIndex`).

    The first :meth:`open` of the provider indexes every ``.mbox`` file of the directory that the index
    does not know (a lost or older index); every open rolls forward the files claimed but not in place
    (a session that stopped between its claim and its rename).
    """

    def __init__(self, directory: Path, *, busy_timeout_s: float = 60.0) -> None:
        self.directory = directory
        self.busy_timeout_s = busy_timeout_s
        self._scanned = False
        self._scan_lock = threading.Lock()

    def open(self) -> OutboxMboxSession:
        """A session on the directory (created when missing), the outbox recovered first."""
        index: OutboxIndex | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            index = OutboxIndex(self.directory, busy_timeout_s=self.busy_timeout_s)
            with self._scan_lock:
                if not self._scanned:
                    _adopt_unknown_files(self.directory, index)
                    self._scanned = True
            _roll_forward(self.directory, index)
        except (OSError, sqlite3.Error) as exc:
            if index is not None:
                index.close()
            raise ProviderUnavailableError(f"cannot open the outbox {self.directory}: {exc}") from exc
        return OutboxMboxSession(self.directory, index)


class OutboxMboxSession:
    """One batch written as one mbox file, durable at :meth:`finish`, each message id at most once.

    ``send`` keeps the message (the pipeline holds the batch in memory already; a second message with
    the same id is dropped, the first content wins). ``finish``:

    1. writes the messages, mboxrd-quoted with LF line ends, to a temporary file, and syncs it and the
       directory (the temporary name is durable);
    2. in one write transaction, claims the ids: the file name, its temporary name and its ids go into
       the index, committed, unless the index holds some already (a replay after a crash between the
       durable file and the ledger's ``sent`` mark, or a concurrent session; the claim detects it under
       the lock): those count as sent and are dropped, the file is rewritten, and the rest claimed (no
       lookup of the ids before: a fresh batch, the usual case, is claimed at once; the ids the pipeline
       said are first attempts, :meth:`expect_first_attempts`, are claimed as one list);
    3. renames the file into place, syncs the directory, and drops the claim.

    A crash after 2 leaves a claim: the next :meth:`OutboxMboxProvider.open` (in any process) renames the
    temporary file into place if it is still there, then drops the claim, so claimed ids are always in
    a file. Claiming before the rename (rather than indexing after it) is what makes the check and the
    claim one atomic step across processes. A disk or index error raises ProviderUnavailableError (the
    batch is reported unsent; a claimed file is kept for the roll-forward, and the replay finds its ids
    written).
    """

    def __init__(self, directory: Path, index: OutboxIndex) -> None:
        self.directory = directory
        self.index = index
        self._messages: dict[str, OutgoingEmail] = {}
        self._temporary: Path | None = None  # a temporary file not claimed yet, removed by close
        self._first_attempts: AbstractSet[str] = frozenset()
        self._others_since: datetime | None = None

    def expect_first_attempts(self, message_ids: Collection[str], *, others_since: datetime | None = None) -> None:
        """Say which of the batch's message ids no earlier attempt can have sent, and since when the others
        can have been (see :meth:`OutboxIndex.claim`): only the pipeline's ledger knows."""
        self._first_attempts = message_ids if isinstance(message_ids, AbstractSet) else frozenset(message_ids)
        self._others_since = others_since

    def send(self, message: OutgoingEmail) -> None:
        """Keep the email for :meth:`finish`; a message id seen before in the batch is dropped."""
        if not _SAFE_FILE_NAME.match(message.message_id):
            raise PermanentProviderError(f"message id {message.message_id!r} is not a safe message id")
        self._messages.setdefault(message.message_id, message)

    def finish(self) -> None:
        """Write the batch's unwritten messages as one durable mbox file (see the class).

        Raises ProviderUnavailableError when the disk or the index fails; the batch is then reported
        unsent."""
        if not self._messages:
            return
        try:
            # No lookup of the ids first: the claim detects one already written (a replayed batch), and
            # only then are the written ones looked up, under the index's lock, and the file rewritten.
            fresh = list(self._messages.values())
            first, since = self._first_attempts, self._others_since
            name, temporary = self._write(fresh)
            with self.index.transaction():
                if not self.index.claim(name, temporary, [m.message_id for m in fresh], first, since):
                    # Some were written meanwhile by another session (the index is locked now).
                    taken = self.index.written([m.message_id for m in fresh], since)
                    self._discard()
                    fresh = [m for m in fresh if m.message_id not in taken]
                    if not fresh:
                        return
                    name, temporary = self._write(fresh)
                    if not self.index.claim(name, temporary, [m.message_id for m in fresh], first, since):
                        raise sqlite3.IntegrityError("the outbox index changed under its write lock")
            self._temporary = None  # claimed: the roll-forward owns it now
            _place(self.directory, temporary, self.directory / name)
            self.index.complete(name)
        except (OSError, sqlite3.Error) as exc:
            raise ProviderUnavailableError(f"cannot make the outbox {self.directory} durable: {exc}") from exc
        finally:
            self._messages.clear()

    def close(self) -> None:
        """Remove an unclaimed temporary file and close the index."""
        self._discard()
        self._messages.clear()
        with contextlib.suppress(sqlite3.Error):
            self.index.close()

    def _discard(self) -> None:
        if self._temporary is not None:
            with contextlib.suppress(OSError):
                self._temporary.unlink()
            self._temporary = None

    def _write(self, messages: Sequence[OutgoingEmail]) -> tuple[str, Path]:
        """Write ``messages`` as mboxrd to a new synced temporary file: (final name, temporary path)."""
        ids = "\n".join(m.message_id for m in messages).encode("ascii")
        now = datetime.now(UTC)
        name = f"{now:%Y%m%dT%H%M%S%fZ}-{hashlib.sha256(ids).hexdigest()[:16]}.mbox"
        temporary = self.directory / f".{name}.{uuid.uuid4().hex}.tmp"
        self._temporary = temporary
        stamp = time.asctime(now.timetuple()).encode("ascii")
        envelopes: dict[str, bytes] = {}  # the "From " line of each sender (the same few for the batch)
        with temporary.open("xb", buffering=1 << 20) as handle:
            write = handle.write
            for message in messages:
                envelope = envelopes.get(message.envelope_from)
                if envelope is None:
                    envelope = envelopes[message.envelope_from] = _envelope_line(message.envelope_from, stamp)
                write(envelope)
                write(_mbox_message(message))
                write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_directory(self.directory)
        return name, temporary


_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_ID_HEADER = MESSAGE_ID_HEADER.lower().encode("ascii") + b":"
_SAFE_ENVELOPE = re.compile(r"^[\x21-\x7e]{1,320}$")


def mbox_entry(message: OutgoingEmail, stamp: bytes) -> bytes:
    """One message of an mboxrd file: the ``From `` line (envelope sender and ``stamp``, an asctime), the
    message with LF line ends, its lines matching ``>*From `` quoted with one more ``>``, a
    ``X-Carillon-Message-Id`` header first when the message does not carry its id as that header, and an
    empty line."""
    return _envelope_line(message.envelope_from, stamp) + _mbox_message(message) + b"\n"


def _envelope_line(envelope_from: str, stamp: bytes) -> bytes:
    """The ``From `` line of a message (a sender that cannot be written there is ``MAILER-DAEMON``)."""
    sender = envelope_from if _SAFE_ENVELOPE.match(envelope_from) else "MAILER-DAEMON"
    return b"From " + sender.encode("ascii") + b" " + stamp + b"\n"


def _mbox_message(message: OutgoingEmail) -> bytes:
    """The message of an mbox entry: LF line ends, ``>*From `` lines quoted, its id header, a final LF."""
    data = message.data.replace(b"\r\n", b"\n")
    if b"From " in data:
        data = _FROM_LINE.sub(rb">\1", data)
    if _header_id(data) != message.message_id:
        data = f"{MESSAGE_ID_HEADER}: {message.message_id}\n".encode("ascii") + data
    if not data.endswith(b"\n"):
        data += b"\n"
    return data


def _header_id(data: bytes) -> str | None:
    """The value of the first ``X-Carillon-Message-Id`` header of a message's header block."""
    end = data.find(b"\n\n")
    headers = b"\n" + (data if end < 0 else data[: end + 1]).lower()
    start = headers.find(b"\n" + _ID_HEADER)
    if start < 0:
        return None
    value_start = start + 1 + len(_ID_HEADER)
    line_end = headers.find(b"\n", value_start)
    # The value's case as written: offsets in the lowered copy match the original (shifted by the "\n").
    original = data[value_start - 1 : (line_end if line_end >= 0 else len(headers)) - 1]
    return original.strip().decode("ascii", "replace")


def mbox_message_ids(path: Path) -> list[str]:
    """The ``X-Carillon-Message-Id`` of each message of an mboxrd file written by the outbox, in order
    (read line by line; a message without the header is skipped)."""
    ids: list[str] = []
    in_headers = False
    with path.open("rb") as handle:
        for line in handle:
            if line.startswith(b"From "):
                in_headers = True
            elif in_headers and line in (b"\n", b"\r\n"):
                in_headers = False
            elif in_headers and line.lower().startswith(_ID_HEADER):
                ids.append(line[len(_ID_HEADER) :].strip().decode("ascii", "replace"))
                in_headers = False
    return ids


def _adopt_unknown_files(directory: Path, index: OutboxIndex) -> None:
    """Index every ``.mbox`` file of ``directory`` that the index does not know, a chunk of names at a time."""
    with os.scandir(directory) as entries:
        names: list[str] = []
        for entry in entries:
            if entry.name.endswith(".mbox") and not entry.name.startswith("."):
                names.append(entry.name)
            if len(names) >= OutboxIndex.CHUNK:
                _adopt(directory, index, names)
                names = []
        _adopt(directory, index, names)


def _adopt(directory: Path, index: OutboxIndex, names: Sequence[str]) -> None:
    for name in index.unknown(names):
        log.warning("indexing an outbox file the index did not know", file=name)
        index.adopt(name, mbox_message_ids(directory / name))


def _roll_forward(directory: Path, index: OutboxIndex) -> None:
    """Put in place the claimed files whose session stopped before its rename, and drop their claims."""
    for name, temporary in index.claims():
        if (directory / temporary).exists():
            log.warning("completing an outbox file claimed by an interrupted session", file=name)
            _place(directory, directory / temporary, directory / name)
        index.complete(name)


def _place(directory: Path, temporary: Path, final: Path) -> None:
    """Rename a synced temporary file into place and sync the directory; a temporary file already gone
    was put in place by another session (a roll-forward)."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(temporary, final)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(2)`` from the C library, or None where it does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


_SYNCFS = _load_syncfs()


def _syncfs(descriptor: int) -> bool:
    """Flush the filesystem holding ``descriptor`` with one call; False when syncfs is unavailable."""
    if _SYNCFS is None:
        return False
    if _SYNCFS(descriptor) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return True


# -- SMTP ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to reach the SMTP relay."""

    host: str
    port: int
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0


class SmtpProvider:
    """Sends emails over SMTP, one connection per batch.

    An SMTP relay honours no idempotency key: a message it accepted is delivered again if sent again. So
    ``mark_each_send``: the pipeline marks each message sent in the ledger as soon as the relay accepted it,
    and a crash repeats at most the one message accepted but not yet marked.
    """

    mark_each_send = True

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    def open(self) -> SmtpSession:
        """A session that connects on its first send."""
        return SmtpSession(self.config)


def _classify(code: int, text: str) -> ProviderError:
    if code == 421:
        return ProviderUnavailableError(f"{code} {text}")
    if 400 <= code < 500:
        return TransientProviderError(f"{code} {text}")
    return PermanentProviderError(f"{code} {text}")


def _reply_text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


class SmtpSession:
    """One SMTP connection reused for every email of a batch, reopened after a disconnection."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self._smtp: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        config = self.config
        smtp = smtplib.SMTP(timeout=config.timeout_s)
        try:
            smtp.connect(config.host, config.port)
            smtp.ehlo_or_helo_if_needed()
            if config.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if config.username:
                smtp.login(config.username, config.password or "")
        except (smtplib.SMTPException, OSError) as exc:
            with contextlib.suppress(Exception):
                smtp.close()
            raise ProviderUnavailableError(f"SMTP {config.host}:{config.port}: {exc!r}") from exc
        return smtp

    def _drop(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(Exception):
                self._smtp.close()
            self._smtp = None

    def send(self, message: OutgoingEmail) -> None:
        """Send one email over the session's connection."""
        if self._smtp is None:
            self._smtp = self._connect()
        try:
            self._smtp.sendmail(message.envelope_from, [message.recipient], message.data)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients.get(message.recipient, (550, b"recipient refused"))
            raise _classify(code, _reply_text(text)) from exc
        except smtplib.SMTPResponseException as exc:
            error = _classify(exc.smtp_code, _reply_text(exc.smtp_error))
            if isinstance(error, ProviderUnavailableError):
                self._drop()
            raise error from exc
        except (smtplib.SMTPNotSupportedError, UnicodeEncodeError) as exc:
            raise PermanentProviderError(f"cannot send to {message.recipient!r}: {exc}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise ProviderUnavailableError(f"SMTP connection lost: {exc!r}") from exc

    def close(self) -> None:
        """Say QUIT and close the connection."""
        if self._smtp is not None:
            with contextlib.suppress(Exception):
                self._smtp.quit()
        self._drop()
