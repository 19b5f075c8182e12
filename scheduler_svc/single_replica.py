"""One scheduler replica per SQLite database, enforced with an exclusive lock on a file beside it.

Leases make several replicas safe on PostgreSQL (``FOR UPDATE SKIP LOCKED``). SQLite is the embedded,
single-machine default: a second scheduler process on the same database file would only contend for
its write lock, so it is refused at start-up with a clear error. The lock is an advisory ``flock``
held for the life of the process: the operating system releases it when the process ends, even on
SIGKILL, so a restarted scheduler starts at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy.engine import make_url


class ReplicaLockError(RuntimeError):
    """Another scheduler replica already uses this SQLite database."""


class SingleReplicaLock:
    """The exclusive lock of one SQLite database's scheduler replica."""

    def __init__(self, database_url: str) -> None:
        database = make_url(database_url).database or ""
        # An in-memory database belongs to its process: there is nothing to share, nothing to lock.
        self.path = Path(f"{database}.scheduler-replica.lock") if database not in ("", ":memory:") else None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ReplicaLockError when another process holds it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReplicaLockError(
                f"another scheduler replica already uses this SQLite database ({self.path} is locked): "
                "run one scheduler per SQLite database, or use PostgreSQL for several replicas"
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
