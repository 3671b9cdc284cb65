"""One weekly drop: its declared week, the ledger and the warehouse, then structure, header and rows.

``validate_drop`` judges one ``transactions_<YYYY-MM-DD>.csv`` in layers, each
only when the one before lets it be read: the drop itself (declared week,
not ingested before, week not loaded), structure (``structure``), the header
suite, then the rows suite with the volume and never-seen shares measured
against the warehouse's recent weeks (``reference``).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from pathlib import Path

from hm_recsys.data import schema
from hm_recsys.data.validation.config import ValidationConfig
from hm_recsys.data.validation.reference import load_reference, too_little_history, volume_bounds
from hm_recsys.data.validation.reports import DropReport
from hm_recsys.data.validation.results import FAILED, PASSED, SKIPPED, CheckResult
from hm_recsys.data.validation.runner import GxRunner, checks_from_result
from hm_recsys.data.validation.structure import Findings, read_plain_file
from hm_recsys.data.validation.suites.header import column_diff, header_suite
from hm_recsys.data.validation.suites.transactions import ROW_CHECKS, transactions_frame, transactions_suite

DROP_NAME = re.compile(r"^transactions_(\d{4}-\d{2}-\d{2})(?:[_.-][^/]*)?\.csv$")


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
    read = read_plain_file(path, "transactions", config.max_examples)
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
    hdr = checks_from_result(res, "header", "transactions", None, config.max_examples)
    for c in hdr:
        if c.bad:
            c.detail = column_diff(read.header.fields, schema.TRANSACTION_COLUMNS)
    checks.extend(hdr)
    if any(c.bad for c in hdr):
        for name in ROW_CHECKS:
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
    rows = checks_from_result(res, "rows", "transactions", raw, config.max_examples)
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
        note = "no declared week" if day is None else too_little_history(len(ref.week_rows), config)
        for name in ("new_article_share", "new_customer_share"):
            checks.append(_skipped(name, "rows", "transactions", "", note))
    return _finish(report, t0)


def _finish(report: DropReport, t0: float) -> DropReport:
    order = {c: i for i, c in enumerate(check_ids())}
    report.checks.sort(key=lambda c: order.get(c.check, len(order)))  # stable: report order = check_ids()
    report.seconds = time.perf_counter() - t0
    return report


def check_ids(layer: str | None = None) -> tuple[str, ...]:
    """Every transactions check id a drop report can contain, in report order (for docs and tests)."""
    drop = ("declared_week", "duplicate_drop", "week_not_loaded")
    structure = Findings.ORDER
    ids = {"drop": drop, "structure": structure, "header": ("columns",), "rows": ROW_CHECKS}
    return ids[layer] if layer else drop + structure + ("columns",) + ROW_CHECKS
