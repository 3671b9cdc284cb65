"""The feature path: vocabularies from the training window, OOV, buckets, hashing, leak-free history."""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np
import pandas as pd
import pytest

from hm_recsys.features import (
    ARTICLE_ATTRIBUTES,
    ArticleStats,
    FeatureConfig,
    FeatureState,
    History,
    HistoryWindow,
    Replay,
    Tables,
    WeekRows,
    bucket_log2,
    day_number,
    postal_bucket,
)

WED = dt.date(2020, 9, 2)  # a Wednesday


def _articles(n: int = 4) -> pd.DataFrame:
    """n articles in the warehouse's schema; article i has product type 100 + i % 3, colour "0<i>"."""
    df = pd.DataFrame({"article_id": [f"{i + 1:010d}" for i in range(n)]})
    for col in ARTICLE_ATTRIBUTES.values():
        df[col] = [f"{col[:3]}{i % 2}" for i in range(n)]
    df["product_code"] = [f"{i // 2:07d}" for i in range(n)]
    df["product_type_no"] = pd.array([100 + i % 3 for i in range(n)], dtype="int32")
    df["colour_group_code"] = [f"0{i}" for i in range(n)]
    return df


def _customers() -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": ["c0", "c1", "c2"],
        "FN": pd.array([1.0, np.nan, np.nan], dtype="float32"),
        "Active": pd.array([1.0, np.nan, 1.0], dtype="float32"),
        "club_member_status": ["ACTIVE", "", "LEFT CLUB"],
        "fashion_news_frequency": ["None", "NONE", "Regularly"],
        "age": pd.array([23, None, 99], dtype="UInt8"),
        "postal_code": ["p" * 64, "", "q" * 64],
    })


def _state(config: FeatureConfig | None = None) -> tuple[FeatureState, Tables]:
    tables = Tables(_articles(), _customers())
    state = FeatureState.fit(
        config or FeatureConfig(),
        tables,
        article_counts=np.array([2, 0, 1, 0]),
        customer_counts=np.array([1, 1, 0]),
        article_mean_price=np.array([0.01, np.nan, 0.03, np.nan]),
    )
    return state, tables


def test_vocabularies_come_from_the_training_window_with_an_oov_bucket():
    state, tables = _state()
    assert state.vocabs["article_id"] == ["0000000001", "0000000003"]
    static = state.article_static(tables.articles)
    # unbought articles (rows 1 and 3) keep attribute values only if a bought article shares them
    assert static["article_id"].tolist() == [1, 0, 2, 0]
    assert state.vocabs["product_type"] == ["100", "102"]  # 101 was only on an unbought article
    assert static["product_type"].tolist() == [1, 0, 2, 1]
    assert static["colour_group"].tolist() == [1, 0, 2, 0]
    assert state.vocabs["product_code"] == ["0000000", "0000001"]
    # customer demographics: values of buyers only (c0, c1); "None" and "NONE" stay apart
    assert state.vocabs["fashion_news_frequency"] == ["NONE", "None"]
    assert state.vocabs["customer_id"] == ["c0", "c1"]
    assert state.cardinality("article_id") == 3 and state.cardinality("customer_id") == 3


def test_customer_static_encoding_exact():
    state, tables = _state()
    m = state.customer_static(tables.customers)
    cols = list(state.static_customer_features)
    assert cols == ["customer_id", "age", "club_member_status", "fashion_news_frequency", "fn", "active", "postal_code"]
    assert m.shape == (4, 7)
    col = {c: m[:, i].tolist() for i, c in enumerate(cols)}
    assert col["customer_id"] == [1, 2, 0, 0]  # c2 bought nothing in training -> OOV; last row = unknown
    assert col["age"] == [2, 0, 12, 0]  # 23 -> [20, 25) = bucket 2; missing -> 0; 99 -> last bucket
    assert state.vocabs["club_member_status"] == ["", "ACTIVE"]
    assert col["club_member_status"] == [2, 1, 0, 0]  # "LEFT CLUB" unseen in training -> 0
    assert state.vocabs["fn"] == ["", "1"] and col["fn"] == [2, 1, 1, 0]
    key = b"hm-recsys"
    expect = 1 + int.from_bytes(hashlib.blake2b(b"p" * 64, key=key, digest_size=8).digest(), "little") % 1024
    assert col["postal_code"][0] == expect and col["postal_code"][1] == 0  # "" -> missing bucket
    assert m[-1].tolist() == [0] * 7


def test_postal_hash_is_stable_and_in_range():
    codes = [f"{i:064x}" for i in range(500)] + [""]
    a = postal_bucket(codes, 16, "salt")
    assert a.tolist() == postal_bucket(list(reversed(codes)), 16, "salt")[::-1].tolist()
    assert a[-1] == 0 and a[:-1].min() >= 1 and a[:-1].max() <= 16
    assert len(set(a[:-1].tolist())) == 16  # 500 codes fill all 16 buckets
    assert a.tolist() != postal_bucket(codes, 16, "other").tolist()


def test_history_window_keeps_last_distinct_articles_before_as_of():
    w = HistoryWindow(weeks=2, length=2)
    d = day_number(WED)

    def rows(c, a, days):
        return WeekRows(np.array(c, np.int32), np.array(a, np.int32), np.array(days, np.int32),
                        np.zeros(len(c)))

    w.push(rows([0, 0, 1], [5, 6, 7], [d - 20, d - 15, d - 10]))  # customer 0, day -20 is outside 2 weeks
    w.push(rows([0, 0, 0, 2], [6, 8, 9, 3], [d - 3, d - 3, d - 1, d]))  # day d is not before as_of
    h = w.snapshot(WED)
    assert h.customer_rows.tolist() == [0, 1]
    # customer 0: 9 (1 day ago), then 6 and 8 both 3 days ago (tie -> lower row first); cut to L = 2
    assert h.items(0).tolist() == [9, 6]
    assert h.entry(0)[1].tolist() == [1, 3]
    assert h.items(1).tolist() == [7] and h.items(2).tolist() == []
    articles, days, real, n = h.slots(np.array([1, 2, 0]), 3, np.arange(11)[:, None])  # padding: row 10
    assert articles[:, :, 0].tolist() == [[7, 10, 10], [10, 10, 10], [9, 6, 10]]
    assert days.tolist() == [[10, 0, 0], [0, 0, 0], [1, 3, 0]]
    assert real.tolist() == [[True, False, False], [False] * 3, [True, True, False]]
    assert n.tolist() == [1, 0, 2]
    sub = h.subset(np.array([1, 1, 4]))
    assert sub.customer_rows.tolist() == [1] and sub.items(1).tolist() == [7]


@pytest.mark.parametrize("n_customers", [50, 1 << 60])  # the second is too wide to pack: the lexsort path
def test_latest_per_pair_matches_sorting_the_columns(n_customers):
    """The packed-key sorts give exactly the rows and order of sorting (customer, article, age) column-wise."""
    from hm_recsys.features import _latest_per_pair

    rng = np.random.default_rng(3)
    n = 5000  # many repeats: the same pair on the same and on different days
    c = rng.integers(0, 50, n) * (n_customers // 50)
    a, age = rng.integers(0, 40, n), rng.integers(1, 30, n)
    got = _latest_per_pair(c, a, age)
    best = {}
    for ci, ai, gi in zip(c.tolist(), a.tolist(), age.tolist()):
        best[(ci, ai)] = min(gi, best.get((ci, ai), gi))
    want = sorted((ci, gi, ai) for (ci, ai), gi in best.items())
    assert list(zip(got[0].tolist(), got[2].tolist(), got[1].tolist())) == want


def test_history_save_load_round_trip(tmp_path):
    h = History(WED, np.array([1, 4], np.int32), np.array([0, 2, 3]), np.array([3, 2, 9], np.int32),
                np.array([1, 5, 2], np.int32))
    h.save(tmp_path / "h.npz")
    g = History.load(tmp_path / "h.npz")
    assert g.as_of == WED and g.items(1).tolist() == [3, 2] and g.entry(4)[1].tolist() == [2]


def test_article_stats_and_dynamic_buckets_exact():
    stats = ArticleStats(4)
    d = day_number(WED)
    prev, last = WED - dt.timedelta(days=14), WED - dt.timedelta(days=7)
    stats.update(prev, WeekRows(np.zeros(2, np.int32), np.array([0, 0], np.int32),
                                np.array([d - 14, d - 13], np.int32), np.array([0.01, 0.03])))
    stats.update(last, WeekRows(np.zeros(5, np.int32), np.array([0, 1, 1, 1, 1], np.int32),
                                np.array([d - 7, d - 2, d - 2, d - 1, d - 1], np.int32),
                                np.array([0.02, 0.5, 0.5, 0.5, 0.5])))
    raw = stats.raw_at(WED)
    assert raw.age_days.tolist() == [14, 2, -1, -1]
    assert raw.sales_last_week.tolist() == [1, 4, 0, 0]
    assert raw.mean_price[0] == pytest.approx(0.02) and np.isnan(raw.mean_price[2])
    state, _ = _state()
    dyn = state.article_dynamic(raw)
    # age since launch: 14 days -> [14, 28) = bucket 3; 2 days -> bucket 1; never sold -> 0
    assert dyn["age_since_launch"].tolist() == [3, 1, 0, 0]
    assert dyn["sales_last_week"].tolist() == [2, 4, 1, 1]  # 1 -> 2, 4 -> 4, 0 -> 1
    assert state.price_edges  # fitted on training mean prices 0.01 and 0.03
    assert dyn["price_band"].tolist()[2:] == [0, 0]
    assert bucket_log2(np.array([0, 1, 2, 3, 4, 7, 8, 10**9]), 15).tolist() == [1, 2, 3, 3, 4, 4, 5, 14]


def test_customer_inputs_weights_and_padding_exact():
    cfg = FeatureConfig(history=("article_id", "product_type"), history_length=3, history_half_life_days=28.0)
    state, tables = _state(cfg)
    static = state.article_static(tables.articles)
    table = state.history_table(static)
    assert table.shape == (5, 2) and table[-1].tolist() == [3, 3]  # padding row = cardinalities
    hist = History(WED, np.array([0], np.int32), np.array([0, 2]), np.array([2, 0], np.int32),
                   np.array([7, 35], np.int32))
    rows = np.array([0, tables.unknown_row])
    cats, h, w = state.customer_inputs(state.customer_static(tables.customers)[rows], hist, rows, table)
    assert h[0].tolist() == [[2, 2], [1, 1], [3, 3]]
    assert h[1].tolist() == [[3, 3]] * 3
    # days 7 and 35 are one half-life apart: weights 2/3 and 1/3
    assert w[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert w[1].tolist() == [0.0, 0.0, 0.0]
    hl = cfg.customer.index("history_length")
    assert cats[:, hl].tolist() == [2, 0]  # 2 items -> bucket 2; none -> 0
    assert cats.shape == (2, len(cfg.customer))


def _numpy_lookup(h: History, rows: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The NumPy history read that ``History.slots`` replaced: (article rows, days, n_items), -1 padding."""
    start, n_items = h._positions(rows)
    n_items = np.minimum(n_items, length)
    arts = np.full((start.size, length), -1, dtype=np.int64)
    days = np.full((start.size, length), -1, dtype=np.int32)
    r = np.repeat(np.arange(start.size), n_items)
    c = np.arange(int(n_items.sum())) - np.repeat(np.cumsum(n_items) - n_items, n_items)
    src = np.repeat(start, n_items) + c
    arts[r, c], days[r, c] = h.article_rows[src], h.days_ago[src]
    return arts, days, n_items


def test_customer_inputs_match_the_numpy_lookup_bit_for_bit():
    """The compiled history read (``History.slots``) against the NumPy lookup, gathers and powers it replaced:
    longer histories than L, absent customers, repeats, an empty history."""
    rng = np.random.default_rng(7)
    cfg = FeatureConfig(history=("article_id", "product_type"), history_length=5, history_half_life_days=13.3)
    state, tables = _state(cfg)
    table = state.history_table(state.article_static(tables.articles))
    static = state.customer_static(tables.customers)
    for trial in range(20):
        owners = np.sort(rng.choice(50, int(rng.integers(0, 30)), replace=False)).astype(np.int32)
        lengths = rng.integers(1, 9, owners.size)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        hist = History(WED, owners, indptr, rng.integers(0, table.shape[0] - 1, indptr[-1]).astype(np.int32),
                       rng.integers(1, 400, indptr[-1]).astype(np.int32))
        rows = rng.integers(0, 60, 40)  # some without history, some repeated
        cats, h, w = state.customer_inputs(static[np.minimum(rows, len(static) - 1)], hist, rows, table)
        arts, days, n_items = _numpy_lookup(hist, rows, cfg.history_length)
        want_h = table[np.where(arts < 0, table.shape[0] - 1, arts)]
        want_w = np.where(arts >= 0, np.power(0.5, np.maximum(days, 0) / cfg.history_half_life_days), 0.0)
        total = want_w.sum(axis=1, keepdims=True)
        want_w = np.divide(want_w, total, out=np.zeros_like(want_w), where=total > 0).astype(np.float32)
        assert np.array_equal(h, want_h) and h.dtype == want_h.dtype, trial
        assert np.array_equal(w, want_w) and w.dtype == np.float32, trial
        hl = cfg.customer.index("history_length")
        assert cats[:, hl].tolist() == [int(n).bit_length() for n in n_items], trial  # items read, at most L


def test_state_save_load_round_trip(tmp_path):
    state, tables = _state()
    state.save(tmp_path / "f")
    again = FeatureState.load(tmp_path / "f")
    assert again.vocabs == state.vocabs and again.price_edges == state.price_edges
    assert again.config == state.config
    assert np.array_equal(again.customer_static(tables.customers), state.customer_static(tables.customers))


def test_bad_input_names_file_row_and_id():
    tables = Tables(_articles(), _customers())
    tx = pd.DataFrame({"t_dat": pd.to_datetime(["2020-09-01", "2020-09-01"]),
                       "customer_id": pd.Categorical(["c0", "c0"]),
                       "article_id": pd.Categorical(["0000000001", "0999999999"]), "price": [0.1, 0.1]})
    with pytest.raises(ValueError, match=r"week 2020-08-26: row 1 has article_id '0999999999'.*articles table"):
        tables.encode_rows(tx, where="week 2020-08-26")
    with pytest.raises(ValueError, match="appears more than once"):
        Tables(pd.concat([_articles(), _articles()]), _customers())
    with pytest.raises(ValueError, match=r"features.customer: unknown feature\(s\) \['height'\]"):
        FeatureConfig(customer=("height",))
    with pytest.raises(ValueError, match="history_length must be >= 1"):
        FeatureConfig(history_length=0)


def test_replay_history_never_sees_the_future(tiny_warehouse):
    """The history as of each week equals a direct computation over strictly earlier transactions."""
    from hm_recsys.data.warehouse import Warehouse

    wh = Warehouse(tiny_warehouse)
    tables = Tables(wh.articles(), wh.customers())
    cfg = FeatureConfig(history_weeks=4, history_length=5)
    replay = Replay(tables, cfg)
    weeks = wh.weeks()
    check = weeks[-3]
    for week, _ in replay.weeks(wh, weeks[-1], history_from=check - dt.timedelta(weeks=4), progress=False):
        if week == check:
            h = replay.history_at(week)
            raw = replay.article_raw_at(week)
            break
    tx = wh.transactions(check - dt.timedelta(weeks=4), check)
    tx = tx.assign(c=tables.customer_rows(tx["customer_id"].astype(str)),
                   a=tables.article_rows(tx["article_id"].astype(str)))
    last = tx.groupby(["c", "a"], observed=True)["t_dat"].max().reset_index()
    last = last.sort_values(["c", "t_dat", "a"], ascending=[True, False, True])
    for c in last["c"].unique()[:50]:
        want = last[last["c"] == c]["a"].tolist()[:5]
        assert h.items(int(c)).tolist() == want
    assert set(h.customer_rows.tolist()) == set(last["c"].tolist())
    before = wh.transactions(weeks[0], check)
    sold = set(tables.article_rows(before["article_id"].astype(str).unique()).tolist())
    assert set(np.flatnonzero(raw.age_days >= 0).tolist()) == sold
    prev = wh.transactions(check - dt.timedelta(weeks=1), check)
    counts = np.bincount(tables.article_rows(prev["article_id"].astype(str)), minlength=tables.n_articles)
    assert raw.sales_last_week.tolist() == counts.tolist()
