"""Bulk statements on PostgreSQL: a whole batch of rows in one statement with few parameters.

Binding thousands of parameters one by one (a multi-row ``VALUES`` list, or an executemany) cost more
than the rows' own insertion; here each column of a batch travels as one parameter instead:

- :func:`pg_array` — a column's values as one PostgreSQL array: strings joined with U+001F in one
  text parameter and split by ``string_to_array`` in the server (psycopg adapts a list element by
  element), a real array parameter for anything else;
- :func:`pg_rows` — ``SELECT unnest(…), unnest(…), …``: the rows of a batch given column by column,
  a column whose rows all hold the same value bound once, for ``INSERT … SELECT`` (``from_select``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

_SEPARATOR = "\x1f"


def pg_array(values: Sequence[Any], column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """A PostgreSQL array of ``values`` for ``column``: strings joined in one parameter and split in
    the server, or a real array parameter (values not all strings, a string holding the separator,
    or a lone empty string, which the split cannot tell from none)."""
    if all(type(v) is str and _SEPARATOR not in v for v in values) and list(values) != [""]:
        joined = sa.bindparam(None, _SEPARATOR.join(values), type_=sa.Text)
        return sa.func.string_to_array(joined, sa.literal_column("chr(31)"), type_=postgresql.ARRAY(sa.Text))
    return sa.bindparam(None, list(values), type_=postgresql.ARRAY(column.type))


def pg_rows(table: sa.Table, columns: Mapping[str, Sequence[Any]]) -> sa.Select[Any]:
    """``SELECT`` of the rows given column by column (each column's values, one per row, all of the
    same length, at least one row): ``unnest`` of each column's array, in row order, or the value
    itself where every row holds the same one (strings, times, numbers and None compare by value)."""
    names = list(columns)
    selected: list[sa.ColumnElement[Any]] = []
    for name in names:
        values = columns[name]
        first = values[0]
        if list(values).count(first) == len(values):
            selected.append(sa.bindparam(None, first, type_=table.c[name].type).label(name))
        else:
            selected.append(sa.func.unnest(pg_array(values, table.c[name])).label(name))
    if all(not isinstance(column.element, sa.sql.functions.Function) for column in selected):
        # Every column is constant: still one row per input row (unnest the first column).
        selected[0] = sa.func.unnest(pg_array(columns[names[0]], table.c[names[0]])).label(names[0])
    return sa.select(*selected)
