"""Great Expectations suites for the H&M files, as code, and the machinery that runs them.

A file is judged in three layers, each only when the one before lets it be read:

1. **structure** (plain Python over the bytes; GX needs a parsed table and
   cannot say *why* a file does not parse): empty file, header-only file,
   wrong delimiter, non-UTF-8 lines, lines with the wrong number of fields, a
   truncated last line. The first three stop everything; bad lines are set
   aside (reported with their line numbers) and the well-formed lines go on.
2. **header** (GX suite ``<table>.header``): the columns are present, named and
   ordered as in the H&M contract. A wrong header stops the row checks: no
   column can be trusted to mean what its name says.
3. **rows** (GX suite ``<table>.rows``, one builder per table below): types,
   formats, value sets, ranges, primary keys, referential integrity, dates of
   the declared week, and, for drops, volume and never-seen shares against the
   warehouse's recent weeks.

Every check has a stable id (``CheckResult.check``), used in reports, tests
and alerts. Each GX expectation carries its id and a one-line *why* in its
``meta``, so the why shows in the JSON report and in the Data Docs.

Line numbers are 1-based file lines, the header being line 1. The GX batch's
index *is* the line number, so GX's ``partial_unexpected_index_list`` names
lines directly.

GX is slow to import (~5 s here): it is imported only when a GX layer runs, and
one ephemeral context (``GxRunner``) serves the whole process. Nothing is
written anywhere but the Data Docs folder a caller asks for.

Batches hold the raw text of every contract column (exactly as written, so an
example row in a report is the file's own text) plus a few derived columns
whose names say what they are (``price_value``, ``article_id_in_articles``,
...). Referential integrity uses such derived booleans rather than
``value_set``: GX copies a value set into every result and Data Docs page, and
1.4M customer ids would make both hundreds of MB.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import math
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm_recsys.data import schema

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "CheckResult",
    "DropReference",
    "DropReport",
    "GxRunner",
    "HistoryReport",
    "IdIndex",
    "ValidationConfig",
    "ValidationSetupError",
    "articles_frame",
    "articles_suite",
    "check_ids",
    "customers_frame",
    "customers_suite",
    "declared_week",
    "header_suite",
    "load_reference",
    "to_json",
    "transactions_frame",
    "transactions_suite",
    "validate_drop",
    "validate_history",
    "week_dates",
    "weekly_volume_frame",
    "weekly_volume_suite",
    "write_report",
]

# Statuses of a check. "error": GX could not evaluate it (treated as a failure).
PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"
_BAD = (FAILED, ERROR)

DROP_NAME = re.compile(r"^transactions_(\d{4}-\d{2}-\d{2})(?:[_.-][^/]*)?\.csv$")
_DELIMITERS = (";", "\t", "|")
_SAMPLE_CHARS = 200  # a quoted bad line is cut to this many characters
_PLAIN_BLOCK_BYTES = 64 << 20  # history transactions are read 64 MiB at a time (~650k rows)
_FLUSH_ROWS = 4_000_000  # unsorted history: validate buffered weeks in pieces beyond this
_BATCH_ROWS = 300_000  # history rows per GX batch: about one full-scale week


class ValidationSetupError(RuntimeError):
    """Validation cannot start (no catalogue in the warehouse, missing input): not a verdict on a file."""


# ==========================================================================
# Configuration
# ==========================================================================
@dataclass(frozen=True)
class ValidationConfig:
    """Tolerances of the checks. Defaults were measured on generated data (tiny, small, full).

    * ``volume_band``: a drop's row count must lie in ``[lo, hi] x`` the median
      row count of the ``history_weeks`` most recent warehouse weeks before it.
    * ``history_weeks``: the history the volume and never-seen checks need; with
      fewer weeks in the warehouse they are skipped with a note.
    * ``new_article_share`` / ``new_customer_share``: the share of a drop's rows
      whose article (customer) appears in no earlier transaction, ``(lo, hi)``.
      A re-keyed id column shows up as a share near 1.
    * ``price_max``: the sane ceiling of a price (prices are local price / 590;
      the real maximum is ~0.59).
    * ``max_examples``: example rows kept per failed check.
    """

    volume_band: tuple[float, float] = (0.2, 5.0)
    history_weeks: int = 4
    new_article_share: tuple[float, float] = (0.0, 0.3)
    new_customer_share: tuple[float, float] = (0.0, 0.5)
    price_max: float = schema.PRICE_MAX
    max_examples: int = 20

    def __post_init__(self) -> None:
        for name in ("volume_band", "new_article_share", "new_customer_share"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        if self.history_weeks < 1:
            raise ValueError(f"history_weeks must be >= 1, got {self.history_weeks}")
        if not self.price_max > 0:
            raise ValueError(f"price_max must be > 0, got {self.price_max}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ==========================================================================
# Results
# ==========================================================================
@dataclass
class CheckResult:
    """The outcome of one check on one file (or, merged, on every week of the history).

    ``examples``: up to ``max_examples`` dicts; row checks give ``{"line", "value",
    "row"}`` (``row``: the raw text of each contract column), structure checks
    ``{"line", "detail", "text"}``.
    """

    check: str
    layer: str  # "drop" | "structure" | "header" | "rows"
    table: str
    status: str
    why: str
    expectation: str | None = None  # GX expectation type, None for plain-Python checks
    kwargs: dict = field(default_factory=dict)
    element_count: int | None = None
    unexpected_count: int | None = None
    observed_value: Any = None
    detail: str | None = None
    examples: list[dict] = field(default_factory=list)
    weeks: list[str] = field(default_factory=list)  # history only: weeks where it failed

    @property
    def bad(self) -> bool:
        return self.status in _BAD

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.weeks:
            d.pop("weeks")
        return d

    def merge(self, other: CheckResult, max_examples: int, week: str | None = None) -> None:
        """Fold ``other`` (the same check on another batch) into this one."""
        if other.bad and week is not None:
            self.weeks.append(week)
        order = {PASSED: 0, SKIPPED: 0, FAILED: 1, ERROR: 2}
        if order[other.status] > order[self.status]:
            self.status, self.detail = other.status, other.detail
        for name in ("element_count", "unexpected_count"):
            a, b = getattr(self, name), getattr(other, name)
            if b is not None:
                setattr(self, name, (a or 0) + b)
        if other.observed_value is not None and other.bad:
            self.observed_value = other.observed_value
        room = max_examples - len(self.examples)
        if room > 0:
            self.examples.extend(other.examples[:room])

    def short(self) -> str:
        """One clause for a human summary: what failed, how often, the first example."""
        s = self.check
        if self.unexpected_count is not None:
            unit = "line" if self.layer == "structure" else "row"
            s += f" ({self.unexpected_count} {unit}{'s' if self.unexpected_count != 1 else ''}"
            ex = self.examples[0] if self.examples else None
            if ex and ex.get("line") is not None:
                shown = repr(ex["value"]) if "value" in ex else ex.get("detail")
                s += f", e.g. line {ex['line']}: {shown}"
            s += ")"
        elif self.detail:
            s += f" ({self.detail})"
        elif self.observed_value is not None:
            s += f" (observed {self.observed_value})"
        return s


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not math.isfinite(float(o)) else float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (dt.date, dt.datetime)):
        return o.isoformat()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite(v):
    """NaN/inf become null: JSON has no such numbers (and a report must stay parseable everywhere)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def to_json(obj) -> str:
    """JSON text of a report dict: numpy scalars, dates and paths made plain, NaN as null."""
    return json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=2, ensure_ascii=False,
                      allow_nan=False)


class _Verdict:
    """A report's verdict from its ``checks``: rejected as soon as one check is bad."""

    checks: list[CheckResult]

    @property
    def status(self) -> str:
        return "rejected" if any(c.bad for c in self.checks) else "accepted"

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.bad]


@dataclass
class DropReport(_Verdict):
    """Everything known about one drop after validation. ``status``: ``accepted`` or ``rejected``."""

    file: str
    path: str
    sha256: str
    bytes: int
    declared_week: str | None
    run_date: str
    config: ValidationConfig
    checks: list[CheckResult] = field(default_factory=list)
    rows: int | None = None  # well-formed data rows handed to GX
    lines: int | None = None  # physical lines, header included
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step: reference, read, gx
    gx_results: list = field(default_factory=list, repr=False)  # GX result ids, for Data Docs


    @property
    def failed_checks(self) -> list[str]:
        return [c.check for c in self.failures]

    @property
    def skipped_checks(self) -> list[str]:
        return [c.check for c in self.checks if c.status == SKIPPED]

    def summary(self, where: str | None = None, docs: bool = False) -> str:
        """A one-paragraph human summary (``where``: the quarantine folder, if any; ``docs``: Data Docs built)."""
        head = f"{self.file} (sha256 {self.sha256[:12]}, declared week {self.declared_week or 'none'})"
        if self.status == "accepted":
            skipped = f"; skipped: {', '.join(self.skipped_checks)}" if self.skipped_checks else ""
            n = len(self.checks) - len(self.skipped_checks)
            return f"{head} passed all {n} checks ({self.rows} rows){skipped}."
        fails = "; ".join(c.short() for c in self.failures)
        n_run = sum(c.status != SKIPPED for c in self.checks)
        s = f"{head} was REJECTED: {len(self.failures)} of {n_run} checks failed: {fails}."
        if where:
            s += f" The file was moved, byte for byte, to {where}/ next to report.json"
            s += " and data_docs/index.html." if docs else "."
            if self.failed_checks == ["duplicate_drop"]:
                s += " Nothing was ingested twice; delete the copy if it was re-sent by mistake."
            else:
                s += (" Fix the file and drop the corrected version into incoming; the same bytes sent again"
                      " are recognised and not validated twice.")
        return s

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "path": self.path,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "table": "transactions",
            "declared_week": self.declared_week,
            "run_date": self.run_date,
            "status": self.status,
            "rows": self.rows,
            "lines": self.lines,
            "failed_checks": self.failed_checks,
            "skipped_checks": self.skipped_checks,
            "summary": self.summary(),
            "checks": [c.to_dict() for c in self.checks],
            "config": self.config.to_dict(),
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


# ==========================================================================
# Reading a CSV: structure checks, with line numbers
# ==========================================================================
class _Findings:
    """Accumulates structure problems per check id across blocks (counts + first examples)."""

    WHY = {
        "empty_file": "an empty file is a failed export, not a week without sales",
        "header_only": "a header without rows is a failed export, not a week without sales",
        "delimiter": "H&M files are comma-separated; another delimiter makes every row one field",
        "encoding": "the files are UTF-8; other bytes mean a corrupted or re-encoded export",
        "field_count": "every line must have as many fields as the header, or values shift columns",
        "truncated_last_line": "a last line cut short means the transfer or the export was interrupted",
    }
    ORDER = ("empty_file", "header_only", "delimiter", "encoding", "field_count", "truncated_last_line")
    FILE_LEVEL = ("empty_file", "header_only", "delimiter")  # about the file as a whole; they stop everything

    def __init__(self, table: str, max_examples: int):
        self.table, self.max_examples = table, max_examples
        self.found: dict[str, CheckResult] = {}

    def add(self, check: str, line: int | None, detail: str, text: bytes | str | None = None) -> None:
        r = self.found.get(check)
        file_level = check in self.FILE_LEVEL
        if r is None:
            r = self.found[check] = CheckResult(
                check, "structure", self.table, FAILED, self.WHY[check],
                unexpected_count=None if file_level else 0, detail=detail,
            )
        if not file_level:
            r.unexpected_count += 1  # bad lines
        if len(r.examples) < self.max_examples:
            ex: dict[str, Any] = {"line": line, "detail": detail}
            if text is not None:
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="backslashreplace")
                ex["text"] = text.rstrip("\r\n")[:_SAMPLE_CHARS]
            r.examples.append(ex)

    @property
    def fatal(self) -> bool:
        return any(c in self.found for c in self.FILE_LEVEL)

    def results(self, lines: int | None) -> list[CheckResult]:
        """All structure checks, passed ones included (a fatal problem leaves the rest unjudged)."""
        out = []
        for check in self.ORDER:
            if check in self.found:
                out.append(self.found[check])
            elif check in self.FILE_LEVEL or not self.fatal:
                out.append(CheckResult(check, "structure", self.table, PASSED, self.WHY[check], element_count=lines))
        return out


@dataclass
class _Header:
    fields: list[str]
    raw: bytes


def _read_header(f, table: str, findings: _Findings) -> _Header | None:
    """Read line 1. Returns ``None`` (with a fatal finding) when there is no usable header."""
    raw = f.readline(1 << 20)
    if not raw:
        findings.add("empty_file", None, "the file has 0 bytes")
        return None
    try:
        text = raw.decode("utf-8-sig")  # a BOM is tolerated, as ingestion does
    except UnicodeDecodeError as e:
        findings.add("encoding", 1, f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line", raw)
        text = raw.decode("utf-8-sig", errors="replace")
    line = text.rstrip("\r\n")
    # RFC 4180 exports may quote the header too ("t_dat","customer_id",...): it names the same columns.
    fields = line.split(",") if table != "articles" and '"' not in line else next(csv.reader([line]), [])
    if len(fields) == 1 and len(schema.COLUMNS[table]) > 1:
        used = [d for d in _DELIMITERS if d in line]
        if used:
            findings.add("delimiter", 1, f"the header is separated by {used[0]!r}, not ','", raw)
            return None
    return _Header(fields, raw)


def _line_bounds(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) byte offsets of each line of a block; ``ends`` exclude the newline."""
    nl = np.flatnonzero(arr == 0x0A)
    ends = nl
    if len(arr) and (len(nl) == 0 or nl[-1] != len(arr) - 1):
        ends = np.append(nl, len(arr))  # a last line with no newline (end of file)
    starts = np.concatenate([[0], nl + 1])[: len(ends)]
    return starts, ends


def _split_quoted_line(raw: bytes) -> list[str]:
    """The fields of one line (no ``\\n``) under RFC 4180 quoting; raises ``ValueError`` saying what is wrong.

    A field that starts with ``"`` is quoted and ends at the next lone ``"``
    (``""`` is a quote inside it); a ``"`` elsewhere is data. Text after a
    closing quote, or a quote that never closes, is malformed: the strict rule,
    under which every line kept here splits into the same fields in pyarrow
    (``_parse_plain`` and ingestion) as in this module.
    """
    text = raw.decode("utf-8", errors="replace").removesuffix("\r")
    try:
        return next(csv.reader([text], strict=True), [""])
    except csv.Error as e:
        msg = str(e)
        if "unexpected end of data" in msg:
            raise ValueError("a quoted field is not closed on this line") from None
        if "expected after" in msg:
            raise ValueError("text follows the closing quote of a quoted field") from None
        if "new-line" in msg:
            raise ValueError("a carriage return (\\r) inside the line") from None
        raise ValueError(msg) from None


def _scan_plain_block(
    block: bytes, first_line: int, header: list[str], at_eof: bool, findings: _Findings
) -> tuple[bytes, np.ndarray]:
    """Structure checks of one block of a file without newlines in values (transactions, customers).

    Vectorised: fields per line = commas + 1, from cumulative comma counts at
    line bounds; only lines holding a byte >= 0x80 are decoded one by one
    (H&M transactions are ASCII), and only lines holding a ``"`` are split by
    RFC 4180 quoting rules (H&M never quotes these files; other exporters
    may). With ``at_eof``, blank lines that end the file are no rows (see
    ``hmcsv.blank_tail_start``): they are neither findings nor returned.
    Returns the well-formed lines' bytes and their line numbers.
    """
    from hm_recsys.data.hmcsv import blank_tail_start

    arr = np.frombuffer(block, dtype=np.uint8)
    starts, ends = _line_bounds(arr)
    n = len(starts)
    if n == 0:
        return b"", np.empty(0, dtype=np.int64)
    lines = np.arange(first_line, first_line + n, dtype=np.int64)
    # Counting by positions (a few % of the bytes), not by a cumulative sum over every byte (8x the block).
    commas = np.flatnonzero(arr == 0x2C)
    fields = np.searchsorted(commas, ends) - np.searchsorted(commas, starts) + 1
    high = np.flatnonzero(arr >= 0x80)
    good = np.ones(n, dtype=bool)
    tail = starts >= blank_tail_start(block) if at_eof else np.zeros(n, bool)
    good[tail] = False
    has_high = np.searchsorted(high, ends) - np.searchsorted(high, starts) > 0 if len(high) else np.zeros(n, bool)
    for i in np.flatnonzero(has_high & good):
        raw = block[starts[i] : ends[i]]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            good[i] = False
            detail = f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
            findings.add("encoding", int(lines[i]), detail, raw)
    malformed: dict[int, str] = {}
    # CSV readers (pyarrow here and in ingestion) end a line at a lone \r too: such a line would split in two.
    cr = np.flatnonzero(arr[:-1] == 0x0D)
    cr = cr[arr[cr + 1] != 0x0A]
    if len(cr):
        for i in np.unique(np.searchsorted(ends, cr)):
            if good[i]:
                malformed[int(i)] = "a carriage return (\\r) inside the line"
                fields[i] = -1
    # A quoted field may hold commas, so lines with a quote are split properly (and their quoting checked).
    quotes = np.flatnonzero(arr == 0x22)
    if len(quotes):
        has_quote = np.searchsorted(quotes, ends) - np.searchsorted(quotes, starts) > 0
        for i in np.flatnonzero(has_quote & good):
            if i in malformed:
                continue
            try:
                fields[i] = len(_split_quoted_line(block[starts[i] : ends[i]]))
            except ValueError as e:
                malformed[i] = str(e)
                fields[i] = -1
    ncols = len(header)
    wrong = np.flatnonzero((fields != ncols) & good)
    truncated = at_eof and not block.endswith(b"\n")
    for i in wrong:
        raw = block[starts[i] : ends[i]]
        if truncated and i == n - 1:
            what = malformed.get(i) or f"{fields[i]} of {ncols} fields"
            findings.add(
                "truncated_last_line",
                int(lines[i]),
                f"the file ends without a newline in the middle of this line ({what})",
                raw,
            )
        elif i in malformed:
            findings.add("field_count", int(lines[i]), f"cannot be split into fields: {malformed[i]}", raw)
        else:
            what = "an empty line" if not raw.strip(b"\r") else f"{fields[i]} fields"
            findings.add("field_count", int(lines[i]), f"{what}, the header has {ncols}", raw)
    good[wrong] = False
    if good.all():
        return block, lines
    if good[~tail].all():  # only blank lines at the end set aside
        return block[: starts[np.argmax(tail)]], lines[good]
    kept = [block[starts[i] : ends[i]] for i in np.flatnonzero(good)]
    return (b"\n".join(kept) + b"\n") if kept else b"", lines[good]


def _parse_plain(data: bytes, header: list[str], lines: np.ndarray) -> pd.DataFrame:
    """Well-formed lines (as ``_scan_plain_block`` keeps them) -> DataFrame of raw strings indexed by line number.

    A quoted field's value is its text without the quotes: ``"0108775015"`` -> ``0108775015``, and a doubled
    ``""`` inside the quotes is one ``"``.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if not data:
        return pd.DataFrame({c: pd.Series([], dtype="str") for c in header}, index=pd.Index(lines, name="line"))
    tbl = pcsv.read_csv(
        io.BytesIO(data),
        read_options=pcsv.ReadOptions(column_names=header, block_size=max(1 << 20, min(len(data), 1 << 28))),
        # H&M never quotes these files but RFC 4180 exporters may: a field opening with '"' is quoted (and
        # the scan let through only lines whose quotes pair up); a '"' elsewhere in a field is data.
        parse_options=pcsv.ParseOptions(quote_char='"', double_quote=True, ignore_empty_lines=False),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=False),
    )
    df = tbl.to_pandas()
    df.index = pd.Index(lines, name="line")
    return df


def _content_cut(data: bytes) -> int:
    """Offset just after the newline that ends the last non-blank line of ``data``; 0 if there is none."""
    end = len(data)
    while (nl := data.rfind(b"\n", 0, end)) >= 0:
        start = data.rfind(b"\n", 0, nl) + 1
        if data[start:nl] not in (b"", b"\r"):
            return nl + 1
        end = nl
    return 0


def _iter_blocks(f, block_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(block, at_eof)``: blocks of whole lines; only the last one (``at_eof``) may lack a newline.

    A block other than the last never ends with blank lines: they travel with
    the next block, so the last block alone holds the blank lines that end the
    file (no rows) and a blank line before more rows is seen as one.
    """
    carry = b""
    ready: bytes | None = None  # held back until it is known whether more follows
    while True:
        chunk = f.read(block_bytes)
        if not chunk:
            break
        data = carry + chunk
        cut = _content_cut(data)
        if cut == 0:
            carry = data
            continue
        if ready is not None:
            yield ready, False
        ready, carry = data[:cut], data[cut:]
    if ready is not None and carry:
        yield ready, False
        ready = None
    last = carry if ready is None else ready
    if last:
        yield last, True


def _lines_in(block: bytes) -> int:
    return block.count(b"\n") + (0 if block.endswith(b"\n") else 1)


@dataclass
class _ReadFile:
    table: str
    header: _Header | None
    findings: _Findings
    frame: pd.DataFrame | None = None  # well-formed rows (whole-file readers only)
    lines: int = 0


def _read_plain_file(path: Path, table: str, max_examples: int) -> _ReadFile:
    """Read a whole file without newlines in values (a drop, customers.csv) with structure checks."""
    from hm_recsys.data.hmcsv import blank_tail_start

    findings = _Findings(table, max_examples)
    with open(path, "rb") as f:
        header = _read_header(f, table, findings)
        out = _ReadFile(table, header, findings, lines=1 if header else 0)
        if header is None:
            return out
        body = f.read()
    if blank_tail_start(body) == 0:  # nothing, or only blank lines
        findings.add("header_only", 1, "the file has a header and no data rows")
        out.lines = 1 + (_lines_in(body) if body else 0)
        return out
    data, lines = _scan_plain_block(body, 2, header.fields, True, findings)
    out.lines = 1 + _lines_in(body)
    out.frame = _parse_plain(data, header.fields, lines)
    return out


def _read_quoted_file(path: Path, table: str, max_examples: int) -> _ReadFile:
    """Read articles.csv (quoted fields, newlines allowed inside quotes) with structure checks."""
    import pandas as pd

    from hm_recsys.data.hmcsv import blank_tail_start

    findings = _Findings(table, max_examples)
    whole = path.read_bytes()
    data = whole[: blank_tail_start(whole)]  # blank lines that end the file are no records
    with io.BytesIO(data) as f:
        header = _read_header(f, table, findings)
        out = _ReadFile(table, header, findings, lines=1 if header else 0)
        if header is None:
            return out
        body_start = f.tell()
    if body_start >= len(data):
        findings.add("header_only", 1, "the file has a header and no data rows")
        out.lines = _lines_in(whole)
        return out
    # surrogateescape keeps undecodable bytes visible (as lone surrogates) without losing positions.
    text = data[body_start:].decode("utf-8", errors="surrogateescape")
    body_lines = _lines_in(data[body_start:])
    reader = csv.reader(io.StringIO(text, newline=""))
    ncols = len(header.fields)
    records, numbers = [], []
    start = 2
    has_surrogate = re.compile("[\udc80-\udcff]")
    for rec in reader:
        line = start
        start = reader.line_num + 2
        joined = ",".join(rec)
        m = has_surrogate.search(joined)
        if m:
            bad = ord(m.group()) - 0xDC00
            findings.add("encoding", line, f"invalid UTF-8 byte 0x{bad:02x}", joined.encode("utf-8", "surrogateescape"))
            continue
        if len(rec) != ncols:
            if reader.line_num == body_lines and not data.endswith(b"\n"):
                detail = f"the file ends inside this record ({len(rec)} of {ncols} fields)"
                findings.add("truncated_last_line", line, detail, joined)
            else:
                findings.add("field_count", line, f"{len(rec)} fields, the header has {ncols}", joined)
            continue
        records.append(rec)
        numbers.append(line)
    out.lines = _lines_in(whole)
    cols = {c: pd.Series([r[i] for r in records], dtype="str") for i, c in enumerate(header.fields)}
    out.frame = pd.DataFrame(cols)
    out.frame.index = pd.Index(np.asarray(numbers, dtype=np.int64), name="line")
    return out


# ==========================================================================
# GX: one ephemeral context per process
# ==========================================================================
class GxRunner:
    """Runs suites on pandas batches in one ephemeral GX context and builds Data Docs on demand.

    Creating a context and importing GX costs seconds, so one runner serves a
    whole process (``GxRunner.shared()``); suites are re-registered under
    their name on every run, so a suite built for another week replaces the
    previous one. Results stay in the context's in-memory store until
    ``build_docs`` renders the ones asked for into a folder.
    """

    _shared: GxRunner | None = None

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        # GX's own tqdm bars ("Calculating Metrics") would flood logs once per batch.
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self._source = self.ctx.data_sources.add_pandas("hm_recsys")
        self._batches: dict[str, Any] = {}
        self._fixed: dict[tuple[str, str], Any] = {}
        self._sites = 0

    @classmethod
    def shared(cls) -> GxRunner:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def _batch_definition(self, asset: str):
        if asset not in self._batches:
            a = self._source.add_dataframe_asset(asset)
            self._batches[asset] = a.add_batch_definition_whole_dataframe("whole")
        return self._batches[asset]

    def run(self, suite, frame: pd.DataFrame, asset: str, run_name: str, max_examples: int, fixed: bool = False):
        """Validate ``frame`` against ``suite``. Returns ``(result, result_identifier)``.

        ``fixed``: the suite never changes under its name (a header suite), so
        the registered one is reused (registering costs ~0.1 s of GX bookkeeping).
        A suite name must be run either always fixed or never.
        """
        from great_expectations.core.run_identifier import RunIdentifier

        gx = self._gx
        vd = self._fixed.get((suite.name, asset)) if fixed else None
        if vd is None:
            suite = self.ctx.suites.add_or_update(suite)
            vd = self.ctx.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=f"{suite.name}@{asset}", data=self._batch_definition(asset), suite=suite)
            )
            if fixed:
                self._fixed[(suite.name, asset)] = vd
        run_id = RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.UTC))
        result = vd.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(max_examples, 1)},
            run_id=run_id,
        )
        key = next(
            k
            for k in self.ctx.validation_results_store.list_keys()
            if k.run_id == run_id and k.expectation_suite_identifier.name == suite.name
        )
        return result, key

    def build_docs(self, result_ids: Sequence, folder: Path) -> Path:
        """Render the given results (and an index) as GX Data Docs HTML into ``folder``; returns index.html."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._sites += 1
        site = f"site{self._sites}"
        self.ctx.add_data_docs_site(
            site,
            {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "show_how_to_buttons": False,
            },
        )
        try:
            self.ctx.build_data_docs(site_names=[site], resource_identifiers=list(result_ids))
        finally:
            self.ctx.delete_data_docs_site(site)
        return folder / "index.html"

    def forget(self, result_ids: Sequence) -> None:
        """Drop results from the in-memory store (a long history run would otherwise keep them all)."""
        store = self.ctx.validation_results_store
        for k in result_ids:
            store.remove_key(k)


def _exception_message(info) -> str | None:
    """GX puts either one ``{"raised_exception", "exception_message"}`` or one per metric here."""
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    msgs = [v.get("exception_message") for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return "; ".join(m for m in msgs if m) or None


def _jsonable(v):
    return _finite(json.loads(json.dumps(v, default=_json_default)))


def _checks_from_result(
    result, layer: str, table: str, raw: pd.DataFrame | None, max_examples: int
) -> list[CheckResult]:
    """Turn a GX suite result into CheckResults, with example rows taken from ``raw`` by line number."""
    out = []
    for r in result.results:
        cfg = r.expectation_config
        meta = dict(cfg.meta or {})
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
        res = r.result or {}
        err = _exception_message(r.exception_info)
        status = ERROR if err else (PASSED if r.success else FAILED)
        c = CheckResult(
            check=meta.get("check", cfg.type),
            layer=layer,
            table=table,
            status=status,
            why=meta.get("why", ""),
            expectation=cfg.type,
            kwargs=_jsonable(kwargs),
            element_count=res.get("element_count"),
            unexpected_count=res.get("unexpected_count"),
            observed_value=_jsonable(res.get("observed_value")),
            detail=err,
        )
        if status == FAILED:
            idx = res.get("partial_unexpected_index_list") or []
            source = meta.get("source") or kwargs.get("column")
            for i in idx[:max_examples]:
                if isinstance(i, dict):  # a named index comes back as {index name: label, column: value}
                    i = i.get(raw.index.name) if raw is not None else i
                if raw is None or isinstance(i, dict) or i not in raw.index:
                    c.examples.append({"key": _jsonable(i)})
                    continue
                row = raw.loc[i]
                ex = {"line": int(i)} if raw.index.name == "line" else {raw.index.name or "key": _jsonable(i)}
                if source in raw.columns:
                    ex["value"] = _jsonable(row[source])
                ex["row"] = {k: _jsonable(row[k]) for k in raw.columns}
                c.examples.append(ex)
        out.append(c)
    return out


# ==========================================================================
# Suites as code: one builder per table
# ==========================================================================
def _expect(check: str, why: str, expectation, source: str | None = None):
    """Tag an expectation with its stable check id and its reason (shown in reports and Data Docs)."""
    expectation.meta = {"check": check, "why": why, **({"source": source} if source else {})}
    return expectation


def _suite(name: str, expectations: list):
    import great_expectations as gx

    return gx.ExpectationSuite(name=name, expectations=expectations)


def header_suite(table: str):
    """``<table>.header``: the file's columns, exactly and in order (run on the header, zero rows)."""
    import great_expectations.expectations as gxe

    return _suite(
        f"{table}.header",
        [
            _expect(
                "columns",
                "every later check and the warehouse address columns by name and position",
                gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(schema.COLUMNS[table])),
            )
        ],
    )


def week_dates(week: dt.date) -> list[str]:
    """The seven ISO dates of the H&M week labelled ``week`` (a Wednesday)."""
    start, _ = schema.week_range(week)
    return [(start + dt.timedelta(days=i)).isoformat() for i in range(7)]


def transactions_suite(
    week: dt.date | None,
    run_date: dt.date,
    config: ValidationConfig,
    volume: tuple[int, int] | None = None,
    novelty: bool = False,
    future_dates: Sequence[str] | None = None,
):
    """``transactions.rows`` for a drop (one declared week) or a batch of whole history weeks.

    ``week``: the declared week; ``None`` leaves ``t_dat_in_week`` out (history
    batches group rows by their own dates, so it could not fail there).
    ``t_dat_not_future`` rejects the week's dates after ``run_date``; without a
    week, ``future_dates`` lists the dates after ``run_date`` to reject (the
    history passes the ones its batch contains). ``volume``: accepted ``(min,
    max)`` row count, or ``None`` to leave the check out. ``novelty``: include
    the never-seen shares (the batch must then carry
    ``article_id_never_seen``/``customer_id_never_seen``). The batch comes
    from ``transactions_frame``.
    """
    import great_expectations.expectations as gxe

    e = [
        _expect("t_dat_format", "dates must be ISO YYYY-MM-DD to be placed in an H&M week",
                gxe.ExpectColumnValuesToMatchRegex(column="t_dat", regex=schema.ISO_DATE.pattern)),
        _expect("customer_id_format", "customer ids are 64 lowercase hex chars; anything else will not join",
                gxe.ExpectColumnValuesToMatchRegex(column="customer_id", regex=schema.HEX64.pattern)),
        _expect("article_id_format", "article ids are 10 digits; a lost leading zero breaks every join",
                gxe.ExpectColumnValuesToMatchRegex(column="article_id", regex=schema.ARTICLE_ID.pattern)),
        _expect("price_is_number", "price must parse as a decimal number",
                gxe.ExpectColumnValuesToNotBeNull(column="price_value"), source="price"),
        _expect("price_range", "a price <= 0 or above the ceiling is a unit or parsing error, not a sale",
                gxe.ExpectColumnValuesToBeBetween(column="price_value", min_value=0, strict_min=True,
                                                  max_value=config.price_max), source="price"),
        _expect("sales_channel_id_set", "sales channels are 1 (store) and 2 (online) only",
                gxe.ExpectColumnValuesToBeInSet(column="sales_channel_id", value_set=["1", "2"])),
        _expect("article_id_in_articles", "every sold article must exist in the catalogue (referential integrity)",
                gxe.ExpectColumnValuesToBeInSet(column="article_id_in_articles", value_set=[True]),
                source="article_id"),
        _expect("customer_id_in_customers", "every buyer must exist in the customer table (referential integrity)",
                gxe.ExpectColumnValuesToBeInSet(column="customer_id_in_customers", value_set=[True]),
                source="customer_id"),
    ]
    if week is not None:
        dates = week_dates(week)
        e.append(_expect("t_dat_in_week", "a drop holds exactly its declared week; other dates would leak elsewhere",
                         gxe.ExpectColumnValuesToBeInSet(column="t_dat", value_set=dates)))
        # Dates outside the week are t_dat_in_week's; within it, those after the run are impossible.
        future_dates = [d for d in dates if d > run_date.isoformat()]
    if future_dates is not None:
        e.append(_expect("t_dat_not_future", f"a sale cannot be dated after the run ({run_date})",
                         gxe.ExpectColumnValuesToNotBeInSet(column="t_dat", value_set=list(future_dates))))
    if volume is not None:
        e.append(_expect("volume", "a week far outside recent volumes is a partial or duplicated export",
                         gxe.ExpectTableRowCountToBeBetween(min_value=volume[0], max_value=volume[1])))
    if novelty:
        (alo, ahi), (clo, chi) = config.new_article_share, config.new_customer_share
        e += [
            _expect("new_article_share", "articles never sold before are a few % of rows; many more means re-keyed ids",
                    gxe.ExpectColumnMeanToBeBetween(column="article_id_never_seen", min_value=alo, max_value=ahi)),
            _expect("new_customer_share", "first-time buyers are a minority of rows; many more means re-keyed ids",
                    gxe.ExpectColumnMeanToBeBetween(column="customer_id_never_seen", min_value=clo, max_value=chi)),
        ]
    return _suite("transactions.rows", e)


def customers_suite(config: ValidationConfig):
    """``customers.rows``: customers.csv as written (batch from ``customers_frame``)."""
    import great_expectations.expectations as gxe

    return _suite(
        "customers.rows",
        [
            _expect("customer_id_format", "customer ids are 64 lowercase hex chars",
                    gxe.ExpectColumnValuesToMatchRegex(column="customer_id", regex=schema.HEX64.pattern)),
            _expect("customer_id_unique", "customer_id is the primary key; a duplicate makes joins ambiguous",
                    gxe.ExpectColumnValuesToBeUnique(column="customer_id")),
            _expect("FN_set", "FN is 1.0 or empty in the real file",
                    gxe.ExpectColumnValuesToBeInSet(column="FN", value_set=["1.0", ""])),
            _expect("Active_set", "Active is 1.0 or empty in the real file",
                    gxe.ExpectColumnValuesToBeInSet(column="Active", value_set=["1.0", ""])),
            _expect("club_member_status_set", "a new status would silently become a new feature value",
                    gxe.ExpectColumnValuesToBeInSet(column="club_member_status",
                                                    value_set=sorted(schema.CLUB_MEMBER_STATUS))),
            # "None" (literal) and "NONE" are distinct values in the real file.
            _expect("fashion_news_frequency_set", "a new frequency would silently become a new feature value",
                    gxe.ExpectColumnValuesToBeInSet(column="fashion_news_frequency",
                                                    value_set=sorted(schema.FASHION_NEWS_FREQUENCY))),
            _expect("age_format", "age is empty or a whole number",
                    gxe.ExpectColumnValuesToMatchRegex(column="age", regex=r"^(?:[0-9]{1,3}(?:\.0+)?)?$")),
            _expect("age_range", f"ages outside {schema.AGE_MIN}..{schema.AGE_MAX} are data-entry errors",
                    gxe.ExpectColumnValuesToBeBetween(column="age_years", min_value=schema.AGE_MIN,
                                                      max_value=schema.AGE_MAX), source="age"),
            _expect("postal_code_format", "postal codes are 64 lowercase hex chars (hashed)",
                    gxe.ExpectColumnValuesToMatchRegex(column="postal_code", regex=schema.HEX64.pattern)),
        ],
    )


_ARTICLE_NAME_COLUMNS = tuple(
    c for c in schema.ARTICLE_STR_COLUMNS if c not in ("article_id", "product_code", "colour_group_code", "detail_desc")
)


def articles_suite(config: ValidationConfig):
    """``articles.rows``: articles.csv as written (batch from ``articles_frame``)."""
    import great_expectations.expectations as gxe

    e = [
        _expect("article_id_format", "article ids are 10 digits (leading zero included)",
                gxe.ExpectColumnValuesToMatchRegex(column="article_id", regex=schema.ARTICLE_ID.pattern)),
        _expect("article_id_unique", "article_id is the primary key; a duplicate makes joins ambiguous",
                gxe.ExpectColumnValuesToBeUnique(column="article_id")),
        _expect("product_code_format", "product codes are 7 digits",
                gxe.ExpectColumnValuesToMatchRegex(column="product_code", regex=r"^[0-9]{7}$")),
        _expect("product_code_prefix", "an article id starts with its product code; a mismatch means shifted columns",
                gxe.ExpectColumnPairValuesToBeEqual(column_A="product_code", column_B="product_code_of_article_id")),
        _expect("colour_group_code_format", "colour group codes are 2 digits",
                gxe.ExpectColumnValuesToMatchRegex(column="colour_group_code", regex=r"^[0-9]{2}$")),
    ]
    for c in schema.ARTICLE_INT_COLUMNS:
        e.append(_expect(f"{c}_format", "integer-coded attributes must be integers (-1 means unknown)",
                         gxe.ExpectColumnValuesToMatchRegex(column=c, regex=r"^-?[0-9]+$")))
    for c in _ARTICLE_NAME_COLUMNS:
        # Only detail_desc may be empty in the real file.
        e.append(_expect(f"{c}_not_empty", "only detail_desc may be empty",
                         gxe.ExpectColumnValueLengthsToBeBetween(column=c, min_value=1)))
    return _suite("articles.rows", e)


def weekly_volume_suite(config: ValidationConfig):
    """``transactions.weekly_volume``: one row per history week (batch from ``weekly_volume_frame``)."""
    import great_expectations.expectations as gxe

    lo, hi = config.volume_band
    return _suite(
        "transactions.weekly_volume",
        [
            _expect("volume", "a week far outside the weeks before it is a partial or duplicated export",
                    gxe.ExpectColumnValuesToBeBetween(column="ratio_to_recent_median", min_value=lo, max_value=hi)),
        ],
    )


# ==========================================================================
# Batches: the raw text plus derived columns the suites need
# ==========================================================================
def _masked(values: np.ndarray, ok: np.ndarray, dtype: str):
    """``values`` where ``ok``, null elsewhere: GX map expectations skip nulls, so a malformed id is
    reported once, by its format check, not again as "unknown"."""
    import pandas as pd

    if dtype == "bool":
        return pd.Series(np.where(ok, values, None), dtype=object)
    return pd.Series(np.where(ok, values.astype(np.float64), np.nan), dtype=np.float64)


def transactions_frame(raw: pd.DataFrame, ref: DropReference) -> pd.DataFrame:
    """Raw transaction rows (strings, index = line) + derived columns:

    * ``price_value``: float, NaN if the text is not a number;
    * ``article_id_in_articles`` / ``customer_id_in_customers``: bool, null for a malformed id;
    * when ``ref`` has the seen-before marks, ``article_id_never_seen`` /
      ``customer_id_never_seen``: 0.0/1.0, NaN for a malformed id (their mean is the share).
    """
    import pandas as pd
    import pyarrow as pa

    out = raw.copy(deep=False)
    out["price_value"] = pd.to_numeric(raw["price"], errors="coerce")
    derived = {}
    for col, index, seen, table in (
        ("article_id", ref.articles, ref.seen_articles, "articles"),
        ("customer_id", ref.customers, ref.seen_customers, "customers"),
    ):
        pattern = schema.ARTICLE_ID if col == "article_id" else schema.HEX64
        ok = raw[col].str.fullmatch(pattern.pattern).to_numpy(dtype=bool)
        pos = index.positions(pa.array(raw[col], pa.string()))
        derived[f"{col}_in_{table}"] = _masked(pos >= 0, ok, "bool")
        if seen is not None:
            before = np.zeros(len(pos), dtype=bool)
            before[pos >= 0] = seen[pos[pos >= 0]]
            derived[f"{col}_never_seen"] = _masked(~before, ok, "float")
    for name, s in derived.items():
        s.index = raw.index
        out[name] = s
    return out


def customers_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw customer rows + ``age_years`` (float; NaN when empty or not a number)."""
    import pandas as pd

    out = raw.copy(deep=False)
    out["age_years"] = pd.to_numeric(raw["age"], errors="coerce")
    return out


def articles_frame(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw article rows + ``product_code_of_article_id`` (the first 7 characters of article_id)."""
    out = raw.copy(deep=False)
    out["product_code_of_article_id"] = raw["article_id"].str.slice(0, 7)
    return out


def weekly_volume_frame(week_rows: dict[dt.date, int], history_weeks: int, partial: set[dt.date]) -> pd.DataFrame:
    """One row per week (index: ISO week label): ``rows``, ``recent_median`` (median of the
    ``history_weeks`` weeks before it; NaN without enough of them or for a partial week)
    and ``ratio_to_recent_median``.
    """
    import pandas as pd

    weeks = sorted(week_rows)
    med = []
    for i, w in enumerate(weeks):
        prev = [week_rows[p] for p in weeks[max(0, i - history_weeks) : i] if p not in partial]
        ok = len(prev) >= history_weeks and w not in partial
        med.append(float(statistics.median(prev)) if ok else float("nan"))
    df = pd.DataFrame(
        {"rows": [week_rows[w] for w in weeks], "recent_median": med},
        index=pd.Index([w.isoformat() for w in weeks], name="week"),
    )
    df["ratio_to_recent_median"] = df["rows"] / df["recent_median"]
    return df


# ==========================================================================
# What a drop is compared with
# ==========================================================================
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i


def _fixed_width(arr: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bytes (m, width) uint8, mask (n,))``: the values exactly ``width`` bytes long, as a 2-D view."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = arr.cast(pa.string())
    ok = pc.fill_null(pc.equal(pc.binary_length(arr), width), False)
    mask = ok.to_numpy(zero_copy_only=False)
    if not mask.all():
        arr = arr.filter(ok)
    if len(arr) == 0:
        return np.empty((0, width), np.uint8), mask
    arr = pa.concat_arrays([arr])  # offsets of a fresh array start at 0
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8, count=width * len(arr))
    return data.reshape(len(arr), width), mask


class IdIndex:
    """Positions of ids in a catalogue column, looked up by 64-bit integer keys (fast and exact).

    ``kind="article"``: 10-digit ids, the key is the number itself. ``kind="hex64"``:
    customer ids, the key is the first 16 hex digits; ``positions`` then
    compares the full text of every match, so a lookup is exact. Hashing
    64-char strings is ~20x slower than integers, and the never-seen check
    looks up every id of every past week (16M at full scale).
    """

    def __init__(self, ids: pa.Array, kind: str):
        import pandas as pd
        import pyarrow as pa
        import pyarrow.compute as pc

        self.kind = kind
        self.ids = pc.unique(ids.cast(pa.string()))
        keys, ok = self._keys(self.ids)
        self._ok_pos = np.flatnonzero(ok)  # catalogue positions with a well-formed id
        index = pd.Index(keys)
        self._exact = index.is_unique  # else (two ids share 64 bits): fall back to full strings
        self._index = index if self._exact else pd.Index(self.ids.filter(pa.array(ok)).to_pandas())

    def __len__(self) -> int:
        return len(self.ids)

    def _keys(self, values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(keys of the well-formed values, mask of the well-formed values)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.kind == "article":
            ok = pc.fill_null(pc.match_substring_regex(values.cast(pa.string()), schema.ARTICLE_ID.pattern), False)
            mask = ok.to_numpy(zero_copy_only=False)
            keys = pc.cast(values.filter(ok), pa.int64()).to_numpy(zero_copy_only=False)
            return keys, mask
        raw, mask = _fixed_width(values, 64)
        nib = _HEX_VALUE[raw[:, :16]]
        hexok = (nib != 255).all(axis=1)
        if not hexok.all():
            mask[np.flatnonzero(mask)[~hexok]] = False
            nib = nib[hexok]
        keys = np.zeros(len(nib), dtype=np.uint64)
        for j in range(16):
            keys = (keys << np.uint64(4)) | nib[:, j].astype(np.uint64)
        return keys, mask

    def positions(self, values, verify: bool = True) -> np.ndarray:
        """Catalogue position of each value, -1 when absent or malformed. ``verify=False`` skips the
        full-text comparison (only for ids already known to come from the catalogue)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        values = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        out = np.full(len(values), -1, dtype=np.int64)
        if self._exact:
            keys, mask = self._keys(values)
            pos = self._index.get_indexer(keys)
        else:
            mask = np.ones(len(values), bool)
            pos = self._index.get_indexer(values.to_pandas())
        found = pos >= 0
        cat = np.full(len(pos), -1, dtype=np.int64)
        cat[found] = self._ok_pos[pos[found]]
        if verify and self.kind == "hex64" and found.any():
            idx = np.flatnonzero(mask)[found]
            same = pc.equal(self.ids.take(pa.array(cat[found])), values.take(pa.array(idx)).cast(pa.string()))
            cat[np.flatnonzero(found)[~same.to_numpy(zero_copy_only=False)]] = -1
        out[np.flatnonzero(mask)] = cat
        return out

    def mark_seen(self, seen: np.ndarray, arrays) -> None:
        """Set ``seen[position]`` for every catalogue id occurring in ``arrays`` (dictionaries of past weeks)."""
        for a in arrays:
            pos = self.positions(a, verify=False)
            seen[pos[pos >= 0]] = True


@dataclass
class DropReference:
    """Reference data for validating a drop (read from the warehouse) or a history batch.

    ``articles``/``customers``: the catalogue ids. ``week_rows``: row counts of
    the warehouse weeks before the declared week (oldest first).
    ``seen_articles``/``seen_customers``: per catalogue position, whether the id
    occurs in any transaction before the declared week; ``None`` when there are
    fewer than ``history_weeks`` weeks of it. ``loaded_parts``: part files
    already in the declared week.
    """

    articles: IdIndex
    customers: IdIndex
    week_rows: dict[dt.date, int] = field(default_factory=dict)
    seen_articles: np.ndarray | None = None
    seen_customers: np.ndarray | None = None
    loaded_parts: list[Path] = field(default_factory=list)


def _dictionaries(col) -> Iterator[pa.Array]:
    """The distinct values of each chunk of a (dictionary-encoded) column, chunk by chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            # ingestion builds each dictionary from its row group, but a sliced one may hold unused values
            yield chunk.dictionary.take(pc.unique(chunk.indices.drop_null()))
        else:
            yield pc.unique(chunk)


def load_reference(warehouse_dir: Path, week: dt.date | None, config: ValidationConfig) -> DropReference:
    """Read what a drop for ``week`` is compared with (see ``DropReference``).

    Row counts come from Parquet metadata; the seen-before marks read only the
    dictionaries of the two id columns of the earlier weeks. Raises
    ``ValidationSetupError`` when the warehouse has no catalogue yet.
    """
    import pyarrow.parquet as pq

    from hm_recsys.data.warehouse import Warehouse

    wh = Warehouse(warehouse_dir)
    for p in (wh.paths.articles, wh.paths.customers):
        if not p.is_file():
            raise ValidationSetupError(
                f"{p} does not exist: drops are checked against the warehouse's catalogue; "
                "ingest the history first (`hm-recsys ingest --raw`)"
            )
    ref = DropReference(
        articles=IdIndex(pq.read_table(wh.paths.articles, columns=["article_id"]).column(0).combine_chunks(),
                         "article"),
        customers=IdIndex(pq.read_table(wh.paths.customers, columns=["customer_id"]).column(0).combine_chunks(),
                          "hex64"),
    )
    weeks = [w for w in wh.weeks() if week is None or w < week]
    for w in weeks:
        ref.week_rows[w] = sum(pq.ParquetFile(f).metadata.num_rows for f in wh.part_files(w))
    if week is not None:
        ref.loaded_parts = wh.part_files(week)
        if len(weeks) >= config.history_weeks:
            ref.seen_articles = np.zeros(len(ref.articles), dtype=bool)
            ref.seen_customers = np.zeros(len(ref.customers), dtype=bool)
            for f in (f for w in weeks for f in wh.part_files(w)):
                t = pq.read_table(f, columns=["article_id", "customer_id"])
                ref.articles.mark_seen(ref.seen_articles, _dictionaries(t.column("article_id")))
                ref.customers.mark_seen(ref.seen_customers, _dictionaries(t.column("customer_id")))
    return ref


def _too_little_history(weeks: int, config: ValidationConfig) -> str:
    return f"the warehouse has {weeks} week(s) before this one; the check needs {config.history_weeks}"


def volume_bounds(ref: DropReference, config: ValidationConfig) -> tuple[tuple[int, int] | None, str]:
    """``((min, max) rows, note)`` for a drop, or ``(None, why skipped)``."""
    weeks = sorted(ref.week_rows)[-config.history_weeks :]
    if len(weeks) < config.history_weeks:
        return None, _too_little_history(len(ref.week_rows), config)
    med = statistics.median(ref.week_rows[w] for w in weeks)
    lo, hi = config.volume_band
    return (math.floor(lo * med), math.ceil(hi * med)), (
        f"median of {len(weeks)} weeks {weeks[0]}..{weeks[-1]} = {med:g} rows; band {lo:g}x..{hi:g}x"
    )


# ==========================================================================
# One drop
# ==========================================================================
def declared_week(file_name: str, week: dt.date | str | None = None) -> tuple[dt.date | None, str | None]:
    """``(week, None)`` from an explicit ``week`` or the name ``transactions_<YYYY-MM-DD>[_suffix].csv``,
    else ``(None, reason)``. The date must be a Wednesday (an H&M week label).
    """
    if week is None:
        m = DROP_NAME.match(file_name)
        if not m:
            return None, (
                f"cannot tell the week of {file_name!r}: name it transactions_<YYYY-MM-DD>.csv "
                "(the week's Wednesday) or pass --week"
            )
        week = m.group(1)
    try:
        day = week if isinstance(week, dt.date) else dt.date.fromisoformat(str(week))
        schema.week_range(day)
    except ValueError as e:
        return None, f"declared week {week!s}: {e}"
    return day, None


def _drop_check(check: str, ok: bool, why: str, detail: str | None = None) -> CheckResult:
    return CheckResult(check, "drop", "transactions", PASSED if ok else FAILED, why, detail=None if ok else detail)


def _skipped(check: str, layer: str, table: str, why: str, detail: str) -> CheckResult:
    return CheckResult(check, layer, table, SKIPPED, why, detail=detail)


_ROW_CHECKS = (
    "t_dat_format", "customer_id_format", "article_id_format", "price_is_number", "price_range",
    "sales_channel_id_set", "article_id_in_articles", "customer_id_in_customers",
    "t_dat_in_week", "t_dat_not_future", "volume", "new_article_share", "new_customer_share",
)  # fmt: skip


def validate_drop(
    path: Path,
    warehouse_dir: Path,
    run_date: dt.date,
    week: dt.date | str | None = None,
    config: ValidationConfig | None = None,
    runner: GxRunner | None = None,
    ingested_ok: bool = False,
) -> DropReport:
    """Validate one weekly transactions drop against the contract and the warehouse. Writes nothing.

    ``week``: the declared week (default: from the file name). ``run_date``:
    rows dated after it are in the future. ``ingested_ok``: the caller knows
    these exact bytes were ingested by an interrupted run of its own (so the
    ledger entry is not a re-sent duplicate). Raises ``ValidationSetupError``
    if the warehouse has no catalogue; a bad *file* never raises: it gets a
    rejected report.
    """
    from hm_recsys.data.ingest import file_sha256, read_ledger

    t0 = time.perf_counter()
    config = config or ValidationConfig()
    path = Path(path)
    sha = file_sha256(path)
    report = DropReport(
        file=path.name,
        path=str(path),
        sha256=sha,
        bytes=path.stat().st_size,
        declared_week=None,
        run_date=run_date.isoformat(),
        config=config,
    )
    checks = report.checks
    day, why_not = declared_week(path.name, week)
    report.declared_week = day.isoformat() if day else None
    checks.append(_drop_check("declared_week", day is not None,
                              "the week decides the partition and the date checks", why_not))

    ledger = read_ledger(warehouse_dir)
    entry = ledger.get(sha)
    dup = entry is not None and not ingested_ok
    checks.append(_drop_check(
        "duplicate_drop", not dup, "the same bytes ingested twice would double a week",
        f"these exact bytes were already ingested from {entry['source']!r} at {entry['ingested_at']}" if dup else None,
    ))
    if dup:
        return _finish(report, t0)

    t1 = time.perf_counter()
    ref = load_reference(warehouse_dir, day, config)
    report.timings["reference"] = time.perf_counter() - t1
    if day is not None:
        mine = {f"part-drop-{sha[:12]}.parquet"} if ingested_ok else set()
        others = [p for p in ref.loaded_parts if p.name not in mine]
        checks.append(_drop_check(
            "week_not_loaded", not others, "a second source for a loaded week would double-count it",
            f"week {day} already holds {', '.join(p.name for p in others)} in the warehouse" if others else None,
        ))

    t1 = time.perf_counter()
    read = _read_plain_file(path, "transactions", config.max_examples)
    report.timings["read"] = time.perf_counter() - t1
    report.lines = read.lines
    checks.extend(read.findings.results(read.lines))
    if read.header is None or read.findings.fatal:
        checks.append(_skipped("columns", "header", "transactions", "", "the file has no readable header"))
        return _finish(report, t0)

    runner = runner or GxRunner.shared()
    import pandas as pd

    t1 = time.perf_counter()
    header_frame = pd.DataFrame({c: pd.Series([], dtype="str") for c in read.header.fields})
    res, key = runner.run(header_suite("transactions"), header_frame, "transactions_header", path.name,
                          config.max_examples, fixed=True)
    report.gx_results.append(key)
    hdr = _checks_from_result(res, "header", "transactions", None, config.max_examples)
    for c in hdr:
        if c.bad:
            c.detail = _column_diff(read.header.fields, schema.TRANSACTION_COLUMNS)
    checks.extend(hdr)
    if any(c.bad for c in hdr):
        for name in _ROW_CHECKS:
            checks.append(_skipped(name, "rows", "transactions", "", "not run: the columns do not match the contract"))
        return _finish(report, t0)

    raw = read.frame
    report.rows = len(raw)
    vol, vol_note = volume_bounds(ref, config) if day is not None else (None, "no declared week")
    novelty = day is not None and ref.seen_articles is not None
    suite = transactions_suite(day, run_date, config, volume=vol, novelty=novelty)
    res, key = runner.run(suite, transactions_frame(raw, ref), "transactions", path.name, config.max_examples)
    report.gx_results.append(key)
    report.timings["gx"] = time.perf_counter() - t1
    rows = _checks_from_result(res, "rows", "transactions", raw, config.max_examples)
    for c in rows:
        if c.check == "volume":
            c.detail = vol_note if c.status == PASSED else f"{c.observed_value} rows; {vol_note}"
    checks.extend(rows)
    if day is None:
        for name in ("t_dat_in_week", "t_dat_not_future"):
            checks.append(_skipped(name, "rows", "transactions", "", "no declared week"))
    if vol is None:
        checks.append(_skipped("volume", "rows", "transactions", "", vol_note))
    if not novelty:
        note = "no declared week" if day is None else _too_little_history(len(ref.week_rows), config)
        for name in ("new_article_share", "new_customer_share"):
            checks.append(_skipped(name, "rows", "transactions", "", note))
    return _finish(report, t0)


def _finish(report: DropReport, t0: float) -> DropReport:
    order = {c: i for i, c in enumerate(check_ids())}
    report.checks.sort(key=lambda c: order.get(c.check, len(order)))  # stable: report order = check_ids()
    report.seconds = time.perf_counter() - t0
    return report


def _column_diff(got: Sequence[str], expected: Sequence[str]) -> str:
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


# ==========================================================================
# The initial history (the three files), week by week
# ==========================================================================
@dataclass
class HistoryReport(_Verdict):
    """Validation of ``articles.csv``, ``customers.csv`` and ``transactions_train.csv``.

    ``checks``: one merged CheckResult per (table, check) over all batches;
    ``weeks``: rows per H&M week of the transactions file.
    """

    raw_dir: str
    run_date: str
    config: ValidationConfig
    checks: list[CheckResult] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    weeks: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0
    gx_failed_results: list = field(default_factory=list, repr=False)


    def summary(self) -> str:
        rows = ", ".join(f"{t}: {n} rows" for t, n in self.rows.items())
        head = f"history in {self.raw_dir} ({rows}, {len(self.weeks)} weeks)"
        if self.status == "accepted":
            return f"{head} passed all checks."
        fails = "; ".join(f"{c.table}.{c.short()}" + (f" in weeks {', '.join(c.weeks[:5])}" if c.weeks else "")
                          for c in self.failures)
        return f"{head} was REJECTED: {fails}."

    def to_dict(self) -> dict:
        return {
            "raw_dir": self.raw_dir,
            "run_date": self.run_date,
            "status": self.status,
            "rows": self.rows,
            "batches": self.batches,
            "failed_checks": [f"{c.table}.{c.check}" for c in self.failures],
            "summary": self.summary(),
            "checks": [c.to_dict() for c in self.checks],
            "weeks": self.weeks,
            "config": self.config.to_dict(),
            "seconds": round(self.seconds, 3),
        }


class _Merged:
    """Merges per-batch CheckResults into one per (table, check), keeping first-seen order."""

    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.by_key: dict[tuple[str, str], CheckResult] = {}

    def add(self, results: list[CheckResult], week: str | None = None) -> None:
        for r in results:
            k = (r.table, r.check)
            if k not in self.by_key:
                first = dataclasses.replace(r, examples=list(r.examples[: self.max_examples]), weeks=[])
                if r.bad and week is not None:
                    first.weeks.append(week)
                self.by_key[k] = first
            else:
                self.by_key[k].merge(r, self.max_examples, week)

    def results(self) -> list[CheckResult]:
        return list(self.by_key.values())


def _week_labels(t_dat: pd.Series) -> np.ndarray:
    """H&M week label (datetime64[D]) of each row; rows with unparseable dates take their neighbour's week."""
    import pandas as pd

    d = pd.to_datetime(t_dat, format="%Y-%m-%d", errors="coerce")
    days = d.to_numpy(dtype="datetime64[D]")
    ok = ~np.isnat(days)
    # 1970-01-01 was a Thursday: day number -> days since the Wednesday on or before it.
    num = days.astype("int64")
    label = (num - (num + 1) % 7).astype("datetime64[D]")
    s = pd.Series(np.where(ok, label, np.datetime64("NaT")))
    return s.ffill().bfill().to_numpy(dtype="datetime64[D]")


def validate_history(
    raw_dir: Path,
    run_date: dt.date,
    config: ValidationConfig | None = None,
    runner: GxRunner | None = None,
    progress: bool = True,
    block_bytes: int = _PLAIN_BLOCK_BYTES,
    batch_rows: int = _BATCH_ROWS,
) -> HistoryReport:
    """Validate the three H&M CSVs in ``raw_dir``; transactions chunk by chunk, in whole H&M weeks.

    The transactions file is read in blocks of ``block_bytes``; rows are
    grouped by their H&M week and each complete week joins the next GX batch,
    which runs once it holds ``batch_rows`` rows (a full-scale week, ~300k
    rows, is one batch; tiny weeks are grouped to save GX's per-run cost).
    Memory is bounded by a block plus the weeks it spans plus one batch (the
    file is date-sorted; an unsorted file is validated in more pieces), the
    catalogue id sets and the per-week row counts. The volume check compares
    each week with the median of the ``history_weeks`` weeks before it; the
    never-seen shares are not applied (every id is new when a history begins).
    Raises ``ValidationSetupError`` if a file is missing.
    """
    import pandas as pd
    import pyarrow as pa
    from tqdm.auto import tqdm

    from hm_recsys.data.hmcsv import blank_tail_start

    t0 = time.perf_counter()
    config = config or ValidationConfig()
    raw_dir = Path(raw_dir)
    files = {t: raw_dir / schema.FILES[t] for t in ("articles", "customers", "transactions")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ValidationSetupError(f"missing H&M CSV(s): {', '.join(missing)}")
    runner = runner or GxRunner.shared()
    report = HistoryReport(raw_dir=str(raw_dir), run_date=run_date.isoformat(), config=config)
    merged = _Merged(config.max_examples)
    n = config.max_examples

    def run(suite, frame, asset, raw, layer, table, run_name, week=None):
        res, key = runner.run(suite, frame, asset, run_name, n, fixed=layer == "header")
        checks = _checks_from_result(res, layer, table, raw, n)
        report.batches += 1
        if any(c.bad for c in checks):
            report.gx_failed_results.append(key)
        else:
            runner.forget([key])
        merged.add(checks, week)
        return checks

    known: dict[str, pa.Array] = {}
    builders = {"articles": (articles_suite, articles_frame, "article_id"),
                "customers": (customers_suite, customers_frame, "customer_id")}
    for table in ("articles", "customers"):
        reader = _read_quoted_file if table == "articles" else _read_plain_file
        read = reader(files[table], table, n)
        merged.add(read.findings.results(read.lines))
        known[table] = pa.array([], pa.string())
        if read.header is None or read.findings.fatal:
            continue
        hdr = run(header_suite(table), pd.DataFrame(columns=read.header.fields), f"{table}_header", None,
                  "header", table, files[table].name)
        if any(c.bad for c in hdr):
            merged.by_key[(table, "columns")].detail = _column_diff(read.header.fields, schema.COLUMNS[table])
            continue
        suite_fn, frame_fn, key_col = builders[table]
        report.rows[table] = len(read.frame)
        run(suite_fn(config), frame_fn(read.frame), table, read.frame, "rows", table, files[table].name)
        known[table] = pa.array(read.frame[key_col].unique(), pa.string())
        del read

    ref = DropReference(articles=IdIndex(known["articles"], "article"), customers=IdIndex(known["customers"], "hex64"))
    week_rows: dict[dt.date, int] = {}
    path = files["transactions"]
    findings = _Findings("transactions", n)
    buffers: dict[np.datetime64, list[pd.DataFrame]] = {}  # weeks still being read
    ready: list[pd.DataFrame] = []  # complete weeks waiting for a GX batch
    ready_weeks: list[dt.date] = []
    last_date = None
    after_run = run_date.isoformat()

    def run_ready() -> None:
        if not ready:
            return
        frame = pd.concat(ready)
        label = f"{min(ready_weeks)}..{max(ready_weeks)}"
        future = sorted(d for d in frame["t_dat"].unique().tolist() if d > after_run and schema.ISO_DATE.match(d))
        suite = transactions_suite(None, run_date, config, future_dates=future)
        run(suite, transactions_frame(frame, ref), "transactions", frame, "rows", "transactions",
            f"{path.name}:{label}", label)
        ready.clear()
        ready_weeks.clear()

    def complete(weeks_done) -> None:
        for wk in sorted(weeks_done):
            frames = buffers.pop(wk)
            ready.extend(frames)
            ready_weeks.append(wk.astype(dt.date))
            if sum(len(x) for x in ready) >= batch_rows:
                run_ready()

    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc="validate history", unit="B",
                                      unit_scale=True, disable=not progress, leave=False) as bar:
        header = _read_header(f, "transactions", findings)
        ok_header = header is not None
        if header is not None:
            hdr = run(header_suite("transactions"), pd.DataFrame(columns=header.fields), "transactions_header", None,
                      "header", "transactions", path.name)
            if any(c.bad for c in hdr):
                diff = _column_diff(header.fields, schema.TRANSACTION_COLUMNS)
                merged.by_key[("transactions", "columns")].detail = diff
                ok_header = False
            bar.update(len(header.raw))
        line = 2
        seen_rows = False
        if ok_header:
            for block, at_eof in _iter_blocks(f, block_bytes):
                seen_rows = seen_rows or blank_tail_start(block) > 0  # blank lines alone are no rows
                data, lines = _scan_plain_block(block, line, header.fields, at_eof, findings)
                line += _lines_in(block)
                bar.update(len(block))
                frame = _parse_plain(data, header.fields, lines)
                if frame.empty:
                    continue
                labels = _week_labels(frame["t_dat"])
                for wk in np.unique(labels):
                    part = frame[labels == wk]
                    buffers.setdefault(wk, []).append(part)
                    label = wk.astype(dt.date)
                    week_rows[label] = week_rows.get(label, 0) + len(part)
                latest = pd.to_datetime(frame["t_dat"], format="%Y-%m-%d", errors="coerce").max()
                if pd.notna(latest):
                    last_date = max(last_date, latest.date()) if last_date else latest.date()
                # Date-sorted input: every week before the block's last row's week is complete. (An
                # unsorted file still validates correctly: a week that comes back is checked in pieces.)
                complete({wk for wk in buffers if wk < labels[-1]})
                if sum(len(p) for parts in buffers.values() for p in parts) > _FLUSH_ROWS:
                    complete(set(buffers))
            complete(set(buffers))
            run_ready()
            if not seen_rows:
                findings.add("header_only", 1, "the file has a header and no data rows")
    report.rows["transactions"] = sum(week_rows.values())
    merged.add(findings.results(line - 1 if ok_header else None))

    if week_rows:
        # The last week is partial when the data stops before its Tuesday: its volume is not comparable.
        last_week = max(week_rows)
        partial = {last_week} if last_date and last_date < last_week + dt.timedelta(days=6) else set()
        vol = weekly_volume_frame(week_rows, config.history_weeks, partial)
        chk = run(weekly_volume_suite(config), vol, "transactions_weekly", vol, "rows", "transactions",
                  f"{path.name}:weekly")
        for c in chk:
            c.detail = f"median of the {config.history_weeks} weeks before each week; band {config.volume_band}"
        merged.by_key[("transactions", "volume")].detail = chk[0].detail
    report.weeks = {w.isoformat(): n_ for w, n_ in sorted(week_rows.items())}
    report.checks = merged.results()
    report.seconds = time.perf_counter() - t0
    return report


def write_report(report: DropReport | HistoryReport, folder: Path, runner: GxRunner | None = None,
                 docs: bool = True, extra: dict | None = None) -> dict[str, Path]:
    """Write ``report.json`` (and, if GX ran and ``docs``, ``data_docs/``) into ``folder``.

    ``extra``: more top-level fields for the JSON. Returns ``{"report": path,
    "data_docs": index.html path (if built)}``. The JSON is written to a
    temporary name and renamed, so a reader never sees half of it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    ids = report.gx_results if isinstance(report, DropReport) else report.gx_failed_results
    d = {**report.to_dict(), **(extra or {})}
    if docs and ids:
        runner = runner or GxRunner.shared()
        out["data_docs"] = runner.build_docs(ids, folder / "data_docs")
        d["data_docs"] = str(out["data_docs"])
    else:
        d["data_docs"] = None
        d["data_docs_note"] = "GX did not run: the file could not be read as a table" if not ids else "not built"
    tmp = folder / ".report.json.tmp"
    tmp.write_text(to_json(d) + "\n", encoding="utf-8")
    tmp.replace(folder / "report.json")
    out["report"] = folder / "report.json"
    return out


def check_ids(layer: str | None = None) -> tuple[str, ...]:
    """Every transactions check id a drop report can contain, in report order (for docs and tests)."""
    drop = ("declared_week", "duplicate_drop", "week_not_loaded")
    structure = _Findings.ORDER
    ids = {"drop": drop, "structure": structure, "header": ("columns",), "rows": _ROW_CHECKS}
    return ids[layer] if layer else drop + structure + ("columns",) + _ROW_CHECKS

