"""Direct mail: extract files for a print partner, written by a provider behind the same interface.

Every message of a batch is one row (the message id, then the template's columns in order). When the
batch ends, :meth:`ExtractSession.finish` writes its rows (sorted on the optional sort column) into
files of at most ``max_rows`` rows each, named ``{prefix}_{UTC timestamp}_{sequence}_{part}.{ext}``,
with a header line and the chosen delimiter (CSV quoting). Each file is written to a temporary name,
synced and renamed into place, so a file is complete or absent; the rows count as sent only once
every file of the batch exists. A batch replayed after a crash between the rename and the ledger
update is written again into new files: the message id column lets the partner drop such repeats.
Files are per batch: the 200,000-row split applies within a batch's extract.
"""

from __future__ import annotations

import contextlib
import csv
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count
from pathlib import Path

from carillon_chassis.database import utcnow
from delivery_svc.providers import ProviderUnavailableError

MAX_ROWS_PER_FILE = 200_000


@dataclass(frozen=True)
class OutgoingRow:
    """One extract row: the message id, the postal address key and the rendered column values."""

    message_id: str
    recipient: str
    headers: tuple[str, ...]
    values: tuple[str, ...]


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


class DirectMailProvider:
    """Writes each batch's rows into extract files."""

    def __init__(self, config: ExtractConfig) -> None:
        self.config = config
        self._sequence = count(1)

    def open(self) -> ExtractSession:
        """A session collecting one batch's rows."""
        return ExtractSession(self.config, next(self._sequence))


@dataclass
class ExtractSession:
    """One batch's rows, written by :meth:`finish`."""

    config: ExtractConfig
    sequence: int
    rows: list[OutgoingRow] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def send(self, message: OutgoingRow) -> None:
        """Collect one row."""
        self.rows.append(message)

    def finish(self) -> None:
        """Write the batch's files; ProviderUnavailableError (nothing left behind) when that fails."""
        if not self.rows:
            return
        config = self.config
        headers = ("message_id", *self.rows[0].headers)
        rows = list(self.rows)
        if config.sort_column and config.sort_column in headers:
            position = headers.index(config.sort_column) - 1
            rows.sort(key=lambda r: r.message_id if position < 0 else r.values[position])
        stamp = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
        try:
            config.directory.mkdir(parents=True, exist_ok=True)
            for part, start in enumerate(range(0, len(rows), config.max_rows), start=1):
                name = f"{config.prefix}_{stamp}_{os.getpid()}-{self.sequence:06d}_{part:03d}.{config.extension}"
                self._write(config.directory / name, headers, rows[start : start + config.max_rows])
        except OSError as exc:
            for path in self.written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise ProviderUnavailableError(f"cannot write the extract into {config.directory}: {exc}") from exc

    def _write(self, final: Path, headers: Sequence[str], rows: Sequence[OutgoingRow]) -> None:
        temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        try:
            with temporary.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, delimiter=self.config.delimiter)
                if self.config.header:
                    writer.writerow(headers)
                writer.writerows((r.message_id, *r.values) for r in rows)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()
        self.written.append(final)

    def close(self) -> None:
        """Nothing to release (the rows are written by finish)."""


def extract_time(path: Path) -> datetime | None:
    """The UTC timestamp in an extract file's name, or None."""
    parts = path.stem.split("_")
    for part in parts:
        with contextlib.suppress(ValueError):
            return datetime.strptime(part, "%Y%m%dT%H%M%S%fZ")
    return None
