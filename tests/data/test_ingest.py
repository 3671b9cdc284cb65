"""Ingestion into the Parquet warehouse: exact round trip, types, weeks, idempotent
drops, crash safety, and malformed CSVs named by file, line and field.

All data is hand-written below in the exact H&M format (a few rows each), so every
expected answer is known; the generator-based round trip runs on the shared
``tiny_raw`` fixture.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hm_recsys.data import ingest, schema
from hm_recsys.data.ingest import IngestError, export_csv, ingest_drop, ingest_history, process_incoming
from hm_recsys.data.warehouse import Warehouse, WarehouseInterrupted
from hm_recsys.layout import WarehouseLayout

C1 = "000058a12d5b43e67d225668fa1f8d618c13dc232df0cad8ffe7ad4a1091e318"
C2 = "00007d2de826758b65a93dd24ce629ed66842531df6699338c5570910a014cc2"
C3 = "00007e8d4e54114b5b2a9b51586325a8d0fa74ea23ef77334eaec4ffccd7ebcc"
P1 = "52043ee2162cf5aa7ee79974281641c6f11a68d276429a91f8ca0d4b6efa8100"
P2 = "2973abc54daa8a5f8ccfe9362140c63247c5eee03f1d93f4c830291c32bc3057"

TX_HEADER = "t_dat,customer_id,article_id,price,sales_channel_id\n"
# Weeks: 2018-09-20 (Thu) and 2018-09-25 (Tue) are in the week of Wed 2018-09-19;
# 2018-09-26 (Wed) starts the next. Row 2 and 3 are an exact duplicate (two units).
TRANSACTIONS = TX_HEADER + (
    f"2018-09-20,{C1},0663713001,0.0508305084745762,2\n"
    f"2018-09-20,{C1},0663713001,0.0508305084745762,2\n"
    f"2018-09-25,{C2},0541518023,0.0304915254237288,1\n"
    f"2018-09-26,{C2},0108775015,0.0152372881355932,2\n"
    f"2018-10-09,{C1},0541518023,0.0000169491525423,2\n"
)
CUSTOMERS = (
    "customer_id,FN,Active,club_member_status,fashion_news_frequency,age,postal_code\n"
    f"{C1},,,ACTIVE,NONE,49,{P1}\n"
    f"{C2},1.0,1.0,ACTIVE,Regularly,,{P2}\n"
    f"{C3},,,,None,25,{P1}\n"
)
ART_HEADER = ",".join(schema.ARTICLE_COLUMNS) + "\n"
ARTICLES = ART_HEADER + (
    "0108775015,0108775,Strap top,253,Vest top,Garment Upper body,1010016,Solid,09,Black,4,Dark,5,Black,"
    "1676,Jersey Basic,A,Ladieswear,1,Ladieswear,16,Womens Everyday Basics,1002,Jersey Basic,"
    "Jersey top with narrow shoulder straps.\n"
    "0663713001,0663713,Atlanta Push Body Harlow,283,Underwear body,Underwear,1010016,Solid,09,Black,4,Dark,5,"
    "Black,1338,Expressive Lingerie,B,Lingeries/Tights,1,Ladieswear,61,Womens Lingerie,1017,"
    '"Under-, Nightwear","Lace push-up body with underwired, moulded, ""padded"" cups."\n'
    "0541518023,0541518,Rae Push (Melbourne) 2p,-1,Unknown,Underwear,1010016,Solid,09,Black,4,Dark,5,Black,"
    '1338,Expressive Lingerie,B,Lingeries/Tights,1,Ladieswear,61,Womens Lingerie,1017,"Under-, Nightwear",\n'
)


def write_raw(d: Path, transactions: str = TRANSACTIONS, customers: str = CUSTOMERS, articles: str = ARTICLES,
              newline: str = "\n") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("transactions_train.csv", transactions), ("customers.csv", customers),
                       ("articles.csv", articles)):
        (d / name).write_bytes(text.replace("\n", newline).encode())
    return d


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock) with its bytes: 'nothing changed' means equal snapshots."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "_ingest.lock"
    }


def week_rows(wh: Path) -> dict[str, list[tuple]]:
    """{week: [(t_dat, customer_id, article_id, price, channel), ...]} over every visible part."""
    w = Warehouse(wh)
    out = {}
    for week in w.weeks():
        rows = []
        for f in w.part_files(week):
            t = pq.read_table(f)
            rows += list(zip(*(t.column(c).to_pylist() for c in schema.TRANSACTION_COLUMNS), strict=True))
        out[week.isoformat()] = rows
    return out


@pytest.fixture
def raw(tmp_path) -> Path:
    return write_raw(tmp_path / "raw")


@pytest.fixture
def wh(tmp_path) -> Path:
    return tmp_path / "warehouse"


# --------------------------------------------------------------------------
# Round trip and types
# --------------------------------------------------------------------------
def test_history_round_trips_byte_for_byte(raw, wh, tmp_path):
    report = ingest_history(raw, wh, progress=False)
    assert report["rows"] == {"articles": 3, "customers": 3, "transactions": 5}
    assert report["weeks"] == ["2018-09-19", "2018-09-26", "2018-10-03"]
    assert (report["first_date"], report["last_date"]) == ("2018-09-20", "2018-10-09")
    assert report["oracle"] is False
    for table, name in (("transactions", "transactions_train.csv"), ("customers", "customers.csv"),
                        ("articles", "articles.csv")):
        out = tmp_path / f"out-{name}"
        assert export_csv(table, wh, out) == {"transactions": 5, "customers": 3, "articles": 3}[table]
        assert out.read_bytes() == (raw / name).read_bytes(), table


def test_stored_types_and_values(raw, wh):
    ingest_history(raw, wh, progress=False)
    paths = WarehouseLayout(wh)
    for table, f in (("articles", paths.articles), ("customers", paths.customers)):
        assert pq.read_schema(f).remove_metadata() == ingest.warehouse_schema(table)
    part = paths.week_part(dt.date(2018, 9, 19), "history")
    t = pq.read_table(part)
    assert t.schema.remove_metadata() == ingest.warehouse_schema("transactions")
    assert t.schema.field("customer_id").type == pa.dictionary(pa.int32(), pa.string())
    # The duplicate row is kept: two units of the same article.
    assert t.column("article_id").to_pylist() == ["0663713001", "0663713001", "0541518023"]
    assert t.column("t_dat").to_pylist() == [dt.date(2018, 9, 20), dt.date(2018, 9, 20), dt.date(2018, 9, 25)]
    assert t.column("price").to_pylist() == [0.0508305084745762, 0.0508305084745762, 0.0304915254237288]
    assert t.column("sales_channel_id").to_pylist() == [2, 2, 1]

    cust = pq.read_table(paths.customers)
    assert cust.column("FN").to_pylist() == [None, 1.0, None]
    assert cust.column("age").to_pylist() == [49, None, 25]
    # The literal "None" and the empty string stay two different values.
    assert cust.column("fashion_news_frequency").to_pylist() == ["NONE", "Regularly", "None"]
    assert cust.column("club_member_status").to_pylist() == ["ACTIVE", "ACTIVE", ""]

    art = pq.read_table(paths.articles)
    assert art.column("product_type_no").to_pylist() == [253, 283, -1]
    assert art.column("colour_group_code").to_pylist() == ["09", "09", "09"]
    assert art.column("garment_group_name").to_pylist() == ["Jersey Basic", "Under-, Nightwear", "Under-, Nightwear"]
    assert art.column("detail_desc").to_pylist() == [
        "Jersey top with narrow shoulder straps.",
        'Lace push-up body with underwired, moulded, "padded" cups.',
        None,
    ]


def test_nine_digit_article_ids_are_zero_padded(tmp_path, wh):
    tx = TRANSACTIONS.replace(",0663713001,", ",663713001,")
    arts = ARTICLES.replace("\n0108775015,", "\n108775015,")
    ingest_history(write_raw(tmp_path / "raw", transactions=tx, articles=arts), wh, progress=False)
    t = pq.read_table(WarehouseLayout(wh).week_part(dt.date(2018, 9, 19), "history"))
    assert t.column("article_id").to_pylist() == ["0663713001", "0663713001", "0541518023"]
    art = pq.read_table(WarehouseLayout(wh).articles)
    assert art.column("article_id").to_pylist() == ["0108775015", "0663713001", "0541518023"]


def test_crlf_files_ingest_like_lf(tmp_path):
    ingest_history(write_raw(tmp_path / "lf"), tmp_path / "wh_lf", progress=False)
    ingest_history(write_raw(tmp_path / "crlf", newline="\r\n"), tmp_path / "wh_crlf", progress=False)
    lf, crlf = WarehouseLayout(tmp_path / "wh_lf"), WarehouseLayout(tmp_path / "wh_crlf")
    assert week_rows(lf.root) == week_rows(crlf.root)
    for name in ("articles", "customers"):
        assert pq.read_table(getattr(lf, name)).equals(pq.read_table(getattr(crlf, name)))


def _quote_all(text: str) -> str:
    """``text`` as an RFC 4180 exporter quoting every field writes it (header included)."""
    import csv
    import io

    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(csv.reader(io.StringIO(text)))
    return out.getvalue()


@pytest.mark.parametrize("variant", ["quoted", "blank_tail", "crlf_blank_tail", "long_blank_tail"])
def test_rfc4180_quoting_and_blank_lines_ending_a_file_ingest_like_plain(tmp_path, variant):
    """Quoted fields and blank lines after the last row are valid CSV: the warehouse gets the same rows."""
    tables = {"transactions": TRANSACTIONS, "customers": CUSTOMERS, "articles": ARTICLES}
    if variant == "quoted":
        texts, newline = {t: _quote_all(v) for t, v in tables.items()}, "\n"
        assert texts["transactions"].startswith('"t_dat","customer_id"') and '"0663713001"' in texts["transactions"]
    else:
        blank = "\n" * (70_000 if variant == "long_blank_tail" else 2)  # longer than the first tail read
        texts, newline = {t: v + blank for t, v in tables.items()}, "\r\n" if variant.startswith("crlf") else "\n"
    ingest_history(write_raw(tmp_path / "plain"), tmp_path / "wh_plain", progress=False)
    ingest_history(write_raw(tmp_path / variant, newline=newline, **texts), tmp_path / "wh", progress=False)
    plain, got = WarehouseLayout(tmp_path / "wh_plain"), WarehouseLayout(tmp_path / "wh")
    assert week_rows(got.root) == week_rows(plain.root)
    for name in ("articles", "customers"):
        assert pq.read_table(getattr(got, name)).equals(pq.read_table(getattr(plain, name)))
    drop = tmp_path / "drop.csv"
    drop.write_text(_quote_all(DROP) if variant == "quoted" else DROP + "\n\n")
    assert ingest_drop(drop, got.root)["rows"] == DROP.count("\n") - 1


def test_weeks_run_wednesday_to_tuesday_for_every_day(tmp_path, wh):
    """One row per day for ~4 months around the Kaggle test week: each lands in schema.week_start's week."""
    days = [dt.date(2020, 6, 1) + dt.timedelta(days=i) for i in range(130)]
    tx = TX_HEADER + "".join(f"{d.isoformat()},{C1},0663713001,0.01,2\n" for d in days)
    ingest_history(write_raw(tmp_path / "raw", transactions=tx), wh, progress=False)
    got = {day: week for week, rows in week_rows(wh).items() for day in (r[0] for r in rows)}
    assert got == {d: schema.week_start(d).isoformat() for d in days}
    assert got[dt.date(2020, 9, 22)] == "2020-09-16"  # Tuesday closes a week
    assert got[dt.date(2020, 9, 23)] == "2020-09-23"  # the Kaggle test week starts on Wednesday
    assert all(dt.date.fromisoformat(w).weekday() == 2 for w in week_rows(wh))


def test_unsorted_input_with_tiny_blocks_and_row_groups(tmp_path, wh, monkeypatch):
    """Rows in any order, read in many blocks and spilled in many row groups: same weeks, file order kept."""
    monkeypatch.setattr(ingest, "_READ_BLOCK_BYTES", 300)  # ~2 rows per block
    monkeypatch.setattr(ingest, "_ROW_GROUP_ROWS", 2)
    monkeypatch.setattr(ingest, "_BUFFER_ROWS", 3)
    dates = ["2018-10-03", "2018-09-20", "2018-10-04", "2018-09-21", "2018-09-22", "2018-10-05", "2018-09-23"]
    tx = TX_HEADER + "".join(f"{d},{C1 if i % 2 else C2},0663713001,0.0{i + 1},2\n" for i, d in enumerate(dates))
    ingest_history(write_raw(tmp_path / "raw", transactions=tx), wh, progress=False)
    rows = week_rows(wh)
    assert {w: [(r[0].isoformat(), r[3]) for r in rs] for w, rs in rows.items()} == {
        "2018-09-19": [("2018-09-20", 0.02), ("2018-09-21", 0.04), ("2018-09-22", 0.05), ("2018-09-23", 0.07)],
        "2018-10-03": [("2018-10-03", 0.01), ("2018-10-04", 0.03), ("2018-10-05", 0.06)],
    }
    assert pq.ParquetFile(WarehouseLayout(wh).week_part(dt.date(2018, 9, 19), "history")).num_row_groups == 2


def test_oracle_is_copied_and_removed_with_the_history(raw, wh, tmp_path):
    (raw / "oracle").mkdir()
    (raw / "oracle" / "truth.json").write_text('{"k": 1}')
    assert ingest_history(raw, wh, progress=False)["oracle"] is True
    assert (wh / "oracle" / "truth.json").read_text() == '{"k": 1}'
    (raw / "oracle" / "truth.json").write_text('{"k": 2}')
    ingest_history(raw, wh, progress=False)
    assert (wh / "oracle" / "truth.json").read_text() == '{"k": 2}'
    real = write_raw(tmp_path / "real")  # real Kaggle data has no oracle: a stale one must not survive
    assert ingest_history(real, wh, progress=False)["oracle"] is False
    assert not (wh / "oracle").exists()


def test_reingesting_history_replaces_it_and_keeps_drops(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    drop = tmp_path / "drop.csv"
    drop.write_text(TX_HEADER + f"2020-09-23,{C3},0108775015,0.02,1\n")
    ingest_drop(drop, wh)
    shorter = TX_HEADER + f"2018-09-20,{C2},0108775015,0.03,1\n"
    report = ingest_history(write_raw(tmp_path / "raw2", transactions=shorter), wh, progress=False)
    assert report["weeks"] == ["2018-09-19"]
    rows = week_rows(wh)
    assert {w: len(r) for w, r in rows.items()} == {"2018-09-19": 1, "2020-09-23": 1}
    assert rows["2018-09-19"][0][1] == C2


# --------------------------------------------------------------------------
# Drops: own parts, idempotent by content hash
# --------------------------------------------------------------------------
DROP = TX_HEADER + (
    f"2020-09-22,{C3},0108775015,0.0338813559322034,2\n"
    f"2020-09-23,{C3},0108775015,0.0338813559322034,2\n"
    f"2020-09-29,{C1},0663713001,0.0169322033898305,1\n"
)


def test_drop_is_ingested_once(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    drop = tmp_path / "week-2020-09-23.csv"
    drop.write_text(DROP)
    first = ingest_drop(drop, wh)
    sha = first["sha256"]
    assert first["status"] == "ingested" and first["rows"] == 3
    assert first["weeks"] == ["2020-09-16", "2020-09-23"]
    paths = WarehouseLayout(wh)
    assert first["parts"] == [str(paths.week_part(dt.date(2020, 9, 16), f"drop-{sha[:12]}")),
                              str(paths.week_part(dt.date(2020, 9, 23), f"drop-{sha[:12]}"))]
    ledger = json.loads(paths.drops_ledger.read_text())
    assert list(ledger) == [sha]
    assert ledger[sha]["source"] == "week-2020-09-23.csv" and ledger[sha]["rows"] == 3
    assert Warehouse(wh).drops() == ledger
    before = snapshot(wh)

    again = ingest_drop(drop, wh)
    assert again == {**first, "status": "duplicate"}
    renamed = tmp_path / "resent-under-another-name.csv"
    renamed.write_bytes(drop.read_bytes())
    assert ingest_drop(renamed, wh)["status"] == "duplicate"
    assert snapshot(wh) == before

    w = Warehouse(wh)
    df = w.transactions(dt.date(2020, 9, 16), dt.date(2020, 9, 30))
    assert len(df) == 3
    assert w.last_date() == dt.date(2020, 9, 29)
    assert w.last_complete_week() == dt.date(2020, 9, 23)


def test_drop_round_trips_after_the_history(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    drop = tmp_path / "d.csv"
    drop.write_text(DROP)
    ingest_drop(drop, wh)
    out = tmp_path / "all.csv"
    export_csv("transactions", wh, out)
    assert out.read_text() == TRANSACTIONS + DROP.removeprefix(TX_HEADER)


def test_two_drops_in_the_same_week_are_two_parts(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(TX_HEADER + f"2018-09-21,{C3},0108775015,0.01,2\n")
    b.write_text(TX_HEADER + f"2018-09-21,{C3},0108775015,0.02,2\n")
    ingest_drop(a, wh)
    ingest_drop(b, wh)
    parts = Warehouse(wh).part_files(dt.date(2018, 9, 19))
    assert len(parts) == 3 and parts[-1].name == "part-history.parquet"
    assert [r[3] for r in week_rows(wh)["2018-09-19"]].count(0.01) == 1


def test_process_incoming_oldest_first_with_an_accept_hook(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    incoming, processed = tmp_path / "incoming", tmp_path / "processed"
    incoming.mkdir()
    files = {}
    for i, (name, day) in enumerate((("b.csv", "2020-09-23"), ("a.csv", "2020-09-30"), ("bad.csv", "2020-10-07"))):
        f = incoming / name
        f.write_text(TX_HEADER + f"{day},{C3},0108775015,0.01,2\n")
        os.utime(f, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
        files[name] = f
    seen = []

    def accept(path: Path) -> bool:
        seen.append(path.name)
        return path.name != "bad.csv"

    results = process_incoming(incoming, wh, processed, accept=accept)
    assert seen == ["b.csv", "a.csv", "bad.csv"]  # mtime order, not name order
    assert [(Path(r["file"]).name, r["status"]) for r in results] == [
        ("b.csv", "ingested"), ("a.csv", "ingested"), ("bad.csv", "rejected")]
    assert sorted(p.name for p in processed.iterdir()) == ["a.csv", "b.csv"]
    assert [p.name for p in incoming.iterdir()] == ["bad.csv"]
    assert Warehouse(wh).weeks()[-2:] == [dt.date(2020, 9, 23), dt.date(2020, 9, 30)]

    # The same drop sent again: a duplicate, and the processed copy is not doubled.
    (incoming / "b.csv").write_bytes((processed / "b.csv").read_bytes())
    (incoming / "bad.csv").unlink()
    again = process_incoming(incoming, wh, processed)
    assert [r["status"] for r in again] == ["duplicate"]
    assert sorted(p.name for p in processed.iterdir()) == ["a.csv", "b.csv"]
    # A different file under a used name keeps both, the new one suffixed with its hash.
    (incoming / "a.csv").write_text(TX_HEADER + f"2020-09-30,{C1},0108775015,0.02,2\n")
    (r,) = process_incoming(incoming, wh, processed)
    assert Path(r["moved_to"]).name == f"a-{r['sha256'][:12]}.csv"


def test_process_incoming_refuses_what_is_not_a_regular_file_unread(raw, wh, tmp_path, home, capsys):
    """Links (even to a good drop), FIFOs and directories named *.csv are refused, never opened or followed."""
    ingest_history(raw, wh, progress=False)
    incoming, processed = tmp_path / "incoming", tmp_path / "processed"
    incoming.mkdir()
    good = tmp_path / "good.csv"
    good.write_text(DROP)
    (incoming / "link.csv").symlink_to(good)
    os.mkfifo(incoming / "pipe.csv")  # opening it to read would block this test
    (incoming / "dir.csv").mkdir()
    (incoming / "w.csv").write_text(DROP)
    refused = []
    results = process_incoming(incoming, wh, processed, refuse=lambda p, kind, why: refused.append((p.name, kind)))
    by = {Path(r["file"]).name: r for r in results}
    assert {n: r["status"] for n, r in by.items()} == {
        "link.csv": "refused", "pipe.csv": "refused", "dir.csv": "refused", "w.csv": "ingested"}
    assert sorted(refused) == [("dir.csv", "directory"), ("link.csv", "symlink"), ("pipe.csv", "fifo")]
    assert by["link.csv"]["reason"] == (f"link.csv is a symbolic link to {str(good)!r}, not a regular file; "
                                        "it was neither opened nor followed")
    assert (incoming / "link.csv").is_symlink() and (incoming / "pipe.csv").exists()  # no hook moved them
    assert ingest.entry_kind(incoming / "pipe.csv") == "fifo" and ingest.entry_kind(good) == "file"
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.csv"))
        assert ingest.entry_kind(tmp_path / "s.csv") == "socket"
        assert ingest.refusal_reason(tmp_path / "s.csv", "socket").startswith("s.csv is a socket, not a regular")
    # The CLI (no validation hook) says so and fails.
    assert ingest.main(["--incoming", str(incoming), "--warehouse", str(wh), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"refused {incoming / 'pipe.csv'}: pipe.csv is a FIFO (named pipe)" in err and "link.csv" in err


# --------------------------------------------------------------------------
# Crash safety
# --------------------------------------------------------------------------
def test_error_mid_write_leaves_the_warehouse_unchanged(raw, wh, tmp_path, monkeypatch):
    ingest_history(raw, wh, progress=False)
    before = snapshot(wh)
    bigger = TRANSACTIONS + f"2018-10-20,{C3},0108775015,0.01,2\n"
    raw2 = write_raw(tmp_path / "raw2", transactions=bigger)
    monkeypatch.setattr(ingest, "_ROW_GROUP_ROWS", 1)  # one write per row, so the failure is mid-file
    real_finalize, calls = ingest._finalize, []

    def failing(tbl, table):
        calls.append(table)
        if table == "transactions" and calls.count("transactions") == 3:
            raise OSError("disk full (simulated)")
        return real_finalize(tbl, table)

    monkeypatch.setattr(ingest, "_finalize", failing)
    with pytest.raises(OSError, match="simulated"):
        ingest_history(raw2, wh, progress=False)
    assert snapshot(wh) == before  # no temporaries either
    monkeypatch.setattr(ingest, "_finalize", real_finalize)
    assert ingest_history(raw2, wh, progress=False)["rows"]["transactions"] == 6


def _run_crashing(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a fresh interpreter that dies with os._exit(3) where the patch says (a hard crash)."""
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr


def test_hard_crash_mid_write_is_invisible_and_rerun_completes(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    before_rows = week_rows(wh)
    before = snapshot(wh)
    raw2 = write_raw(tmp_path / "raw2", transactions=TRANSACTIONS + f"2018-10-20,{C3},0108775015,0.01,2\n")
    _run_crashing(f"""
        import os
        from hm_recsys.data import ingest
        ingest._ROW_GROUP_ROWS = 1
        real, n = ingest._WeekSpiller._flush, [0]
        def flush(self, week):
            n[0] += 1
            if n[0] == 3:
                os._exit(3)
            real(self, week)
        ingest._WeekSpiller._flush = flush
        ingest.ingest_history({str(raw2)!r}, {str(wh)!r}, progress=False)
    """, tmp_path)
    leftovers = [p for p in wh.rglob("*.tmp")]
    assert leftovers, "the crash should have left temporaries behind"
    assert week_rows(wh) == before_rows  # readers see the old data only
    assert {k: v for k, v in snapshot(wh).items() if not k.endswith(".tmp")} == before
    report = ingest_history(raw2, wh, progress=False)
    assert report["rows"]["transactions"] == 6
    assert not list(wh.rglob("*.tmp"))


def test_hard_crash_mid_commit_is_rolled_forward(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    drop = tmp_path / "drop.csv"
    drop.write_text(DROP)
    _run_crashing(f"""
        import os
        from hm_recsys.data import ingest
        real = ingest._apply
        def apply(root, ops):
            real(root, ops[:1])  # the first part renamed, then the power goes out
            os._exit(3)
        ingest._apply = apply
        ingest.ingest_drop({str(drop)!r}, {str(wh)!r})
    """, tmp_path)
    paths = WarehouseLayout(wh)
    assert paths.commit_journal.exists()
    with pytest.raises(WarehouseInterrupted, match="hm-recsys ingest"):
        Warehouse(wh).weeks()
    # Any ingest finishes the commit first: the drop is then already in the ledger.
    assert ingest_drop(drop, wh)["status"] == "duplicate"
    assert not paths.commit_journal.exists() and not list(wh.rglob("*.tmp"))
    rows = week_rows(wh)
    assert len(rows["2020-09-16"]) == 1 and len(rows["2020-09-23"]) == 2
    assert sum(len(r) for r in rows.values()) == 5 + 3


# --------------------------------------------------------------------------
# Malformed input: IngestError names file, line and field; nothing is written
# --------------------------------------------------------------------------
GOOD = f"2018-09-20,{C1},0663713001,0.05,2\n"


@pytest.mark.parametrize(
    ("bad_line", "line", "field", "reason"),
    [
        (f"2018-09-21,{C1},0663713001,0.05\n", 4, "sales_channel_id", "missing field"),
        (f"2018-09-21,{C1},0663713001,0.05,2,9\n", 4, None, "6 fields, expected 5"),
        ("\n", 4, None, "empty line"),
        (f"2018-02-30,{C1},0663713001,0.05,2\n", 4, "t_dat", "not a valid date"),
        (f"2018-9-21,{C1},0663713001,0.05,2\n", 4, "t_dat", "not a valid date"),
        (f"2018-09-21,{C1},0663713001,abc,2\n", 4, "price", "not a decimal number"),
        (f"2018-09-21,{C1},0663713001,nan,2\n", 4, "price", "not a finite number"),
        (f"2018-09-21,{C1},66371300,0.05,2\n", 4, "article_id", "9 or 10 digits"),
        (f"2018-09-21,{C1},06637130x1,0.05,2\n", 4, "article_id", "9 or 10 digits"),
        (f"2018-09-21,,0663713001,0.05,2\n", 4, "customer_id", "empty"),
        (f"2018-09-21,{C1},0663713001,0.05,300\n", 4, "sales_channel_id", "-128..127"),
        (f"2018-09-21,{C1}\r,0663713001,0.05,2\n", 4, None, "carriage return"),
    ],
)
def test_malformed_transactions_name_file_line_and_field(tmp_path, wh, bad_line, line, field, reason):
    tx = TX_HEADER + GOOD + GOOD + bad_line + GOOD
    raw = write_raw(tmp_path / "raw", transactions=tx)
    with pytest.raises(IngestError, match=reason) as err:
        ingest_history(raw, wh, progress=False)
    e = err.value
    assert (e.path.name, e.line, e.field) == ("transactions_train.csv", line, field)
    assert str(e).startswith(f"{raw / 'transactions_train.csv'}: line {line}")
    assert snapshot(wh) == {}  # nothing at all became visible


def test_non_utf8_is_reported_with_its_line(tmp_path, wh):
    raw = write_raw(tmp_path / "raw")
    data = (TX_HEADER + GOOD + GOOD).encode() + f"2018-09-21,{C1[:-1]}".encode() + b"\xff,0663713001,0.05,2\n"
    (raw / "transactions_train.csv").write_bytes(data)
    with pytest.raises(IngestError, match="not valid UTF-8") as err:
        ingest_history(raw, wh, progress=False)
    assert (err.value.line, err.value.field) == (4, "customer_id")


def test_the_first_bad_line_is_reported_whatever_the_column(tmp_path, wh):
    tx = TX_HEADER + GOOD + f"2018-09-21,{C1},0663713001,oops,2\n" + f"2018-99-21,{C1},0663713001,0.05,2\n"
    with pytest.raises(IngestError) as err:
        ingest_history(write_raw(tmp_path / "raw", transactions=tx), wh, progress=False)
    assert (err.value.line, err.value.field) == (3, "price")


@pytest.mark.parametrize("block", [300, 1 << 20])
def test_line_numbers_are_exact_across_blocks(tmp_path, wh, monkeypatch, block):
    monkeypatch.setattr(ingest, "_READ_BLOCK_BYTES", block)
    for bad, field in ((f"2018-09-21,{C1},0663713001,0.05\n", "sales_channel_id"),
                       (f"2018-09-21,{C1},0663713001,x,2\n", "price")):
        tx = TX_HEADER + GOOD * 40 + bad + GOOD * 5
        with pytest.raises(IngestError) as err:
            ingest_history(write_raw(tmp_path / "raw", transactions=tx), wh, progress=False)
        assert (err.value.line, err.value.field) == (42, field)


def test_bad_header_and_empty_file(tmp_path, wh):
    raw = write_raw(tmp_path / "raw", transactions=TX_HEADER.replace("price", "amount") + GOOD)
    with pytest.raises(IngestError, match="header column 4 should be 'price'") as err:
        ingest_history(raw, wh, progress=False)
    assert (err.value.line, err.value.field, err.value.value) == (1, "price", "amount")
    (raw / "transactions_train.csv").write_bytes(b"")
    with pytest.raises(IngestError, match="empty file"):
        ingest_history(raw, wh, progress=False)


def test_malformed_articles_and_customers_lines_count_quoted_newlines(tmp_path, wh):
    # A quoted newline in detail_desc makes the next record start one physical line later.
    arts = ARTICLES.replace("Jersey top with narrow", '"Jersey top\nwith narrow').replace(
        "straps.\n", 'straps."\n').replace(",283,", ",2x3,")
    with pytest.raises(IngestError, match="32-bit integer") as err:
        ingest_history(write_raw(tmp_path / "raw", articles=arts), wh, progress=False)
    assert (err.value.path.name, err.value.line, err.value.field, err.value.value) == (
        "articles.csv", 4, "product_type_no", "2x3")
    cust = CUSTOMERS.replace(",25,", ",25.5,")
    with pytest.raises(IngestError, match="whole number") as err:
        ingest_history(write_raw(tmp_path / "raw2", customers=cust), wh, progress=False)
    assert (err.value.path.name, err.value.line, err.value.field) == ("customers.csv", 4, "age")


def test_age_written_as_float_is_accepted(tmp_path, wh):
    ingest_history(write_raw(tmp_path / "raw", customers=CUSTOMERS.replace(",49,", ",49.0,")), wh, progress=False)
    assert pq.read_table(WarehouseLayout(wh).customers).column("age").to_pylist() == [49, None, 25]


def test_malformed_drop_writes_nothing(raw, wh, tmp_path):
    ingest_history(raw, wh, progress=False)
    before = snapshot(wh)
    drop = tmp_path / "drop.csv"
    drop.write_text(DROP + f"2020-09-30,{C1},0663713001,0.05,two\n")
    with pytest.raises(IngestError) as err:
        ingest_drop(drop, wh)
    assert (err.value.path, err.value.line, err.value.field) == (drop, 5, "sales_channel_id")
    assert snapshot(wh) == before


def test_ingest_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(IngestError("/x/a.csv", 3, "price", "not a decimal number", "abc")))
    assert str(e) == "/x/a.csv: line 3, field 'price': not a decimal number (got 'abc')"
    assert (e.line, e.field, e.value) == (3, "price", "abc")


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def test_cli_history_drop_and_incoming(home, capsys):
    from hm_recsys.config import Settings

    layout = Settings.from_env().layout
    write_raw(layout.raw_dir)
    assert ingest.main(["--raw", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"]["transactions"] == 5
    assert Warehouse(layout.warehouse_dir).weeks()[0] == dt.date(2018, 9, 19)

    layout.incoming_dir.mkdir(parents=True)
    (layout.incoming_dir / "w.csv").write_text(DROP)
    assert ingest.main(["--incoming"]) == 0
    (res,) = json.loads(capsys.readouterr().out)["files"]
    assert res["status"] == "ingested" and (layout.processed_dir / "w.csv").exists()

    assert ingest.main(["--drop", str(layout.processed_dir / "w.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "duplicate"

    bad = home / "bad.csv"
    bad.write_text(TX_HEADER + "2020-13-01,x,0663713001,0.1,2\n")
    assert ingest.main(["--drop", str(bad)]) == 1
    assert f"{bad}: line 2, field 't_dat'" in capsys.readouterr().err


def test_cli_through_the_dispatcher(tmp_path):
    raw = write_raw(tmp_path / "raw")
    env = {**os.environ, "HM_RECSYS_HOME": str(tmp_path / "var")}
    proc = subprocess.run(
        [sys.executable, "-m", "hm_recsys.cli", "ingest", "--raw", str(raw), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["warehouse"] == str((tmp_path / "var" / "data" / "warehouse").resolve())


# --------------------------------------------------------------------------
# The generator's tiny dataset (shared fixtures)
# --------------------------------------------------------------------------
def test_generated_tiny_dataset_round_trips(tiny_raw, tiny_warehouse_ro, tmp_path):
    for table in ("transactions", "customers", "articles"):
        out = tmp_path / f"{table}.csv"
        export_csv(table, tiny_warehouse_ro, out)
        assert out.read_bytes() == (tiny_raw / schema.FILES[table]).read_bytes(), table


def test_generated_drops_add_up_to_the_full_history(tiny_warehouse_ro, tmp_path):
    """The generator's last weeks as separate drops: same rows per week as one history file."""
    from hm_recsys.data.synthetic import generate

    from ..conftest import TINY_SEED

    raw = tmp_path / "raw"
    generate(raw, scale="tiny", seed=TINY_SEED, progress=False, drop_weeks=2)
    wh = tmp_path / "warehouse"
    ingest_history(raw, wh, progress=False)
    drops = sorted((raw / "drops").glob("*.csv"))
    assert len(drops) == 2
    results = process_incoming(raw / "drops", wh, tmp_path / "processed")
    assert [r["status"] for r in results] == ["ingested", "ingested"]
    assert [r["weeks"] for r in results] == [[p.stem.removeprefix("transactions_")] for p in drops]
    assert week_rows(wh) == week_rows(tiny_warehouse_ro)
