"""The initial history (articles, customers, transactions_train), the transactions week by week.

The catalogue files are validated whole; the transactions file is read in
blocks and validated in batches of whole H&M weeks, so memory stays bounded
at full scale. One merged ``CheckResult`` per (table, check) says in which
weeks a check failed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hm_recsys.data import schema
from hm_recsys.data.validation.config import ValidationConfig
from hm_recsys.data.validation.reference import DropReference, IdIndex
from hm_recsys.data.validation.reports import HistoryReport
from hm_recsys.data.validation.results import CheckResult, ValidationSetupError
from hm_recsys.data.validation.runner import GxRunner, checks_from_result
from hm_recsys.data.validation.structure import (
    Findings,
    iter_blocks,
    lines_in,
    parse_plain,
    read_header,
    read_plain_file,
    read_quoted_file,
    scan_plain_block,
)
from hm_recsys.data.validation.suites.articles import articles_frame, articles_suite
from hm_recsys.data.validation.suites.customers import customers_frame, customers_suite
from hm_recsys.data.validation.suites.header import column_diff, header_suite
from hm_recsys.data.validation.suites.transactions import (
    transactions_frame,
    transactions_suite,
    weekly_volume_frame,
    weekly_volume_suite,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_PLAIN_BLOCK_BYTES = 64 << 20  # history transactions are read 64 MiB at a time (~650k rows)
_FLUSH_ROWS = 4_000_000  # unsorted history: validate buffered weeks in pieces beyond this
_BATCH_ROWS = 300_000  # history rows per GX batch: about one full-scale week


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
        checks = checks_from_result(res, layer, table, raw, n)
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
        reader = read_quoted_file if table == "articles" else read_plain_file
        read = reader(files[table], table, n)
        merged.add(read.findings.results(read.lines))
        known[table] = pa.array([], pa.string())
        if read.header is None or read.findings.fatal:
            continue
        hdr = run(header_suite(table), pd.DataFrame(columns=read.header.fields), f"{table}_header", None,
                  "header", table, files[table].name)
        if any(c.bad for c in hdr):
            merged.by_key[(table, "columns")].detail = column_diff(read.header.fields, schema.COLUMNS[table])
            continue
        suite_fn, frame_fn, key_col = builders[table]
        report.rows[table] = len(read.frame)
        run(suite_fn(config), frame_fn(read.frame), table, read.frame, "rows", table, files[table].name)
        known[table] = pa.array(read.frame[key_col].unique(), pa.string())
        del read

    ref = DropReference(articles=IdIndex(known["articles"], "article"), customers=IdIndex(known["customers"], "hex64"))
    week_rows: dict[dt.date, int] = {}
    path = files["transactions"]
    findings = Findings("transactions", n)
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
        header = read_header(f, "transactions", findings)
        ok_header = header is not None
        if header is not None:
            hdr = run(header_suite("transactions"), pd.DataFrame(columns=header.fields), "transactions_header", None,
                      "header", "transactions", path.name)
            if any(c.bad for c in hdr):
                diff = column_diff(header.fields, schema.TRANSACTION_COLUMNS)
                merged.by_key[("transactions", "columns")].detail = diff
                ok_header = False
            bar.update(len(header.raw))
        line = 2
        seen_rows = False
        if ok_header:
            for block, at_eof in iter_blocks(f, block_bytes):
                seen_rows = seen_rows or blank_tail_start(block) > 0  # blank lines alone are no rows
                data, lines = scan_plain_block(block, line, header.fields, at_eof, findings)
                line += lines_in(block)
                bar.update(len(block))
                frame = parse_plain(data, header.fields, lines)
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
