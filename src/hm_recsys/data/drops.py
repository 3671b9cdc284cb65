"""A drop's life: validate, then ingest (accepted) or quarantine (rejected); ``hm-recsys validate``.

For every ``*.csv`` in the incoming folder, oldest first (the order
``hm_recsys.data.ingest.process_incoming`` uses; this module is its
validation hook):

* **accepted** -> ``ingest_drop`` (one part per week, idempotent by sha256) and
  moved to ``processed/``; its ``report.json`` and ``drift.png`` go to
  ``validation/drops/<stem>-<sha12>/`` (``Layout.drop_reports_dir``);
* **rejected** -> moved byte for byte to ``quarantine/<stem>-<sha12>/`` next to
  ``report.json`` (which checks failed, counts, example rows with line
  numbers), ``data_docs/`` (GX Data Docs HTML) and ``drift.png``. The command
  exits 1 and prints a one-paragraph summary per rejected drop on stderr.

Only regular files are drops. An entry named ``*.csv`` that is anything else
(a symbolic link, even to a good drop; a FIFO, socket, device or directory)
is rejected without being read (failed check ``regular_file``): a link would
make the worker validate, and quote in reports and Data Docs, whatever file
it points to; a FIFO would block the run. The entry itself (a link stays a
link, never its target's bytes) is renamed to
``quarantine/<stem>-<kind>-<id12>/`` next to ``report.json``; if it cannot be
renamed (another filesystem), it stays in incoming and is refused again next
run. Either way the run fails like any rejection.

Every drop, accepted or rejected, is also measured against the training
window (``hm_recsys.data.drift``: prices, channels, category mix, new
customers and articles) before it is ingested: the ``drift`` section of its
``report.json``, ``drift.png`` next to it, and ``drift_verdict`` /
``drift_report`` / ``drift_plot`` in its outcome. Drift never rejects a drop
and a failure to compute it never changes the drop's fate (it is recorded as
verdict ``error``).

Nothing is lost, and a file sent again is recognised:

* a *fixed* file has new bytes, so it is validated afresh (and accepted);
* the *same bad* bytes sent again are recognised by their sha256 in the
  quarantine. They are validated again (a verdict can depend on the name, the
  run date and the warehouse: a week sent before it ended passes once it
  has), and if rejected again the extra copy is removed (quarantine holds
  identical bytes) and the resubmission logged in that ``report.json``;
* the same *good* bytes sent again are rejected as ``duplicate_drop`` (they
  would double the week), except when they are the file this very process
  ingested before a crash stopped it from moving it to ``processed/``; then
  the move is simply completed.

The outcome per drop is a small JSON-able dict of ids and paths (for XCom),
never data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

from hm_recsys.cli import iso_date
from hm_recsys.data.drift import DriftConfig, drift_for_drop, plot_drift
from hm_recsys.data.validate import (
    FAILED,
    CheckResult,
    DropReport,
    GxRunner,
    ValidationConfig,
    ValidationSetupError,
    declared_week,
    to_json,
    validate_drop,
    validate_history,
    write_report,
)
from hm_recsys.layout import Layout

__all__ = ["DropsRejected", "find_quarantined", "main", "process_incoming", "quarantine", "refuse_entry",
           "validate_incoming"]


class DropsRejected(RuntimeError):
    """At least one drop was rejected; ``.result`` is what ``process_incoming`` returned."""

    def __init__(self, result: dict):
        self.result = result
        lines = [d["summary"] for d in result["drops"] if d["status"] == "rejected"]
        super().__init__(f"{len(lines)} drop(s) rejected:\n" + "\n".join(lines))


# --------------------------------------------------------------------------
# Quarantine
# --------------------------------------------------------------------------
def quarantine_folder(quarantine_dir: Path, file_name: str, sha256: str) -> Path:
    """``<quarantine_dir>/<stem>-<sha12>``: one folder per rejected content."""
    return Path(quarantine_dir) / f"{Path(file_name).stem}-{sha256[:12]}"


def find_quarantined(quarantine_dir: Path, sha256: str) -> Path | None:
    """The quarantine folder already holding these exact bytes (under any name), or ``None``."""
    qdir = Path(quarantine_dir)
    if not qdir.is_dir():
        return None
    for folder in sorted(qdir.glob(f"*-{sha256[:12]}")):
        rep = folder / "report.json"
        if not rep.is_file():
            continue  # an interrupted quarantine: it will be redone
        try:
            stored = json.loads(rep.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if stored.get("sha256") == sha256 and (folder / stored.get("file", "")).is_file():
            return folder
    return None


def _move_exact(src: Path, dest: Path, sha256: str) -> None:
    """Move ``src`` to ``dest`` keeping every byte; across filesystems, copy, verify the hash, then delete."""
    from hm_recsys.data.ingest import file_sha256

    try:
        os.replace(src, dest)
        return
    except OSError:
        pass
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    if file_sha256(tmp) != sha256:
        tmp.unlink()
        raise OSError(f"copy of {src} to {tmp} does not have the original sha256; the original is left in place")
    os.replace(tmp, dest)
    src.unlink()


def quarantine(path: Path, report: DropReport, quarantine_dir: Path, runner: GxRunner | None = None,
               drift: dict | None = None) -> dict:
    """Move a rejected drop to its quarantine folder with ``report.json``, ``data_docs/`` and ``drift.png``.

    ``drift``: the drop's ``drift_report`` (its ``drift`` section; plotted as
    ``drift.png``). The report, the Data Docs and the plot are written first
    and the file moved last, so a folder whose file is missing is an
    interrupted quarantine (redone next time). Returns ``{"quarantine",
    "quarantined_file", "report", "data_docs"}`` as strings, plus
    ``{"drift_verdict", "drift_report", "drift_plot"}`` when ``drift`` is given.
    """
    path = Path(path)
    folder = quarantine_folder(quarantine_dir, path.name, report.sha256)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / path.name
    keys = _write_drift_plot(drift, folder)
    extra = {"quarantined_file": str(dest), **({"drift": drift} if drift is not None else {})}
    written = write_report(report, folder, runner, extra=extra)
    _move_exact(path, dest, report.sha256)
    return {
        "quarantine": str(folder),
        "quarantined_file": str(dest),
        "report": str(written["report"]),
        "data_docs": str(written["data_docs"]) if "data_docs" in written else None,
        **keys,
    }


_REGULAR_FILE_WHY = ("a drop must be a regular file: a link would make the worker read (and quote in reports) any "
                     "file it points to, and a FIFO, socket, device or directory is no file to read")


def refuse_entry(path: Path, kind: str, reason: str, quarantine_dir: Path, run_date: dt.date) -> dict:
    """Quarantine an incoming entry that is not a regular file, without reading it; returns its outcome.

    ``kind`` and ``reason``: ``ingest.entry_kind`` and ``ingest.refusal_reason``
    of ``path``. Nothing is opened or followed: ``report.json`` (the failed check
    ``regular_file``; ``sha256``, ``rows`` and ``bytes`` are null, since nothing
    was read) is written to ``<quarantine_dir>/<stem>-<kind>-<id12>/``, then the
    entry itself is renamed next to it (``os.rename`` moves a link, not its
    target). ``id12`` hashes what ``lstat`` says of the entry, so another entry
    of the same name gets another folder, and the same one refused again (left
    in place) the same folder. If the rename fails, the entry stays where it is
    and the report and summary say so. The outcome has ``_outcome``'s keys
    (``status`` ``rejected``, ``failed_checks`` ``["regular_file"]``) plus
    ``refused`` (``kind``).
    """
    from hm_recsys.data.ingest import ENTRY_KINDS

    path = Path(path)
    try:
        st = os.lstat(path)
        ident = f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"
    except OSError:
        ident = ""
    target = None
    if kind == "symlink":
        try:
            target = os.readlink(path)  # the link's own text, never the target's bytes
        except OSError:
            pass
    token = hashlib.sha256(f"{kind}\0{path.name}\0{target}\0{ident}".encode()).hexdigest()
    folder = Path(quarantine_dir) / f"{path.stem}-{kind.replace('_', '-')}-{token[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / path.name
    check = CheckResult("regular_file", "drop", "transactions", FAILED, _REGULAR_FILE_WHY, detail=reason)
    day, _ = declared_week(path.name)

    def write(moved: bool, error: str | None) -> str:
        summary = f"{path.name} was REJECTED without being read: 1 of 1 checks failed: regular_file ({reason})."
        if moved:
            noun = ENTRY_KINDS[kind].split(" ", 1)[1]  # "symbolic link", "FIFO (named pipe)", ...
            summary += f" The {noun} itself was moved, as is, to {folder}/ next to report.json."
        else:
            summary += (f" It could not be moved without reading it ({error}), so it was left in {path.parent}/ "
                        f"and will be refused again; its report is in {folder}/. Remove it by hand.")
        summary += " Put the drop's own bytes into incoming as a regular file (write it elsewhere, then rename it in)."
        report = {
            "file": path.name, "path": str(path), "sha256": None, "bytes": None, "table": "transactions",
            "declared_week": day.isoformat() if day else None, "run_date": run_date.isoformat(),
            "status": "rejected", "refused": kind, "link_target": target, "rows": None, "lines": None,
            "failed_checks": ["regular_file"], "skipped_checks": [], "summary": summary,
            "checks": [check.to_dict()],
            "quarantined_file": str(dest) if moved else None, "left_in": None if moved else str(path),
            "move_error": error, "data_docs": None, "data_docs_note": "GX did not run: the entry was not read",
        }
        tmp = folder / ".report.json.tmp"
        tmp.write_text(to_json(report) + "\n", encoding="utf-8")
        tmp.replace(folder / "report.json")
        return summary

    # The report first, the entry last (as ``quarantine`` does): a folder without its entry is then
    # an interrupted quarantine, never an entry without its report.
    summary = write(True, None)
    moved, error = True, None
    try:
        if os.path.lexists(dest):
            raise FileExistsError(f"{dest} already exists")
        os.rename(path, dest)  # never a copy: copying would read it
    except OSError as exc:
        moved, error = False, f"{type(exc).__name__}: {exc}"
        summary = write(False, error)
    return {
        "file": path.name,
        "sha256": None,
        "week": day.isoformat() if day else None,
        "status": "rejected",
        "rows": None,
        "failed_checks": ["regular_file"],
        "skipped_checks": [],
        "ingest": None,
        "moved_to": None,
        "quarantine": str(folder),
        "quarantined_file": str(dest) if moved else None,
        "report": str(folder / "report.json"),
        "data_docs": None,
        "already_quarantined": False,
        "drift_verdict": None,
        "drift_report": None,
        "drift_plot": None,
        "refused": kind,
        "summary": summary,
    }


# --------------------------------------------------------------------------
# Drift (a warning signal: it never decides a drop's fate)
# --------------------------------------------------------------------------
def _drift(path: Path, report: DropReport, warehouse_dir: Path, config: DriftConfig | None) -> dict:
    """The drop's drift against the warehouse as it is now (before this drop is ingested); never raises."""
    week = dt.date.fromisoformat(report.declared_week) if report.declared_week else None
    return drift_for_drop(path, week, warehouse_dir, config)


def _write_drift_plot(drift: dict | None, folder: Path) -> dict:
    """Plot ``drift`` as ``<folder>/drift.png``; returns the outcome's drift keys (the report is
    ``<folder>/report.json``). A plotting failure is recorded in ``drift`` (``plot_error``), never raised."""
    if drift is None:
        return {}
    plot: Path | None = folder / "drift.png"
    try:
        plot_drift(drift, plot)
    except Exception as exc:  # noqa: BLE001 (a plot must never lose the drop)
        drift["plot_error"] = f"{type(exc).__name__}: {exc}"
        plot = None
    drift["plot"] = str(plot) if plot else None
    return {"drift_verdict": drift["verdict"], "drift_report": str(folder / "report.json"),
            "drift_plot": drift["plot"]}


def _drift_clause(drift: dict | None) -> str:
    """One sentence for a drop's summary: the drift verdict and the metrics that raised it."""
    if drift is None:
        return ""
    verdict = drift["verdict"]
    if verdict == "error":
        return f" Drift: ERROR, not computed ({drift.get('error')})."
    n = len((drift.get("reference") or {}).get("weeks") or [])
    flagged = [f"{name.replace('_', ' ')} {m['verdict']}" for name, m in drift["metrics"].items()
               if m["verdict"] in ("warn", "drift")]
    what = f" ({', '.join(flagged)})" if flagged else ""
    return f" Drift vs {n} reference week(s): {verdict.upper()}{what}."


def _default_reports_dir(processed_dir: Path) -> Path:
    """``Layout.drop_reports_dir`` of the layout that ``processed_dir`` belongs to (the two folders' relation
    is taken from ``Layout``, so this follows it if it moves)."""
    probe = Layout(Path("/h"))
    return Path(processed_dir).parent / os.path.relpath(probe.drop_reports_dir, probe.processed_dir.parent)


def _log_resubmission(folder: Path, file_name: str, report: DropReport, drift: dict | None = None,
                      latest_drift: bool = False) -> dict:
    """Append ``{file, at, status, failed_checks, drift_verdict}`` to the quarantined report's ``resubmissions``.

    ``latest_drift``: these bytes stay in this folder (rejected again), so its
    ``drift`` section (and ``drift.png``, written by the caller) become this attempt's.
    """
    rep = folder / "report.json"
    stored = json.loads(rep.read_text(encoding="utf-8"))
    stored.setdefault("resubmissions", []).append({
        "file": file_name,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_date": report.run_date,
        "status": report.status,
        "failed_checks": report.failed_checks,
        "drift_verdict": drift["verdict"] if drift is not None else None,
    })
    if latest_drift and drift is not None:
        stored["drift"] = drift
    tmp = folder / ".report.json.tmp"
    tmp.write_text(to_json(stored) + "\n", encoding="utf-8")
    tmp.replace(rep)
    return stored


def _was_processed(processed_dir: Path, name: str, sha256: str) -> bool:
    """Whether these bytes already sit in processed/ (under ingest's naming: ``<name>`` or ``<stem>-<sha12>.csv``)."""
    from hm_recsys.data.ingest import file_sha256

    p = Path(name)
    for cand in (processed_dir / p.name, processed_dir / f"{p.stem}-{sha256[:12]}{p.suffix}"):
        if cand.is_file() and file_sha256(cand) == sha256:
            return True
    return False


# --------------------------------------------------------------------------
# The incoming folder
# --------------------------------------------------------------------------
def _outcome(report: DropReport) -> dict:
    return {
        "file": report.file,
        "sha256": report.sha256,
        "week": report.declared_week,
        "status": report.status,
        "rows": report.rows,
        "failed_checks": report.failed_checks,
        "skipped_checks": report.skipped_checks,
        "ingest": None,
        "moved_to": None,
        "quarantine": None,
        "quarantined_file": None,
        "report": None,
        "data_docs": None,
        "already_quarantined": False,
        "drift_verdict": None,
        "drift_report": None,
        "drift_plot": None,
    }


def process_incoming(
    incoming_dir: Path,
    warehouse_dir: Path,
    processed_dir: Path,
    quarantine_dir: Path,
    run_date: dt.date,
    config: ValidationConfig | None = None,
    runner: GxRunner | None = None,
    progress: bool = False,
    drift_config: DriftConfig | None = None,
    reports_dir: Path | None = None,
) -> dict:
    """Validate every drop in ``incoming_dir``; ingest + move the accepted, quarantine the rejected.

    Drops are taken oldest first (mtime, then name), each validated (and its
    drift measured) against the warehouse as the drops before it left it.
    ``drift_config``: default ``DriftConfig.from_env()``. ``reports_dir``:
    where accepted drops get their ``<stem>-<sha12>/`` report folder
    (default: the ``Layout.drop_reports_dir`` beside ``processed_dir``).
    Returns ``{"run_date": ISO, "accepted": n, "rejected": n, "drops":
    [outcome, ...]}`` where an outcome is ``{"file", "sha256", "week",
    "status": "accepted"|"rejected", "rows", "failed_checks",
    "skipped_checks", "ingest": "ingested"|"duplicate"|None, "moved_to",
    "quarantine", "quarantined_file", "report", "data_docs",
    "already_quarantined", "drift_verdict":
    "ok"|"warn"|"drift"|"no-reference"|"no-data"|"error", "drift_report",
    "drift_plot", "summary"}`` (paths as strings; ``report`` and
    ``drift_report`` are the same ``report.json``). An entry that is not a
    regular file is rejected unread (``refuse_entry``): its outcome adds
    ``"refused": kind`` and has no sha256, rows or drift. Raises
    ``ValidationSetupError`` if the warehouse has no catalogue yet (and a
    drop needs validating) or the lock file is not a regular file.
    """
    from tqdm.auto import tqdm

    from hm_recsys.data import ingest
    from hm_recsys.data.ingest import IngestError, file_sha256, read_ledger

    incoming_dir, warehouse_dir = Path(incoming_dir), Path(warehouse_dir)
    processed_dir, quarantine_dir = Path(processed_dir), Path(quarantine_dir)
    config = config or ValidationConfig()
    drift_config = drift_config if drift_config is not None else _drift_config()
    reports_dir = Path(reports_dir) if reports_dir is not None else _default_reports_dir(processed_dir)
    if not incoming_dir.is_dir():
        raise ValidationSetupError(f"incoming folder {incoming_dir} does not exist")
    outcomes: dict[str, dict] = {}
    reports: dict[str, DropReport] = {}
    drifts: dict[str, dict] = {}
    # Two runs at once (a double-triggered DAG) would validate and move the same files: the second waits.
    lock = _open_lock(incoming_dir / ".validate.lock")
    fcntl.flock(lock, fcntl.LOCK_EX)
    total = sum(1 for _ in incoming_dir.glob("*.csv"))
    bar = tqdm(total=total, desc="validate drops", unit="drop", disable=not progress, leave=False)

    def refuse(path: Path, kind: str, reason: str) -> None:
        bar.update(1)
        outcomes[path.name] = refuse_entry(path, kind, reason, quarantine_dir, run_date)

    def accept(path: Path) -> bool:
        bar.update(1)
        sha = file_sha256(path)
        entry = read_ledger(warehouse_dir).get(sha)
        resumed = entry is not None and entry.get("source") == path.name and not _was_processed(
            processed_dir, path.name, sha
        )
        report = validate_drop(path, warehouse_dir, run_date, config=config, runner=runner, ingested_ok=resumed)
        reports[path.name] = report
        out = outcomes[path.name] = _outcome(report)
        # Measured now, before ingestion, so that the reference is the weeks before this drop, as validated.
        drift = drifts[path.name] = _drift(path, report, warehouse_dir, drift_config)
        # The same bytes may sit in quarantine already. They are judged again all the same: a verdict
        # can depend on the name (declared week), the run date and the warehouse, not only on the bytes.
        prior = find_quarantined(quarantine_dir, sha)
        if report.status == "accepted":
            if prior is not None:
                _log_resubmission(prior, path.name, report, drift)
            out["summary"] = report.summary() + _drift_clause(drift)  # its report is written once it is ingested
            return True
        if prior is None:
            out.update(quarantine(path, report, quarantine_dir, runner, drift=drift))
            out["summary"] = report.summary(where=out["quarantine"], docs=out["data_docs"] is not None)
            out["summary"] += _drift_clause(drift)
            return False
        # Rejected again: quarantine holds these very bytes, so this copy goes; the verdict is logged there.
        keys = _write_drift_plot(drift, prior)
        stored = _log_resubmission(prior, path.name, report, drift, latest_drift=True)
        path.unlink()
        out.update({
            "quarantine": str(prior),
            "quarantined_file": str(prior / stored["file"]),
            "report": str(prior / "report.json"),
            "data_docs": stored.get("data_docs"),
            "already_quarantined": True,
            **keys,
            "summary": report.summary() + (
                f" These exact bytes were already quarantined in {prior}/; this copy was removed and the "
                "resubmission logged in its report.json. Fix the file before sending it again."
            ) + _drift_clause(drift),
        })
        return False

    try:
        while True:
            try:
                results = ingest.process_incoming(
                    incoming_dir, warehouse_dir, processed_dir, accept=accept, progress=False, refuse=refuse
                )
                break
            except IngestError as exc:
                # Validation accepted a file ingestion refuses: a gap in the suites. Quarantine it like any
                # reject (ingestion wrote nothing) and go on with the files after it.
                bad = Path(exc.path)
                report = reports[bad.name]
                report.checks.append(CheckResult("ingest", "drop", "transactions", FAILED,
                                                 "ingestion must be able to store every row", detail=str(exc)))
                out = outcomes[bad.name]
                out.update(_outcome(report))
                out.update(quarantine(bad, report, quarantine_dir, runner, drift=drifts.get(bad.name)))
                out["summary"] = report.summary(where=out["quarantine"], docs=out["data_docs"] is not None)
                out["summary"] += _drift_clause(drifts.get(bad.name))
        by_name = {Path(r["file"]).name: r for r in results}
    finally:
        bar.close()
        lock.close()  # releases the flock
    for name, out in outcomes.items():
        if out["status"] != "accepted":
            continue
        r = by_name.get(name)
        if r is not None:
            out["ingest"], out["moved_to"] = r["status"], r.get("moved_to")
        else:  # ingested in a pass that an IngestError on a later file cut short
            out["ingest"] = "ingested"
            out["moved_to"] = next(
                (str(p) for p in (processed_dir / name, processed_dir / f"{Path(name).stem}-{out['sha256'][:12]}.csv")
                 if p.is_file()),
                None,
            )
        out.update(_accepted_report(reports[name], drifts.get(name), out, reports_dir))
    drops = list(outcomes.values())
    return {
        "run_date": run_date.isoformat(),
        "accepted": sum(d["status"] == "accepted" for d in drops),
        "rejected": sum(d["status"] == "rejected" for d in drops),
        "drops": drops,
    }


def _open_lock(path: Path):
    """The incoming folder's lock file, opened for appending (held until closed). Never through a link, and
    never blocking on a FIFO in its place: either is a ``ValidationSetupError`` naming the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise ValidationSetupError(
            f"cannot open the lock file {path} ({exc.strerror}): it must be a regular file (a link is not "
            "followed, a FIFO not opened); remove it and run again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValidationSetupError(f"the lock file {path} is not a regular file; remove it and run again")
    return os.fdopen(fd, "a")


def _drift_config() -> DriftConfig | None:
    """``DriftConfig.from_env()``, or ``None`` when the environment is invalid: drift then reports the error
    per drop (``drift_for_drop`` reads the environment again and records why) instead of stopping validation."""
    try:
        return DriftConfig.from_env()
    except ValueError:
        return None


def _accepted_report(report: DropReport, drift: dict | None, out: dict, reports_dir: Path) -> dict:
    """Write an ingested drop's ``report.json`` (validation + drift; no Data Docs) and ``drift.png`` into
    ``<reports_dir>/<stem>-<sha12>/``. Returns the outcome keys ``report`` and ``drift_*``."""
    folder = quarantine_folder(reports_dir, report.file, report.sha256)  # the same naming as quarantine's
    folder.mkdir(parents=True, exist_ok=True)
    keys = _write_drift_plot(drift, folder)
    extra = {"ingest": out["ingest"], "moved_to": out["moved_to"], **({"drift": drift} if drift is not None else {})}
    written = write_report(report, folder, docs=False, extra=extra)
    return {"report": str(written["report"]), **keys}


def validate_incoming(run_date: dt.date, config: ValidationConfig | None = None, fail_on_reject: bool = False,
                      progress: bool = False) -> dict:
    """``process_incoming`` on the runtime layout (``Settings.from_env()``): the Airflow task's one call.

    ``run_date``: the run's data-interval end (rows dated later are "future").
    Returns ``process_incoming``'s dict; with ``fail_on_reject`` raises
    ``DropsRejected`` (carrying that dict) if any drop was rejected.
    """
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    layout.incoming_dir.mkdir(parents=True, exist_ok=True)  # nothing arrived yet is not an error
    result = process_incoming(layout.incoming_dir, layout.warehouse_dir, layout.processed_dir,
                              layout.quarantine_dir, run_date, config=config, progress=progress,
                              reports_dir=layout.drop_reports_dir)
    if fail_on_reject and result["rejected"]:
        raise DropsRejected(result)
    return result


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
_DEFAULT = "\0default"




def _parser() -> argparse.ArgumentParser:
    d = ValidationConfig()
    p = argparse.ArgumentParser(
        prog="hm-recsys validate",
        description="Validate weekly transaction drops (then ingest or quarantine them) or the initial H&M "
        "history with Great Expectations. Prints a JSON report on stdout, a summary per rejected file on "
        "stderr; exits 1 if anything was rejected, 2 if validation could not start.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--incoming", nargs="?", const=_DEFAULT, metavar="DIR",
                      help="validate every *.csv in DIR (default: $HM_RECSYS_HOME/data/incoming), oldest first: "
                      "accepted -> ingested and moved to data/processed (report and drift plot in "
                      "data/validation/drops/<stem>-<sha12>/), rejected -> data/quarantine/<stem>-<sha12>/")
    what.add_argument("--drop", metavar="FILE", help="validate one drop only (and measure its drift): nothing is "
                      "ingested, moved or written (except --out)")
    what.add_argument("--history", nargs="?", const=_DEFAULT, metavar="DIR",
                      help="validate articles/customers/transactions_train.csv in DIR (default: "
                      "$HM_RECSYS_HOME/data/raw), one H&M week at a time")
    p.add_argument("--week", type=iso_date, metavar="YYYY-MM-DD",
                   help="--drop: the declared week (its Wednesday), when the file name does not say it")
    p.add_argument("--run-date", type=iso_date, metavar="YYYY-MM-DD",
                   help="rows dated after this day are 'in the future' (default: today; Airflow passes its "
                   "data interval end)")
    p.add_argument("--warehouse", metavar="DIR", help="warehouse folder (default: $HM_RECSYS_HOME/data/warehouse)")
    p.add_argument("--out", metavar="DIR", help="--drop/--history: write report.json and data_docs/ (--drop: and "
                   "drift.png) here "
                   "(--history default: $HM_RECSYS_HOME/data/validation/history)")
    p.add_argument("--volume-band", type=float, nargs=2, metavar=("LO", "HI"), default=d.volume_band,
                   help=f"accepted row count, as multiples of the recent weekly median (default: {d.volume_band})")
    p.add_argument("--history-weeks", type=int, default=d.history_weeks, metavar="N",
                   help=f"recent weeks behind the volume median and needed by the history checks "
                   f"(default: {d.history_weeks})")
    p.add_argument("--new-article-share", type=float, nargs=2, metavar=("LO", "HI"), default=d.new_article_share,
                   help=f"accepted share of rows whose article was never sold before (default: {d.new_article_share})")
    p.add_argument("--new-customer-share", type=float, nargs=2, metavar=("LO", "HI"), default=d.new_customer_share,
                   help=f"accepted share of rows whose customer never bought before (default: {d.new_customer_share})")
    p.add_argument("--price-max", type=float, default=d.price_max, help=f"price ceiling (default: {d.price_max})")
    p.add_argument("--max-examples", type=int, default=d.max_examples, metavar="N",
                   help=f"example rows kept per failed check (default: {d.max_examples})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    warehouse = Path(args.warehouse) if args.warehouse else layout.warehouse_dir
    run_date = args.run_date or dt.date.today()  # the CLI's notion of "now"; library code never reads the clock
    progress = not args.no_progress
    if args.week is not None and args.drop is None:
        print("hm-recsys validate: error: --week applies to --drop only (incoming drops say their week in "
              "their name: transactions_<YYYY-MM-DD>.csv)", file=sys.stderr)
        return 2
    try:
        config = ValidationConfig(
            volume_band=tuple(args.volume_band),
            history_weeks=args.history_weeks,
            new_article_share=tuple(args.new_article_share),
            new_customer_share=tuple(args.new_customer_share),
            price_max=args.price_max,
            max_examples=args.max_examples,
        )
    except ValueError as exc:
        print(f"hm-recsys validate: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.incoming is not None:
            incoming = layout.incoming_dir if args.incoming == _DEFAULT else Path(args.incoming)
            if args.incoming == _DEFAULT:
                incoming.mkdir(parents=True, exist_ok=True)
            result = process_incoming(incoming, warehouse, layout.processed_dir, layout.quarantine_dir, run_date,
                                      config=config, progress=progress, reports_dir=layout.drop_reports_dir)
            print(to_json(result))
            for d in result["drops"]:
                if d["status"] == "rejected":
                    print(d["summary"], file=sys.stderr)
            return 1 if result["rejected"] else 0
        if args.drop is not None:
            path = Path(args.drop)
            if not path.is_file():
                raise ValidationSetupError(f"{path} is not a file")
            report = validate_drop(path, warehouse, run_date, week=args.week, config=config)
            drift = _drift(path, report, warehouse, _drift_config())
            out = {**report.to_dict(), "drift": drift}
            if args.out:
                _write_drift_plot(drift, Path(args.out))
                written = write_report(report, Path(args.out), extra={"drift": drift})
                out["written"] = {k: str(v) for k, v in written.items()} | {"drift_plot": drift["plot"]}
            print(to_json(out))
            if report.status == "rejected":
                print(report.summary(), file=sys.stderr)
            return 1 if report.status == "rejected" else 0
        raw = layout.raw_dir if args.history == _DEFAULT else Path(args.history)
        hist = validate_history(raw, run_date, config=config, progress=progress)
        written = write_report(hist, Path(args.out) if args.out else layout.validation_dir / "history")
        out = hist.to_dict()
        out["written"] = {k: str(v) for k, v in written.items()}
        print(to_json(out))
        if hist.status == "rejected":
            print(hist.summary(), file=sys.stderr)
        return 1 if hist.status == "rejected" else 0
    except ValidationSetupError as exc:
        print(f"hm-recsys validate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
