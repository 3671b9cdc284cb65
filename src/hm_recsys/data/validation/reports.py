"""The reports: a drop's and the history's verdict, their one-paragraph summaries, ``report.json`` and Data Docs.

Each GX expectation carries its check id and a one-line *why* in its
``meta``, so the why shows in the JSON report and in the Data Docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hm_recsys.data.validation.config import ValidationConfig
from hm_recsys.data.validation.results import SKIPPED, CheckResult, to_json
from hm_recsys.data.validation.runner import GxRunner


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
