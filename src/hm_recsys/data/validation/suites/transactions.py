"""``transactions.rows`` (a drop, or a batch of history weeks) and ``transactions.weekly_volume`` (the history).

Each suite runs on the batch its ``*_frame`` builds: the raw text of every
contract column (exactly as written, so an example row in a report is the
file's own text) plus derived columns whose names say what they are
(``price_value``, ``article_id_in_articles``, ...). Referential integrity
uses such derived booleans rather than ``value_set``: GX copies a value set
into every result and Data Docs page, and 1.4M customer ids would make both
hundreds of MB.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from hm_recsys.data import schema
from hm_recsys.data.validation.suites.build import expect, suite

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from hm_recsys.data.validation.config import ValidationConfig
    from hm_recsys.data.validation.reference import DropReference

# The rows suite's check ids, in report order (``drop.check_ids``).
ROW_CHECKS = (
    "t_dat_format", "customer_id_format", "article_id_format", "price_is_number", "price_range",
    "sales_channel_id_set", "article_id_in_articles", "customer_id_in_customers",
    "t_dat_in_week", "t_dat_not_future", "volume", "new_article_share", "new_customer_share",
)  # fmt: skip


def week_dates(week: dt.date) -> list[str]:
    """The seven ISO dates of the H&M week labelled ``week`` (a Wednesday)."""
    start, _ = schema.week_range(week)
    return [(start + dt.timedelta(days=i)).isoformat() for i in range(7)]


def transactions_suite(
    week: dt.date | None,
    run_date: dt.date,
    config: ValidationConfig,
    volume: tuple[int, int] | None = None,
    novelty: bool = False,
    future_dates: Sequence[str] | None = None,
):
    """``transactions.rows`` for a drop (one declared week) or a batch of whole history weeks.

    ``week``: the declared week; ``None`` leaves ``t_dat_in_week`` out (history
    batches group rows by their own dates, so it could not fail there).
    ``t_dat_not_future`` rejects the week's dates after ``run_date``; without a
    week, ``future_dates`` lists the dates after ``run_date`` to reject (the
    history passes the ones its batch contains). ``volume``: accepted ``(min,
    max)`` row count, or ``None`` to leave the check out. ``novelty``: include
    the never-seen shares (the batch must then carry
    ``article_id_never_seen``/``customer_id_never_seen``). The batch comes
    from ``transactions_frame``.
    """
    import great_expectations.expectations as gxe

    e = [
        expect("t_dat_format", "dates must be ISO YYYY-MM-DD to be placed in an H&M week",
                gxe.ExpectColumnValuesToMatchRegex(column="t_dat", regex=schema.ISO_DATE.pattern)),
        expect("customer_id_format", "customer ids are 64 lowercase hex chars; anything else will not join",
                gxe.ExpectColumnValuesToMatchRegex(column="customer_id", regex=schema.HEX64.pattern)),
        expect("article_id_format", "article ids are 10 digits; a lost leading zero breaks every join",
                gxe.ExpectColumnValuesToMatchRegex(column="article_id", regex=schema.ARTICLE_ID.pattern)),
        expect("price_is_number", "price must parse as a decimal number",
                gxe.ExpectColumnValuesToNotBeNull(column="price_value"), source="price"),
        expect("price_range", "a price <= 0 or above the ceiling is a unit or parsing error, not a sale",
                gxe.ExpectColumnValuesToBeBetween(column="price_value", min_value=0, strict_min=True,
                                                  max_value=config.price_max), source="price"),
        expect("sales_channel_id_set", "sales channels are 1 (store) and 2 (online) only",
                gxe.ExpectColumnValuesToBeInSet(column="sales_channel_id", value_set=["1", "2"])),
        expect("article_id_in_articles", "every sold article must exist in the catalogue (referential integrity)",
                gxe.ExpectColumnValuesToBeInSet(column="article_id_in_articles", value_set=[True]),
                source="article_id"),
        expect("customer_id_in_customers", "every buyer must exist in the customer table (referential integrity)",
                gxe.ExpectColumnValuesToBeInSet(column="customer_id_in_customers", value_set=[True]),
                source="customer_id"),
    ]
    if week is not None:
        dates = week_dates(week)
        e.append(expect("t_dat_in_week", "a drop holds exactly its declared week; other dates would leak elsewhere",
                         gxe.ExpectColumnValuesToBeInSet(column="t_dat", value_set=dates)))
        # Dates outside the week are t_dat_in_week's; within it, those after the run are impossible.
        future_dates = [d for d in dates if d > run_date.isoformat()]
    if future_dates is not None:
        e.append(expect("t_dat_not_future", f"a sale cannot be dated after the run ({run_date})",
                         gxe.ExpectColumnValuesToNotBeInSet(column="t_dat", value_set=list(future_dates))))
    if volume is not None:
        e.append(expect("volume", "a week far outside recent volumes is a partial or duplicated export",
                         gxe.ExpectTableRowCountToBeBetween(min_value=volume[0], max_value=volume[1])))
    if novelty:
        (alo, ahi), (clo, chi) = config.new_article_share, config.new_customer_share
        e += [
            expect("new_article_share", "articles never sold before are a few % of rows; many more means re-keyed ids",
                    gxe.ExpectColumnMeanToBeBetween(column="article_id_never_seen", min_value=alo, max_value=ahi)),
            expect("new_customer_share", "first-time buyers are a minority of rows; many more means re-keyed ids",
                    gxe.ExpectColumnMeanToBeBetween(column="customer_id_never_seen", min_value=clo, max_value=chi)),
        ]
    return suite("transactions.rows", e)


def _masked(values: np.ndarray, ok: np.ndarray, dtype: str):
    """``values`` where ``ok``, null elsewhere: GX map expectations skip nulls, so a malformed id is
    reported once, by its format check, not again as "unknown"."""
    import pandas as pd

    if dtype == "bool":
        return pd.Series(np.where(ok, values, None), dtype=object)
    return pd.Series(np.where(ok, values.astype(np.float64), np.nan), dtype=np.float64)


def transactions_frame(raw: pd.DataFrame, ref: DropReference) -> pd.DataFrame:
    """Raw transaction rows (strings, index = line) + derived columns:

    * ``price_value``: float, NaN if the text is not a number;
    * ``article_id_in_articles`` / ``customer_id_in_customers``: bool, null for a malformed id;
    * when ``ref`` has the seen-before marks, ``article_id_never_seen`` /
      ``customer_id_never_seen``: 0.0/1.0, NaN for a malformed id (their mean is the share).
    """
    import pandas as pd
    import pyarrow as pa

    out = raw.copy(deep=False)
    out["price_value"] = pd.to_numeric(raw["price"], errors="coerce")
    derived = {}
    for col, index, seen, table in (
        ("article_id", ref.articles, ref.seen_articles, "articles"),
        ("customer_id", ref.customers, ref.seen_customers, "customers"),
    ):
        pattern = schema.ARTICLE_ID if col == "article_id" else schema.HEX64
        ok = raw[col].str.fullmatch(pattern.pattern).to_numpy(dtype=bool)
        pos = index.positions(pa.array(raw[col], pa.string()))
        derived[f"{col}_in_{table}"] = _masked(pos >= 0, ok, "bool")
        if seen is not None:
            before = np.zeros(len(pos), dtype=bool)
            before[pos >= 0] = seen[pos[pos >= 0]]
            derived[f"{col}_never_seen"] = _masked(~before, ok, "float")
    for name, s in derived.items():
        s.index = raw.index
        out[name] = s
    return out


def weekly_volume_suite(config: ValidationConfig):
    """``transactions.weekly_volume``: one row per history week (batch from ``weekly_volume_frame``)."""
    import great_expectations.expectations as gxe

    lo, hi = config.volume_band
    return suite(
        "transactions.weekly_volume",
        [
            expect("volume", "a week far outside the weeks before it is a partial or duplicated export",
                    gxe.ExpectColumnValuesToBeBetween(column="ratio_to_recent_median", min_value=lo, max_value=hi)),
        ],
    )


def weekly_volume_frame(week_rows: dict[dt.date, int], history_weeks: int, partial: set[dt.date]) -> pd.DataFrame:
    """One row per week (index: ISO week label): ``rows``, ``recent_median`` (median of the
    ``history_weeks`` weeks before it; NaN without enough of them or for a partial week)
    and ``ratio_to_recent_median``.
    """
    import pandas as pd

    weeks = sorted(week_rows)
    med = []
    for i, w in enumerate(weeks):
        prev = [week_rows[p] for p in weeks[max(0, i - history_weeks) : i] if p not in partial]
        ok = len(prev) >= history_weeks and w not in partial
        med.append(float(statistics.median(prev)) if ok else float("nan"))
    df = pd.DataFrame(
        {"rows": [week_rows[w] for w in weeks], "recent_median": med},
        index=pd.Index([w.isoformat() for w in weeks], name="week"),
    )
    df["ratio_to_recent_median"] = df["rows"] / df["recent_median"]
    return df
