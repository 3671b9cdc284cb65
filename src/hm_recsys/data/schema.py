"""The H&M data contract: columns, formats, value sets and the H&M week.

This module is the single source of truth for what the three Kaggle files look
like. The generator writes to it, ingestion reads with it, validation checks
against it. It imports nothing heavy so that any process can use it.

Facts about the real files (H&M Personalized Fashion Recommendations, Kaggle):

* ``transactions_train.csv``: 31,788,324 rows, t_dat 2018-09-20..2020-09-22.
  About 9.4% of rows are exact duplicates: each is one more unit bought.
* ``customers.csv``: 1,371,980 rows. ``fashion_news_frequency`` holds both
  empty cells and the literal string ``None``; pandas turns the latter into
  NaN unless ``keep_default_na=False``, so we always read with it off.
* ``articles.csv``: 105,542 rows, 25 columns; only ``detail_desc`` has nulls.
"""

from __future__ import annotations

import datetime as dt
import re

# --------------------------------------------------------------------------
# Columns, in file order.
# --------------------------------------------------------------------------
TRANSACTION_COLUMNS: tuple[str, ...] = (
    "t_dat",
    "customer_id",
    "article_id",
    "price",
    "sales_channel_id",
)

CUSTOMER_COLUMNS: tuple[str, ...] = (
    "customer_id",
    "FN",
    "Active",
    "club_member_status",
    "fashion_news_frequency",
    "age",
    "postal_code",
)

ARTICLE_COLUMNS: tuple[str, ...] = (
    "article_id",
    "product_code",
    "prod_name",
    "product_type_no",
    "product_type_name",
    "product_group_name",
    "graphical_appearance_no",
    "graphical_appearance_name",
    "colour_group_code",
    "colour_group_name",
    "perceived_colour_value_id",
    "perceived_colour_value_name",
    "perceived_colour_master_id",
    "perceived_colour_master_name",
    "department_no",
    "department_name",
    "index_code",
    "index_name",
    "index_group_no",
    "index_group_name",
    "section_no",
    "section_name",
    "garment_group_no",
    "garment_group_name",
    "detail_desc",
)

# Integer-coded article attributes (the *_no / *_id / *_code columns that are numbers).
ARTICLE_INT_COLUMNS: tuple[str, ...] = (
    "product_type_no",
    "graphical_appearance_no",
    "perceived_colour_value_id",
    "perceived_colour_master_id",
    "department_no",
    "index_group_no",
    "section_no",
    "garment_group_no",
)
# colour_group_code is a 2-char zero-padded string in the file ("09"), product_code 7 chars.
ARTICLE_STR_COLUMNS: tuple[str, ...] = tuple(c for c in ARTICLE_COLUMNS if c not in ARTICLE_INT_COLUMNS)

FILES = {
    "transactions": "transactions_train.csv",
    "customers": "customers.csv",
    "articles": "articles.csv",
}
COLUMNS = {
    "transactions": TRANSACTION_COLUMNS,
    "customers": CUSTOMER_COLUMNS,
    "articles": ARTICLE_COLUMNS,
}

# --------------------------------------------------------------------------
# Formats and value sets.
# --------------------------------------------------------------------------
HEX64 = re.compile(r"^[0-9a-f]{64}$")
ARTICLE_ID = re.compile(r"^[0-9]{10}$")
ARTICLE_ID_LOOSE = re.compile(r"^[0-9]{9,10}$")  # some re-exports dropped the leading zero
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

SALES_CHANNELS = frozenset({1, 2})  # 1 store, 2 online
CLUB_MEMBER_STATUS = frozenset({"ACTIVE", "PRE-CREATE", "LEFT CLUB", ""})
# "None" (a literal string) and "NONE" are different values in the real file.
FASHION_NEWS_FREQUENCY = frozenset({"NONE", "Regularly", "Monthly", "None", ""})
AGE_MIN, AGE_MAX = 16, 99
# Prices are local prices divided by 590; the real max is ~0.59. A row 100x
# above that is an error, not a luxury item.
PRICE_MAX = 1.0

FIRST_DATE = dt.date(2018, 9, 20)
LAST_DATE = dt.date(2020, 9, 22)
KAGGLE_TEST_WEEK = dt.date(2020, 9, 23)  # a Wednesday; the week is 09-23..09-29


def normalize_article_id(value: str | int) -> str:
    """Return the canonical 10-char zero-padded article id.

    Accepts the 9-digit form (leading zero lost by a spreadsheet or an integer
    round trip) and ints. Raises ``ValueError`` on anything else.
    """
    s = str(value).strip()
    if not ARTICLE_ID_LOOSE.match(s):
        raise ValueError(f"article_id {value!r} is not 9 or 10 digits")
    return s.zfill(10)


# --------------------------------------------------------------------------
# The H&M week: Wednesday..Tuesday, aligned with Kaggle's test week.
# --------------------------------------------------------------------------
_WEDNESDAY = 2  # date.weekday(): Monday=0


def week_start(day: dt.date) -> dt.date:
    """The Wednesday on or before ``day``: the label of its H&M week."""
    return day - dt.timedelta(days=(day.weekday() - _WEDNESDAY) % 7)


def week_range(start: dt.date) -> tuple[dt.date, dt.date]:
    """Half-open ``[start, start + 7 days)`` for a week label; checks it is a Wednesday."""
    if start.weekday() != _WEDNESDAY:
        raise ValueError(f"{start} is not a Wednesday; H&M weeks run Wednesday..Tuesday")
    return start, start + dt.timedelta(days=7)


def read_csv_kwargs(table: str) -> dict:
    """``pandas.read_csv`` arguments that read a table exactly as written.

    Everything is read as strings with no NA conversion, so nothing is
    silently reinterpreted (leading zeros, the literal "None"); typed
    conversion is ingestion's job and reports row numbers on failure.
    """
    cols = COLUMNS[table]
    return {
        "dtype": {c: "string" for c in cols},
        "keep_default_na": False,
        "na_filter": False,
        "encoding": "utf-8",
    }
