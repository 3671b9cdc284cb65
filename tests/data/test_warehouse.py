"""The warehouse read side: which partitions are visible, windows, dtypes, interrupted commits."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from hm_recsys.data.ingest import ingest_drop, ingest_history
from hm_recsys.data.warehouse import Warehouse, WarehouseEmpty, WarehouseInterrupted
from hm_recsys.layout import WarehouseLayout

from .test_ingest import C1, C2, C3, TX_HEADER, write_raw

# Wed 2020-09-09 .. Tue 2020-09-22: two complete weeks, then two rows in the Kaggle test week.
ROWS = [
    ("2020-09-09", C1, "0663713001", "0.01", "2"),
    ("2020-09-15", C2, "0541518023", "0.02", "1"),
    ("2020-09-16", C1, "0541518023", "0.03", "2"),
    ("2020-09-22", C3, "0108775015", "0.04", "2"),
]


@pytest.fixture
def wh(tmp_path):
    tx = TX_HEADER + "".join(",".join(r) + "\n" for r in ROWS)
    root = tmp_path / "warehouse"
    ingest_history(write_raw(tmp_path / "raw", transactions=tx), root, progress=False)
    return root


def test_weeks_and_parts_ignore_temporaries(wh):
    w = Warehouse(wh)
    assert w.weeks() == [dt.date(2020, 9, 9), dt.date(2020, 9, 16)]
    # An interrupted write leaves only hidden .tmp files: never a visible week or part.
    ghost = WarehouseLayout(wh).week_dir(dt.date(2020, 9, 23))
    ghost.mkdir()
    (ghost / ".part-history.parquet.123-abcd.tmp").write_bytes(b"partial")
    (WarehouseLayout(wh).week_dir(dt.date(2020, 9, 9)) / ".part-drop-x.parquet.1-2.tmp").write_bytes(b"partial")
    assert w.weeks() == [dt.date(2020, 9, 9), dt.date(2020, 9, 16)]
    assert [p.name for p in w.part_files(dt.date(2020, 9, 9))] == ["part-history.parquet"]


def test_transactions_window_and_dtypes(wh):
    w = Warehouse(wh)
    df = w.transactions(dt.date(2020, 9, 15), dt.date(2020, 9, 22))
    assert df["t_dat"].tolist() == [pd.Timestamp("2020-09-15"), pd.Timestamp("2020-09-16")]
    assert df["customer_id"].tolist() == [C2, C1]
    assert df["price"].tolist() == [0.02, 0.03]
    assert df.dtypes.astype(str).to_dict() == {
        "t_dat": "datetime64[s]",
        "customer_id": "category",
        "article_id": "category",
        "price": "float64",
        "sales_channel_id": "int8",
    }
    empty = w.transactions(dt.date(2021, 1, 6), dt.date(2021, 1, 13))
    assert len(empty) == 0
    assert empty.dtypes.astype(str).to_dict() == df.dtypes.astype(str).to_dict()


def test_iter_weeks_one_week_at_a_time_with_columns(wh):
    got = [(week, df["article_id"].tolist()) for week, df in
           Warehouse(wh).iter_weeks(dt.date(2020, 9, 9), dt.date(2020, 9, 23), columns=["article_id"])]
    assert got == [
        (dt.date(2020, 9, 9), ["0663713001", "0541518023"]),
        (dt.date(2020, 9, 16), ["0541518023", "0108775015"]),
    ]


def test_last_date_and_last_complete_week_follow_drops(wh, tmp_path):
    w = Warehouse(wh)
    assert w.last_date() == dt.date(2020, 9, 22)
    assert w.last_complete_week() == dt.date(2020, 9, 16)  # ends on a Tuesday: complete
    drop = tmp_path / "drop.csv"
    drop.write_text(TX_HEADER + f"2020-09-24,{C1},0663713001,0.05,2\n")
    ingest_drop(drop, wh)
    assert w.last_date() == dt.date(2020, 9, 24)
    assert w.last_complete_week() == dt.date(2020, 9, 16)  # 09-23 week has only started
    assert list(w.drops().values())[0]["weeks"] == ["2020-09-23"]


def test_dimension_tables_dtypes(wh):
    w = Warehouse(wh)
    cust = w.customers()
    assert str(cust["age"].dtype) == "UInt8"
    assert cust["age"].tolist() == [49, pd.NA, 25]
    assert str(cust["FN"].dtype) == "float32" and cust["FN"].isna().tolist() == [True, False, True]
    assert cust["fashion_news_frequency"].tolist() == ["NONE", "Regularly", "None"]
    assert cust["club_member_status"].tolist() == ["ACTIVE", "ACTIVE", ""]
    art = w.articles()
    assert art["product_type_no"].dtype == "int32"
    assert art["index_group_name"].dtype == "category"
    assert art["article_id"].tolist() == ["0108775015", "0663713001", "0541518023"]
    assert art["detail_desc"].isna().tolist() == [False, False, True]


def test_empty_warehouse(tmp_path):
    w = Warehouse(tmp_path / "nothing")
    assert w.weeks() == []
    assert w.drops() == {}
    with pytest.raises(WarehouseEmpty, match="hm-recsys ingest"):
        w.last_date()


def test_reads_refuse_a_half_applied_commit(wh):
    WarehouseLayout(wh).commit_journal.write_text('{"version": 1, "ops": []}')
    w = Warehouse(wh)
    for read in (w.weeks, w.customers, w.articles, w.drops, lambda: w.part_files(dt.date(2020, 9, 9))):
        with pytest.raises(WarehouseInterrupted, match="_commit.json"):
            read()
