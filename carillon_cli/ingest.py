"""``carillon ingest ENTITY FILE``: load a CSV or JSON Lines file into an entity through the API.

A CSV file goes in the bulk wire format: its header names the block's columns and its rows are sent
nearly as they are, re-quoted, as one CSV ``RecordBlock`` per batch; the server parses every cell by
the attribute's type. An empty cell is NULL, except in a non-nullable string or enum attribute,
where it is the empty string. JSON Lines go as per-row ``RecordChange`` messages: values are taken
as they are and parsed only where the attribute needs it (dates, timestamps, decimals). A column or
key named ``_op`` holding ``d`` (or ``delete``) deletes the record instead of upserting it. The file
is read lazily and streamed in batches, so memory stays bounded by the batch size. When the server
refuses a batch, every reported problem is printed with the file line it came from, and nothing of
that batch is written (earlier batches stay applied; the command says how many).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from carillon.audience.v1 import audience_service_pb2 as aud
from carillon.audience.v1 import audience_service_pb2_grpc as aud_grpc
from carillon.audience.v1 import entity_pb2
from carillon.type.v1 import value_pb2
from carillon_chassis.clients import call_metadata, open_channel
from carillon_chassis.values import to_value

T = entity_pb2
OP_COLUMN = "_op"


class RowError(ValueError):
    """A line of the file cannot be turned into a record change."""


def _parse_timestamp(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("a timestamp needs a UTC offset, e.g. 2026-11-29T09:00:00Z")
    return value


_TEXT_PARSERS: dict[int, Callable[[str], Any]] = {
    T.ATTRIBUTE_TYPE_STRING: str,
    T.ATTRIBUTE_TYPE_ENUM: str,
    T.ATTRIBUTE_TYPE_INTEGER: int,
    T.ATTRIBUTE_TYPE_DECIMAL: Decimal,
    T.ATTRIBUTE_TYPE_BOOLEAN: lambda s: {"true": True, "false": False, "1": True, "0": False}[s.strip().lower()],
    T.ATTRIBUTE_TYPE_DATE: dt.date.fromisoformat,
    T.ATTRIBUTE_TYPE_TIMESTAMP: _parse_timestamp,
}


def typed_value(attribute: entity_pb2.Attribute, raw: Any, *, from_text: bool) -> value_pb2.Value:
    """The Value of one cell for ``attribute`` (raises RowError when it cannot be read)."""
    if raw is None or (from_text and raw == "" and attribute.nullable):
        return to_value(None)
    try:
        if from_text or (
            isinstance(raw, str) and attribute.type not in (T.ATTRIBUTE_TYPE_STRING, T.ATTRIBUTE_TYPE_ENUM)
        ):
            return to_value(_TEXT_PARSERS[attribute.type](str(raw)))
        if attribute.type == T.ATTRIBUTE_TYPE_DECIMAL and isinstance(raw, int | float):
            return to_value(Decimal(str(raw)))
        return to_value(raw)
    except (ValueError, KeyError, InvalidOperation) as exc:
        raise RowError(f"{attribute.name}: cannot read {raw!r} as {T.AttributeType.Name(attribute.type)}") from exc


def change_of(entity: entity_pb2.Entity, row: dict[str, Any], *, from_text: bool) -> aud.RecordChange:
    """The record change for one row: typed values for the entity's attributes, `_op` for deletes."""
    attributes = {a.name: a for a in entity.attributes}
    op = str(row.pop(OP_COLUMN, "") or "u").strip().lower()
    if op not in ("u", "upsert", "d", "delete"):
        raise RowError(f"{OP_COLUMN} must be 'u' or 'd', not {op!r}")
    unknown = sorted(set(row) - set(attributes))
    if unknown:
        raise RowError(f"unknown attribute(s) {', '.join(unknown)}")
    values = {name: typed_value(attributes[name], raw, from_text=from_text) for name, raw in row.items()}
    operation = aud.CHANGE_OPERATION_DELETE if op in ("d", "delete") else aud.CHANGE_OPERATION_UPSERT
    return aud.RecordChange(operation=operation, values=values)


def csv_cell(value: str | None) -> str:
    """One cell of a CSV block: NULL unquoted and empty, a text quoted when empty or when it must be."""
    if value is None:
        return ""
    if value == "" or any(char in value for char in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def empty_means_text(entity: entity_pb2.Entity, columns: list[str]) -> list[bool]:
    """Per column: whether an empty cell is the empty string (a non-nullable string or enum) or NULL."""
    attributes = {a.name: a for a in entity.attributes}
    texts = (T.ATTRIBUTE_TYPE_STRING, T.ATTRIBUTE_TYPE_ENUM)
    return [name in attributes and not attributes[name].nullable and attributes[name].type in texts for name in columns]


def read_csv_blocks(
    path: Path, entity: entity_pb2.Entity, batch_size: int
) -> Iterator[tuple[list[str], list[int], str]]:
    """(the columns, the file line of each row, the CSV text) of each block of ``batch_size`` rows."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        columns = next(reader, None)
        if columns is None:
            return
        as_text = empty_means_text(entity, columns)
        lines: list[int] = []
        rows: list[str] = []
        for row in reader:
            cells = [cell if cell or (i < len(as_text) and as_text[i]) else None for i, cell in enumerate(row)]
            rows.append(",".join(csv_cell(cell) for cell in cells) + "\n")
            lines.append(reader.line_num)
            if len(rows) == batch_size:
                yield columns, lines, "".join(rows)
                lines, rows = [], []
        if rows:
            yield columns, lines, "".join(rows)


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each record of a JSON Lines file, read lazily."""
    with path.open(encoding="utf-8", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RowError(f"line {number}: not JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise RowError(f"line {number}: a JSON object is expected")
                yield number, row


@dataclass
class IngestReport:
    """What an ingestion did."""

    rows: int = 0
    batches: int = 0
    upserted: int = 0
    deleted: int = 0
    ignored_stale: int = 0
    problems: list[str] = field(default_factory=list)


def _problems(err: grpc.RpcError, batch_lines: list[list[int]]) -> tuple[int, list[str]]:
    """(batches applied before the refused one, each problem with its file line)."""
    status = rpc_status.from_call(err)
    found: list[str] = []
    refused = len(batch_lines) - 1
    details = list(status.details) if status is not None else []
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.metadata.get("batch_index", "").isdigit():
                refused = int(info.metadata["batch_index"])
    lines = batch_lines[refused] if 0 <= refused < len(batch_lines) else []
    for detail in details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                where = violation.field
                for prefix in ("changes[", "block.rows["):
                    if where.startswith(prefix) and "]" in where:
                        index = int(where[len(prefix) : where.index("]")])
                        if 0 <= index < len(lines):
                            where = f"line {lines[index]} ({violation.field})"
                if where.startswith("block.columns"):
                    where = f"line 1, the header ({violation.field})"
                found.append(f"{where}: {violation.description}")
    return max(refused, 0), found or [f"{err.code().name}: {err.details()}"]


async def ingest_file(
    address: str,
    entity_id: str,
    path: Path,
    *,
    fmt: str | None = None,
    batch_size: int = 1000,
    sandbox: str = "prod",
    on_progress: Callable[[int], None] | None = None,
) -> IngestReport:
    """Stream ``path`` into ``entities/{entity_id}``; one IngestRecords call, one request per batch."""
    fmt = fmt or ("jsonl" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv")
    report = IngestReport()
    async with open_channel(address) as channel:
        stub = aud_grpc.AudienceServiceStub(channel)
        metadata = call_metadata(sandbox)
        reply = await stub.GetEntity(aud.GetEntityRequest(name=f"entities/{entity_id}"), metadata=metadata)
        entity = reply.entity
        batch_lines: list[list[int]] = []

        async def blocks() -> AsyncIterator[aud.IngestRecordsRequest]:
            for columns, lines, text in read_csv_blocks(path, entity, batch_size):
                batch_lines.append(lines)
                report.rows += len(lines)
                yield aud.IngestRecordsRequest(entity=entity.name, block=aud.RecordBlock(columns=columns, csv=text))
                if on_progress is not None:
                    on_progress(len(lines))

        async def batches() -> AsyncIterator[aud.IngestRecordsRequest]:
            changes: list[aud.RecordChange] = []
            lines: list[int] = []
            rows = read_rows(path)
            while True:
                try:
                    item = next(rows, None)
                    if item is None:
                        break
                    number, row = item
                    changes.append(change_of(entity, row, from_text=False))
                except RowError as exc:
                    # stop here: the batch being built is not sent, earlier batches stay applied
                    report.problems.append(str(exc) if str(exc).startswith("line ") else f"line {number}: {exc}")
                    return
                lines.append(number)
                report.rows += 1
                if len(changes) == batch_size:
                    batch_lines.append(lines)
                    yield aud.IngestRecordsRequest(entity=entity.name, changes=changes)
                    if on_progress is not None:
                        on_progress(len(changes))
                    changes, lines = [], []
            if changes:
                batch_lines.append(lines)
                yield aud.IngestRecordsRequest(entity=entity.name, changes=changes)
                if on_progress is not None:
                    on_progress(len(changes))

        try:
            result = await stub.IngestRecords(blocks() if fmt == "csv" else batches(), metadata=metadata)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            report.batches, report.problems = _problems(err, batch_lines)
            return report
        report.batches = result.batches
        report.upserted = result.upserted
        report.deleted = result.deleted
        report.ignored_stale = result.ignored_stale
    return report
