"""Direct-mail extract files: delimiter, header, timestamped names, the row split and the sort column."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from carillon_chassis.errors import InvalidArgument
from delivery_svc.direct_mail import DirectMailProvider, ExtractConfig, OutgoingRow, extract_time
from delivery_svc.providers import RetryPolicy, deliver_batch
from delivery_svc.templates import Template, check_new_template

HEADERS = ("name", "city")


def row(i: int, city: str) -> OutgoingRow:
    return OutgoingRow(f"m{i:03d}", f"addr-{i}", HEADERS, (f"Name {i}", city))


def read(path: Path, delimiter: str = ",") -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle, delimiter=delimiter))


def test_a_batch_is_split_into_files_of_at_most_max_rows_sorted_on_the_sort_column(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, max_rows=2, sort_column="city"))
    cities = ["Oslo", "Berlin", "Paris", "Athens", "Madrid"]

    report = deliver_batch(provider, [row(i, c) for i, c in enumerate(cities)], RetryPolicy())

    files = sorted(tmp_path.glob("extract_*.csv"))
    assert report.sent == [f"m{i:03d}" for i in range(5)]
    assert [len(read(f)) - 1 for f in files] == [2, 2, 1]
    assert all(read(f)[0] == ["message_id", "name", "city"] for f in files)
    assert [r[2] for f in files for r in read(f)[1:]] == sorted(cities)
    assert all(extract_time(f) is not None for f in files)


def test_the_delimiter_and_the_header_line_are_configurable(tmp_path: Path) -> None:
    provider = DirectMailProvider(ExtractConfig(tmp_path, delimiter=";", header=False, extension="txt"))

    deliver_batch(provider, [row(1, "Saint-Étienne; Loire")], RetryPolicy())

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
