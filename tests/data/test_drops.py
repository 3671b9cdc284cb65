"""A drop's life (``hm_recsys.data.drops``): validate -> ingest + processed/, or quarantine intact.

The whole bad-input corpus (``tests/data/bad_inputs/corpus.py``) goes through
one ``process_incoming`` run (GX is slow; one batch, one context): each case
must be rejected with exactly its expected failures and sit in quarantine
byte for byte; the CRLF variant must be ingested. Then: duplicates,
resubmissions, a fixed file, an interrupted run, and the CLI on clean weeks.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hm_recsys.data import drops as D
from hm_recsys.data import schema
from hm_recsys.data.ingest import ingest_drop
from hm_recsys.data.warehouse import Warehouse
from tests.data.bad_inputs import corpus
from tests.data.bad_inputs.fixtures import tiny_drops

NO_DOCS = {"empty_file", "header_only", "wrong_delimiter"}  # GX never saw these files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_drops(tmp_path_factory)


def _dirs(root: Path) -> dict[str, Path]:
    d = {k: root / k for k in ("incoming", "processed", "quarantine")}
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    return d


def _put(incoming: Path, name: str, data: bytes, order: int) -> Path:
    """Write a drop with an mtime that fixes its place in the queue (oldest first)."""
    p = incoming / name
    p.write_bytes(data)
    t = 1_600_000_000 + order
    os.utime(p, (t, t))
    return p


def _bases(tiny) -> dict[str, bytes]:
    return {
        "base": (tiny.raw / "drops" / f"transactions_{corpus.BASE_WEEK}.csv").read_bytes(),
        "crlf_base": (tiny.raw / "drops" / f"transactions_{corpus.CRLF_WEEK}.csv").read_bytes(),
        "hidden": tiny.hidden_week.read_bytes(),
    }


@pytest.fixture(scope="module")
def batch(tiny, tmp_path_factory):
    """Every corpus case, then the clean base drop, then an exact copy of it, in one run."""
    root = tmp_path_factory.mktemp("corpus_run")
    dirs = _dirs(root)
    wh = tiny.warehouse_copy(root / "warehouse")
    bases = _bases(tiny)
    written = {}
    for i, case in enumerate(corpus.CASES):
        data = case.build(bases[case.base])
        written[case.name] = data
        _put(dirs["incoming"], corpus.file_name(case), data, i)
    clean = f"transactions_{corpus.BASE_WEEK}.csv"
    _put(dirs["incoming"], clean, bases["base"], 100)
    _put(dirs["incoming"], f"transactions_{corpus.BASE_WEEK}_duplicated_drop.csv", bases["base"], 101)
    result = D.process_incoming(dirs["incoming"], wh, dirs["processed"], dirs["quarantine"], corpus.RUN_DATE)
    by_file = {d["file"]: d for d in result["drops"]}
    return {"result": result, "by_file": by_file, "written": written, "dirs": dirs, "wh": wh, "bases": bases}


@pytest.mark.parametrize("case", corpus.CASES, ids=lambda c: c.name)
def test_corpus_case_gets_its_exact_verdict(batch, case):
    out = batch["by_file"][corpus.file_name(case)]
    assert set(out["failed_checks"]) == set(case.fails), out["summary"]
    data = batch["written"][case.name]
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    assert not (batch["dirs"]["incoming"] / corpus.file_name(case)).exists()
    if not case.fails:
        assert out["status"] == "accepted" and out["ingest"] == "ingested"
        assert Path(out["moved_to"]).read_bytes() == data
        assert out["quarantine"] is None
        return
    assert out["status"] == "rejected" and out["ingest"] is None and out["moved_to"] is None
    folder = Path(out["quarantine"])
    assert folder == batch["dirs"]["quarantine"] / f"{Path(corpus.file_name(case)).stem}-{out['sha256'][:12]}"
    assert (folder / corpus.file_name(case)).read_bytes() == data  # byte for byte
    report = json.loads((folder / "report.json").read_text())
    assert report["sha256"] == out["sha256"] and report["status"] == "rejected"
    assert set(report["failed_checks"]) == set(case.fails)
    assert report["quarantined_file"] == str(folder / corpus.file_name(case))
    docs = folder / "data_docs" / "index.html"
    assert docs.is_file() == (case.name not in NO_DOCS)
    assert out["data_docs"] == (str(docs) if docs.is_file() else None)
    first = next(c for c in report["checks"] if c["status"] == "failed")
    if case.line is not None:
        assert first["examples"][0]["line"] == case.line
    assert out["summary"].startswith(f"{corpus.file_name(case)} (sha256 {out['sha256'][:12]}")
    assert f"was REJECTED: {len(case.fails)} of" in out["summary"] and str(folder) in out["summary"]


def test_corpus_counts_are_exact(batch, tiny):
    by = {c: batch["by_file"][corpus.file_name(corpus.BY_NAME[c])] for c in corpus.BY_NAME}

    def failed(name):
        rep = json.loads((Path(by[name]["quarantine"]) / "report.json").read_text())
        return next(c for c in rep["checks"] if c["status"] == "failed")

    base = batch["bases"]["base"].decode().split("\n")[1:-1]
    over = sum(float(r.split(",")[3]) * 100 > 1.0 for r in base)
    assert failed("price_100x")["unexpected_count"] == over
    hidden = batch["bases"]["hidden"].decode().split("\n")[1:-1]
    future = [i + 2 for i, r in enumerate(hidden) if r[:10] > corpus.RUN_DATE.isoformat()]
    fut = failed("future_date")
    assert fut["unexpected_count"] == len(future) and fut["examples"][0]["line"] == future[0]
    assert fut["kwargs"]["value_set"] == ["2020-09-28", "2020-09-29"]
    assert failed("volume_spike_10x")["observed_value"] == 10 * len(base)
    assert failed("missing_column")["detail"].startswith("missing: price (expected t_dat,")
    assert failed("renamed_column")["detail"].startswith("renamed: 'price' -> 'prize'")
    assert failed("extra_column")["detail"].startswith("unexpected: store_id")
    assert failed("truncated_last_line")["examples"][0]["line"] == len(base) + 1
    assert failed("non_utf8_bytes")["examples"][0]["detail"] == "invalid UTF-8 byte 0xe9 at byte 12 of the line"
    assert by["non_utf8_bytes"]["rows"] == len(base) - 1  # the bad line is set aside, the rest validated
    assert failed("no_declared_week")["detail"].startswith("cannot tell the week of 'transactions_latest.csv'")
    assert set(by["no_declared_week"]["skipped_checks"]) == {
        "t_dat_in_week", "t_dat_not_future", "volume", "new_article_share", "new_customer_share"}
    # the CRLF drop landed in the warehouse as its week
    crlf_rows = batch["bases"]["crlf_base"].count(b"\n") - 1
    parts = Warehouse(batch["wh"]).part_files(corpus.CRLF_WEEK)
    assert len(parts) == 1 and pq.ParquetFile(parts[0]).metadata.num_rows == crlf_rows


def test_clean_drop_is_ingested_and_its_copy_rejected_as_duplicate(batch):
    clean = batch["by_file"][f"transactions_{corpus.BASE_WEEK}.csv"]
    assert clean["status"] == "accepted" and clean["ingest"] == "ingested"
    assert Path(clean["moved_to"]) == batch["dirs"]["processed"] / f"transactions_{corpus.BASE_WEEK}.csv"
    dup = batch["by_file"][f"transactions_{corpus.BASE_WEEK}_duplicated_drop.csv"]
    assert dup["failed_checks"] == ["duplicate_drop"] and dup["sha256"] == clean["sha256"]
    assert dup["data_docs"] is None and "Nothing was ingested twice" in dup["summary"]
    rep = json.loads(Path(dup["report"]).read_text())
    assert rep["checks"][1]["detail"].startswith(
        f"these exact bytes were already ingested from 'transactions_{corpus.BASE_WEEK}.csv' at ")
    assert batch["result"]["accepted"] == 2 and batch["result"]["rejected"] == len(corpus.CASES) - 1 + 1
    assert Warehouse(batch["wh"]).part_files(corpus.BASE_WEEK)[0].name == f"part-drop-{clean['sha256'][:12]}.parquet"


def test_same_bad_bytes_sent_again_are_recognised(batch):
    d = batch["dirs"]
    case = corpus.BY_NAME["sales_channel_3"]
    first = batch["by_file"][corpus.file_name(case)]
    again = _put(d["incoming"], "transactions_2020-08-26_resent.csv", batch["written"][case.name], 200)
    before = sorted(p.name for p in d["quarantine"].iterdir())
    res = D.process_incoming(d["incoming"], batch["wh"], d["processed"], d["quarantine"], corpus.RUN_DATE)
    (out,) = res["drops"]
    assert out["status"] == "rejected" and out["already_quarantined"] is True
    # judged again: meanwhile the clean drop of that week was ingested, so the week is taken too
    assert out["quarantine"] == first["quarantine"]
    assert out["failed_checks"] == ["week_not_loaded", "sales_channel_id_set"]
    assert "These exact bytes were already quarantined" in out["summary"]
    # the copy is gone (quarantine holds the same bytes), no second folder, the resubmission is logged
    assert not again.exists() and sorted(p.name for p in d["quarantine"].iterdir()) == before
    rep = json.loads((Path(first["quarantine"]) / "report.json").read_text())
    assert [(r["file"], r["status"], r["failed_checks"]) for r in rep["resubmissions"]] == [
        ("transactions_2020-08-26_resent.csv", "rejected", ["week_not_loaded", "sales_channel_id_set"])]


def test_a_week_sent_before_it_ended_passes_when_sent_again_after(batch):
    """A verdict depends on the run date too: the same bytes are judged again, not refused on sight."""
    d = batch["dirs"]
    early = batch["by_file"][corpus.file_name(corpus.BY_NAME["future_date"])]
    assert early["failed_checks"] == ["t_dat_not_future"]
    _put(d["incoming"], "transactions_2020-09-23.csv", batch["bases"]["hidden"], 300)
    res = D.process_incoming(d["incoming"], batch["wh"], d["processed"], d["quarantine"], dt.date(2020, 9, 30))
    (out,) = res["drops"]
    assert (out["status"], out["ingest"], out["sha256"]) == ("accepted", "ingested", early["sha256"])
    rep = json.loads((Path(early["quarantine"]) / "report.json").read_text())
    assert [(r["file"], r["status"], r["run_date"]) for r in rep["resubmissions"]] == [
        ("transactions_2020-09-23.csv", "accepted", "2020-09-30")]


def test_a_fixed_file_is_accepted_after_its_reject(tiny, tmp_path):
    d = _dirs(tmp_path)
    wh = tiny.warehouse_copy(tmp_path / "warehouse")
    clean = _bases(tiny)["base"]
    name = f"transactions_{corpus.BASE_WEEK}.csv"
    _put(d["incoming"], name, corpus.BY_NAME["sales_channel_3"].build(clean), 0)
    first = D.process_incoming(d["incoming"], wh, d["processed"], d["quarantine"], corpus.RUN_DATE)
    assert first["rejected"] == 1 and Warehouse(wh).part_files(corpus.BASE_WEEK) == []
    _put(d["incoming"], name, clean, 1)
    second = D.process_incoming(d["incoming"], wh, d["processed"], d["quarantine"], corpus.RUN_DATE)
    (out,) = second["drops"]
    assert out["status"] == "accepted" and out["ingest"] == "ingested"
    assert (d["processed"] / name).read_bytes() == clean
    assert len(Warehouse(wh).part_files(corpus.BASE_WEEK)) == 1
    assert (Path(first["drops"][0]["quarantine"]) / name).is_file()  # the bad one is kept for audit


def test_a_drop_ingested_by_an_interrupted_run_is_finished_not_rejected(tiny, tmp_path):
    d = _dirs(tmp_path)
    wh = tiny.warehouse_copy(tmp_path / "warehouse")
    p = _put(d["incoming"], f"transactions_{corpus.BASE_WEEK}.csv", _bases(tiny)["base"], 0)
    ingest_drop(p, wh)  # ...and the process died before moving the file to processed/
    res = D.process_incoming(d["incoming"], wh, d["processed"], d["quarantine"], corpus.RUN_DATE)
    (out,) = res["drops"]
    assert (out["status"], out["ingest"], out["failed_checks"]) == ("accepted", "duplicate", [])
    assert Path(out["moved_to"]).is_file() and not p.exists() and not any(d["quarantine"].iterdir())


def _quote_fields(data: bytes, columns: set[str]) -> bytes:
    """``data`` with ``columns`` quoted on every line, header included, as RFC 4180 exporters may write it."""
    lines = data.split(b"\n")
    pos = [i for i, c in enumerate(lines[0].split(b",")) if c.decode() in columns]

    def quote(line: bytes) -> bytes:
        parts = line.split(b",")
        return b",".join(b'"' + p + b'"' if i in pos else p for i, p in enumerate(parts)) if line else line

    return b"\n".join(quote(ln) for ln in lines)


@pytest.mark.parametrize("variant", ["quoted_ids", "quoted_all_crlf", "blank_lines_at_the_end"])
def test_valid_rfc4180_variants_of_a_clean_drop_are_accepted_as_the_same_rows(tiny, tmp_path, variant):
    """Quoted fields and blank lines ending the file are valid CSV: accepted, and the warehouse gets the plain rows."""
    clean = _bases(tiny)["base"]
    data = {
        "quoted_ids": _quote_fields(clean, {"t_dat", "customer_id", "article_id"}),
        "quoted_all_crlf": _quote_fields(clean, set(schema.TRANSACTION_COLUMNS)).replace(b"\n", b"\r\n"),
        "blank_lines_at_the_end": clean + b"\n\n\r\n",
    }[variant]
    assert data != clean and (b'"0' in data) == variant.startswith("quoted")
    plain_wh = tiny.warehouse_copy(tmp_path / "plain_wh")
    ingest_drop(_put(tmp_path, "plain.csv", clean, 0), plain_wh)  # the reference: the clean bytes' rows

    d = _dirs(tmp_path / "var")
    wh = tiny.warehouse_copy(tmp_path / "warehouse")
    name = f"transactions_{corpus.BASE_WEEK}.csv"
    _put(d["incoming"], name, data, 0)
    res = D.process_incoming(d["incoming"], wh, d["processed"], d["quarantine"], corpus.RUN_DATE)
    (out,) = res["drops"]
    assert (out["status"], out["ingest"], out["failed_checks"]) == ("accepted", "ingested", []), out["summary"]
    assert out["rows"] == clean.count(b"\n") - 1 and (d["processed"] / name).read_bytes() == data
    (got,) = Warehouse(wh).part_files(corpus.BASE_WEEK)
    (want,) = Warehouse(plain_wh).part_files(corpus.BASE_WEEK)
    assert pq.read_table(got).equals(pq.read_table(want))


def test_cli_accepts_every_clean_week(tiny, home, capsys):
    from hm_recsys.cli import main
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    tiny.warehouse_copy(layout.warehouse_dir)
    layout.incoming_dir.mkdir(parents=True)
    for i, p in enumerate(tiny.drops):
        _put(layout.incoming_dir, p.name, p.read_bytes(), i)
    _put(layout.incoming_dir, "transactions_2020-09-23.csv", tiny.hidden_week.read_bytes(), 10)
    rc = main(["validate", "--incoming", "--run-date", "2020-09-30", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out = json.loads(cap.out)
    assert (out["accepted"], out["rejected"]) == (5, 0) and cap.err == ""
    weeks = [dt.date.fromisoformat(w) for w in ("2020-08-26", "2020-09-02", "2020-09-09", "2020-09-16", "2020-09-23")]
    assert Warehouse(layout.warehouse_dir).weeks()[-5:] == weeks
    assert sorted(p.name for p in layout.processed_dir.iterdir()) == sorted(
        [p.name for p in tiny.drops] + ["transactions_2020-09-23.csv"])
    # every outcome is small and JSON-able: ids and paths, no data
    assert all(set(o) >= {"file", "sha256", "status", "moved_to", "quarantine", "report"} for o in out["drops"])


def test_cli_exit_codes_and_summary(tiny, home, capsys):
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    layout.incoming_dir.mkdir(parents=True)
    # no catalogue yet: validation cannot start (2), the drop stays where it is
    p = _put(layout.incoming_dir, f"transactions_{corpus.BASE_WEEK}.csv", _bases(tiny)["base"], 0)
    assert D.main(["--incoming", "--run-date", "2020-10-01"]) == 2
    assert "ingest the history first" in capsys.readouterr().err and p.exists()
    tiny.warehouse_copy(layout.warehouse_dir)
    p.write_bytes(corpus.BY_NAME["negative_price"].build(_bases(tiny)["base"]))
    assert D.main(["--incoming", "--run-date", "2020-10-01", "--no-progress"]) == 1
    cap = capsys.readouterr()
    (out,) = json.loads(cap.out)["drops"]
    assert cap.err.strip() == out["summary"]
    assert "price_range (1 row, e.g. line 13:" in cap.err and out["quarantine"] in cap.err
    assert D.main(["--incoming", "--volume-band", "5", "1"]) == 2
    assert "volume_band" in capsys.readouterr().err


def test_validate_incoming_for_airflow(tiny, home):
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    tiny.warehouse_copy(layout.warehouse_dir)
    assert D.validate_incoming(dt.date(2020, 10, 1))["drops"] == []  # nothing arrived: not an error
    _put(layout.incoming_dir, f"transactions_{corpus.BASE_WEEK}.csv",
         corpus.BY_NAME["sales_channel_3"].build(_bases(tiny)["base"]), 0)
    with pytest.raises(D.DropsRejected) as e:
        D.validate_incoming(dt.date(2020, 10, 1), fail_on_reject=True)
    assert e.value.result["rejected"] == 1 and "sales_channel_id_set" in str(e.value)
    assert json.loads(json.dumps(e.value.result)) == e.value.result
    shutil.rmtree(layout.quarantine_dir)


def test_nothing_is_written_outside_the_runtime_folders(tiny, tmp_path, monkeypatch):
    """GX builds Data Docs where it is told to and nowhere else: not $HOME, not the working directory."""
    fake_home, cwd = tmp_path / "home", tmp_path / "cwd"
    fake_home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.chdir(cwd)
    d = _dirs(tmp_path / "var")
    wh = tiny.warehouse_copy(tmp_path / "warehouse")
    _put(d["incoming"], f"transactions_{corpus.BASE_WEEK}.csv",
         corpus.BY_NAME["negative_price"].build(_bases(tiny)["base"]), 0)
    res = D.process_incoming(d["incoming"], wh, d["processed"], d["quarantine"], corpus.RUN_DATE)
    assert res["rejected"] == 1 and Path(res["drops"][0]["data_docs"]).is_file()
    assert list(fake_home.iterdir()) == [] and list(cwd.iterdir()) == []


# --------------------------------------------------------------------------
# What is not a regular file is refused unread (links, FIFOs, directories)
# --------------------------------------------------------------------------
SECRET = "SECRET-MARKER-7f3a: this line must never leave its file"


class _FifoWatch:
    """Fails a test, instead of hanging it, if anyone opens one of the FIFOs for reading.

    A writer's non-blocking open succeeds only while a reader has the FIFO
    open; the watch then closes it again, so the blocked reader sees EOF and
    the run goes on (``opened`` records it).
    """

    def __init__(self, paths):
        self.paths, self.opened, self._stop = paths, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for p in self.paths():
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: no reader (good); ENOENT: moved meanwhile
                    continue
                self.opened.append(str(p))
                os.close(fd)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _regular_files_holding(root: Path, text: str) -> list[str]:
    """Regular files under ``root`` containing ``text``, found without following a link or opening a FIFO."""
    hits = []
    for folder, _, names in os.walk(root):  # does not descend into links
        for name in names:
            p = Path(folder) / name
            if stat.S_ISREG(os.lstat(p).st_mode) and text.encode() in p.read_bytes():
                hits.append(str(p))
    return hits


def test_a_symlink_is_refused_without_reading_what_it_points_to(tmp_path, monkeypatch):
    d = _dirs(tmp_path / "var")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.csv"
    secret.write_text("t_dat,customer_id,article_id,price,sales_channel_id\n" + SECRET + "\n")
    fifo = outside / "pipe"
    os.mkfifo(fifo)
    (d["incoming"] / f"transactions_{corpus.BASE_WEEK}.csv").symlink_to(secret)
    (d["incoming"] / "to_a_pipe.csv").symlink_to(fifo)
    (d["incoming"] / "dangling.csv").symlink_to(outside / "missing.csv")

    def never(*a, **k):
        raise AssertionError(f"validated {a[0]}: a link must not be read")

    monkeypatch.setattr(D, "validate_drop", never)
    with _FifoWatch(lambda: [fifo]) as watch:  # following the second link would block on the pipe
        res = D.process_incoming(d["incoming"], tmp_path / "warehouse", d["processed"], d["quarantine"],
                                 corpus.RUN_DATE)
    assert watch.opened == []
    assert (res["accepted"], res["rejected"]) == (0, 3)
    by = {o["file"]: o for o in res["drops"]}
    out = by[f"transactions_{corpus.BASE_WEEK}.csv"]
    assert (out["status"], out["failed_checks"], out["refused"], out["sha256"]) == (
        "rejected", ["regular_file"], "symlink", None)
    assert out["summary"].startswith(f"transactions_{corpus.BASE_WEEK}.csv was REJECTED without being read")
    assert f"a symbolic link to {str(secret)!r}, not a regular file" in out["summary"]
    # The link itself sits in quarantine, still a link to the same place; the target is untouched, not copied.
    q = Path(out["quarantined_file"])
    assert q.parent == Path(out["quarantine"]) and q.is_symlink() and os.readlink(q) == str(secret)
    assert secret.read_text().endswith(SECRET + "\n") and not any(d["incoming"].glob("*.csv"))
    report = json.loads(Path(out["report"]).read_text())
    assert (report["status"], report["refused"], report["link_target"]) == ("rejected", "symlink", str(secret))
    assert [c["check"] for c in report["checks"]] == ["regular_file"] and report["data_docs"] is None
    assert by["to_a_pipe.csv"]["refused"] == by["dangling.csv"]["refused"] == "symlink"
    # Nothing of the target's bytes anywhere: outcome, reports, quarantine, processed, warehouse.
    assert SECRET not in json.dumps(res)
    assert _regular_files_holding(tmp_path / "var", SECRET) == []
    assert not (tmp_path / "warehouse").exists() and not any(d["processed"].iterdir())


def test_a_fifo_and_a_directory_named_csv_are_rejected_not_skipped(tmp_path):
    d = _dirs(tmp_path / "var")
    os.mkfifo(d["incoming"] / "pipe.csv")
    (d["incoming"] / "folder.csv").mkdir()
    (d["incoming"] / "folder.csv" / "inside.txt").write_text("kept as is")
    fifos = lambda: [d["incoming"] / "pipe.csv", *d["quarantine"].glob("*/pipe.csv")]  # noqa: E731
    with _FifoWatch(fifos) as watch:
        res = D.process_incoming(d["incoming"], tmp_path / "warehouse", d["processed"], d["quarantine"],
                                 corpus.RUN_DATE)
    assert watch.opened == [], "the FIFO was opened"
    by = {o["file"]: o for o in res["drops"]}
    assert res["rejected"] == 2 and {o["refused"] for o in by.values()} == {"fifo", "directory"}
    assert "pipe.csv is a FIFO (named pipe), not a regular file" in by["pipe.csv"]["summary"]
    assert "folder.csv is a directory, not a regular file" in by["folder.csv"]["summary"]
    assert stat.S_ISFIFO(os.lstat(by["pipe.csv"]["quarantined_file"]).st_mode)
    assert (Path(by["folder.csv"]["quarantined_file"]) / "inside.txt").read_text() == "kept as is"
    assert Path(by["pipe.csv"]["quarantine"]).name.startswith("pipe-fifo-")
    assert list(d["incoming"].glob("*.csv")) == []
    with pytest.raises(D.DropsRejected, match="pipe.csv is a FIFO"):
        raise D.DropsRejected(res)


def test_an_entry_that_cannot_be_moved_stays_and_is_refused_again(tmp_path, monkeypatch):
    d = _dirs(tmp_path / "var")
    link = d["incoming"] / "x.csv"
    link.symlink_to(tmp_path / "anywhere.csv")

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(D.os, "rename", cross_device)
    runs = [D.process_incoming(d["incoming"], tmp_path / "wh", d["processed"], d["quarantine"], corpus.RUN_DATE)
            for _ in range(2)]
    first, second = (r["drops"][0] for r in runs)
    assert link.is_symlink() and first["quarantined_file"] is None
    assert "it was left in" in first["summary"] and "Remove it by hand" in first["summary"]
    assert second["quarantine"] == first["quarantine"] and len(list(d["quarantine"].iterdir())) == 1
    report = json.loads(Path(first["report"]).read_text())
    assert report["left_in"] == str(link) and "cross-device" in report["move_error"]


def test_a_lock_file_that_is_a_link_is_a_setup_error(tmp_path):
    d = _dirs(tmp_path / "var")
    target = tmp_path / "elsewhere"
    (d["incoming"] / ".validate.lock").symlink_to(target)
    with pytest.raises(D.ValidationSetupError, match="lock file"):
        D.process_incoming(d["incoming"], tmp_path / "wh", d["processed"], d["quarantine"], corpus.RUN_DATE)
    assert not target.exists()


def test_cli_rejects_a_symlink_beside_a_clean_drop_and_fails(tiny, home, tmp_path, capsys):
    """The CLI and the Airflow call both fail naming the link; the clean drop beside it is still ingested."""
    from hm_recsys.cli import main
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    tiny.warehouse_copy(layout.warehouse_dir)
    incoming = tmp_path / "drops"
    incoming.mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text("t_dat,customer_id,article_id,price,sales_channel_id\n" + SECRET + "\n")
    _put(incoming, f"transactions_{corpus.BASE_WEEK}.csv", _bases(tiny)["base"], 0)
    (incoming / "transactions_2020-09-02.csv").symlink_to(secret)
    rc = main(["validate", "--incoming", str(incoming), "--run-date", "2020-10-01", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1 and SECRET not in cap.out + cap.err
    assert _regular_files_holding(home, SECRET) == []  # the old code quoted it in the quarantine report.json
    out = json.loads(cap.out)
    assert (out["accepted"], out["rejected"]) == (1, 1)
    assert cap.err.startswith("transactions_2020-09-02.csv was REJECTED without being read")
    assert "symbolic link" in cap.err and len(Warehouse(layout.warehouse_dir).part_files(corpus.BASE_WEEK)) == 1

    layout.incoming_dir.mkdir(parents=True)
    (layout.incoming_dir / "again.csv").symlink_to(secret)
    with pytest.raises(D.DropsRejected, match="again.csv is a symbolic link") as e:
        D.validate_incoming(dt.date(2020, 10, 1), fail_on_reject=True)
    assert SECRET not in str(e.value) and e.value.result["drops"][0]["failed_checks"] == ["regular_file"]
    assert _regular_files_holding(home, SECRET) == []
