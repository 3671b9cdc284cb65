"""Load the H&M CSVs and weekly drops into the Parquet warehouse.

Two entry points, both safe to rerun and to interrupt:

* ``ingest_history(raw_dir, warehouse_dir)`` reads ``articles.csv``,
  ``customers.csv`` and ``transactions_train.csv`` and (re)places the
  dimension tables and every ``part-history.parquet``.
* ``ingest_drop(csv_path, warehouse_dir)`` adds one weekly drop (a CSV in the
  transactions format) as ``part-drop-<sha12>.parquet`` files, once per
  content hash; the ledger ``_drops.json`` remembers what was ingested.

How the guarantees are kept:

* Streaming: transactions are read block by block (``pyarrow.csv.open_csv``)
  and routed to one temporary Parquet file per H&M week, buffered into large
  row groups; memory is bounded by the buffer (a few million rows), never by
  the file, whatever its order.
* Nothing partial is visible: every file is written under a temporary
  ``.<name>.<token>.tmp`` name in its final folder (``Warehouse`` only sees
  ``part-*.parquet``). When all of them are complete, the list of renames is
  written to ``_commit.json`` (the commit point), applied with ``os.replace``
  and the journal removed. The ledger is the last rename. A crash before the
  journal exists leaves only temporaries (deleted by the next ingest); a crash
  after it is rolled forward by the next ingest, so a commit is all or nothing.
* Exact types: every field is read as raw bytes and converted column-wise
  with strict casts; the first bad value raises ``IngestError`` naming file,
  line (1-based, header = line 1) and field.
* One writer at a time: each ingest holds an ``flock`` on ``_ingest.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import fcntl
import io
import json
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from hm_recsys.data import schema
from hm_recsys.fsutil import file_sha256
from hm_recsys.layout import WarehouseLayout

__all__ = [
    "ENTRY_KINDS",
    "IngestError",
    "drop_source",
    "export_csv",
    "entry_kind",
    "file_sha256",
    "ingest_drop",
    "ingest_history",
    "main",
    "process_incoming",
    "read_ledger",
    "refusal_reason",
    "warehouse_schema",
]

HISTORY_SOURCE = "history"
_COMPRESSION = "zstd"
_EPOCH = dt.date(1970, 1, 1)
_READ_BLOCK_BYTES = 16 << 20  # one CSV block ~ 150k transaction rows
_ROW_GROUP_ROWS = 1 << 20  # one real H&M week (~300k rows) fits in one row group
_BUFFER_ROWS = 1 << 22  # rows held across all weeks before spilling (~350 MB)


class IngestError(ValueError):
    """A CSV that cannot be ingested as written.

    ``path``, ``line`` (1-based; the header is line 1) and ``field`` (column
    name, ``None`` when the whole line is wrong) say where; the message also
    quotes the offending value.
    """

    def __init__(self, path: Path | str, line: int, field: str | None, reason: str, value: str | None = None):
        self.path, self.line, self.field, self.reason, self.value = Path(path), line, field, reason, value
        where = f"{path}: line {line}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {reason}" + (f" (got {value!r})" if value is not None else ""))

    def __reduce__(self):  # picklable across processes (Airflow, multiprocessing)
        return (type(self), (self.path, self.line, self.field, self.reason, self.value))


# --------------------------------------------------------------------------
# Column kinds: how each CSV field is converted and stored.
# --------------------------------------------------------------------------
_ARROW_TYPE = {
    "date": pa.date32(),
    "id": pa.string(),
    "article_id": pa.string(),
    "price": pa.float64(),
    "int8": pa.int8(),
    "int32": pa.int32(),
    "flag": pa.float32(),
    "age": pa.uint8(),
    "str": pa.string(),
    "category": pa.string(),
    "text": pa.string(),
}

_ARTICLE_CODE_COLUMNS = ("product_code", "colour_group_code")  # zero-padded codes, kept as written

_KINDS: dict[str, dict[str, str]] = {
    "transactions": {
        "t_dat": "date",
        "customer_id": "id",
        "article_id": "article_id",
        "price": "price",
        "sales_channel_id": "int8",
    },
    "customers": {
        "customer_id": "id",
        "FN": "flag",
        "Active": "flag",
        "club_member_status": "str",
        "fashion_news_frequency": "str",
        "age": "age",
        "postal_code": "str",
    },
    "articles": {
        c: (
            "article_id"
            if c == "article_id"
            else "int32"
            if c in schema.ARTICLE_INT_COLUMNS
            else "str"
            if c in _ARTICLE_CODE_COLUMNS
            else "text"
            if c == "detail_desc"
            else "category"
        )
        for c in schema.ARTICLE_COLUMNS
    },
}
# Stored as dictionary<string>: heavily repeated values (pandas reads them as category).
_DICTIONARY_COLUMNS: dict[str, frozenset[str]] = {
    "transactions": frozenset({"customer_id", "article_id"}),
    "customers": frozenset(),
    "articles": frozenset(c for c, k in _KINDS["articles"].items() if k == "category"),
}
# Only articles has free text; quoted newlines there are legal. Elsewhere a
# newline always ends a row, which keeps parsing parallel and line numbers cheap.
_NEWLINES_IN_VALUES = {"transactions": False, "customers": False, "articles": True}


def warehouse_schema(table: str) -> pa.Schema:
    """The Arrow schema of a warehouse table as stored in Parquet (see ``warehouse`` module doc)."""
    fields = []
    for name, kind in _KINDS[table].items():
        typ = _ARROW_TYPE[kind]
        if name in _DICTIONARY_COLUMNS[table]:
            typ = pa.dictionary(pa.int32(), typ)
        fields.append(pa.field(name, typ))
    return pa.schema(fields)


def _buffer_schema(table: str) -> pa.Schema:
    """Like ``warehouse_schema`` but with plain strings: dictionaries are built per written row group."""
    return pa.schema([pa.field(n, _ARROW_TYPE[k]) for n, k in _KINDS[table].items()])


def _finalize(tbl: pa.Table, table: str) -> pa.Table:
    """Dictionary-encode the dictionary columns of a converted table (one dictionary per call)."""
    target = warehouse_schema(table)
    cols = []
    for f in target:
        col = tbl.column(f.name)
        if pa.types.is_dictionary(f.type):
            col = pc.dictionary_encode(col.combine_chunks()) if len(col) else pa.array([], f.type)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=target)


# --------------------------------------------------------------------------
# Conversion: raw bytes -> typed arrays, locating the first bad value.
# --------------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


def _first_false(mask: pa.Array) -> int | None:
    mask = pc.fill_null(mask, False)
    idx = pc.index(mask, False).as_py()
    return None if idx < 0 else idx


def _cast(arr: pa.Array, typ: pa.DataType, reason: str) -> pa.Array:
    """Strict cast; on failure, bisect to the first value that does not cast (error path only)."""
    try:
        return arr.cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    lo, hi = 0, len(arr)  # the first failure lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            arr.slice(lo, mid - lo).cast(typ)
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    raise _Bad(lo, reason)


def _check(arr: pa.Array, mask: pa.Array, reason: str) -> None:
    bad = _first_false(mask)
    if bad is not None:
        raise _Bad(bad, reason)


def _empty_to_null(s: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)


def _convert_column(s: pa.Array, kind: str) -> pa.Array:
    """``s``: one column as UTF-8 strings exactly as written. Returns the stored type."""
    if kind in ("str", "category"):
        return s
    if kind == "text":
        return _empty_to_null(s)
    if kind == "id":
        _check(s, pc.greater(pc.utf8_length(s), 0), "empty value")
        return s
    if kind == "article_id":
        _check(s, pc.match_substring_regex(s, schema.ARTICLE_ID_LOOSE.pattern), "article_id must be 9 or 10 digits")
        return pc.utf8_lpad(s, width=10, padding="0")
    if kind == "date":
        return _cast(s, pa.date32(), "not a valid date in YYYY-MM-DD form")
    if kind == "price":
        v = _cast(s, pa.float64(), "not a decimal number")
        _check(v, pc.is_finite(v), "not a finite number")
        return v
    if kind == "int8":
        return _cast(s, pa.int8(), "not an integer in -128..127")
    if kind == "int32":
        return _cast(s, pa.int32(), "not a 32-bit integer")
    if kind == "flag":
        return _cast(_empty_to_null(s), pa.float32(), "not a number or empty")
    if kind == "age":
        # "49.0" appears in re-exports where pandas turned the column into floats.
        whole = pc.replace_substring_regex(_empty_to_null(s), pattern=r"^([0-9]+)\.0+$", replacement=r"\1")
        return _cast(whole, pa.uint8(), "not a whole number in 0..255 or empty")
    raise AssertionError(f"unknown column kind {kind!r}")


def _convert_batch(batch: pa.RecordBatch, path: Path, table: str, first_line: int) -> tuple[pa.Table, int]:
    """Convert one block of raw rows. Returns (table in the buffer schema, physical lines consumed).

    ``first_line`` is the file line of the batch's first row; embedded
    newlines (articles only) shift the following rows' lines.
    """
    n = batch.num_rows
    embedded = None
    if _NEWLINES_IN_VALUES[table] and n:
        counts = sum(pc.count_substring(batch.column(i), "\n").to_numpy() for i in range(batch.num_columns))
        embedded = np.concatenate([[0], np.cumsum(counts)])  # newlines before row i
    errors: list[tuple[int, int, str, str]] = []  # (row, column position, field, reason)
    arrays = []
    for pos, (name, kind) in enumerate(_KINDS[table].items()):
        raw = batch.column(name)
        try:
            s = _cast(raw, pa.string(), "not valid UTF-8")
            arrays.append(_convert_column(s, kind))
        except _Bad as bad:
            errors.append((bad.index, pos, name, bad.reason))
    if errors:
        # Report the earliest bad line in the file, whichever column it is in.
        row, _, name, reason = min(errors)
        value = batch.column(name)[row].as_py().decode("utf-8", errors="backslashreplace")
        line = first_line + row + (int(embedded[row]) if embedded is not None else 0)
        if not any(batch.column(i)[row].as_py() for i in range(batch.num_columns)):
            # pyarrow reads a blank line as a row of empty fields
            raise IngestError(path, line, None, "empty line (no values)")
        raise IngestError(path, line, name, reason, value)
    lines = n + (int(embedded[-1]) if embedded is not None else 0)
    return pa.Table.from_arrays(arrays, schema=_buffer_schema(table)), lines


# --------------------------------------------------------------------------
# Reading a CSV: header check, streaming blocks, precise parse errors.
# --------------------------------------------------------------------------
def _check_header(path: Path, table: str) -> int:
    """Check line 1 is exactly the H&M header of ``table``; returns its length in bytes."""
    expected = list(schema.COLUMNS[table])
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    if not first:
        raise IngestError(path, 1, None, f"empty file; expected the header {','.join(expected)}")
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IngestError(path, 1, None, "header is not valid UTF-8") from None
    got = next(csv.reader([text.rstrip("\r\n")]), [])
    if got != expected:
        for i, (g, e) in enumerate(zip(got, expected, strict=False)):
            if g != e:
                raise IngestError(path, 1, e, f"header column {i + 1} should be {e!r}", g)
        reason = f"header has {len(got)} columns, expected {len(expected)}: {','.join(expected)}"
        raise IngestError(path, 1, None, reason, text.strip())
    return len(first)


def _content_end(path: Path) -> int:
    """The size of ``path`` without the blank lines that end it (``hmcsv.blank_tail_start``); reads its tail only."""
    from hm_recsys.data.hmcsv import blank_tail_start

    size = path.stat().st_size
    span = 1 << 16
    with open(path, "rb") as f:
        while True:
            start = max(0, size - span)
            f.seek(start)
            tail = f.read(size - start)
            # The tail must reach back to a non-blank byte, or its first newline may not end a row.
            if start == 0 or tail.strip(b"\r\n"):
                return start + blank_tail_start(tail)
            span *= 16


def _skip_lines(f, count: int) -> None:
    """Position binary file ``f`` at the start of line ``count + 1`` (counting is fast; parsing is not)."""
    f.seek(0)
    offset = 0
    while count > 0:
        chunk = f.read(16 << 20)
        if not chunk:
            return
        k = chunk.count(b"\n")
        if k < count:
            count -= k
            offset += len(chunk)
            continue
        pos = -1
        for _ in range(count):
            pos = chunk.index(b"\n", pos + 1)
        f.seek(offset + pos + 1)
        return


def _locate_bad_row(path: Path, table: str, good_lines: int) -> tuple[int, int] | None:
    """(line, field count) of the first record after ``good_lines`` lines whose field count is wrong.

    Runs only after pyarrow rejected a block, scanning with the same newline
    rules the parser used, from the end of the last good block. A field count
    of -1: a lone ``\\r`` inside the line (pyarrow ends a row there).
    """
    ncols = len(schema.COLUMNS[table])
    with open(path, "rb") as f:
        if _NEWLINES_IN_VALUES[table]:
            # Quoted newlines: scan records from the top with the csv module (small files only).
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
            reader = csv.reader(text)
            next(reader, None)
            start = reader.line_num + 1
            for rec in reader:
                if len(rec) != ncols:
                    return start, len(rec)
                start = reader.line_num + 1
            return None
        _skip_lines(f, good_lines)
        line = good_lines
        for raw in f:
            line += 1
            text = raw.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")
            if "\r" in text:
                return line, -1
            rec = next(csv.reader([text]), [])
            if len(rec) != ncols:
                return line, len(rec)
    return None


def _parse_error(path: Path, table: str, good_lines: int, invalid: list, exc: Exception) -> IngestError:
    columns = schema.COLUMNS[table]
    found = _locate_bad_row(path, table, good_lines) if invalid else None
    if found is None:
        return IngestError(path, good_lines + 1, None, f"cannot parse CSV at or after this line: {exc}")
    line, got = found
    if got < 0:
        return IngestError(path, line, None, "a carriage return (\\r) inside the line splits it in two")
    if got == 0:
        return IngestError(path, line, None, f"empty line; expected {len(columns)} fields")
    if got < len(columns):
        return IngestError(path, line, columns[got], f"missing field: {got} fields, expected {len(columns)}")
    return IngestError(path, line, None, f"{got} fields, expected {len(columns)}")


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _read_table_csv(path: Path, table: str, progress: bool) -> Iterator[pa.Table]:
    """Yield the converted rows of one H&M CSV, block by block, in file order.

    Raises ``IngestError`` on a wrong header, a line with the wrong number of
    fields, or a value that does not convert.
    """
    path = Path(path)
    header_bytes = _check_header(path, table)
    invalid: list = []

    def on_invalid(row) -> str:
        invalid.append(row)  # pyarrow gives no line number: _locate_bad_row finds it
        return "error"

    # pyarrow needs the header inside the first block.
    read = pcsv.ReadOptions(block_size=max(_READ_BLOCK_BYTES, 2 * header_bytes), use_threads=True)
    parse = pcsv.ParseOptions(
        newlines_in_values=_NEWLINES_IN_VALUES[table],
        # A blank line between rows is malformed, and skipping it would shift line numbers; blank lines
        # that end the file are no rows (hmcsv.blank_tail_start): the reader stops before them.
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid,
    )
    # Raw bytes in, so nothing is reinterpreted (no NA strings, no UTF-8 failure without a line).
    convert = pcsv.ConvertOptions(column_types={c: pa.binary() for c in schema.COLUMNS[table]})
    good_lines = 1  # the header
    size = _content_end(path)
    # Only a file with a blank tail is mapped: its first `size` bytes are read in place, without a copy.
    source = str(path) if size == path.stat().st_size else pa.BufferReader(pa.memory_map(str(path)).read_buffer(size))
    with _progress(size, path.name, progress) as bar:
        try:
            reader = pcsv.open_csv(source, read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as exc:
            raise _parse_error(path, table, good_lines, invalid, exc) from None
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raise _parse_error(path, table, good_lines, invalid, exc) from None
            converted, lines = _convert_batch(batch, path, table, good_lines + 1)
            good_lines += lines
            # Bytes consumed ~ value bytes + one separator per field (quotes and CRs aside).
            consumed = batch.num_rows * batch.num_columns + sum(
                pc.sum(pc.binary_length(batch.column(i))).as_py() or 0 for i in range(batch.num_columns)
            )
            bar.update(min(consumed, size - bar.n))
            yield converted


# --------------------------------------------------------------------------
# Files: temporaries, fsync, the commit journal, the lock.
# --------------------------------------------------------------------------
def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _tmp(final: Path, token: str) -> Path:
    """The temporary sibling of ``final``: hidden and ``.tmp``, so no reader (nor pyarrow.dataset) sees it."""
    return final.with_name(f".{final.name}.{token}.tmp")


def _is_tmp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        _fsync_file(path)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _apply(root: Path, ops: list[list[str]]) -> None:
    """Apply journal operations. Each is idempotent, so replaying a half-applied journal is safe."""
    dirs = set()
    for op in ops:
        if op[0] == "replace":  # file: temp -> final
            src, dst = root / op[1], root / op[2]
            if src.exists():
                os.replace(src, dst)
            dirs.add(dst.parent)
        elif op[0] == "replace_dir":  # folder: a directory cannot be os.replace'd onto a non-empty one
            src, dst = root / op[1], root / op[2]
            if src.exists():
                if dst.exists():
                    _remove(dst)
                os.replace(src, dst)
            dirs.add(dst.parent)
        elif op[0] == "delete":
            target = root / op[1]
            if target.exists() or target.is_symlink():
                _remove(target)
            dirs.add(target.parent)
        else:
            raise ValueError(f"unknown journal operation {op!r}")
    for d in dirs:
        if d.exists():
            _fsync_dir(d)


def _commit(paths: WarehouseLayout, ops: list[tuple], token: str) -> None:
    """Make a set of complete temporaries visible all together (see module doc)."""
    root = paths.root
    rel = [[op[0], *(str(Path(p).relative_to(root)) for p in op[1:])] for op in ops]
    tmp = _tmp(paths.commit_journal, token)
    _write_json(tmp, {"version": 1, "ops": rel})
    os.replace(tmp, paths.commit_journal)  # the commit point
    _fsync_dir(root)
    _apply(root, rel)
    paths.commit_journal.unlink()
    _fsync_dir(root)


def _recover(paths: WarehouseLayout) -> None:
    """Finish a commit interrupted by a crash, then delete leftover temporaries. Caller holds the lock."""
    if paths.commit_journal.exists():
        journal = json.loads(paths.commit_journal.read_text(encoding="utf-8"))
        _apply(paths.root, journal["ops"])
        paths.commit_journal.unlink()
    _remove_temps(paths, token=None)


def _remove_temps(paths: WarehouseLayout, token: str | None) -> None:
    """Delete temporaries (all of them, or one ingest's) and week folders left empty."""
    root = paths.root
    folders = [root]
    tdir = paths.transactions_dir
    if tdir.is_dir():
        folders.append(tdir)
        folders.extend(d for d in tdir.iterdir() if d.is_dir())
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _is_tmp(p) and (token is None or p.name.endswith(f".{token}.tmp")):
                _remove(p)
    if tdir.is_dir():
        for d in tdir.iterdir():
            if d.is_dir() and d.name.startswith("week=") and not any(d.iterdir()):
                d.rmdir()


@contextlib.contextmanager
def _locked(paths: WarehouseLayout):
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another ingest runs
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# Transactions: route rows to per-week temporary Parquet files.
# --------------------------------------------------------------------------
class _WeekSpiller:
    """Writes one source's transactions into ``.part-<source>.parquet.<token>.tmp`` per H&M week.

    Rows are buffered per week and written as row groups of up to
    ``row_group_rows``; when all buffers together exceed ``buffer_rows`` the
    fullest week is spilled, so memory stays bounded whatever the row order.
    Row order within a week is the file order.
    """

    def __init__(self, paths: WarehouseLayout, source: str, token: str,
                 row_group_rows: int | None = None, buffer_rows: int | None = None):
        self.paths, self.source, self.token = paths, source, token
        # Module constants read here, not at definition time, so tests can shrink them.
        self.row_group_rows = row_group_rows or _ROW_GROUP_ROWS
        self.buffer_rows = buffer_rows or _BUFFER_ROWS
        self.buffers: dict[int, list[pa.Table]] = {}
        self.buffered: dict[int, int] = {}
        self.total_buffered = 0
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.rows: dict[int, int] = {}
        self.schema = warehouse_schema("transactions")

    def add(self, tbl: pa.Table) -> None:
        if tbl.num_rows == 0:
            return
        days = pc.cast(tbl.column("t_dat"), pa.int32()).to_numpy()
        # Day 0 (1970-01-01) is a Thursday, so (days + 1) % 7 is the distance back to Wednesday.
        weeks = days - (days + 1) % 7
        if (weeks == weeks[0]).all():
            self._push(int(weeks[0]), tbl)
            return
        order = np.argsort(weeks, kind="stable")  # stable: file order is kept within a week
        cuts = np.flatnonzero(np.diff(weeks[order])) + 1
        for idx in np.split(order, cuts):
            self._push(int(weeks[idx[0]]), tbl.take(pa.array(idx)))

    def _push(self, week: int, tbl: pa.Table) -> None:
        self.buffers.setdefault(week, []).append(tbl)
        self.buffered[week] = self.buffered.get(week, 0) + tbl.num_rows
        self.total_buffered += tbl.num_rows
        if self.buffered[week] >= self.row_group_rows:
            self._flush(week)
        while self.total_buffered > self.buffer_rows:
            self._flush(max(self.buffered, key=self.buffered.__getitem__))

    def _flush(self, week: int) -> None:
        tbl = pa.concat_tables(self.buffers.pop(week))
        self.total_buffered -= self.buffered.pop(week)
        writer = self.writers.get(week)
        if writer is None:
            final = self.paths.week_part(self._date(week), self.source)
            final.parent.mkdir(parents=True, exist_ok=True)
            writer = pq.ParquetWriter(_tmp(final, self.token), self.schema, compression=_COMPRESSION)
            self.writers[week] = writer
        writer.write_table(_finalize(tbl, "transactions"), row_group_size=max(tbl.num_rows, 1))
        self.rows[week] = self.rows.get(week, 0) + tbl.num_rows

    @staticmethod
    def _date(week: int) -> dt.date:
        return _EPOCH + dt.timedelta(days=week)

    def finish(self) -> dict[dt.date, tuple[Path, Path, int]]:
        """Flush, close and fsync every week file. Returns ``{week: (temp path, final path, rows)}``."""
        for week in list(self.buffers):
            self._flush(week)
        out = {}
        for week, writer in sorted(self.writers.items()):
            writer.close()
            final = self.paths.week_part(self._date(week), self.source)
            tmp = _tmp(final, self.token)
            _fsync_file(tmp)
            out[self._date(week)] = (tmp, final, self.rows[week])
        self.writers.clear()
        return out

    def abort(self) -> None:
        for writer in self.writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        self.writers.clear()


def _spill_transactions(path: Path, paths: WarehouseLayout, source: str, token: str, progress: bool):
    spiller = _WeekSpiller(paths, source, token)
    try:
        for tbl in _read_table_csv(path, "transactions", progress):
            spiller.add(tbl)
        return spiller.finish()
    finally:
        spiller.abort()  # closes writers left open by an error; a no-op after finish()


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def ingest_history(raw_dir: Path, warehouse_dir: Path, progress: bool = True) -> dict:
    """Ingest ``articles.csv``, ``customers.csv`` and ``transactions_train.csv`` from ``raw_dir``.

    Replaces the dimension tables, every ``part-history.parquet`` (history
    weeks that disappeared are removed) and ``oracle/`` (copied from
    ``raw_dir/oracle/`` if present, removed otherwise) in one commit. Drop
    parts are left alone.

    Returns ``{"rows": {"articles": int, "customers": int, "transactions": int},
    "weeks": [ISO Wednesday, ...], "first_date": ISO, "last_date": ISO,
    "oracle": bool, "warehouse": str, "seconds": float}``.
    Raises ``FileNotFoundError`` if a CSV is missing, ``IngestError`` if one is malformed
    (the warehouse is then unchanged).
    """
    t0 = time.perf_counter()
    raw_dir = Path(raw_dir)
    paths = WarehouseLayout(Path(warehouse_dir))
    files = {t: raw_dir / schema.FILES[t] for t in ("articles", "customers", "transactions")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing H&M CSV(s): {', '.join(missing)}")
    with _locked(paths):
        _recover(paths)
        token = _token()
        ops: list[tuple] = []
        rows: dict[str, int] = {}
        try:
            for table, final in (("articles", paths.articles), ("customers", paths.customers)):
                parts = list(_read_table_csv(files[table], table, progress))
                tbl = pa.concat_tables(parts) if parts else _buffer_schema(table).empty_table()
                tmp = _tmp(final, token)
                pq.write_table(_finalize(tbl, table), tmp, compression=_COMPRESSION)
                _fsync_file(tmp)
                ops.append(("replace", tmp, final))
                rows[table] = tbl.num_rows
                del parts, tbl
            written = _spill_transactions(files["transactions"], paths, HISTORY_SOURCE, token, progress)
            ops.extend(("replace", tmp, final) for tmp, final, _ in written.values())
            rows["transactions"] = sum(n for _, _, n in written.values())
            if paths.transactions_dir.is_dir():
                for d in sorted(paths.transactions_dir.glob("week=*")):
                    stale = d / paths.week_part(_EPOCH, HISTORY_SOURCE).name
                    if stale.exists() and dt.date.fromisoformat(d.name.removeprefix("week=")) not in written:
                        ops.append(("delete", stale))
            oracle_src = raw_dir / "oracle"
            if oracle_src.is_dir():
                tmp_dir = _tmp(paths.oracle_dir, token)
                shutil.copytree(oracle_src, tmp_dir)
                ops.append(("replace_dir", tmp_dir, paths.oracle_dir))
            elif paths.oracle_dir.exists():
                ops.append(("delete", paths.oracle_dir))  # an oracle describes the data it came with only
        except BaseException:
            _remove_temps(paths, token)
            raise
        _commit(paths, ops, token)
    weeks = sorted(written)
    dates = _date_range(paths, weeks)
    return {
        "rows": rows,
        "weeks": [w.isoformat() for w in weeks],
        "first_date": dates[0],
        "last_date": dates[1],
        "oracle": oracle_src.is_dir(),
        "warehouse": str(paths.root),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _date_range(paths: WarehouseLayout, weeks: list[dt.date]) -> tuple[str | None, str | None]:
    if not weeks:
        return None, None
    first = pq.read_table(paths.week_part(weeks[0], HISTORY_SOURCE), columns=["t_dat"])["t_dat"]
    last = pq.read_table(paths.week_part(weeks[-1], HISTORY_SOURCE), columns=["t_dat"])["t_dat"]
    return pc.min(first).as_py().isoformat(), pc.max(last).as_py().isoformat()


def drop_source(sha256: str) -> str:
    """The source name of a drop's part files: ``part-<drop_source(sha)>.parquet`` (see ``WarehouseLayout.week_part``)."""
    return f"drop-{sha256[:12]}"


def read_ledger(warehouse_dir: Path) -> dict[str, dict]:
    """The drops ledger: ``{sha256: {"source", "rows", "weeks", "parts", "ingested_at"}}`` in ingestion order."""
    ledger = WarehouseLayout(Path(warehouse_dir)).drops_ledger
    if not ledger.exists():
        return {}
    return json.loads(ledger.read_text(encoding="utf-8"))


def ingest_drop(csv_path: Path, warehouse_dir: Path, progress: bool = False) -> dict:
    """Ingest one weekly transactions drop (H&M transactions format) as its own part files.

    Idempotent by sha256 of the file bytes: a file already in the ledger
    changes nothing and reports ``"duplicate"``. Rows of each H&M week go to
    ``transactions/week=<Wednesday>/part-drop-<sha12>.parquet``; the parts
    and the ledger entry become visible in one commit.

    Returns ``{"status": "ingested" | "duplicate", "sha256": str, "rows": int,
    "weeks": [ISO Wednesday, ...], "parts": [absolute path, ...]}``.
    Raises ``IngestError`` if the file is malformed (nothing is written).
    """
    csv_path = Path(csv_path)
    paths = WarehouseLayout(Path(warehouse_dir))
    sha = file_sha256(csv_path)
    with _locked(paths):
        _recover(paths)
        ledger = read_ledger(paths.root)
        if sha in ledger:
            entry = ledger[sha]
            return {
                "status": "duplicate",
                "sha256": sha,
                "rows": entry["rows"],
                "weeks": list(entry["weeks"]),
                "parts": [str(paths.root / p) for p in entry["parts"]],
            }
        clash = [k for k in ledger if k[:12] == sha[:12]]
        if clash:  # 48-bit prefix collision: never silently overwrite another drop's parts
            raise RuntimeError(f"{csv_path}: sha256 prefix {sha[:12]} already used by drop {clash[0]}")
        token = _token()
        try:
            written = _spill_transactions(csv_path, paths, drop_source(sha), token, progress)
            entry = {
                "source": csv_path.name,
                "rows": sum(n for _, _, n in written.values()),
                "weeks": [w.isoformat() for w in sorted(written)],
                "parts": [str(final.relative_to(paths.root)) for _, final, _ in written.values()],
                "ingested_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            ledger_tmp = _tmp(paths.drops_ledger, token)
            _write_json(ledger_tmp, {**ledger, sha: entry})
            ops = [("replace", tmp, final) for tmp, final, _ in written.values()]
            ops.append(("replace", ledger_tmp, paths.drops_ledger))  # the ledger moves last
        except BaseException:
            _remove_temps(paths, token)
            raise
        _commit(paths, ops, token)
    return {
        "status": "ingested",
        "sha256": sha,
        "rows": entry["rows"],
        "weeks": entry["weeks"],
        "parts": [str(paths.root / p) for p in entry["parts"]],
    }


# The kinds of incoming entries that are not regular files (``entry_kind``), in words.
ENTRY_KINDS = {
    "symlink": "a symbolic link",
    "directory": "a directory",
    "fifo": "a FIFO (named pipe)",
    "socket": "a socket",
    "char_device": "a character device",
    "block_device": "a block device",
    "other": "a special file",
}


def entry_kind(path: Path) -> str:
    """``"file"`` for a regular file, else a key of ``ENTRY_KINDS`` (``"symlink"``, ``"fifo"``, ...).

    Looks at the entry itself (``os.lstat``): a link is never followed and
    nothing is opened, so neither can a FIFO block nor a link make the caller
    read what it points to. Raises ``FileNotFoundError`` if the entry is gone.
    """
    mode = os.lstat(path).st_mode
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char_device"),
                       (stat.S_ISBLK, "block_device")):
        if test(mode):
            return kind
    return "other"


def refusal_reason(path: Path, kind: str) -> str:
    """Why the entry ``path`` of kind ``kind`` (not ``"file"``) is no drop, naming it: one sentence."""
    what = ENTRY_KINDS[kind]
    if kind == "symlink":
        with contextlib.suppress(OSError):  # the link's own text, never its target's bytes
            what += f" to {os.readlink(path)!r}"
    return f"{Path(path).name} is {what}, not a regular file; it was neither opened nor followed"


def process_incoming(
    incoming_dir: Path,
    warehouse_dir: Path,
    processed_dir: Path | None = None,
    accept: Callable[[Path], bool] | None = None,
    progress: bool = False,
    refuse: Callable[[Path, str, str], None] | None = None,
) -> list[dict]:
    """Ingest every ``*.csv`` in ``incoming_dir``, oldest first (mtime, then name).

    ``accept(path) -> bool`` runs before each file is ingested (the
    validation hook). ``False`` marks the file ``"rejected"``: it is not
    ingested, and the hook is responsible for moving it (to quarantine);
    otherwise it stays in ``incoming_dir``. Accepted files are ingested with
    ``ingest_drop`` and moved to ``processed_dir`` (default: the runtime
    layout's ``data/processed``), renamed ``<stem>-<sha12>.csv`` if a different
    file of that name is already there.

    Only regular files are drops. Any other entry named ``*.csv`` (a symbolic
    link, even to a regular file; a FIFO, socket, device or directory) is
    ``"refused"`` without being opened or followed (``entry_kind``, checked
    just before the entry's turn): ``refuse(path, kind, reason)`` runs (the hook
    may move it away), otherwise it stays in ``incoming_dir``.

    Returns one dict per entry: ``{"file": str, "status": "ingested" | "duplicate" | "rejected" | "refused",
    ...}`` with ``ingest_drop``'s fields and ``"moved_to"`` for accepted files, ``"kind"`` and ``"reason"``
    for refused entries. Raises ``IngestError`` on the first malformed file (it stays in place; files after
    it wait).
    """
    incoming_dir = Path(incoming_dir)
    if not incoming_dir.is_dir():
        raise FileNotFoundError(f"incoming folder {incoming_dir} does not exist")
    if processed_dir is None:
        from hm_recsys.config import Settings

        processed_dir = Settings.from_env().layout.processed_dir
    processed_dir = Path(processed_dir)
    entries = []
    for p in incoming_dir.glob("*.csv"):
        with contextlib.suppress(FileNotFoundError):  # gone since the listing: nothing to take in
            entries.append((p.lstat().st_mtime_ns, p.name, p))  # lstat: a link's own time, never its target's
    results = []
    for _, _, f in sorted(entries):
        try:
            # Looked at again now: validating the drops before it may have taken minutes.
            kind = entry_kind(f)
        except FileNotFoundError:
            continue
        if kind != "file":
            reason = refusal_reason(f, kind)
            results.append({"file": str(f), "status": "refused", "kind": kind, "reason": reason})
            if refuse is not None:
                refuse(f, kind, reason)
            continue
        if accept is not None and not accept(f):
            results.append({"file": str(f), "status": "rejected"})
            continue
        report = ingest_drop(f, warehouse_dir, progress=progress)
        dest = _move_to_processed(f, processed_dir, report["sha256"])
        results.append({"file": str(f), **report, "moved_to": str(dest)})
    return results


def _move_to_processed(src: Path, processed_dir: Path, sha: str) -> Path:
    processed_dir.mkdir(parents=True, exist_ok=True)
    dest = processed_dir / src.name
    if dest.exists():
        if file_sha256(dest) == sha:  # the same bytes were processed before (a re-sent drop)
            src.unlink()
            return dest
        dest = processed_dir / f"{src.stem}-{sha[:12]}{src.suffix}"
    shutil.move(src, dest)
    return dest


# --------------------------------------------------------------------------
# Export: the warehouse back to H&M CSV text (the inverse of ingestion).
# --------------------------------------------------------------------------
def _formatter(kind: str) -> Callable[[object], str]:
    if kind == "date":
        return lambda v: v.isoformat()
    if kind == "price":
        from hm_recsys.data.hmcsv import format_price

        # H&M's text has 16 decimals: recovered exactly below 0.5 (see format_price); from 0.5 up
        # two texts can share one float64, so the 16th decimal may differ there.
        return format_price
    if kind == "flag":
        return lambda v: "" if v is None else str(np.float32(v))  # float32 1.0 -> "1.0"
    if kind in ("int8", "int32", "age"):
        return lambda v: "" if v is None else str(v)
    return lambda v: "" if v is None else v


def export_csv(table: str, warehouse_dir: Path, out_path: Path) -> int:
    """Write one warehouse table as H&M CSV text (``\\n`` line ends, minimal quoting); returns rows written.

    ``table`` is ``"transactions"``, ``"customers"`` or ``"articles"``.
    Transactions come week by week; within a week the history part first,
    then drops in ledger order, each in its original row order: for a
    date-sorted input with 10-digit article ids, the output is byte-identical
    to the ingested file. Memory is bounded by one row group.
    """
    if table not in _KINDS:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(_KINDS)}")
    paths = WarehouseLayout(Path(warehouse_dir))
    if table == "transactions":
        from hm_recsys.data.warehouse import Warehouse

        wh = Warehouse(paths.root)
        order = [HISTORY_SOURCE] + [drop_source(sha) for sha in read_ledger(paths.root)]
        files = [paths.week_part(w, s) for w in wh.weeks() for s in order if paths.week_part(w, s).exists()]
    else:
        files = [paths.articles if table == "articles" else paths.customers]
    kinds = _KINDS[table]
    fmts = [_formatter(k) for k in kinds.values()]
    n = 0
    with open(out_path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(list(kinds))
        for file in files:
            pf = pq.ParquetFile(file)
            for batch in pf.iter_batches(columns=list(kinds)):
                cols = [[fmt(v) for v in batch.column(i).to_pylist()] for i, fmt in enumerate(fmts)]
                w.writerows(zip(*cols, strict=True))
                n += batch.num_rows
    return n


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
_DEFAULT = "\0default"  # a bare --raw / --incoming: use the runtime layout's folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hm-recsys ingest",
        description="Load H&M CSVs (history) or weekly transaction drops into the Parquet warehouse. "
        "Prints a JSON report on stdout.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--raw", nargs="?", const=_DEFAULT, metavar="DIR",
                      help="ingest articles/customers/transactions_train.csv from DIR "
                      "(default: $HM_RECSYS_HOME/data/raw); replaces the history")
    what.add_argument("--drop", metavar="FILE",
                      help="ingest one weekly drop (transactions format), once per content hash")
    what.add_argument("--incoming", nargs="?", const=_DEFAULT, metavar="DIR",
                      help="ingest every *.csv in DIR (default: $HM_RECSYS_HOME/data/incoming), oldest first, "
                      "and move them to $HM_RECSYS_HOME/data/processed; an entry that is not a regular file (a "
                      "link, a FIFO, a directory...) is refused, not read, and exits 1")
    parser.add_argument("--warehouse", metavar="DIR", help="warehouse folder (default: $HM_RECSYS_HOME/data/warehouse)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    warehouse = Path(args.warehouse) if args.warehouse else layout.warehouse_dir
    progress = not args.no_progress
    rc = 0
    try:
        if args.raw is not None:
            raw = layout.raw_dir if args.raw == _DEFAULT else Path(args.raw)
            report: object = ingest_history(raw, warehouse, progress=progress)
        elif args.drop is not None:
            report = ingest_drop(Path(args.drop), warehouse, progress=progress)
        else:
            incoming = layout.incoming_dir if args.incoming == _DEFAULT else Path(args.incoming)
            if args.incoming == _DEFAULT:
                incoming.mkdir(parents=True, exist_ok=True)  # nothing arrived yet is not an error
            results = process_incoming(incoming, warehouse, layout.processed_dir, progress=progress)
            report = {"files": results}
            for r in results:
                if r["status"] == "refused":
                    print(f"hm-recsys ingest: refused {r['file']}: {r['reason']} (it was left in place)",
                          file=sys.stderr)
            rc = 1 if any(r["status"] in ("rejected", "refused") for r in results) else 0
    except (IngestError, FileNotFoundError) as exc:
        print(f"hm-recsys ingest: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
