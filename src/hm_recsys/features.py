"""The one feature path: training, evaluation, index building and serving all encode here.

Three layers, from raw warehouse rows to the integer matrices the towers eat:

1. ``Tables``: the catalogue (``articles.parquet`` rows, in order: an article's
   *row* is its position) and the customer table (``customers.parquet`` rows;
   one extra row, ``unknown_row``, stands for a customer the table lacks).
   ``Tables.encode_rows`` maps a week of transactions to ``WeekRows`` (row
   numbers, days, prices) and names the first id it cannot find.
2. ``Replay``: streams warehouse weeks in time order and keeps two running
   states, so every "as of" view is computed from the past only:

   * ``HistoryWindow``: each customer's last ``history_length`` distinct
     articles bought in the ``history_weeks`` weeks before a date (``History``,
     a CSR over customer rows, most recent first);
   * ``ArticleStats``: first-sale day, running mean price and last week's
     sales count per article (``ArticleRaw`` as of a date).

   Memory is bounded by the history lookback, not by the training window.
3. ``FeatureState``: vocabularies fitted on the training window only (index 0
   is the out-of-vocabulary / missing bucket of every feature, so unseen
   customers and new articles still get embeddings), hashing parameters and
   bucket edges. It turns the tables, an ``ArticleRaw`` and a ``History`` into

   * ``article_matrix``: ``int64 (n_articles, len(config.article))``;
   * ``customer_matrix``: ``int64 (n_customers + 1, n_static)`` (no history);
   * ``customer_inputs``: ``(cats int64 (n, len(config.customer)),
     hist int64 (n, L, len(config.history)), weights float32 (n, L))``.

   It is saved with the model (``save``/``load``: JSON + Parquet, no pickle).

Feature names (``FeatureConfig`` picks which feed which tower):

* article: ``article_id``, ``product_code``, the attribute columns in
  ``ARTICLE_ATTRIBUTES``, and the time-dependent ``price_band``,
  ``age_since_launch``, ``sales_last_week``;
* customer: ``customer_id``, ``age``, ``club_member_status``,
  ``fashion_news_frequency``, ``fn``, ``active``, ``postal_code`` (hashed),
  ``history_length``;
* history: any static article feature, averaged over the customer's recent
  purchases with recency weights ``0.5 ** (days_ago / half_life)`` (sum 1).

In the history tensor, padding uses index ``cardinality`` of each feature
(one past the last real index), which the model treats as ``padding_idx``.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm_recsys.arrays import unique
from hm_recsys.data.schema import week_start

if TYPE_CHECKING:
    import pandas as pd

    from hm_recsys.data.warehouse import Warehouse

FORMAT_VERSION = 1
EPOCH = dt.date(1970, 1, 1)

# feature name -> articles.parquet column
ARTICLE_ATTRIBUTES: dict[str, str] = {
    "product_code": "product_code",
    "product_type": "product_type_no",
    "product_group": "product_group_name",
    "graphical_appearance": "graphical_appearance_no",
    "colour_group": "colour_group_code",
    "perceived_colour_value": "perceived_colour_value_id",
    "perceived_colour_master": "perceived_colour_master_id",
    "department": "department_no",
    "index": "index_code",
    "index_group": "index_group_no",
    "section": "section_no",
    "garment_group": "garment_group_no",
}
ARTICLE_STATIC = ("article_id", *ARTICLE_ATTRIBUTES)
ARTICLE_DYNAMIC = ("price_band", "age_since_launch", "sales_last_week")
ARTICLE_FEATURES = ARTICLE_STATIC + ARTICLE_DYNAMIC

# feature name -> customers.parquet column, for the vocabulary-encoded ones
CUSTOMER_CATEGORICAL: dict[str, str] = {
    "club_member_status": "club_member_status",
    "fashion_news_frequency": "fashion_news_frequency",
    "fn": "FN",
    "active": "Active",
}
CUSTOMER_STATIC = ("customer_id", "age", *CUSTOMER_CATEGORICAL, "postal_code")
CUSTOMER_FEATURES = CUSTOMER_STATIC + ("history_length",)

# Buckets of time-dependent article features (days / counts); index 0 stays the unknown bucket.
AGE_SINCE_LAUNCH_DAYS = (7, 14, 28, 56, 112, 224, 364)  # 1: sold first < 7 days ago, ...
SALES_BUCKETS = 15  # 1: no sale last week, then 2 + floor(log2(count)), capped


@dataclass(frozen=True)
class FeatureConfig:
    """Which features feed which tower and how they are encoded (the schema's feature half).

    Attributes:
        customer: features of the customer tower, from ``CUSTOMER_FEATURES``.
        article: features of the article tower, from ``ARTICLE_FEATURES``.
        history: static article features averaged over the customer's recent
            purchases (part of the customer tower); empty disables history.
        history_length: most recent distinct articles kept per customer (L).
        history_weeks: how far back the history looks, in weeks.
        history_half_life_days: recency weight half-life (days).
        min_article_count: purchases in the training window for an article
            (and its product code) to get its own id embedding.
        min_customer_count: same for a customer id.
        postal_buckets: hash buckets for postal codes (index 0 = missing).
        hash_salt: salt of the postal-code hash (changing it reshuffles buckets).
        price_bands: quantile bands of article mean price (fitted on training).
        age_edges: customer age bucket edges in years (missing age = bucket 0).
    """

    customer: tuple[str, ...] = CUSTOMER_FEATURES
    article: tuple[str, ...] = ARTICLE_FEATURES
    history: tuple[str, ...] = ("article_id", "product_code", "product_type", "colour_group",
                                "index_group", "department", "garment_group", "section")
    history_length: int = 32
    history_weeks: int = 26
    history_half_life_days: float = 28.0
    min_article_count: int = 1
    min_customer_count: int = 1
    postal_buckets: int = 1024
    hash_salt: str = "hm-recsys"
    price_bands: int = 10
    age_edges: tuple[int, ...] = (20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70)

    def __post_init__(self) -> None:
        for name, allowed, kind in ((self.customer, CUSTOMER_FEATURES, "customer"),
                                    (self.article, ARTICLE_FEATURES, "article"),
                                    (self.history, ARTICLE_STATIC, "history")):
            unknown = [f for f in name if f not in allowed]
            if unknown:
                raise ValueError(f"features.{kind}: unknown feature(s) {unknown}; choose from {list(allowed)}")
            if len(set(name)) != len(name):
                raise ValueError(f"features.{kind}: a feature is listed twice: {list(name)}")
        if not self.customer and not self.history:
            raise ValueError("features: the customer tower needs at least one feature (customer or history)")
        if not self.article:
            raise ValueError("features.article: the article tower needs at least one feature")
        for k in ("history_length", "history_weeks", "postal_buckets", "price_bands",
                  "min_article_count", "min_customer_count"):
            if getattr(self, k) < 1:
                raise ValueError(f"features.{k} must be >= 1, got {getattr(self, k)}")
        if self.history_half_life_days <= 0:
            raise ValueError(f"features.history_half_life_days must be > 0, got {self.history_half_life_days}")
        if list(self.age_edges) != sorted(set(self.age_edges)):
            raise ValueError(f"features.age_edges must be strictly increasing, got {list(self.age_edges)}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureConfig:
        return config_from_dict(cls, d, "features")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as JSON-able options (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(cls: type, d: Mapping[str, Any], section: str) -> Any:
    """The config dataclass ``cls`` from options (lists as tuples); unknown options name the ``section``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{section}: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def day_number(d: dt.date) -> int:
    """Days since 1970-01-01 (the integer time axis of every array here)."""
    return (d - EPOCH).days


# ---------------------------------------------------------------------------
# Tables: ids -> rows
# ---------------------------------------------------------------------------
def positions(index: pd.Index, ids: Sequence[str]) -> np.ndarray:
    """``int64 (n,)`` position of each id in a unique ``index``; -1 where absent.

    A handful of ids (a serving request) are looked up one by one with
    ``get_loc``, which skips building an Index of the ids (~10x less overhead).
    """
    ids = list(ids)
    if len(ids) > 8:
        return np.asarray(index.get_indexer(ids), dtype=np.int64)
    out = np.full(len(ids), -1, dtype=np.int64)
    for i, c in enumerate(ids):
        try:
            loc = index.get_loc(c)
        except (KeyError, TypeError):
            continue
        if isinstance(loc, (int, np.integer)):
            out[i] = loc
    return out


@dataclass
class WeekRows:
    """One week of transactions as row numbers. All arrays ``(n,)``, aligned."""

    customer_rows: np.ndarray  # int32, rows of Tables.customers
    article_rows: np.ndarray  # int32, rows of Tables.articles (the catalogue)
    days: np.ndarray  # int32, day_number(t_dat)
    prices: np.ndarray  # float64

    def __len__(self) -> int:
        return int(self.article_rows.size)


class Tables:
    """The catalogue and the customer table with id -> row lookups.

    ``articles``/``customers`` are the warehouse frames (any extra columns are
    ignored). Article ids must be unique; a customer id missing from the table
    maps to ``unknown_row`` (= ``len(customers)``) when encoding features, but
    is an error in transactions (``encode_rows``): ingestion guarantees
    referential integrity, so a miss means the warehouse is inconsistent.
    """

    def __init__(self, articles: pd.DataFrame, customers: pd.DataFrame):
        import pandas as pd

        for df, col, what in ((articles, "article_id", "articles"), (customers, "customer_id", "customers")):
            if col not in df.columns:
                raise ValueError(f"{what} table: missing column {col!r} (have {list(df.columns)})")
        self.articles = articles.reset_index(drop=True)
        self.customers = customers.reset_index(drop=True)
        self.article_index = pd.Index(self.articles["article_id"].astype(str))
        self.customer_index = pd.Index(self.customers["customer_id"].astype(str))
        for idx, what in ((self.article_index, "article_id"), (self.customer_index, "customer_id")):
            if not idx.is_unique:
                dup = idx[idx.duplicated()][0]
                raise ValueError(f"{what} {dup!r} appears more than once in its table")

    @property
    def n_articles(self) -> int:
        return len(self.article_index)

    @property
    def n_customers(self) -> int:
        return len(self.customer_index)

    @property
    def unknown_row(self) -> int:
        return len(self.customer_index)

    def article_rows(self, ids: Sequence[str]) -> np.ndarray:
        """``int64 (n,)`` catalogue rows; -1 for ids not in the catalogue."""
        return self.article_index.get_indexer(list(ids)).astype(np.int64)

    def customer_rows(self, ids: Sequence[str]) -> np.ndarray:
        """``int64 (n,)`` customer rows; ``unknown_row`` for ids not in the table."""
        rows = positions(self.customer_index, ids)
        rows[rows < 0] = self.unknown_row
        return rows

    def encode_rows(self, tx: pd.DataFrame, where: str = "transactions") -> WeekRows:
        """Warehouse transactions (``t_dat, customer_id, article_id[, price]``) to ``WeekRows``.

        Raises ``ValueError`` naming ``where``, the row and the id when a
        customer or article is not in its table: the warehouse must be
        consistent (served states use the warehouse's own tables, so an id a
        model never saw is still in them).
        """
        cust = self._codes(tx, "customer_id", self.customer_index, where)
        art = self._codes(tx, "article_id", self.article_index, where)
        days = tx["t_dat"].to_numpy().astype("datetime64[D]").astype(np.int64).astype(np.int32)
        prices = tx["price"].to_numpy(dtype=np.float64) if "price" in tx.columns else np.full(len(tx), np.nan)
        return WeekRows(cust, art, days, prices)

    @staticmethod
    def _codes(tx: pd.DataFrame, col: str, index: pd.Index, where: str) -> np.ndarray:
        """Row of each id in ``index``; ``ValueError`` naming the first id it lacks."""
        import pandas as pd

        s = tx[col]
        if not isinstance(s.dtype, pd.CategoricalDtype):
            s = s.astype("category")
        cats = s.cat.categories.astype(str)
        lookup = index.get_indexer(cats)
        codes = s.cat.codes.to_numpy()
        rows = np.where(codes >= 0, lookup[np.maximum(codes, 0)], -1)
        bad = np.flatnonzero(rows < 0)
        if bad.size:
            i = int(bad[0])
            value = s.iloc[i]
            table = "articles" if col == "article_id" else "customers"
            raise ValueError(
                f"{where}: row {i} has {col} {value!r}, which is not in the {table} table "
                f"({bad.size} such rows); ingest the matching {table} file first"
            )
        return rows.astype(np.int32)


# ---------------------------------------------------------------------------
# Running state over streamed weeks
# ---------------------------------------------------------------------------
@dataclass
class History:
    """Each customer's most recent distinct purchases as of ``as_of`` (CSR over customer rows).

    ``customer_rows`` ``int32 (m,)`` ascending; customer ``customer_rows[i]``
    owns ``article_rows[indptr[i]:indptr[i+1]]`` (most recent first, at most
    L) and ``days_ago`` (>= 1) for each.
    """

    as_of: dt.date
    customer_rows: np.ndarray
    indptr: np.ndarray
    article_rows: np.ndarray
    days_ago: np.ndarray

    @classmethod
    def empty(cls, as_of: dt.date) -> History:
        z = np.zeros(0, dtype=np.int32)
        return cls(as_of, z, np.zeros(1, dtype=np.int64), z.copy(), z.copy())

    def __len__(self) -> int:
        return int(self.customer_rows.size)

    def _positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start in article_rows, number of items) of each customer row; (0, 0) when absent."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self) == 0:
            return np.zeros(rows.size, np.int64), np.zeros(rows.size, np.int64)
        pos = np.minimum(np.searchsorted(self.customer_rows, rows), len(self) - 1)
        found = self.customer_rows[pos] == rows
        start = np.where(found, self.indptr[pos], 0)
        length = np.where(found, self.indptr[pos + 1] - self.indptr[pos], 0)
        return start.astype(np.int64), length.astype(np.int64)

    def slots(self, rows: np.ndarray, length: int, table: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The first ``length`` history slots of customer ``rows``, as the customer tower reads them.

        Returns ``(table rows (n, length, k), days_ago int32 (n, length),
        real bool (n, length), n_items int64 (n,))``: each slot's row of
        ``table`` (``(n_articles + 1, k)``, its last row the padding, read for
        empty slots), its days ago (0 on empty slots), whether it holds an
        article, and how many slots do (at most ``length``). One compiled pass
        (``kernels.history_slots``).
        """
        from hm_recsys.kernels import history_slots

        start, n_items = self._positions(rows)
        n_items = np.minimum(n_items, length)
        hist, days, real = history_slots(start, n_items, self.article_rows, self.days_ago,
                                         np.ascontiguousarray(table), length)
        return hist, days, real, n_items

    def items(self, row: int) -> np.ndarray:
        """Article rows of one customer row, most recent first (empty if none)."""
        return self.entry(row)[0]

    def entry(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """``(article_rows, days_ago)`` of one customer row, most recent first (empty if none)."""
        start, n = self._positions(np.array([row]))
        sl = slice(int(start[0]), int(start[0] + n[0]))
        return self.article_rows[sl], self.days_ago[sl]

    def subset(self, rows: np.ndarray) -> History:
        """The history restricted to the customer rows in ``rows`` (any order, repeats ok)."""
        keep = unique(np.asarray(rows, dtype=np.int64))
        keep = keep[np.isin(keep, self.customer_rows)]
        start, n = self._positions(keep)
        src = np.repeat(start, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        return History(self.as_of, keep.astype(np.int32), np.r_[0, np.cumsum(n)].astype(np.int64),
                       self.article_rows[src], self.days_ago[src])

    def save(self, path: Path) -> None:
        np.savez(path, as_of=np.array(self.as_of.isoformat()), customer_rows=self.customer_rows,
                 indptr=self.indptr, article_rows=self.article_rows, days_ago=self.days_ago)

    @classmethod
    def load(cls, path: Path) -> History:
        with np.load(path, allow_pickle=False) as z:
            return cls(dt.date.fromisoformat(str(z["as_of"])), z["customer_rows"], z["indptr"],
                       z["article_rows"], z["days_ago"])


class HistoryWindow:
    """The last ``weeks`` weeks of (customer row, article row, day), to take ``History`` snapshots."""

    def __init__(self, weeks: int, length: int):
        self.weeks, self.length = weeks, length
        self._parts: collections.deque[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = collections.deque()

    def push(self, rows: WeekRows) -> None:
        if len(rows):
            self._parts.append((int(rows.days.max()), rows.customer_rows, rows.article_rows, rows.days))

    def snapshot(self, as_of: dt.date) -> History:
        """Last ``length`` distinct articles per customer bought in ``[as_of - weeks, as_of)``."""
        end = day_number(as_of)
        start = end - 7 * self.weeks
        while self._parts and self._parts[0][0] < start:  # whole part too old: drop it for good
            self._parts.popleft()
        if not self._parts:
            return History.empty(as_of)
        c = np.concatenate([p[1] for p in self._parts])
        a = np.concatenate([p[2] for p in self._parts])
        d = np.concatenate([p[3] for p in self._parts])
        keep = (d >= start) & (d < end)
        c, a, d = c[keep], a[keep], d[keep]
        if c.size == 0:
            return History.empty(as_of)
        c, a, age = _latest_per_pair(c.astype(np.int64), a.astype(np.int64), (end - d).astype(np.int64))
        # per customer: most recent first; ties broken by article row so the order is reproducible
        starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        counts = np.diff(np.r_[starts, c.size])
        rank = np.arange(c.size) - np.repeat(starts, counts)
        keep = rank < self.length
        kept = np.minimum(counts, self.length)
        return History(as_of, c[starts].astype(np.int32), np.r_[0, np.cumsum(kept)].astype(np.int64),
                       a[keep].astype(np.int32), age[keep].astype(np.int32))


def _latest_per_pair(c: np.ndarray, a: np.ndarray, age: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (customer, article), its smallest ``age``; ordered by (customer, age, article).

    The three columns are packed into one int64 key per ordering and sorted
    as plain integers: on the full data's 26-week window (~8M rows) that is
    ~6x faster than ``np.lexsort`` over the columns, and the key order is the
    same total order, so the result is identical. Columns too wide to pack
    (over 63 bits together) take the ``np.lexsort`` path.
    """
    bits = [int(x.max()).bit_length() for x in (c, a, age)]
    if min(int(c.min()), int(a.min()), int(age.min())) < 0 or sum(bits) > 63:
        order = np.lexsort((age, a, c))
        c, a, age = c[order], a[order], age[order]
        first = np.r_[True, (c[1:] != c[:-1]) | (a[1:] != a[:-1])]
        c, a, age = c[first], a[first], age[first]
        order = np.lexsort((a, age, c))
        return c[order], a[order], age[order]
    bc, ba, bd = bits
    key = np.sort((c << (ba + bd)) | (a << bd) | age)  # by (customer, article, age)
    pair = key >> bd
    key = key[np.r_[True, pair[1:] != pair[:-1]]]  # the first of each pair: its smallest age
    c, a, age = key >> (ba + bd), (key >> bd) & ((1 << ba) - 1), key & ((1 << bd) - 1)
    key = np.sort((c << (bd + ba)) | (age << ba) | a)  # by (customer, age, article)
    return key >> (bd + ba), key & ((1 << ba) - 1), (key >> ba) & ((1 << bd) - 1)


@dataclass
class ArticleRaw:
    """Time-dependent article facts as of ``as_of``, before bucketing. Arrays ``(n_articles,)``."""

    as_of: dt.date
    age_days: np.ndarray  # int32, days since first sale; -1 = not sold before as_of
    sales_last_week: np.ndarray  # int32, purchases in [as_of - 7 days, as_of)
    mean_price: np.ndarray  # float32, mean price over all sales before as_of; NaN = none


class ArticleStats:
    """Per-article running totals over streamed weeks (first sale, price sum, last week's sales)."""

    def __init__(self, n_articles: int):
        self.first_day = np.full(n_articles, np.iinfo(np.int32).max, dtype=np.int64)
        self.price_sum = np.zeros(n_articles, dtype=np.float64)
        self.price_n = np.zeros(n_articles, dtype=np.int64)
        self._week_counts: dict[int, np.ndarray] = {}  # week start day -> counts (last two kept)

    def update(self, week: dt.date, rows: WeekRows) -> None:
        n = self.first_day.size
        if len(rows):
            np.minimum.at(self.first_day, rows.article_rows, rows.days)
            priced = ~np.isnan(rows.prices)
            self.price_sum += np.bincount(rows.article_rows[priced], weights=rows.prices[priced], minlength=n)
            self.price_n += np.bincount(rows.article_rows[priced], minlength=n)
        self._week_counts[day_number(week)] = np.bincount(rows.article_rows, minlength=n).astype(np.int32)
        for k in sorted(self._week_counts)[:-2]:
            del self._week_counts[k]

    def raw_at(self, as_of: dt.date) -> ArticleRaw:
        end = day_number(as_of)
        n = self.first_day.size
        sold = self.first_day < end
        age = np.where(sold, end - self.first_day, -1).astype(np.int32)
        last = self._week_counts.get(end - 7, np.zeros(n, dtype=np.int32))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.price_n > 0, self.price_sum / np.maximum(self.price_n, 1), np.nan)
        return ArticleRaw(as_of, age, last.copy(), mean.astype(np.float32))


class Replay:
    """Stream warehouse weeks in order, keeping ``HistoryWindow`` and ``ArticleStats`` current.

    Iterating ``weeks(...)`` yields ``(week, rows)`` *before* the week is
    applied, so inside the loop ``history_at(week)`` and ``article_raw_at(week)``
    see only the past; after the loop they describe the stream's end.
    Weeks older than the history lookback are read without customer ids.
    """

    def __init__(self, tables: Tables, config: FeatureConfig):
        self.tables = tables
        self.config = config
        self.window = HistoryWindow(config.history_weeks, config.history_length)
        self.stats = ArticleStats(tables.n_articles)

    def weeks(self, warehouse: Warehouse, end: dt.date, history_from: dt.date | None = None,
              progress: bool = True, desc: str = "weeks") -> Iterator[tuple[dt.date, WeekRows]]:
        """Every warehouse week before ``end``; history kept from ``history_from`` on.

        ``history_from`` defaults to ``end - history_weeks``. Yields
        ``(week_start, WeekRows)`` for weeks with customer ids read (those on
        or after ``history_from``); older weeks only update article stats.
        """
        from tqdm.auto import tqdm

        end = week_start(end)
        hist_from = week_start(history_from or (end - dt.timedelta(weeks=self.config.history_weeks)))
        weeks = [w for w in warehouse.weeks() if w < end]
        bar = tqdm(total=len(weeks), desc=desc, unit="wk", disable=not progress)
        old = [w for w in weeks if w < hist_from]
        if old:
            for week, df in warehouse.iter_weeks(old[0], hist_from, columns=["t_dat", "article_id", "price"]):
                art = Tables._codes(df, "article_id", self.tables.article_index, f"week {week}")
                days = df["t_dat"].to_numpy().astype("datetime64[D]").astype(np.int64).astype(np.int32)
                rows = WeekRows(np.zeros(art.size, np.int32), art, days, df["price"].to_numpy(np.float64))
                self.stats.update(week, rows)
                bar.update()
        recent = [w for w in weeks if w >= hist_from]
        if recent:
            cols = ["t_dat", "customer_id", "article_id", "price"]
            for week, df in warehouse.iter_weeks(recent[0], end, columns=cols):
                rows = self.tables.encode_rows(df, where=f"transactions of week {week}")
                yield week, rows
                self.window.push(rows)
                self.stats.update(week, rows)
                bar.update()
        bar.close()

    def history_at(self, as_of: dt.date) -> History:
        return self.window.snapshot(as_of)

    def article_raw_at(self, as_of: dt.date) -> ArticleRaw:
        return self.stats.raw_at(as_of)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------
def _as_str(s: pd.Series) -> np.ndarray:
    """A column as ``object`` strings: missing -> "", floats 1.0 -> "1" (FN/Active), ints -> digits."""
    import pandas as pd

    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan)
        out = np.where(np.isnan(v), "", np.char.mod("%g", np.nan_to_num(v)))
        return out.astype(object)
    out = s.astype("string").fillna("").astype(object).to_numpy()
    return out


def postal_bucket(codes: Sequence[str], buckets: int, salt: str) -> np.ndarray:
    """Stable hash bucket in ``1..buckets`` of each postal code; "" -> 0.

    blake2b keyed by ``salt``: the same code lands in the same bucket in
    every process and Python version (``hash()`` is randomised per process).
    """
    import pandas as pd

    values = pd.Index(np.asarray(codes, dtype=object))
    uniq = values.unique()
    key = salt.encode()[:64]
    table = np.fromiter(
        (0 if not u else 1 + int.from_bytes(hashlib.blake2b(u.encode(), key=key, digest_size=8).digest(), "little")
         % buckets for u in uniq), dtype=np.int64, count=len(uniq))
    return table[uniq.get_indexer(values)]


def age_bucket(customers: pd.DataFrame, edges: Sequence[int]) -> np.ndarray:
    """``int64 (n,)`` age bucket of each customer row: 0 = missing age, 1 + (edges at or below the age).

    There are ``len(edges) + 2`` buckets. The customer tower's ``age`` feature
    and the ``age_trending`` candidate source share this definition.
    """
    age = customers["age"].to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isnan(age), 0, 1 + np.searchsorted(np.asarray(edges), np.nan_to_num(age), side="right")
                    ).astype(np.int64)


def bucket_log2(counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """0 -> 1, 1 -> 2, 2..3 -> 3, 4..7 -> 4 ... capped at ``n_buckets - 1`` (0 stays the unknown bucket)."""
    c = np.asarray(counts, dtype=np.int64)
    bits = np.zeros(c.shape, dtype=np.int64)
    pos = c > 0
    bits[pos] = np.floor(np.log2(c[pos])).astype(np.int64) + 1
    return np.minimum(1 + bits, n_buckets - 1)


@dataclass
class FeatureState:
    """Fitted encoders: vocabularies (index 0 = out-of-vocabulary / missing), hash params, edges.

    ``vocabs[name]`` lists the known values of a categorical feature as
    strings; value ``vocabs[name][i]`` has index ``i + 1``.
    """

    config: FeatureConfig
    vocabs: dict[str, list[str]]
    price_edges: list[float]
    _lookups: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- fitting ---------------------------------------------------------------
    @classmethod
    def fit(cls, config: FeatureConfig, tables: Tables, article_counts: np.ndarray,
            customer_counts: np.ndarray, article_mean_price: np.ndarray) -> FeatureState:
        """Fit on the training window only.

        Args:
            article_counts: ``(n_articles,)`` purchases of each catalogue row in the training window.
            customer_counts: ``(n_customers,)`` purchases of each customer row in the training window.
            article_mean_price: ``(n_articles,)`` mean price in the training window (NaN if unsold).
        """
        arts, custs = tables.articles, tables.customers
        bought = article_counts > 0
        if not bought.any():
            raise ValueError("cannot fit features: the training window has no purchases")
        vocabs: dict[str, list[str]] = {
            "article_id": sorted(np.asarray(tables.article_index)[article_counts >= config.min_article_count]),
            "customer_id": sorted(np.asarray(tables.customer_index)[customer_counts >= config.min_customer_count]),
        }
        for name, col in ARTICLE_ATTRIBUTES.items():
            if name == "product_code":
                continue
            vocabs[name] = sorted(set(_as_str(arts[col])[bought]) - {""})
        codes = _as_str(arts["product_code"])
        pc_counts: dict[str, int] = {}
        for code, n in zip(codes[bought], article_counts[bought]):
            pc_counts[code] = pc_counts.get(code, 0) + int(n)
        vocabs["product_code"] = sorted(c for c, n in pc_counts.items() if n >= config.min_article_count and c)
        buyers = customer_counts > 0
        for name, col in CUSTOMER_CATEGORICAL.items():
            vocabs[name] = sorted(set(_as_str(custs[col])[buyers]))  # "" (missing) is a value of its own
        prices = article_mean_price[bought & ~np.isnan(article_mean_price)]
        qs = np.linspace(0, 1, config.price_bands + 1)[1:-1]
        edges = sorted(set(np.quantile(prices, qs).tolist())) if prices.size else []
        return cls(config, vocabs, [float(e) for e in edges])

    # -- sizes -------------------------------------------------------------------
    def cardinality(self, name: str) -> int:
        """Number of indices of feature ``name`` (0 = unknown included); padding uses this value."""
        c = self.config
        if name in self.vocabs:
            return len(self.vocabs[name]) + 1
        fixed = {
            "age": len(c.age_edges) + 2,
            "postal_code": c.postal_buckets + 1,
            "history_length": int(c.history_length).bit_length() + 1,
            "price_band": len(self.price_edges) + 2,
            "age_since_launch": len(AGE_SINCE_LAUNCH_DAYS) + 2,
            "sales_last_week": SALES_BUCKETS,
        }
        if name not in fixed:
            raise KeyError(f"unknown feature {name!r}")
        return fixed[name]

    def cardinalities(self) -> dict[str, int]:
        names = dict.fromkeys([*self.config.customer, *self.config.article, *self.config.history])
        return {n: self.cardinality(n) for n in names}

    def _lookup(self, name: str):
        import pandas as pd

        idx = self._lookups.get(name)
        if idx is None:
            idx = self._lookups[name] = pd.Index(np.asarray(self.vocabs[name], dtype=object))
        return idx

    def encode_values(self, name: str, values: Sequence[str]) -> np.ndarray:
        """Vocabulary indices ``int64 (n,)``; unknown values -> 0."""
        return self._lookup(name).get_indexer(np.asarray(values, dtype=object)).astype(np.int64) + 1

    # -- articles ------------------------------------------------------------------
    def article_static(self, articles: pd.DataFrame) -> dict[str, np.ndarray]:
        """Static article features of every row of ``articles``: name -> ``int64 (n,)``."""
        out = {"article_id": self.encode_values("article_id", _as_str(articles["article_id"]))}
        for name, col in ARTICLE_ATTRIBUTES.items():
            if col not in articles.columns:
                raise ValueError(f"articles table: missing column {col!r} (feature {name!r})")
            out[name] = self.encode_values(name, _as_str(articles[col]))
        return out

    def article_dynamic(self, raw: ArticleRaw) -> dict[str, np.ndarray]:
        """Time-dependent features as of ``raw.as_of``: name -> ``int64 (n,)``."""
        price = raw.mean_price.astype(np.float64)
        band = np.where(np.isnan(price), 0, 1 + np.searchsorted(np.asarray(self.price_edges), np.nan_to_num(price),
                                                                side="right"))
        age = np.where(raw.age_days < 0, 0,
                       1 + np.searchsorted(np.asarray(AGE_SINCE_LAUNCH_DAYS), np.maximum(raw.age_days, 0),
                                           side="right"))
        return {
            "price_band": band.astype(np.int64),
            "age_since_launch": age.astype(np.int64),
            "sales_last_week": bucket_log2(raw.sales_last_week, SALES_BUCKETS),
        }

    def article_matrix(self, static: Mapping[str, np.ndarray], raw: ArticleRaw) -> np.ndarray:
        """``int64 (n_articles, len(config.article))``: the article tower's input for every catalogue row."""
        dyn = self.article_dynamic(raw)
        cols = [static[n] if n in static else dyn[n] for n in self.config.article]
        return np.stack(cols, axis=1)

    def history_table(self, static: Mapping[str, np.ndarray]) -> np.ndarray:
        """``int64 (n_articles + 1, len(config.history))``; the last row is padding (index = cardinality)."""
        names = self.config.history
        if not names:
            return np.zeros((len(next(iter(static.values()))) + 1, 0), dtype=np.int64)
        body = np.stack([static[n] for n in names], axis=1)
        pad = np.array([[self.cardinality(n) for n in names]], dtype=np.int64)
        return np.concatenate([body, pad], axis=0)

    # -- customers -----------------------------------------------------------------
    def customer_static(self, customers: pd.DataFrame) -> np.ndarray:
        """``int64 (n + 1, len(static customer features))``; the last row is the unknown customer (all 0).

        Column order: ``static_customer_features`` (``config.customer`` without history_length).
        """
        n = len(customers)
        cols = []
        for name in self.static_customer_features:
            if name == "customer_id":
                v = self.encode_values(name, _as_str(customers["customer_id"]))
            elif name == "age":
                v = age_bucket(customers, self.config.age_edges)
            elif name == "postal_code":
                v = postal_bucket(_as_str(customers["postal_code"]), self.config.postal_buckets, self.config.hash_salt)
            else:
                col = CUSTOMER_CATEGORICAL[name]
                if col not in customers.columns:
                    raise ValueError(f"customers table: missing column {col!r} (feature {name!r})")
                v = self.encode_values(name, _as_str(customers[col]))
            cols.append(np.asarray(v, dtype=np.int64))
        body = np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.int64)
        return np.concatenate([body, np.zeros((1, body.shape[1]), dtype=np.int64)], axis=0)

    @property
    def static_customer_features(self) -> tuple[str, ...]:
        return tuple(f for f in self.config.customer if f != "history_length")

    def customer_inputs(self, static_rows: np.ndarray, history: History, customer_rows: np.ndarray,
                        history_table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The customer tower's input for ``customer_rows``.

        Args:
            static_rows: ``customer_static(...)[customer_rows]``, ``(n, n_static)``.
            history: snapshot to read the customers' recent purchases from.
            customer_rows: ``(n,)`` rows of the customer table (unknown_row allowed).
            history_table: ``history_table(...)``, ``(n_articles + 1, n_hist)``.

        Returns:
            ``cats int64 (n, len(config.customer))``, ``hist int64 (n, L, n_hist)``
            (padding = cardinality), ``weights float32 (n, L)`` (each row sums to
            1, or is all 0 without history).
        """
        c = self.config
        hist, days, real, n_items = history.slots(customer_rows, c.history_length, history_table)
        # 0.5 ** (days / half-life) from a table of the whole days present: the same float64 values as
        # computing the power per slot, ~3x faster (a training batch's 65k slots; the power dominated batching)
        halvings = np.power(0.5, np.arange(int(days.max(initial=0)) + 1) / c.history_half_life_days)
        w = np.where(real, halvings[days], 0.0)
        total = w.sum(axis=1, keepdims=True)
        w = np.divide(w, total, out=np.zeros_like(w), where=total > 0).astype(np.float32)
        static_names = self.static_customer_features
        cols = []
        for name in c.customer:
            if name == "history_length":
                cols.append(_bit_length(n_items))
            else:
                cols.append(static_rows[:, static_names.index(name)])
        cats = np.stack(cols, axis=1) if cols else np.zeros((len(customer_rows), 0), dtype=np.int64)
        return cats, hist, w

    # -- persistence -----------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """``state.json`` (config, small vocabularies, edges) + ``vocabularies.parquet`` (all vocabularies)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder.mkdir(parents=True, exist_ok=True)
        names, values = [], []
        for name in sorted(self.vocabs):
            names.extend([name] * len(self.vocabs[name]))
            values.extend(self.vocabs[name])
        table = pa.table({"feature": pa.array(names, pa.string()).dictionary_encode(),
                          "value": pa.array(values, pa.string())})
        pq.write_table(table, folder / "vocabularies.parquet")
        state = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "price_edges": self.price_edges,
            "vocab_sizes": {k: len(v) for k, v in sorted(self.vocabs.items())},
            "cardinalities": self.cardinalities(),
            "index_0": "out-of-vocabulary / missing value of every feature",
            "postal_hash": {"algorithm": "blake2b-64, keyed by hash_salt, mod postal_buckets, + 1",
                            "buckets": self.config.postal_buckets, "salt": self.config.hash_salt},
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> FeatureState:
        import pyarrow.parquet as pq

        state = json.loads((folder / "state.json").read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / 'state.json'}: feature state format {state.get('format_version')} "
                             f"is not {FORMAT_VERSION}")
        table = pq.read_table(folder / "vocabularies.parquet")
        feats = table.column("feature").to_pylist()
        vals = table.column("value").to_pylist()
        vocabs: dict[str, list[str]] = {k: [] for k in state["vocab_sizes"]}
        for f, v in zip(feats, vals):
            vocabs[f].append(v)
        for k, n in state["vocab_sizes"].items():
            if len(vocabs[k]) != n:
                raise ValueError(f"{folder / 'vocabularies.parquet'}: vocabulary {k!r} has {len(vocabs[k])} "
                                 f"values, state.json says {n}")
        return cls(FeatureConfig.from_dict(state["config"]), vocabs, [float(e) for e in state["price_edges"]])


def _bit_length(n: np.ndarray) -> np.ndarray:
    """Vectorised ``int.bit_length`` for non-negative ints: 0 -> 0, 1 -> 1, 2..3 -> 2, ..."""
    n = np.asarray(n, dtype=np.int64)
    out = np.zeros(n.shape, dtype=np.int64)
    pos = n > 0
    out[pos] = np.floor(np.log2(n[pos])).astype(np.int64) + 1
    return out
