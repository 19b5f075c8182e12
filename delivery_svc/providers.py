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
- :class:`SmtpProvider` sends over SMTP with smtplib, optionally with STARTTLS and login.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import smtplib
import ssl
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TypeVar, cast

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from delivery_svc.emails import OutgoingEmail
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
) -> DeliveryReport:
    """Send ``messages`` in order through one session, retrying transient errors (blocking).

    Every attempt first takes a token from each bucket of ``throttles`` (the activity's and the
    provider's); backoff and throttling sleep on ``clock``. ``on_sent`` is called with each message's id
    as soon as the provider accepted it, before the next message is sent (an exception it raises ends
    the batch).
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
                for attempt in retrying:
                    with attempt:
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
