"""Direct-mail extract files: delimiter, header, timestamped names, the row split across batches, the
sort column, and recovery of the open file after a crash; all with real files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from carillon_chassis.errors import InvalidArgument
from delivery_svc.direct_mail import DirectMailProvider, ExtractConfig, OutgoingRow, extract_time, stream_name
from delivery_svc.providers import RetryPolicy, deliver_batch
from delivery_svc.templates import Template, check_new_template

HEADERS = ("name", "city")


STREAM = stream_name("prod", "campaigns/mail/runs/r1", "letter")


def row(i: int, city: str, stream: str = STREAM) -> OutgoingRow:
    return OutgoingRow(f"m{i:03d}", f"addr-{i}", HEADERS, (f"Name {i}", city), stream)


def read(path: Path, delimiter: str = ",") -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle, delimiter=delimiter))


def test_a_batch_is_split_into_files_of_at_most_max_rows_sorted_on_the_sort_column(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, max_rows=2, sort_column="city"))
    cities = ["Oslo", "Berlin", "Paris", "Athens", "Madrid"]

    report = deliver_batch(provider, [row(i, c) for i, c in enumerate(cities)], RetryPolicy())
    provider.end_stream(STREAM)

    files = sorted(tmp_path.glob("extract_*.csv"))
    assert report.sent == [f"m{i:03d}" for i in range(5)]
    assert [len(read(f)) - 1 for f in files] == [2, 2, 1]
    assert all(read(f)[0] == ["message_id", "name", "city"] for f in files)
    assert [r[2] for f in files for r in read(f)[1:]] == sorted(cities)
    assert all(extract_time(f) is not None for f in files)


def test_the_delimiter_and_the_header_line_are_configurable(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, delimiter=";", header=False, extension="txt"))

    deliver_batch(provider, [row(1, "Saint-Étienne; Loire")], RetryPolicy())
    provider.end_stream(STREAM)

    (path,) = tmp_path.glob("extract_*.txt")
    assert read(path, ";") == [["m001", "Name 1", "Saint-Étienne; Loire"]]


def test_an_extract_that_cannot_be_written_leaves_the_batch_unsent(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    provider = DirectMailProvider(ExtractConfig(blocker / "extracts"))

    report = deliver_batch(provider, [row(1, "Oslo"), row(2, "Rome")], RetryPolicy())

    assert (report.sent, report.unsent) == ([], ["m001", "m002"])


def test_a_direct_mail_template_has_at_most_49_columns_plus_the_message_id() -> None:
    columns = {f"c{i}": "{{ profile.first_name }}" for i in range(50)}
    template = Template(template_id="", channel="direct_mail", content_kind="direct_mail", content=columns)

    with pytest.raises(InvalidArgument) as caught:
        check_new_template("wide", template)

    assert [v.field for v in caught.value.violations] == ["template.direct_mail.columns"]


def parts(directory: Path) -> list[list[list[str]]]:
    """The completed files of the stream, in part order, each as its rows (header first)."""
    return [read(f) for f in sorted(directory.glob("extract_*.csv"), key=lambda f: f.stem.rsplit("_", 1)[1])]


def test_the_files_of_an_activity_continue_across_batches_and_split_at_max_rows(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, max_rows=5))

    for batch in range(4):  # four batches of three rows: 12 rows, so files of 5, 5 and 2
        deliver_batch(provider, [row(batch * 3 + i, "Oslo") for i in range(3)], RetryPolicy())
    completed_before_the_end = len(list(tmp_path.glob("extract_*.csv")))
    provider.end_stream(STREAM)

    files = parts(tmp_path)
    assert completed_before_the_end == 2
    assert [len(f) - 1 for f in files] == [5, 5, 2]
    assert all(f[0] == ["message_id", "name", "city"] for f in files)
    assert [r[0] for f in files for r in f[1:]] == [f"m{i:03d}" for i in range(12)]
    names = sorted(p.name for p in tmp_path.glob("extract_*.csv"))
    assert all(STREAM in name for name in names)
    assert sorted(n.rsplit("_", 1)[1] for n in names) == ["001.csv", "002.csv", "003.csv"]
    assert all(extract_time(p) is not None for p in tmp_path.glob("extract_*.csv"))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == names
    assert list(tmp_path.glob(".*.partial")) == []


def test_two_activities_write_separate_files(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, max_rows=5))
    other = stream_name("prod", "campaigns/mail/runs/r1", "reminder")

    deliver_batch(provider, [row(1, "Oslo"), row(2, "Rome", other), row(3, "Paris")], RetryPolicy())
    provider.end_stream(STREAM)
    provider.end_stream(other)

    by_stream = {
        stream: [r[0] for f in tmp_path.glob(f"extract_*_{stream}_*.csv") for r in read(f)[1:]]
        for stream in (STREAM, other)
    }
    assert by_stream == {STREAM: ["m001", "m003"], other: ["m002"]}


def test_with_a_sort_column_every_file_is_sorted_even_when_its_rows_came_in_several_batches(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, max_rows=4, sort_column="city"))

    deliver_batch(provider, [row(1, "Oslo"), row(2, "Berlin")], RetryPolicy())
    deliver_batch(provider, [row(3, "Paris"), row(4, "Athens"), row(5, "Madrid")], RetryPolicy())
    provider.end_stream(STREAM)

    assert [[r[2] for r in f[1:]] for f in parts(tmp_path)] == [
        ["Athens", "Berlin", "Madrid", "Oslo"],  # Oslo, Berlin, then the sorted second batch's first two
        ["Paris"],
    ]


def test_a_restarted_worker_continues_the_open_file_and_drops_a_half_written_append(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, max_rows=5))
    deliver_batch(provider, [row(1, "Oslo"), row(2, "Rome")], RetryPolicy())
    (partial,) = tmp_path.glob(".*.partial")
    with partial.open("ab") as handle:  # a crash in the middle of the next append
        handle.write(b"m003,Name 3,Pa")

    restarted = DirectMailProvider(ExtractConfig(tmp_path, max_rows=5))
    deliver_batch(restarted, [row(3, "Paris"), row(4, "Oslo")], RetryPolicy())
    restarted.end_stream(STREAM)

    (only,) = parts(tmp_path)
    assert only == [
        ["message_id", "name", "city"],
        *[[f"m{i:03d}", f"Name {i}", c] for i, c in ((1, "Oslo"), (2, "Rome"), (3, "Paris"), (4, "Oslo"))],
    ]


def test_ending_a_stream_with_no_open_file_writes_nothing(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, max_rows=2))
    deliver_batch(provider, [row(1, "Oslo"), row(2, "Rome")], RetryPolicy())  # fills part 1 exactly

    provider.end_stream(STREAM)
    provider.end_stream(STREAM)

    assert [len(f) - 1 for f in parts(tmp_path)] == [2]
