"""The synthetic generator: H&M contract, determinism, drops, and an oracle that is exact."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hm_recsys.data import schema
from hm_recsys.data.hmcsv import TransactionsCsvWriter, format_price, write_articles_csv, write_customers_csv
from hm_recsys.data.synthetic import (
    ORACLE_TOP,
    SCALES,
    STAT_ROWS,
    _simulate,
    generate,
    load_oracle,
    main,
    oracle_weeks,
)

D = dt.date
HOLDOUT, VALID, HIDDEN = D(2020, 9, 16), D(2020, 9, 9), D(2020, 9, 23)


def _read(raw: Path, table: str, path: Path | None = None) -> pd.DataFrame:
    return pd.read_csv(path or raw / schema.FILES[table], **schema.read_csv_kwargs(table))


@pytest.fixture(scope="module")
def tx(tiny_raw) -> pd.DataFrame:
    return _read(tiny_raw, "transactions")


@pytest.fixture(scope="module")
def customers(tiny_raw) -> pd.DataFrame:
    return _read(tiny_raw, "customers")


@pytest.fixture(scope="module")
def articles(tiny_raw) -> pd.DataFrame:
    return _read(tiny_raw, "articles")


# -- the contract ------------------------------------------------------------
def test_files_have_exact_headers_and_unix_newlines(tiny_raw):
    for table, cols in schema.COLUMNS.items():
        data = (tiny_raw / schema.FILES[table]).read_bytes()
        assert data.split(b"\n", 1)[0].decode() == ",".join(cols), table
        assert b"\r" not in data and data.endswith(b"\n") and not data.startswith(b"\xef\xbb\xbf")


def test_transactions_follow_the_contract(tx, articles, customers):
    assert len(tx) > 15_000  # tiny is ~20k rows
    assert tx["t_dat"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
    assert tx["t_dat"].max() == "2020-09-22"
    assert tx["t_dat"].is_monotonic_increasing
    assert tx["customer_id"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert tx["article_id"].str.fullmatch(r"\d{10}").all()
    assert set(tx["sales_channel_id"].unique()) == {"1", "2"}
    assert tx["price"].str.fullmatch(r"0\.\d{1,16}").all()
    price = tx["price"].astype(float)
    assert (price > 0).all() and (price < 0.5).all()
    # float64 round trip gives back the very text (what ingestion relies on)
    assert (tx["price"].drop_duplicates().map(lambda s: format_price(float(s))) == tx["price"].drop_duplicates()).all()
    assert set(tx["article_id"]) <= set(articles["article_id"])
    assert set(tx["customer_id"]) <= set(customers["customer_id"])
    assert tx.duplicated().any()  # multi-unit buys are exact duplicate rows


def test_customers_follow_the_contract(customers, tx, tiny_raw):
    assert len(customers) == SCALES["tiny"].customers
    assert customers["customer_id"].is_unique and customers["customer_id"].is_monotonic_increasing
    assert customers["customer_id"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert customers["postal_code"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert set(customers["FN"]) == {"1.0", ""} and set(customers["Active"]) == {"1.0", ""}
    assert set(customers["club_member_status"]) == schema.CLUB_MEMBER_STATUS
    assert set(customers["fashion_news_frequency"]) == schema.FASHION_NEWS_FREQUENCY  # "None" and "" both present
    ages = customers.loc[customers["age"] != "", "age"].astype(int)
    assert (customers["age"] == "").any() and ages.between(schema.AGE_MIN, schema.AGE_MAX).all()
    top_postal = customers["postal_code"].value_counts(normalize=True).iloc[0]
    assert 0.06 < top_postal < 0.12  # one code holds ~8.8%
    # every customer buys at least once, in the history or in the hidden week
    future = _read(tiny_raw, "transactions", tiny_raw / "oracle" / "future_transactions.csv")
    assert set(tx["customer_id"]) | set(future["customer_id"]) == set(customers["customer_id"])
    # the literal "None" is why read_csv_kwargs turns NA parsing off
    default = pd.read_csv(tiny_raw / "customers.csv", dtype=str)
    assert default["fashion_news_frequency"].isna().sum() == (customers["fashion_news_frequency"].isin(["", "None"])).sum()


def test_articles_follow_the_contract(articles, tiny_raw):
    assert len(articles) == SCALES["tiny"].articles
    assert articles["article_id"].is_unique and articles["article_id"].is_monotonic_increasing
    assert articles["article_id"].str.fullmatch(r"\d{10}").all()
    assert (articles["product_code"] == articles["article_id"].str[:7]).all()
    assert articles["colour_group_code"].str.fullmatch(r"\d{2}").all()
    for c in schema.ARTICLE_INT_COLUMNS:
        assert articles[c].str.fullmatch(r"-?\d+").all(), c
    empties = [c for c in schema.ARTICLE_COLUMNS if (articles[c] == "").any()]
    assert empties == ["detail_desc"]
    assert set(articles["index_group_name"]) == {"Ladieswear", "Divided", "Menswear", "Baby/Children", "Sport"}
    assert set(articles["index_code"]) <= set("ABCDFGHIJS")
    # fields with commas are quoted, so every line parses into 25 fields
    with open(tiny_raw / "articles.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert {len(r) for r in rows} == {25}
    assert '"Children Accessories, Swimwear"' in (tiny_raw / "articles.csv").read_text()


def test_csvs_round_trip_through_string_dtypes_byte_for_byte(tiny_raw, tmp_path, tx, customers, articles):
    import pyarrow as pa

    with TransactionsCsvWriter(tmp_path / "t.csv") as w:
        w.write(pa.Table.from_pandas(tx, preserve_index=False))
    assert (tmp_path / "t.csv").read_bytes() == (tiny_raw / "transactions_train.csv").read_bytes()
    write_customers_csv(pa.Table.from_pandas(customers, preserve_index=False), tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_bytes() == (tiny_raw / "customers.csv").read_bytes()
    write_articles_csv(articles, tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tiny_raw / "articles.csv").read_bytes()


def test_typed_read_round_trips(tx, articles):
    typed = tx.astype({"price": "float64", "sales_channel_id": "int8"})
    assert (typed["price"].map(format_price) == tx["price"]).all()
    assert (typed["sales_channel_id"].astype(str) == tx["sales_channel_id"]).all()
    ints = articles[list(schema.ARTICLE_INT_COLUMNS)].astype("int64")
    assert (ints.astype(str) == articles[list(schema.ARTICLE_INT_COLUMNS)]).all().all()


def test_dates_and_weeks(tx, tiny_raw):
    stats = json.loads((tiny_raw / "oracle" / "stats.json").read_text())
    weeks = SCALES["tiny"].weeks
    first = HIDDEN - weeks * dt.timedelta(days=7)
    assert stats["first_date"] == tx["t_dat"].min() == first.isoformat()
    assert stats["last_date"] == "2020-09-22"
    assert stats["rows_total"] == len(tx)
    assert len({schema.week_start(D.fromisoformat(d)) for d in tx["t_dat"].unique()}) == weeks


def test_full_scale_dates_match_the_real_file():
    from hm_recsys.data.synthetic import data_weeks

    labels, first, hidden = data_weeks("full")
    assert (first, labels[0], labels[-1], hidden) == (D(2018, 9, 20), D(2018, 9, 19), HOLDOUT, HIDDEN)
    assert len(labels) == 105


# -- determinism --------------------------------------------------------------
def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != "stats.json":  # stats.json holds the run time
            data = pd.read_parquet(f).to_csv().encode() if f.suffix == ".parquet" else f.read_bytes()
            out[str(f.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def test_same_seed_gives_identical_files_and_another_seed_does_not(tiny_raw, tmp_path):
    again = tmp_path / "again"
    generate(again, scale="tiny", seed=7, progress=False)
    assert _digest(again) == _digest(tiny_raw)
    assert (again / "transactions_train.csv").read_bytes() == (tiny_raw / "transactions_train.csv").read_bytes()
    other = tmp_path / "other"
    generate(other, scale="tiny", seed=8, progress=False)
    assert (other / "transactions_train.csv").read_bytes() != (tiny_raw / "transactions_train.csv").read_bytes()


# -- drops --------------------------------------------------------------------
def test_drop_weeks_split_the_same_history_into_weekly_drop_files(tiny_raw, tmp_path):
    out = tmp_path / "dropped"
    stats = generate(out, scale="tiny", seed=7, progress=False, drop_weeks=2)
    files = sorted(p.name for p in (out / "drops").iterdir())
    assert files == ["transactions_2020-09-09.csv", "transactions_2020-09-16.csv"]
    assert stats["drop_files"] == [f"drops/{f}" for f in files]
    assert stats["last_train_date"] == "2020-09-08"
    full = (tiny_raw / "transactions_train.csv").read_bytes()
    parts = [(out / "transactions_train.csv").read_bytes()]
    header = full.split(b"\n", 1)[0] + b"\n"
    for f in files:
        data = (out / "drops" / f).read_bytes()
        assert data.startswith(header)
        week = {line.split(b",", 1)[0] for line in data.splitlines()[1:]}
        label = D.fromisoformat(f.removeprefix("transactions_").removesuffix(".csv"))
        assert week == {(label + dt.timedelta(days=i)).isoformat().encode() for i in range(7)}
        parts.append(data[len(header) :])
    assert b"".join(parts) == full
    # the oracle is relative to all simulated data, drops included
    assert oracle_weeks(out / "oracle") == [VALID, HOLDOUT, HIDDEN]
    # a rerun without drops removes the stale drop files
    generate(out, scale="tiny", seed=7, progress=False)
    assert list((out / "drops").glob("*.csv")) == []


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        generate(tmp_path, scale="huge")
    with pytest.raises(ValueError, match="drop_weeks must be in 0..42"):
        generate(tmp_path, scale="tiny", drop_weeks=43)


# -- oracle -------------------------------------------------------------------
def test_oracle_files_cover_exactly_the_buyers_of_each_week(tiny_raw, tx):
    oracle_dir = tiny_raw / "oracle"
    assert oracle_weeks(oracle_dir) == [VALID, HOLDOUT, HIDDEN]
    assert load_oracle(oracle_dir, D(2020, 9, 2)) is None
    assert (oracle_dir / "README.txt").read_text().startswith("Generator-only truth, never part of the H&M files.")
    future = _read(tiny_raw, "transactions", oracle_dir / "future_transactions.csv")
    assert set(future["t_dat"]) <= {(HIDDEN + dt.timedelta(days=i)).isoformat() for i in range(7)}
    week_buyers = {
        VALID: set(tx.loc[tx["t_dat"].between("2020-09-09", "2020-09-15"), "customer_id"]),
        HOLDOUT: set(tx.loc[tx["t_dat"].between("2020-09-16", "2020-09-22"), "customer_id"]),
        HIDDEN: set(future["customer_id"]),
    }
    for week, buyers in week_buyers.items():
        o = load_oracle(oracle_dir, week + dt.timedelta(days=3))  # any day of the week works
        assert list(o.columns) == ["customer_id", "article_id", "prob", "rank"]
        assert str(o["customer_id"].dtype) == "str" and str(o["article_id"].dtype) == "str"
        assert o["prob"].dtype == np.float64 and o["rank"].dtype == np.int16
        assert set(o["customer_id"]) == buyers
        assert o["article_id"].str.fullmatch(r"\d{10}").all()
        sizes = o.groupby("customer_id").size()
        assert (sizes == ORACLE_TOP).all()  # tiny has more than 100 articles on sale
        assert (o.groupby("customer_id")["rank"].apply(lambda r: list(r) == list(range(1, ORACLE_TOP + 1)))).all()
        assert (o.groupby("customer_id")["prob"].apply(lambda p: p.is_monotonic_decreasing)).all()
        assert (o.groupby("customer_id")["prob"].sum() <= 1 + 1e-9).all() and (o["prob"] > 0).all()


def test_oracle_is_the_exact_top100_of_the_probabilities_purchases_were_drawn_from(tiny_raw):
    """Brute force over every article agrees with the oracle shortcut, and every purchase had p > 0."""
    weeks = SCALES["tiny"].weeks
    stored = load_oracle(tiny_raw / "oracle", HOLDOUT)
    for w, label, res, world in _simulate("tiny", 7):
        if w != weeks - 1:
            continue
        assert label == HOLDOUT
        buyers = res["buyers"]
        dense = world.dense_probs(res)
        np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-9)
        # the k-th largest probability of the brute force equals the oracle's k-th probability
        top_dense = -np.sort(-dense, axis=1)[:, :ORACLE_TOP]
        np.testing.assert_allclose(res["oracle_p"], top_dense, rtol=1e-9, atol=1e-15)
        # and the oracle's articles carry those probabilities
        np.testing.assert_allclose(np.take_along_axis(dense, res["oracle_a"], axis=1), res["oracle_p"], rtol=1e-9)
        # purchases were drawn from these probabilities: none has probability zero
        pos = np.searchsorted(buyers, res["line_customer"])
        assert (dense[pos, res["line_article"]] > 0).all()
        # the stored file is what the simulation computed
        ids = world.cust["ids"].astype(str)
        arts = world.cat["ids"].astype(str)
        first = stored[stored["customer_id"] == ids[buyers[0]]]
        assert list(first["article_id"]) == list(arts[res["oracle_a"][0]])
        np.testing.assert_array_equal(first["prob"].to_numpy(), res["oracle_p"][0])
        break


def test_stats_are_written_and_cli_prints_them(tmp_path, capsys):
    assert main(["--scale", "tiny", "--seed", "3", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2,000 customers, 500 articles" in printed
    assert "share of customers buying in a week" in printed and "target (real data)" in printed
    stats = json.loads((tmp_path / "cli" / "oracle" / "stats.json").read_text())
    assert stats["scale"] == "tiny" and stats["seed"] == 3
    assert set(k for k, *_ in STAT_ROWS) <= set(stats["shape"])
    assert main(["--scale", "tiny", "--out", str(tmp_path / "bad"), "--drop-weeks", "99", "--no-progress"]) == 2
    assert "drop_weeks must be in" in capsys.readouterr().err


def test_cli_default_output_is_the_layout_raw_dir(home, capsys):
    assert main(["--scale", "tiny", "--no-progress"]) == 0
    assert (home / "data" / "raw" / "transactions_train.csv").exists()


# -- statistics at small scale ---------------------------------------------------
@pytest.mark.slow
def test_small_scale_statistics_land_in_their_target_ranges(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    stats = generate(out, scale="small", seed=42, progress=False)
    shape = stats["shape"]
    misses = {k: round(shape[k], 4) for k, _, _, (lo, hi) in STAT_ROWS if not lo <= shape[k] <= hi}
    assert not misses, f"statistics outside their ranges: {misses}"
    # popularity is a fair baseline but beatable; repurchase adds a little on top of it
    assert shape["recall12_popularity"] < shape["recall12_repurchase_popularity"] < shape["recall12_oracle"]
    assert 300_000 < stats["rows_total"] < 1_200_000

