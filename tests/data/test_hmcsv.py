"""The H&M CSV conventions: price text, bare quoting, streaming writer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hm_recsys.data import hmcsv
from hm_recsys.data.schema import TRANSACTION_COLUMNS


@pytest.mark.parametrize(
    ("cents", "text"),
    [
        (2999, "0.0508305084745762"),  # the real file's example: truncated, not rounded (...7627)
        (1999, "0.0338813559322033"),  # rounding would give ...034
        (999, "0.0169322033898305"),
        (1799, "0.0304915254237288"),
        (2950, "0.05"),  # trailing zeros dropped
        (59000, "1.0"),
    ],
)
def test_price_string_is_local_price_over_590_truncated_to_16_decimals(cents, text):
    assert hmcsv.price_string_from_cents(cents) == text


def test_price_string_rejects_non_positive_prices():
    with pytest.raises(ValueError, match="positive"):
        hmcsv.price_string_from_cents(0)


def test_format_price_recovers_the_text_from_float64_below_half():
    # every local price up to 294.99 (price < 0.5): text -> float64 -> text is the identity
    for cents in range(1, 29500):
        text = hmcsv.price_string_from_cents(cents)
        assert hmcsv.format_price(float(text)) == text, cents


def test_fixed_width_strings_builds_arrow_strings_without_copying_through_python():
    arr = np.array([b"0108775015", b"0959461001"], dtype="S10")
    out = hmcsv.fixed_width_strings(arr)
    assert out.type == pa.string()
    assert out.to_pylist() == ["0108775015", "0959461001"]
    with pytest.raises(TypeError):
        hmcsv.fixed_width_strings(np.array([1, 2]))


def _batch(rows):
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {
            "t_dat": pa.array(cols[0], pa.string()),
            "customer_id": pa.array(cols[1], pa.string()),
            "article_id": pa.array(cols[2], pa.string()),
            "price": pa.array(cols[3], pa.string()),
            "sales_channel_id": pa.array(cols[4], pa.int8()),
        }
    )


def test_transactions_writer_writes_bare_header_once_and_unquoted_rows(tmp_path):
    cid = "a" * 64
    path = tmp_path / "t.csv"
    with hmcsv.TransactionsCsvWriter(path) as w:
        w.write(_batch([("2020-09-22", cid, "0663713001", "0.0508305084745762", 2)]))
        w.write(_batch([("2020-09-22", cid, "0663713001", "0.0508305084745762", 2)]))
    assert path.read_bytes() == (
        b"t_dat,customer_id,article_id,price,sales_channel_id\n"
        + (f"2020-09-22,{cid},0663713001,0.0508305084745762,2\n".encode()) * 2
    )
    assert w.rows == 2
    assert not (tmp_path / "t.csv.tmp").exists()


def test_transactions_writer_leaves_no_file_on_error_and_checks_columns(tmp_path):
    path = tmp_path / "t.csv"
    with pytest.raises(ValueError, match="t.csv: batch columns"):
        with hmcsv.TransactionsCsvWriter(path) as w:
            w.write(pa.table({"x": [1]}))
    assert not path.exists() and not (tmp_path / "t.csv.tmp").exists()
    # an empty drop is still a valid file: the header alone
    with hmcsv.TransactionsCsvWriter(path):
        pass
    assert path.read_text() == ",".join(TRANSACTION_COLUMNS) + "\n"


def test_articles_writer_quotes_only_fields_with_commas_or_quotes(tmp_path):
    import pandas as pd

    from hm_recsys.data.schema import ARTICLE_COLUMNS

    row = {c: "x" for c in ARTICLE_COLUMNS}
    row.update(index_name="Children Accessories, Swimwear", detail_desc='Top with a "soft" feel.', product_type_no=253)
    empty = dict(row, detail_desc="")
    path = tmp_path / "a.csv"
    hmcsv.write_articles_csv(pd.DataFrame([row, empty], columns=list(ARTICLE_COLUMNS)), path)
    lines = path.read_text().splitlines()
    assert lines[1].endswith('"Children Accessories, Swimwear",x,x,x,x,x,x,"Top with a ""soft"" feel."')
    assert lines[2].endswith('"Children Accessories, Swimwear",x,x,x,x,x,x,')
    assert ",253," in lines[1]
