"""Bad (and two good) weekly drops, each made from a clean generated drop by one byte-level edit.

Every case says which checks must fail, exactly: the whole set of failed
check ids a report may contain. Edits name 1-based file lines (the header is
line 1), so tests can assert the line numbers the report gives.

The clean base is the tiny dataset's first drop week (``BASE_WEEK``), which
the history warehouse does not hold yet. ``future_date`` uses the hidden week
after the data, validated on a run date inside that week; ``crlf`` uses the
second drop week so that its acceptance does not load ``BASE_WEEK`` (and
``no_declared_week`` the clean second week, so that no two cases share bytes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

BASE_WEEK = dt.date(2020, 8, 26)  # the first drop week of the tiny dataset (drop_weeks=4)
CRLF_WEEK = dt.date(2020, 9, 2)
HIDDEN_WEEK = dt.date(2020, 9, 23)
# Run date of the corpus batch: inside the hidden week, so its last two days are "the future".
RUN_DATE = dt.date(2020, 9, 27)

UNKNOWN_ARTICLE = "0999999999"
UNKNOWN_CUSTOMER = "f" * 64


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")  # [header, row..., b""] for a file ending with a newline


def _edit_field(data: bytes, line: int, field: int, fn: Callable[[bytes], bytes]) -> bytes:
    """Apply ``fn`` to field ``field`` (0-based) of file line ``line`` (1-based)."""
    lines = _lines(data)
    parts = lines[line - 1].split(b",")
    parts[field] = fn(parts[field])
    lines[line - 1] = b",".join(parts)
    return b"\n".join(lines)


def _every_row(data: bytes, fn: Callable[[list[bytes]], list[bytes]], header: Callable[[list[bytes]], list[bytes]]):
    lines = _lines(data)
    out = [b",".join(header(lines[0].split(b",")))]
    out += [b",".join(fn(ln.split(b","))) if ln else ln for ln in lines[1:]]
    return b"\n".join(out)


def _times_100(p: bytes) -> bytes:
    return f"{float(p) * 100:.14f}".encode()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[bytes], bytes]
    fails: frozenset[str]  # exactly the checks that must fail (empty: the drop must be accepted)
    base: str = "base"  # which clean file it starts from: "base", "crlf_base" or "hidden"
    file_name: str | None = None  # default: transactions_<week>_<case>.csv
    line: int | None = None  # the line the failure must be reported on (first example)


CASES: list[Case] = [
    Case("missing_column", lambda d: _every_row(d, lambda f: f[:3] + f[4:], lambda h: h[:3] + h[4:]),
         frozenset({"columns"})),
    Case("renamed_column", lambda d: d.replace(b"price,", b"prize,", 1), frozenset({"columns"})),
    Case("extra_column", lambda d: _every_row(d, lambda f: [*f, b"1"], lambda h: [*h, b"store_id"]),
         frozenset({"columns"})),
    Case("article_id_lost_leading_zero", lambda d: _edit_field(d, 5, 2, lambda v: v.lstrip(b"0")),
         frozenset({"article_id_format"}), line=5),
    Case("non_hex_customer_id", lambda d: _edit_field(d, 7, 1, lambda v: v[:-1] + b"g"),
         frozenset({"customer_id_format"}), line=7),
    Case("unknown_article_id", lambda d: _edit_field(d, 9, 2, lambda v: UNKNOWN_ARTICLE.encode()),
         frozenset({"article_id_in_articles"}), line=9),
    Case("unknown_customer_id", lambda d: _edit_field(d, 11, 1, lambda v: UNKNOWN_CUSTOMER.encode()),
         frozenset({"customer_id_in_customers"}), line=11),
    Case("negative_price", lambda d: _edit_field(d, 13, 3, lambda v: b"-" + v), frozenset({"price_range"}), line=13),
    Case("price_100x", lambda d: _every_row(d, lambda f: [*f[:3], _times_100(f[3]), *f[4:]], lambda h: h),
         frozenset({"price_range"})),
    Case("sales_channel_3", lambda d: _edit_field(d, 15, 4, lambda v: b"3"), frozenset({"sales_channel_id_set"}),
         line=15),
    Case("date_outside_week", lambda d: _edit_field(d, 17, 0, lambda v: b"2020-09-02"), frozenset({"t_dat_in_week"}),
         line=17),
    Case("future_date", lambda d: d, frozenset({"t_dat_not_future"}), base="hidden"),
    Case("empty_file", lambda d: b"", frozenset({"empty_file"})),
    Case("header_only", lambda d: _lines(d)[0] + b"\n", frozenset({"header_only"})),
    Case("truncated_last_line", lambda d: d[:-20], frozenset({"truncated_last_line"})),
    Case("wrong_delimiter", lambda d: d.replace(b",", b";"), frozenset({"delimiter"}), line=1),
    Case("non_utf8_bytes", lambda d: _edit_field(d, 19, 1, lambda v: b"\xe9" + v[1:]), frozenset({"encoding"}),
         line=19),
    Case("volume_spike_10x", lambda d: _lines(d)[0] + b"\n" + d.split(b"\n", 1)[1] * 10, frozenset({"volume"})),
    Case("no_declared_week", lambda d: d, frozenset({"declared_week"}), base="crlf_base",
         file_name="transactions_latest.csv"),
    Case("crlf_line_endings", lambda d: d.replace(b"\n", b"\r\n"), frozenset(), base="crlf_base"),
]


BY_NAME = {c.name: c for c in CASES}


def file_name(case: Case) -> str:
    if case.file_name:
        return case.file_name
    week = {"base": BASE_WEEK, "crlf_base": CRLF_WEEK, "hidden": HIDDEN_WEEK}[case.base]
    return f"transactions_{week.isoformat()}_{case.name}.csv"
