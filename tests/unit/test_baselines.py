"""Baselines on a hand-made 3-week table, the split loader and the CLI, the oracle on tiny data."""

from __future__ import annotations

import datetime as dt
import importlib.util

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hm_recsys.data.warehouse import Warehouse
from hm_recsys.evaluate import (
    ORACLE,
    POPULARITY,
    REPURCHASE,
    TRENDING,
    _kernel_decay,
    baselines_for_split,
    evaluate_rankings,
    holdout_truth,
    main,
    popularity_baseline,
    popularity_ranking,
    purchased_by,
    recall_at_k,
    relevant_sets,
    repurchase_popularity_baseline,
    repurchase_ranking,
    trending_baseline,
    trending_scores,
)
from hm_recsys.split import Split

A1, A2, A3, A4, A5, A6, A7, A8, A9 = (f"010000000{i}" for i in range(1, 10))
W1, W2, W3 = dt.date(2020, 9, 2), dt.date(2020, 9, 9), dt.date(2020, 9, 16)  # Wednesdays: train, valid, holdout

# (day, customer, article). Week 2 counts: A1 3 (2 units by A + D), A2 2, A3 2, A4 1, A8 1.
ROWS = [
    ("2020-09-03", "A", A5), ("2020-09-04", "A", A6), ("2020-09-05", "B", A7),  # week 1
    ("2020-09-09", "C", A3),  # A3 is bought before A2, yet A2 wins their tie by id
    ("2020-09-10", "A", A1), ("2020-09-10", "A", A1), ("2020-09-10", "A", A8),
    ("2020-09-11", "B", A2), ("2020-09-12", "A", A2), ("2020-09-13", "C", A4),
    ("2020-09-14", "B", A3), ("2020-09-15", "D", A1),  # week 2
    ("2020-09-16", "A", A2), ("2020-09-18", "A", A9), ("2020-09-17", "B", A1), ("2020-09-22", "E", A4),  # holdout
]


def _tx(rows=ROWS) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["t_dat", "customer_id", "article_id"])
    return df.assign(
        t_dat=pd.to_datetime(df["t_dat"]).astype("datetime64[s]"),
        customer_id=df["customer_id"].astype("category"),
        article_id=df["article_id"].astype("category"),
    )


def _week(tx: pd.DataFrame, start: dt.date, weeks: int = 1) -> pd.DataFrame:
    t0 = pd.Timestamp(start)
    return tx[(tx["t_dat"] >= t0) & (tx["t_dat"] < t0 + pd.Timedelta(weeks=weeks))]


def test_popularity_order_and_tie_rule():
    tx = _tx()
    assert popularity_ranking(_week(tx, W2)) == [A1, A2, A3, A4, A8]  # count desc, then article_id asc
    assert popularity_ranking(_week(tx, W2), k=2) == [A1, A2]
    preds = popularity_baseline(_week(tx, W2), ["A", "B", "E"], k=3)
    assert preds == {"A": [A1, A2, A3], "B": [A1, A2, A3], "E": [A1, A2, A3]}
    assert preds["A"] is preds["E"]  # one shared list, not a copy per customer


def test_repurchase_order_recency_then_frequency():
    tx = _tx()
    own = repurchase_ranking(_week(tx, W1, weeks=2), ["A", "B", "E"])
    # A: A2 (09-12), then A1 and A8 on 09-10 (A1 bought twice first), then A6 (09-04), A5 (09-03)
    assert own == {"A": [A2, A1, A8, A6, A5], "B": [A3, A2, A7]}
    preds = repurchase_popularity_baseline(_week(tx, W1, weeks=2), _week(tx, W2), ["A", "B", "E"], k=6)
    assert preds == {
        "A": [A2, A1, A8, A6, A5, A3],  # own first, then popularity without repeats
        "B": [A3, A2, A7, A1, A4, A8],
        "E": [A1, A2, A3, A4, A8],  # no history: popularity (only 5 articles sold last week)
    }
    # a 1-week lookback forgets week 1
    short = repurchase_popularity_baseline(_week(tx, W2), _week(tx, W2), ["A"], k=4)
    assert short == {"A": [A2, A1, A8, A3]}
    # k smaller than the own list: truncated, no popularity
    assert repurchase_popularity_baseline(_week(tx, W1, 2), _week(tx, W2), ["A"], k=2) == {"A": [A2, A1]}


def test_exclude_purchased():
    tx = _tx()
    bought = purchased_by(_week(tx, W1, weeks=2), ["A", "B", "E"])
    assert bought == {"A": {A1, A2, A5, A6, A8}, "B": {A2, A3, A7}}
    pop = popularity_baseline(_week(tx, W2), ["A", "B", "E"], k=3, exclude=bought)
    assert pop == {"A": [A3, A4], "B": [A1, A4, A8], "E": [A1, A2, A3]}
    rep = repurchase_popularity_baseline(_week(tx, W1, 2), _week(tx, W2), ["A", "B", "E"], k=3, exclude=bought)
    assert rep == pop  # nothing of one's own survives the exclusion


def test_baseline_scores_on_the_holdout():
    tx = _tx()
    truth = relevant_sets(_week(tx, W3))
    assert dict(truth) == {"A": {A2, A9}, "B": {A1}, "E": {A4}}
    pop = popularity_baseline(_week(tx, W2), truth.customer_ids, k=3)
    # A: A2 at rank 2 (1/2 of 2 relevant); B: A1 at rank 1; E: A4 not in the top 3
    assert recall_at_k(pop, truth, 3) == pytest.approx((0.5 + 1 + 0) / 3)
    out = evaluate_rankings(pop, truth, ks=(3,))
    assert out["map@12"] == pytest.approx((0.5 / 2 + 1 + 0) / 3)


def test_baselines_need_the_columns():
    with pytest.raises(ValueError, match="popularity transactions: missing column 'article_id'"):
        popularity_ranking(pd.DataFrame({"customer_id": ["a"]}))
    with pytest.raises(ValueError, match="recent transactions: missing column 't_dat'"):
        repurchase_ranking(pd.DataFrame({"customer_id": ["a"], "article_id": ["x"]}))


# -- the same table as a warehouse: the split loader and the CLI -------------------------
@pytest.fixture
def hand_warehouse(tmp_path) -> Warehouse:
    wh = Warehouse(tmp_path / "warehouse")
    tx = _tx()
    for week in (W1, W2, W3):
        part = _week(tx, week)
        table = pa.table(
            {
                "t_dat": pa.array(part["t_dat"].dt.date.tolist(), pa.date32()),
                "customer_id": pa.array(part["customer_id"].astype(str).tolist()).dictionary_encode(),
                "article_id": pa.array(part["article_id"].astype(str).tolist()).dictionary_encode(),
                "price": pa.array([0.01] * len(part), pa.float64()),
                "sales_channel_id": pa.array([2] * len(part), pa.int8()),
            }
        )
        path = wh.paths.week_part(week, "history")
        path.parent.mkdir(parents=True)
        pq.write_table(table, path)
    pq.write_table(pa.table({"article_id": [f"010000000{i}" for i in range(10)]}), wh.paths.articles)
    return wh


def test_baselines_for_split_on_a_warehouse(hand_warehouse):
    split = Split.from_warehouse(hand_warehouse, train_weeks=1)
    assert split.holdout_start == W3
    truth = holdout_truth(hand_warehouse, split)
    models = baselines_for_split(hand_warehouse, split, k=6, lookback_weeks=2, progress=False)
    assert list(models) == [POPULARITY, REPURCHASE, TRENDING]  # no oracle for real-format data
    assert models[POPULARITY]["A"] == [A1, A2, A3, A4, A8]
    assert models[REPURCHASE] == {"A": [A2, A1, A8, A6, A5, A3], "B": [A3, A2, A7, A1, A4, A8], "E": [A1, A2, A3, A4, A8]}
    # see test_trending_by_hand: own still-selling articles by decayed value, then trending
    assert models[TRENDING] == {"A": [A1, A2, A8, A3, A4], "B": [A3, A2, A1, A4, A8], "E": [A1, A2, A3, A4, A8]}
    assert set(models[POPULARITY]) == set(truth)
    ex = baselines_for_split(hand_warehouse, split, k=3, exclude_purchased=True, lookback_weeks=1, progress=False)
    assert ex[POPULARITY] == ex[REPURCHASE] == ex[TRENDING] == {"A": [A3, A4], "B": [A1, A4, A8], "E": [A1, A2, A3]}


def test_trending_by_hand():
    """The published kernel's arithmetic on the hand table, as of the holdout (2020-09-16).

    Last week (09-09..09-15) sells A1 x3, A2 x2, A3 x2, A4, A8; week 1's A5-A7 do not sell any more,
    so their quotient (last week's sales / sales in the row's week) is 0. Every last-week row has
    quotient 1, so trending = last-week counts, ties by id: A1, A2, A3, A4, A8. Own values are
    quotient x decay(days ago): A bought A1 twice 6 days ago (2 x decay(6)), A2 4 days ago
    (decay(4)), A8 6 days ago (decay(6)); decay(4) = 78,899 < 2 x decay(6) = 108,770.
    """
    tx = _tx()
    before = tx[tx["t_dat"] < pd.Timestamp(W3)]
    own, trending = trending_scores(before, W3)
    assert trending == [A1, A2, A3, A4, A8]
    a = own[own["customer_id"] == "A"].set_index("article_id")["value"]
    assert set(a.index) == {A1, A2, A8}  # A5, A6 no longer sell
    assert a[A1] == pytest.approx(2 * _kernel_decay(6)) and a[A2] == pytest.approx(_kernel_decay(4))
    assert _kernel_decay(4) == pytest.approx(2.5e4 / 2 + 1.5e5 * 0.449329 - 1e3, rel=1e-5)
    assert _kernel_decay(10_000) == 0.0 and _kernel_decay(0) == _kernel_decay(1)  # clipped at 0; x >= 1
    preds = trending_baseline(before, W3, ["A", "B", "E"], k=4)
    assert preds == {"A": [A1, A2, A8, A3], "B": [A3, A2, A1, A4], "E": [A1, A2, A3, A4]}
    with pytest.raises(ValueError, match="only see the past"):
        trending_scores(tx, W3)


def test_cli_prints_the_table(hand_warehouse, tmp_path, capsys):
    plot = tmp_path / "curves.png"
    rc = main(["--warehouse", str(hand_warehouse.root), "--train-weeks", "1", "--plot", str(plot), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == "holdout week 2020-09-16..2020-09-22: 3 scored customers"
    # popularity [A1 A2 A3 A4 A8]: A 1/2 (AP 1/4), B 1 (AP 1), E 1 (AP 1/4); 5 of 10 articles shown
    assert lines[3].split() == ["popularity", "0.8333", "0.8333", "0.5000", "0.6058", "0.5000", "3"]
    # repurchase (4-week lookback): A [A2 A1 A8 A6 A5 A3 A4], B [A3 A2 A7 A1 A4 A8], E popularity
    assert lines[4].split() == ["repurchase+popularity", "0.8333", "0.8333", "0.3333", "0.4915", "0.8000", "3"]
    # trending: A [A1 A2 A8 A3 A4] (A2 at 2), B [A3 A2 A1 A4 A8] (A1 at 3), E [A1 A2 A3 A4 A8] (A4 at 4)
    assert lines[5].split() == ["trending+decayed-repurchase", "0.8333", "0.8333", "0.2778", "0.4392", "0.5000", "3"]
    assert "no oracle" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_clear_error_on_empty_warehouse(tmp_path, capsys):
    rc = main(["--warehouse", str(tmp_path / "nothing"), "--no-progress"])
    assert rc == 1
    assert "run `hm-recsys ingest`" in capsys.readouterr().err


# -- the shared tiny dataset: the oracle is the ceiling -----------------------------------
_HAVE_PIPELINE = all(importlib.util.find_spec(m) for m in ("hm_recsys.data.synthetic", "hm_recsys.data.ingest"))


@pytest.mark.skipif(not _HAVE_PIPELINE, reason="needs the generator and ingestion (hm_recsys.data.synthetic, .ingest)")
def test_popularity_below_oracle_on_tiny_data(tiny_warehouse_ro):
    wh = Warehouse(tiny_warehouse_ro)
    split = Split.from_warehouse(wh, train_weeks=1)
    truth = holdout_truth(wh, split)
    models = baselines_for_split(wh, split, k=100, progress=False)
    assert ORACLE in models, "the tiny synthetic warehouse should carry the oracle for its last week"
    pop = evaluate_rankings(models[POPULARITY], truth)
    oracle = evaluate_rankings(models[ORACLE], truth)
    assert pop["n_customers"] == oracle["n_customers"] == len(truth)
    assert pop["recall@12"] < oracle["recall@12"]
