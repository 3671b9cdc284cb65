"""Validation of H&M files (``hm_recsys.data.validate``): what can break and how it is reported.

Structure checks run on hand-made bytes (no GX); the suites run on the tiny
generated dataset (seed 7, 4 weekly drops): clean drops and the clean history
must pass, corrupted copies must fail exactly the expected checks, at the
expected lines. One GX context serves the whole session (``GxRunner.shared``).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from hm_recsys.data import schema
from hm_recsys.data import validate as V
from hm_recsys.data.validation import structure
from hm_recsys.data.validation.suites.header import column_diff
from tests.data.bad_inputs import corpus
from tests.data.bad_inputs.fixtures import tiny_drops

RUN = dt.date(2020, 10, 1)
T_HEADER = list(schema.TRANSACTION_COLUMNS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_drops(tmp_path_factory)


def _failed(report) -> set[str]:
    return set(report.failed_checks)


# --------------------------------------------------------------------------
# Structure: bytes in, bad lines out (plain Python, no GX)
# --------------------------------------------------------------------------
def _scan(data: bytes, at_eof: bool = True):
    f = structure.Findings("transactions", 10)
    good, lines = structure.scan_plain_block(data, 2, ["a", "b", "c"], at_eof, f)
    return good, lines.tolist(), {k: [e["line"] for e in r.examples] for k, r in f.found.items()}, f


def test_scan_sets_aside_bad_lines_by_number():
    data = b"1,2,3\n1,2\n\n1,2,3,4\n\xff,2,3\n1,2,3\r\n1,2"
    good, lines, found, f = _scan(data)
    # line 2 ok, 3 short, 4 blank, 5 long, 6 non-UTF-8, 7 ok (CRLF), 8 cut off at the end of the file
    assert lines == [2, 7]
    assert found == {"field_count": [3, 4, 5], "encoding": [6], "truncated_last_line": [8]}
    assert good == b"1,2,3\n1,2,3\r\n"
    assert f.found["field_count"].unexpected_count == 3
    assert f.found["field_count"].examples[1]["detail"] == "an empty line, the header has 3"
    assert f.found["encoding"].examples[0]["detail"] == "invalid UTF-8 byte 0xff at byte 1 of the line"
    assert f.found["truncated_last_line"].examples[0]["text"] == "1,2"


def test_scan_keeps_a_complete_last_line_without_newline_and_non_ascii_utf8():
    good, lines, found, _ = _scan("1,2,3\n1,é,3".encode())
    assert (lines, found) == ([2, 3], {})
    assert good == "1,2,3\n1,é,3".encode()
    # Mid-file, a short line is a field-count problem, not a truncation.
    _, lines, found, _ = _scan(b"1,2\n1,2,3\n", at_eof=False)
    assert (lines, found) == ([3], {"field_count": [2]})


def test_read_plain_file_structure(tmp_path):
    def read(data: bytes):
        p = tmp_path / "t.csv"
        p.write_bytes(data)
        r = structure.read_plain_file(p, "transactions", 5)
        return r, {c.check: c.status for c in r.findings.results(r.lines)}

    r, st = read(b"")
    assert r.header is None and st["empty_file"] == "failed" and "encoding" not in st
    r, st = read(b"t_dat,customer_id,article_id,price,sales_channel_id\n")
    assert st["header_only"] == "failed" and r.frame is None
    r, st = read(b"t_dat;customer_id;article_id;price;sales_channel_id\n2020-09-23;a;b;1;2\n")
    assert st["delimiter"] == "failed"
    assert r.findings.found["delimiter"].detail == "the header is separated by ';', not ','"
    # A UTF-8 BOM is tolerated (ingestion accepts it too); the frame is indexed by line number.
    bom = b"\xef\xbb\xbft_dat,customer_id,article_id,price,sales_channel_id\r\n"
    r, st = read(bom + b"2020-09-23,c,0663713001,0.5,2\r\n")
    assert set(st.values()) == {"passed"}
    assert r.header.fields == T_HEADER
    assert r.frame.index.tolist() == [2] and r.frame.loc[2].tolist() == ["2020-09-23", "c", "0663713001", "0.5", "2"]


def test_read_quoted_file_numbers_lines_across_quoted_newlines(tmp_path):
    p = tmp_path / "articles.csv"
    p.write_bytes(b'a,b,c\n1,"two\nlines",3\n4,5\n6,7,8\n9,"x')
    r = structure.read_quoted_file(p, "articles", 5)
    assert r.frame.index.tolist() == [2, 5]
    assert r.frame.loc[2].tolist() == ["1", "two\nlines", "3"]
    assert {k: [e["line"] for e in v.examples] for k, v in r.findings.found.items()} == {
        "field_count": [4],
        "truncated_last_line": [6],
    }


# --------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------
def test_scan_splits_rfc4180_quoted_lines():
    data = (
        b'"1","2","3"\n'  # 2: every field quoted
        b'1,"a,b",3\n'  # 3: a comma inside quotes is data
        b'1,"say ""hi""",3\r\n'  # 4: doubled quotes, CRLF
        b'1,a"b,3\n'  # 5: a quote inside an unquoted field is data
        b'1,"ab,3\n'  # 6: a quote never closed
        b'1,"a"b,3\n'  # 7: text after the closing quote
        b'"1","2"\n'  # 8: quoted, but 2 fields
        b'1,2,"3'  # 9: cut off inside a quote at the end of the file
    )
    good, lines, found, f = _scan(data)
    assert lines == [2, 3, 4, 5]
    assert found == {"field_count": [6, 7, 8], "truncated_last_line": [9]}
    assert [e["detail"] for e in f.found["field_count"].examples] == [
        "cannot be split into fields: a quoted field is not closed on this line",
        "cannot be split into fields: text follows the closing quote of a quoted field",
        "2 fields, the header has 3",
    ]
    assert f.found["truncated_last_line"].examples[0]["detail"].endswith("(a quoted field is not closed on this line)")
    frame = structure.parse_plain(good, ["a", "b", "c"], np.asarray(lines))
    assert frame.values.tolist() == [["1", "2", "3"], ["1", "a,b", "3"], ["1", 'say "hi"', "3"], ["1", 'a"b', "3"]]


def test_a_carriage_return_inside_a_line_is_a_malformed_line_not_a_crash(tmp_path):
    # CSV readers end a line at a lone \r too, so the line would split in two: it is set aside instead.
    good, lines, found, f = _scan(b'1,2,3\n1,2\r,3\n\r1,2,3\n1,"2\r",3\n1,2,3\r\n1,2,3\r')
    assert (lines, found) == ([2, 6, 7], {"field_count": [3, 4, 5]})
    assert {e["detail"] for e in f.found["field_count"].examples} == {"cannot be split into fields: a carriage "
                                                                      "return (\\r) inside the line"}
    assert structure.parse_plain(good, ["a", "b", "c"], np.asarray(lines)).index.tolist() == [2, 6, 7]


def test_a_quoted_rfc4180_drop_reads_as_the_plain_one(tmp_path):
    header = ",".join(T_HEADER).encode() + b"\n"
    row = b"2020-09-23,c,0663713001,0.5,2\n"
    quoted = b'"2020-09-23","c","0663713001","0.5","2"\n'
    (tmp_path / "plain.csv").write_bytes(header + row * 2)
    (tmp_path / "quoted.csv").write_bytes(b",".join(b'"%s"' % c.encode() for c in T_HEADER) + b"\n" + quoted * 2)
    plain = structure.read_plain_file(tmp_path / "plain.csv", "transactions", 5)
    got = structure.read_plain_file(tmp_path / "quoted.csv", "transactions", 5)
    assert {c.status for c in got.findings.results(got.lines)} == {"passed"}
    assert got.header.fields == T_HEADER and got.frame.equals(plain.frame)


@pytest.mark.parametrize("tail", [b"\n", b"\n\n\n", b"\r\n\r\n", b"\n\r"])
def test_blank_lines_ending_a_file_are_no_rows(tmp_path, tail):
    header = ",".join(T_HEADER).encode() + b"\n"
    row = b"2020-09-23,c,0663713001,0.5,2\n"
    p = tmp_path / "t.csv"

    def read(data: bytes):
        p.write_bytes(data)
        r = structure.read_plain_file(p, "transactions", 5)
        return r, {k: [e["line"] for e in v.examples] for k, v in r.findings.found.items()}

    r, found = read(header + row + row + tail)
    assert found == {} and r.frame.index.tolist() == [2, 3]
    # Between rows a blank line is still malformed; a header followed by blank lines has no rows.
    r, found = read(header + row + b"\n" + row + tail)
    assert found == {"field_count": [3]} and r.frame.index.tolist() == [2, 4]
    r, found = read(header + tail)
    assert found == {"header_only": [1]} and r.frame is None
    # articles.csv (quoted newlines allowed) follows the same rule.
    p.write_bytes(b'a,b,c\n1,"two\nlines",3\n' + tail)
    r = structure.read_quoted_file(p, "articles", 5)
    assert r.findings.found == {} and r.frame.index.tolist() == [2]


@pytest.mark.parametrize("block", [1, 5, 13, 1 << 20])
def test_history_blocks_tell_blank_lines_that_end_the_file_from_blank_lines_between_rows(block):
    """Read in blocks (the history), blank lines at the end are still no rows, wherever a block ends."""
    row = b"2020-09-23,c,0663713001,0.5,2\n"
    body = row * 3 + b"\n" + row + b"\n\r\n\n"  # line 5: blank between rows; 7..9: the blank end
    blocks = list(structure.iter_blocks(io.BytesIO(body), block))
    assert b"".join(b for b, _ in blocks) == body and [e for _, e in blocks][-1] is True
    assert not any(e for _, e in blocks[:-1])
    f, line, kept = structure.Findings("transactions", 10), 2, []
    for data, at_eof in blocks:
        _, lines = structure.scan_plain_block(data, line, T_HEADER, at_eof, f)
        line += structure.lines_in(data)
        kept += lines.tolist()
    assert kept == [2, 3, 4, 6] and {k: [e["line"] for e in v.examples] for k, v in f.found.items()} == {
        "field_count": [5]}


def test_declared_week():
    assert V.declared_week("transactions_2020-09-23.csv") == (dt.date(2020, 9, 23), None)
    assert V.declared_week("transactions_2020-09-23_fixed.csv") == (dt.date(2020, 9, 23), None)
    assert V.declared_week("anything.csv", "2020-09-30") == (dt.date(2020, 9, 30), None)
    day, why = V.declared_week("transactions_2020-09-24.csv")
    assert day is None and why == (
        "declared week 2020-09-24: 2020-09-24 is not a Wednesday; H&M weeks run Wednesday..Tuesday"
    )
    day, why = V.declared_week("drop.csv")
    assert day is None and "cannot tell the week of 'drop.csv'" in why


def test_column_diff_names_what_changed():
    exp = ("a", "b", "c")
    assert column_diff(["a", "c"], exp) == "missing: b (expected a,b,c)"
    assert column_diff(["a", "x", "c"], exp) == "renamed: 'b' -> 'x' (expected a,b,c)"
    assert column_diff(["a", "b", "c", "d"], exp) == "unexpected: d (expected a,b,c)"
    assert column_diff(["b", "a", "c"], exp) == "reordered: got b,a,c (expected a,b,c)"


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="volume_band"):
        V.ValidationConfig(volume_band=(5.0, 0.2))
    with pytest.raises(ValueError, match="history_weeks"):
        V.ValidationConfig(history_weeks=0)
    with pytest.raises(ValueError, match="new_customer_share"):
        V.ValidationConfig(new_customer_share=(-0.1, 0.5))


def test_weekly_volume_frame_compares_each_week_with_the_weeks_before():
    w = [dt.date(2020, 7, 1) + dt.timedelta(days=7 * i) for i in range(6)]
    rows = dict(zip(w, [100, 100, 300, 100, 1000, 20], strict=True))
    df = V.weekly_volume_frame(rows, history_weeks=2, partial={w[5]})
    assert df.index.tolist() == [d.isoformat() for d in w]
    assert df["recent_median"].tolist()[2:5] == [100.0, 200.0, 200.0]
    assert df["ratio_to_recent_median"].tolist()[2:5] == [3.0, 0.5, 5.0]
    # no history for the first two weeks; the partial last week is not comparable
    assert df["recent_median"].isna().tolist() == [True, True, False, False, False, True]


def test_suites_tag_every_expectation_with_an_id_and_a_reason():
    cfg = V.ValidationConfig()
    suites = [
        V.header_suite("transactions"),
        V.transactions_suite(dt.date(2020, 9, 23), RUN, cfg, volume=(1, 2), novelty=True),
        V.customers_suite(cfg),
        V.articles_suite(cfg),
        V.weekly_volume_suite(cfg),
    ]
    for s in suites:
        for e in s.expectations:
            assert e.meta["check"] and len(e.meta["why"]) > 10, (s.name, e)
    ids = [e.meta["check"] for e in suites[1].expectations]
    assert sorted(ids) == sorted(V.check_ids("rows"))
    bare = [e.meta["check"] for e in V.transactions_suite(None, RUN, cfg).expectations]
    assert set(ids) - set(bare) == {"t_dat_in_week", "t_dat_not_future", "volume", "new_article_share",
                                    "new_customer_share"}
    # the week's dates after the run date are the "future" ones
    s = V.transactions_suite(dt.date(2020, 9, 23), dt.date(2020, 9, 27), cfg)
    fut = next(e for e in s.expectations if e.meta["check"] == "t_dat_not_future")
    assert fut.value_set == ["2020-09-28", "2020-09-29"]


# --------------------------------------------------------------------------
# Drops against the warehouse
# --------------------------------------------------------------------------
def test_clean_generated_drops_pass(tiny):
    files = [(p, None, RUN) for p in tiny.drops] + [(tiny.hidden_week, "2020-09-23", dt.date(2020, 9, 29))]
    for path, week, run_date in files:
        r = V.validate_drop(path, tiny.warehouse, run_date, week=week)
        assert r.status == "accepted", r.summary()
        assert {c.status for c in r.checks} == {"passed"}, [c.check for c in r.checks if c.status != "passed"]
        assert [c.check for c in r.checks] == list(V.check_ids())
        assert r.rows == path.read_bytes().count(b"\n") - 1
        shares = {c.check: c.observed_value for c in r.checks if c.check.startswith("new_")}
        assert 0 <= shares["new_article_share"] <= 0.3 and 0 < shares["new_customer_share"] <= 0.5


def test_checks_needing_history_are_skipped_with_a_note(tiny):
    from hm_recsys.data.warehouse import Warehouse

    n_weeks = len(Warehouse(tiny.warehouse).weeks())
    r = V.validate_drop(tiny.drops[0], tiny.warehouse, RUN, config=V.ValidationConfig(history_weeks=n_weeks + 1))
    assert r.status == "accepted"
    assert r.skipped_checks == ["volume", "new_article_share", "new_customer_share"]
    note = f"the warehouse has {n_weeks} week(s) before this one; the check needs {n_weeks + 1}"
    assert {c.detail for c in r.checks if c.status == "skipped"} == {note}
    assert r.summary().endswith("skipped: volume, new_article_share, new_customer_share.")


def test_a_failure_names_line_value_and_the_raw_row(tiny, tmp_path):
    case = corpus.BY_NAME["negative_price"]
    clean = tiny.drops[0].read_bytes()
    p = tmp_path / corpus.file_name(case)
    p.write_bytes(case.build(clean))
    r = V.validate_drop(p, tiny.warehouse, RUN)
    assert _failed(r) == {"price_range"}
    (c,) = r.failures
    line13 = p.read_bytes().split(b"\n")[12].decode().split(",")
    assert c.unexpected_count == 1 and c.element_count == r.rows == clean.count(b"\n") - 1
    assert c.examples == [{"line": 13, "value": line13[3], "row": dict(zip(T_HEADER, line13, strict=True))}]
    assert c.kwargs == {"column": "price_value", "min_value": 0, "max_value": 1.0, "strict_min": True}
    d = json.loads(V.to_json(r.to_dict()))
    assert d["status"] == "rejected" and d["failed_checks"] == ["price_range"]
    assert f"price_range (1 row, e.g. line 13: '{line13[3]}')" in d["summary"]


def test_a_second_source_for_a_loaded_week_is_rejected(tiny, tmp_path):
    """The history's last week sent again as a drop would double it."""
    lines = (tiny.raw / "transactions_train.csv").read_bytes().split(b"\n")
    week = [ln for ln in lines[1:] if ln[:10] >= b"2020-08-19"]
    p = tmp_path / "transactions_2020-08-19.csv"
    p.write_bytes(b"\n".join([lines[0], *week]))
    r = V.validate_drop(p, tiny.warehouse, RUN)
    assert _failed(r) == {"week_not_loaded"}
    assert r.failures[0].detail == "week 2020-08-19 already holds part-history.parquet in the warehouse"


def test_a_warehouse_without_catalogue_is_a_setup_error(tiny, tmp_path):
    with pytest.raises(V.ValidationSetupError, match="ingest the history first"):
        V.validate_drop(tiny.drops[0], tmp_path / "empty_wh", RUN)


# --------------------------------------------------------------------------
# The initial history
# --------------------------------------------------------------------------
def _week_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ln in path.read_bytes().split(b"\n")[1:]:
        if ln:
            d = dt.date.fromisoformat(ln[:10].decode())
            w = schema.week_start(d).isoformat()
            counts[w] = counts.get(w, 0) + 1
    return counts


def test_clean_history_passes_in_one_block_or_many(tiny):
    weeks = _week_counts(tiny.raw / "transactions_train.csv")
    one = V.validate_history(tiny.raw, RUN, progress=False)
    many = V.validate_history(tiny.raw, RUN, progress=False, block_bytes=1 << 18, batch_rows=6000)
    for r in (one, many):
        assert r.status == "accepted", r.summary()
        assert r.weeks == dict(sorted(weeks.items()))
        assert r.rows == {"articles": 500, "customers": 2000, "transactions": sum(weeks.values())}
    assert many.batches > one.batches
    key = [(c.table, c.check, c.status, c.element_count, c.unexpected_count) for c in one.checks]
    assert key == [(c.table, c.check, c.status, c.element_count, c.unexpected_count) for c in many.checks]
    assert {(c.table, c.check) for c in one.checks} >= {
        ("transactions", "volume"), ("customers", "customer_id_unique"),
        ("articles", "article_id_unique"), ("transactions", "encoding"),
    }


def test_history_failures_name_tables_weeks_and_lines(tiny, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("articles.csv", "customers.csv", "transactions_train.csv"):
        shutil.copy(tiny.raw / name, raw / name)
    # customers: line 2 again at the end -> its id is no longer unique (2 rows)
    cust = (raw / "customers.csv").read_bytes()
    (raw / "customers.csv").write_bytes(cust + cust.split(b"\n")[1] + b"\n")
    n_cust = cust.count(b"\n") + 1  # the appended line's number
    # articles: line 3's product code no longer prefixes its article id
    art = (raw / "articles.csv").read_bytes().split(b"\n")
    aid, code, rest = art[2].split(b",", 2)
    art[2] = b",".join([aid, b"%07d" % ((int(code) + 1) % 10**7), rest])
    (raw / "articles.csv").write_bytes(b"\n".join(art))
    # transactions: an unknown article on line 100, a non-UTF-8 byte on line 200, week 20 sent 10 times
    tx = (raw / "transactions_train.csv").read_bytes().split(b"\n")
    spiked = sorted(_week_counts(tiny.raw / "transactions_train.csv"))[20]
    in_spiked = [i for i, ln in enumerate(tx[1:], 1) if ln and schema.week_start(
        dt.date.fromisoformat(ln[:10].decode())).isoformat() == spiked]
    rows = [tx[i] for i in in_spiked]
    assert in_spiked[0] > 200  # the edits below come before the spike, so their line numbers hold
    f = tx[99].split(b",")
    tx[99] = b",".join([*f[:2], corpus.UNKNOWN_ARTICLE.encode(), *f[3:]])
    tx[199] = b"\xff" + tx[199][1:]
    tx = tx[: in_spiked[-1] + 1] + rows * 9 + tx[in_spiked[-1] + 1 :]
    (raw / "transactions_train.csv").write_bytes(b"\n".join(tx))

    r = V.validate_history(raw, RUN, progress=False, block_bytes=1 << 16, batch_rows=3000)
    assert r.status == "rejected"
    assert {(c.table, c.check) for c in r.failures} == {
        ("customers", "customer_id_unique"),
        ("articles", "product_code_prefix"),
        ("transactions", "article_id_in_articles"),
        ("transactions", "encoding"),
        ("transactions", "volume"),
    }
    got = {(c.table, c.check): c for c in r.failures}
    assert [e["line"] for e in got[("customers", "customer_id_unique")].examples] == [2, n_cust]
    assert [e["line"] for e in got[("articles", "product_code_prefix")].examples] == [3]
    assert [e["line"] for e in got[("transactions", "article_id_in_articles")].examples] == [100]
    assert got[("transactions", "article_id_in_articles")].examples[0]["value"] == corpus.UNKNOWN_ARTICLE
    assert [e["line"] for e in got[("transactions", "encoding")].examples] == [200]
    vol = got[("transactions", "volume")]
    assert vol.unexpected_count == 1 and vol.examples[0]["week"] == spiked
    assert vol.examples[0]["row"]["rows"] == 10 * len(rows)
    assert r.rows["transactions"] == sum(_week_counts(tiny.raw / "transactions_train.csv").values()) - 1 + 9 * len(rows)
    assert "customers.customer_id_unique (2 rows, e.g. line 2:" in r.summary()


def test_unsorted_history_is_validated_in_pieces(tiny, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny.raw, raw, ignore=shutil.ignore_patterns("drops", "oracle"))
    lines = (raw / "transactions_train.csv").read_bytes().split(b"\n")
    body = [ln for ln in lines[1:] if ln]
    random.Random(0).shuffle(body)
    (raw / "transactions_train.csv").write_bytes(b"\n".join([lines[0], *body]) + b"\n")
    r = V.validate_history(raw, RUN, progress=False, block_bytes=1 << 18)
    assert r.status == "accepted", r.summary()
    assert r.weeks == dict(sorted(_week_counts(tiny.raw / "transactions_train.csv").items()))


# --------------------------------------------------------------------------
# CLI: one drop (check only) and the history
# --------------------------------------------------------------------------
def test_cli_drop_checks_without_moving_anything(tiny, tmp_path, capsys, home):
    from hm_recsys.data.drops import main

    good = tiny.drops[1]
    assert main(["--drop", str(good), "--warehouse", str(tiny.warehouse), "--run-date", "2020-10-01",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "accepted"
    bad = tmp_path / "transactions_2020-09-02.csv"
    bad.write_bytes(good.read_bytes().replace(b",2\n", b",3\n", 1))
    out = tmp_path / "out"
    rc = main(["--drop", str(bad), "--warehouse", str(tiny.warehouse), "--run-date", "2020-10-01", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    assert json.loads(cap.out)["failed_checks"] == ["sales_channel_id_set"]
    assert "was REJECTED: 1 of" in cap.err and "sales_channel_id_set (1 row, e.g. line" in cap.err
    assert bad.is_file() and (out / "report.json").is_file() and (out / "data_docs" / "index.html").is_file()
    # An explicit --week overrides the name.
    assert main(["--drop", str(tiny.hidden_week), "--week", "2020-09-23", "--warehouse", str(tiny.warehouse),
                 "--run-date", "2020-09-29"]) == 0


def test_cli_history_writes_its_report(tiny, tmp_path, capsys, home):
    from hm_recsys.data.drops import main

    out = tmp_path / "hist"
    assert main(["--history", str(tiny.raw), "--run-date", "2020-10-01", "--out", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "accepted" and printed["written"]["report"] == str(out / "report.json")
    assert json.loads((out / "report.json").read_text())["rows"]["transactions"] == printed["rows"]["transactions"]
    assert main(["--history", str(tmp_path / "nowhere")]) == 2
    assert "missing H&M CSV(s)" in capsys.readouterr().err
