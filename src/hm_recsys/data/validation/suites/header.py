"""``<table>.header``, layer 2: the columns are present, named and ordered as in the H&M contract.

A wrong header stops the row checks (no column can be trusted to mean what
its name says); ``column_diff`` says what changed.
"""

from __future__ import annotations

from collections.abc import Sequence

from hm_recsys.data import schema
from hm_recsys.data.validation.suites.build import expect, suite


def header_suite(table: str):
    """``<table>.header``: the file's columns, exactly and in order (run on the header, zero rows)."""
    import great_expectations.expectations as gxe

    return suite(
        f"{table}.header",
        [
            expect(
                "columns",
                "every later check and the warehouse address columns by name and position",
                gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(schema.COLUMNS[table])),
            )
        ],
    )


def column_diff(got: Sequence[str], expected: Sequence[str]) -> str:
    """Say how a header differs from the contract: missing, unexpected, renamed, reordered."""
    got, expected = list(got), list(expected)
    missing = [c for c in expected if c not in got]
    extra = [c for c in got if c not in expected]
    parts = []
    if len(got) == len(expected) and len(missing) == len(extra) and missing:
        pairs = [f"{e!r} -> {g!r}" for g, e in zip(got, expected, strict=True) if g != e and g in extra]
        parts.append(f"renamed: {', '.join(pairs)}")
    else:
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected: {', '.join(extra)}")
    if not missing and not extra:
        parts.append(f"reordered: got {','.join(got)}")
    return f"{'; '.join(parts)} (expected {','.join(expected)})"
