"""Layer 1, structure: reading a CSV in plain Python, with line numbers, before GX sees a table.

GX needs a parsed table and cannot say *why* a file does not parse, so these
checks run over the bytes: empty file, header-only file, wrong delimiter,
non-UTF-8 lines, lines with the wrong number of fields, a truncated last
line. The first three stop everything (``Findings.fatal``); bad lines are set
aside (reported with their line numbers) and the well-formed lines go on, as
a frame of raw strings indexed by line number (1-based file lines, the header
being line 1), to the GX layers.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm_recsys.data import schema
from hm_recsys.data.validation.results import FAILED, PASSED, CheckResult

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_DELIMITERS = (";", "\t", "|")
_SAMPLE_CHARS = 200  # a quoted bad line is cut to this many characters


class Findings:
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


def read_header(f, table: str, findings: Findings) -> _Header | None:
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
    (``parse_plain`` and ingestion) as in this module.
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


def scan_plain_block(
    block: bytes, first_line: int, header: list[str], at_eof: bool, findings: Findings
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


def parse_plain(data: bytes, header: list[str], lines: np.ndarray) -> pd.DataFrame:
    """Well-formed lines (as ``scan_plain_block`` keeps them) -> DataFrame of raw strings indexed by line number.

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


def iter_blocks(f, block_bytes: int) -> Iterator[tuple[bytes, bool]]:
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


def lines_in(block: bytes) -> int:
    return block.count(b"\n") + (0 if block.endswith(b"\n") else 1)


@dataclass
class _ReadFile:
    table: str
    header: _Header | None
    findings: Findings
    frame: pd.DataFrame | None = None  # well-formed rows (whole-file readers only)
    lines: int = 0


def read_plain_file(path: Path, table: str, max_examples: int) -> _ReadFile:
    """Read a whole file without newlines in values (a drop, customers.csv) with structure checks."""
    from hm_recsys.data.hmcsv import blank_tail_start

    findings = Findings(table, max_examples)
    with open(path, "rb") as f:
        header = read_header(f, table, findings)
        out = _ReadFile(table, header, findings, lines=1 if header else 0)
        if header is None:
            return out
        body = f.read()
    if blank_tail_start(body) == 0:  # nothing, or only blank lines
        findings.add("header_only", 1, "the file has a header and no data rows")
        out.lines = 1 + (lines_in(body) if body else 0)
        return out
    data, lines = scan_plain_block(body, 2, header.fields, True, findings)
    out.lines = 1 + lines_in(body)
    out.frame = parse_plain(data, header.fields, lines)
    return out


def read_quoted_file(path: Path, table: str, max_examples: int) -> _ReadFile:
    """Read articles.csv (quoted fields, newlines allowed inside quotes) with structure checks."""
    import pandas as pd

    from hm_recsys.data.hmcsv import blank_tail_start

    findings = Findings(table, max_examples)
    whole = path.read_bytes()
    data = whole[: blank_tail_start(whole)]  # blank lines that end the file are no records
    with io.BytesIO(data) as f:
        header = read_header(f, table, findings)
        out = _ReadFile(table, header, findings, lines=1 if header else 0)
        if header is None:
            return out
        body_start = f.tell()
    if body_start >= len(data):
        findings.add("header_only", 1, "the file has a header and no data rows")
        out.lines = lines_in(whole)
        return out
    # surrogateescape keeps undecodable bytes visible (as lone surrogates) without losing positions.
    text = data[body_start:].decode("utf-8", errors="surrogateescape")
    body_lines = lines_in(data[body_start:])
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
    out.lines = lines_in(whole)
    cols = {c: pd.Series([r[i] for r in records], dtype="str") for i, c in enumerate(header.fields)}
    out.frame = pd.DataFrame(cols)
    out.frame.index = pd.Index(np.asarray(numbers, dtype=np.int64), name="line")
    return out
