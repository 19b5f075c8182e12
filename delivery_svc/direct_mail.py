"""Direct mail: extract files for a print partner, written by a provider behind the same interface.

Every message is one row (the message id, then the template's columns in order). The rows of one
extract stream — one sandbox, run and channel activity — go into a sequence of files of at most
``max_rows`` rows each, **continuing across batches**: a batch fills the stream's open part and
starts the next one when it is full. A file is named
``{prefix}_{UTC timestamp of its first row}_{stream}_{part:03d}.{ext}`` and has the header line (when
configured) and the chosen delimiter (CSV quoting).

Durability. The open part is a hidden ``.partial`` file next to a small state file (part number,
rows, committed length, timestamp), both in the extract directory, so that a restarted worker
continues the same part. A batch's rows are appended and synced, then the state is replaced
atomically; the rows count as sent only after that. At the start of every batch the partial file is
cut back to its committed length, so a crash in the middle of an append leaves no half-written rows
(those rows are still ``pending`` in the ledger and are written again by the replay). A full part is
moved to its final name by an atomic rename, so a final file is always complete; the last part of
a stream is completed when the Send stream ends cleanly (a stream cut off by a crash leaves it open
for the resumed stream to continue). A batch replayed after a crash between the state update and the
ledger update is written again: the message id column lets the partner drop such repeats.

Sorting. With a sort column, the rows of each batch are sorted before they are appended, and each
file is sorted once more when it is completed, so **every file is sorted**. Rows arrive in batches
and memory is bounded by the batch and file size, so the order across files holds only within one
batch: a global order over a whole activity would need the whole audience at once.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from carillon_chassis.database import utcnow
from delivery_svc.providers import ProviderUnavailableError

MAX_ROWS_PER_FILE = 200_000
_STAMP = "%Y%m%dT%H%M%S%fZ"
_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


@dataclass(frozen=True)
class OutgoingRow:
    """One extract row: the message id, the postal address key, the rendered column values and the
    extract stream it belongs to (see :func:`stream_name`)."""

    message_id: str
    recipient: str
    headers: tuple[str, ...]
    values: tuple[str, ...]
    stream: str = "extract"


@dataclass(frozen=True)
class ExtractConfig:
    """Where and how extract files are written."""

    directory: Path
    prefix: str = "extract"
    delimiter: str = ","
    header: bool = True
    max_rows: int = MAX_ROWS_PER_FILE
    sort_column: str = ""
    extension: str = "csv"


def stream_name(sandbox: str, run: str, activity: str) -> str:
    """A file-name-safe, unique name of the extract stream of one sandbox, run and activity:
    ``{campaign}-{run}-{activity}-{hash}`` (the hash keeps names that sanitise alike apart)."""
    parts = run.split("/")
    readable = "-".join(p for p in (parts[1] if len(parts) > 1 else "", parts[-1], activity) if p)
    digest = hashlib.sha256("\x1f".join((sandbox, run, activity)).encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('-', readable)[:80]}-{digest}"


@dataclass
class _State:
    """The committed state of a stream's open part."""

    part: int = 1
    rows: int = 0
    length: int = 0
    stamp: str = ""
    sort_position: int = -1  # the sort column's position in a row, -1 when not sorted


class DirectMailProvider:
    """Appends each batch's rows to its stream's extract files."""

    def __init__(self, config: ExtractConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # one writer at a time in this process

    def open(self) -> ExtractSession:
        """A session collecting one batch's rows."""
        return ExtractSession(self)

    # -- files of a stream ------------------------------------------------------------------------
    def _paths(self, stream: str) -> tuple[Path, Path]:
        base = self.config.directory / f".{self.config.prefix}_{stream}"
        return base.with_name(base.name + ".partial"), base.with_name(base.name + ".state")

    def _final(self, stream: str, state: _State) -> Path:
        config = self.config
        return config.directory / f"{config.prefix}_{state.stamp}_{stream}_{state.part:03d}.{config.extension}"

    def _load(self, stream: str) -> _State:
        partial, state_path = self._paths(stream)
        try:
            state = _State(**json.loads(state_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return _State()
        if state.rows and self._final(stream, state).exists():  # crashed after completing the part
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            state = _State(part=state.part + 1)
            self._save(stream, state)
        return state

    def _save(self, stream: str, state: _State) -> None:
        _, state_path = self._paths(stream)
        _write_atomically(state_path, json.dumps(state.__dict__).encode())
        # The rename must be durable before the batch counts as sent: a state lost to a power cut would
        # cut the partial file back to an older length, dropping rows the ledger already has as sent.
        _fsync_directory(state_path)

    def append(self, rows: Sequence[OutgoingRow]) -> list[Path]:
        """Append ``rows`` to their streams' files, completing every part that fills up; returns the
        files completed. Raises OSError (the open part cut back to its committed length)."""
        by_stream: dict[str, list[OutgoingRow]] = {}
        for row in rows:
            by_stream.setdefault(row.stream, []).append(row)
        completed: list[Path] = []
        with self._lock:
            self.config.directory.mkdir(parents=True, exist_ok=True)
            for stream, stream_rows in by_stream.items():
                completed += self._append_stream(stream, self._sorted(stream_rows))
        return completed

    def end_stream(self, stream: str) -> Path | None:
        """Complete the stream's open part (the Send stream ended); returns the file, if any."""
        with self._lock:
            state = self._load(stream)
            if not state.rows:
                return None
            return self._complete(stream, state)

    def _append_stream(self, stream: str, rows: list[OutgoingRow]) -> list[Path]:
        config = self.config
        state = self._load(stream)
        partial, _ = self._paths(stream)
        completed: list[Path] = []
        headers = ("message_id", *rows[0].headers)
        start = 0
        while start < len(rows):
            take = rows[start : start + config.max_rows - state.rows]
            buffer = io.StringIO()
            writer = csv.writer(buffer, delimiter=config.delimiter)
            if state.rows == 0:
                state.stamp = utcnow().strftime(_STAMP)
                column = config.sort_column
                state.sort_position = headers.index(column) if column and column in headers else -1
                if config.header:
                    writer.writerow(headers)
            writer.writerows((r.message_id, *r.values) for r in take)
            data = buffer.getvalue().encode("utf-8")
            with partial.open("a+b") as handle:
                handle.truncate(state.length)  # drop what a crashed append left after the committed rows
                handle.seek(state.length)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            state = _State(
                state.part, state.rows + len(take), state.length + len(data), state.stamp, state.sort_position
            )
            self._save(stream, state)
            start += len(take)
            if state.rows >= config.max_rows:
                completed.append(self._complete(stream, state))
                state = _State(part=state.part + 1)
        return completed

    def _complete(self, stream: str, state: _State) -> Path:
        """Move the open part to its final name (sorted first when a sort column is set)."""
        partial, _ = self._paths(stream)
        final = self._final(stream, state)
        if state.sort_position >= 0:
            self._rewrite_sorted(partial, final, state.sort_position)
            partial.unlink()
        else:
            os.replace(partial, final)
        _fsync_directory(final)
        self._save(stream, _State(part=state.part + 1))
        return final

    # -- sorting ----------------------------------------------------------------------------------
    def _sorted(self, rows: list[OutgoingRow]) -> list[OutgoingRow]:
        column = self.config.sort_column
        headers = ("message_id", *rows[0].headers)
        if not column or column not in headers:
            return rows
        position = headers.index(column)
        return sorted(rows, key=lambda r: (r.message_id, *r.values)[position])

    def _rewrite_sorted(self, partial: Path, final: Path, position: int) -> None:
        """Write the part's rows (at most ``max_rows``), sorted on the sort column, as ``final``."""
        with partial.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter=self.config.delimiter))
        header, body = (rows[:1], rows[1:]) if self.config.header else ([], rows)
        body.sort(key=lambda r: r[position])
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=self.config.delimiter)
        writer.writerows(header)
        writer.writerows(body)
        _write_atomically(final, buffer.getvalue().encode("utf-8"))


@dataclass
class ExtractSession:
    """One batch's rows, appended by :meth:`finish`."""

    provider: DirectMailProvider
    rows: list[OutgoingRow] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def send(self, message: OutgoingRow) -> None:
        """Collect one row."""
        self.rows.append(message)

    def finish(self) -> None:
        """Append the batch's rows; ProviderUnavailableError when that fails (the open part keeps
        only its committed rows)."""
        if not self.rows:
            return
        try:
            self.written = self.provider.append(self.rows)
        except OSError as exc:
            raise ProviderUnavailableError(
                f"cannot write the extract into {self.provider.config.directory}: {exc}"
            ) from exc

    def close(self) -> None:
        """Nothing to release (the rows are written by finish)."""


def _write_atomically(final: Path, data: bytes) -> None:
    temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path``'s directory durable (best effort where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def extract_time(path: Path) -> datetime | None:
    """The UTC timestamp in an extract file's name, or None."""
    parts = path.stem.split("_")
    for part in parts:
        with contextlib.suppress(ValueError):
            return datetime.strptime(part, _STAMP)
    return None
