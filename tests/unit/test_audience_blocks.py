"""Reading CSV record blocks: splitting the text into rows and resolving the columns."""

from __future__ import annotations

import pytest

from audience_svc.blocks import layout_of, split_rows
from audience_svc.schema import Attribute, EntitySchema
from carillon_chassis.errors import InvalidArgument

SCHEMA = EntitySchema(
    attributes=(
        Attribute("id", "string"),
        Attribute("version", "integer"),
        Attribute("email", "string"),
        Attribute("age", "integer", nullable=True),
    ),
    primary_key=("id",),
    version_attribute="version",
)


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        ("", []),
        ("a,b\nc,d\n", [["a", "b"], ["c", "d"]]),
        ("a,b\r\nc,d", [["a", "b"], ["c", "d"]]),
        ("a,,\n", [["a", None, None]]),
        ('a,"",""""\n', [["a", "", '"']]),
        ('"x,y","two\nlines",z\n', [["x,y", "two\nlines", "z"]]),
        ('"say ""hi""",b\r\n', [['say "hi"', "b"]]),
        ("\n", [[None]]),
    ],
)
def test_csv_text_splits_into_rows_with_null_for_unquoted_empty_cells(text: str, rows: list[list[str | None]]) -> None:
    assert split_rows(text) == rows


@pytest.mark.parametrize("bad", ['a"b,c', '"ab"c,d', '"open,d'])
def test_a_stray_or_unclosed_quote_makes_its_row_malformed(bad: str) -> None:
    assert split_rows(f"x,y\n{bad}\nz,w\n") == [["x", "y"], None, ["z", "w"]]


def test_the_layout_knows_what_upserts_and_deletes_lack() -> None:
    layout = layout_of(SCHEMA, ["_op", "id", "version"])
    assert (layout.op_index, layout.missing_for_upsert, layout.missing_for_delete) == (0, ("email",), ())


def test_unknown_and_repeated_columns_are_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        layout_of(SCHEMA, ["id", "version", "shoe", "id"])
    assert [v.field for v in caught.value.violations] == ["block.columns[2]", "block.columns[3]"]
