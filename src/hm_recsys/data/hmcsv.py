"""Byte-exact writers for the three H&M CSV files, and the one reading rule they share.

The real Kaggle files follow a few conventions that a generic CSV writer gets
wrong; this module owns them so the generator (and anyone exporting the
warehouse back to CSV) writes the same bytes:

* ``transactions_train.csv`` and ``customers.csv`` never quote anything (no
  field contains a comma) and the header is bare: ``t_dat,customer_id,...``.
* ``articles.csv`` quotes only fields that contain a comma or a quote
  (``"Children Accessories, Swimwear"``), doubling inner quotes; an empty
  ``detail_desc`` is an empty field.
* Lines end with ``\\n``; the files are UTF-8 without BOM.
* ``price`` is the local price divided by 590, *truncated* (not rounded) to 16
  decimals, trailing zeros dropped: 29.99 -> ``0.0508305084745762``.

Readers (validation, ingestion) accept more than H&M writes: any RFC 4180
file means the same rows. Fields may be quoted (``"0108775015"``, inner
quotes doubled) and ``\\r\\n`` may end lines. Blank lines at the very end of
a file (``\\n`` or ``\\r\\n`` only) are no rows, as in every CSV reader; a blank
line *between* rows is still malformed. ``blank_tail_start`` is that rule,
shared so that validation and ingestion agree on where a file's rows end.

Only pyarrow is imported at module level (it is light and every caller needs
it); pandas is imported inside the article writer.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from hm_recsys.data.schema import ARTICLE_COLUMNS, CUSTOMER_COLUMNS, TRANSACTION_COLUMNS

PRICE_DIVISOR_CENTS = 590 * 100  # price = local cents / 59000
_PRICE_DECIMALS = 16

# No quoting at all, header included: what transactions/customers look like.
_BARE = pacsv.WriteOptions(include_header=True, quoting_style="none", quoting_header="none")
_BARE_NO_HEADER = pacsv.WriteOptions(include_header=False, quoting_style="none", quoting_header="none")


def price_string_from_cents(local_cents: int) -> str:
    """H&M's price text for a local price in cents: ``cents / 59000`` truncated to 16 decimals.

    Exact integer arithmetic, so the text never depends on float rounding.
    ``price_string_from_cents(2999) == "0.0508305084745762"``.
    """
    if local_cents <= 0:
        raise ValueError(f"local price must be positive, got {local_cents} cents")
    scaled = (int(local_cents) * 10**_PRICE_DECIMALS) // PRICE_DIVISOR_CENTS
    whole, frac = divmod(scaled, 10**_PRICE_DECIMALS)
    frac_s = f"{frac:0{_PRICE_DECIMALS}d}".rstrip("0")
    return f"{whole}.{frac_s}" if frac_s else f"{whole}.0"


def format_price(value: float) -> str:
    """Inverse of reading a price as float64: the text H&M wrote, for prices below 0.5.

    A price text has at most 16 decimals; below 0.5 a float64 is within half a
    unit of the 16th decimal of it, so ``%.16f`` recovers the text exactly
    (trailing zeros dropped). Every generated price is below 0.5 (the most
    expensive price point is 249.99 / 590 = 0.4237...).
    """
    s = f"{value:.16f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def blank_tail_start(data: bytes) -> int:
    r"""Offset in ``data`` (the end of a file) where its trailing blank lines begin; ``len(data)`` if none.

    The trailing blank lines are the ``\n`` / ``\r\n`` / ``\r`` bytes after the
    newline that ends the last non-blank line: ``b"a\n\n\r\n"`` -> 2, ``b"a\r\n"``
    -> 3 (its newline belongs to the line), ``b"\n\n"`` -> 0 (nothing but blank
    lines). ``data`` must begin at a line start (or hold a non-blank byte). Scans
    back over the blank tail only, so it is cheap on a whole file's bytes.
    """
    i = len(data)
    while i and data[i - 1] in b"\r\n":
        i -= 1
    if i == len(data) or i == 0:
        return i
    nl = data.find(b"\n", i)
    return len(data) if nl < 0 else nl + 1


def fixed_width_strings(buf: np.ndarray) -> pa.StringArray:
    """A pyarrow string array from a numpy ``S<n>`` array without Python objects.

    ``buf`` is 1-D, dtype ``S<n>`` with every value exactly n bytes (hex ids,
    article ids); far faster than ``pa.array(list_of_str)`` for millions of ids.
    """
    if buf.ndim != 1 or buf.dtype.kind != "S":
        raise TypeError(f"expected a 1-D bytes array, got {buf.dtype} with shape {buf.shape}")
    width = buf.dtype.itemsize
    n = len(buf)
    data = np.ascontiguousarray(buf).view(np.uint8)
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64)
    if offsets[-1] < 2**31:
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data))
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data)).cast(pa.string())


class TransactionsCsvWriter:
    """Streams transaction batches into one H&M-format CSV (header once, no quoting).

    Each batch is a ``pyarrow.Table`` with exactly ``TRANSACTION_COLUMNS``:
    ``t_dat``, ``customer_id``, ``article_id``, ``price`` as strings (already in
    their H&M text form) and ``sales_channel_id`` as an integer. Use as a
    context manager; the file is written to ``<path>.tmp`` and renamed on a
    clean exit, so a crash never leaves a half file under the final name.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._sink = None
        self._writer = None

    def __enter__(self) -> TransactionsCsvWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self._tmp), "wb")
        # The header is written even when no batch ever comes (an empty week).
        self._sink.write(b",".join(c.encode() for c in TRANSACTION_COLUMNS) + b"\n")
        return self

    def write(self, table: pa.Table) -> None:
        if tuple(table.column_names) != TRANSACTION_COLUMNS:
            raise ValueError(f"{self.path.name}: batch columns {table.column_names} != {list(TRANSACTION_COLUMNS)}")
        if table.num_rows:
            pacsv.write_csv(table, self._sink, _BARE_NO_HEADER)
            self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        self._sink.close()
        if exc_type is None:
            self._tmp.replace(self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def write_customers_csv(table: pa.Table, path: Path) -> None:
    """Write customers.csv: columns ``CUSTOMER_COLUMNS``, all strings already formatted, no quoting."""
    if tuple(table.column_names) != CUSTOMER_COLUMNS:
        raise ValueError(f"customers table columns {table.column_names} != {list(CUSTOMER_COLUMNS)}")
    tmp = Path(str(path) + ".tmp")
    pacsv.write_csv(table, str(tmp), _BARE)
    tmp.replace(path)


def write_articles_csv(df, path: Path) -> None:
    """Write articles.csv from a DataFrame with ``ARTICLE_COLUMNS`` (ints as ints, text as str).

    Minimal quoting like the real file; an empty/NA ``detail_desc`` is an empty field.
    """
    if tuple(df.columns) != ARTICLE_COLUMNS:
        raise ValueError(f"articles columns {list(df.columns)} != {list(ARTICLE_COLUMNS)}")
    tmp = Path(str(path) + ".tmp")
    df.to_csv(tmp, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL, na_rep="", encoding="utf-8")
    tmp.replace(path)
