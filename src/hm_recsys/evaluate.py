"""Offline evaluation: pure ranking metrics, baselines, the oracle, reports.

One protocol everywhere (DESIGN.md, "Evaluation protocol"):

* the holdout is one H&M week right after the training window
  (``hm_recsys.split.Split``);
* scored customers are those with at least one purchase in that week, their
  relevant set the distinct articles they bought that week (``Truth``);
* a prediction is a ranked list of article ids per customer,
  ``Mapping[str, Sequence[str]]`` (customer_id -> article ids, best first);
  a scored customer with no prediction scores 0 on every metric, predictions
  for customers outside the truth are ignored.

Metrics, each averaged over the scored customers:

* ``recall@K`` = |top-K ∩ relevant| / |relevant|;
* ``map@12``: Kaggle's AP@12 = (1 / min(|relevant|, 12)) * sum_{k<=12} P(k) rel(k).
  A predicted id repeated in a list counts once, at its first position, and
  the repeats still use up list positions (Kaggle's reference ``apk``);
* ``ndcg@12``: binary gains 1/log2(rank + 1), normalised by the ideal list of
  min(|relevant|, 12) hits at the top; repeats count once, as for MAP;
* ``coverage@12``: distinct articles in the scored customers' top-12 lists
  divided by the catalogue size.

Everything above the ``# -- I/O`` line is pure (ids in, numbers out). The
only per-customer Python work is one C-level pass of each scored customer's
top-K against their small relevant set; every metric is then numpy over the
few hits. ~80k customers x 100 predictions: about 0.3-1 s per model
(``bench/evaluate.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hm_recsys.arrays import unique
from hm_recsys.cli import iso_date

if TYPE_CHECKING:  # pandas and the warehouse are only needed by the loaders and baselines
    import pandas as pd

    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.split import Split

Predictions = Mapping[str, Sequence[str]]

MAP_K = 12  # Kaggle's list length: MAP@12, NDCG@12, coverage@12
METRIC_ORDER = ("recall@12", "recall@100", "map@12", "ndcg@12", "coverage@12", "n_customers")
ORACLE = "oracle"
POPULARITY = "popularity"
REPURCHASE = "repurchase+popularity"
TRENDING = "trending+decayed-repurchase"
BASELINES = (POPULARITY, REPURCHASE, TRENDING)  # every heuristic the served recommender must beat
DEFAULT_LOOKBACK_WEEKS = 4
TRENDING_LOOKBACK_WEEKS = 26  # the kernel's decay reaches zero after ~625 days; 26 weeks hold nearly all its mass


# ---------------------------------------------------------------------------
# Truth: the relevant sets of the scored customers
# ---------------------------------------------------------------------------
class Truth(Mapping[str, frozenset[str]]):
    """Relevant articles of each scored customer, customers in sorted order.

    Behaves as a read-only ``Mapping[str, frozenset[str]]``; iteration follows
    ``customer_ids`` (sorted ascending), which is the order of every
    per-customer array this module returns.

    Attributes:
        customer_ids: ``(n,)`` object array of customer ids, sorted, unique.
        n_relevant: ``(n,)`` int64 array, size of each relevant set (>= 1).
    """

    __slots__ = ("_sets", "customer_ids", "n_relevant")

    def __init__(self, sets: Mapping[str, Iterable[str]]):
        out: dict[str, frozenset[str]] = {}
        for c in sorted(sets):
            if not isinstance(c, str):
                raise TypeError(f"truth: customer id {c!r} is a {type(c).__name__}, expected str")
            rel = sets[c]
            if isinstance(rel, str):
                raise TypeError(f"truth: customer {c}: relevant articles must be a collection of ids, got a str")
            uniq = rel if isinstance(rel, frozenset) else frozenset(rel)
            if not uniq:
                raise ValueError(
                    f"truth: customer {c} has an empty relevant set; scored customers must have a purchase"
                )
            bad = next((a for a in uniq if not isinstance(a, str)), None)
            if bad is not None:
                raise TypeError(f"truth: customer {c}: article id {bad!r} is a {type(bad).__name__}, expected str")
            out[c] = uniq
        if not out:
            raise ValueError("truth is empty: no scored customers (the holdout week has no purchases)")
        self._sets = out
        self.customer_ids = np.array(list(out), dtype=object)
        self.n_relevant = np.fromiter((len(v) for v in out.values()), dtype=np.int64, count=len(out))

    @classmethod
    def _trusted(cls, sets: dict[str, frozenset[str]]) -> Truth:
        """Skip the per-item checks for sets built here from a validated frame."""
        self = cls.__new__(cls)
        self._sets = {c: sets[c] for c in sorted(sets)}
        self.customer_ids = np.array(list(self._sets), dtype=object)
        self.n_relevant = np.fromiter((len(v) for v in self._sets.values()), dtype=np.int64, count=len(sets))
        return self

    def __getitem__(self, customer_id: str) -> frozenset[str]:
        return self._sets[customer_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __repr__(self) -> str:
        return f"Truth({len(self)} customers, {int(self.n_relevant.sum())} relevant pairs)"

    def relevant(self) -> Iterable[frozenset[str]]:
        """Each customer's relevant ids, in ``customer_ids`` order."""
        return self._sets.values()


def as_truth(truth: Truth | Mapping[str, Iterable[str]]) -> Truth:
    return truth if isinstance(truth, Truth) else Truth(truth)


def relevant_sets(holdout_tx: pd.DataFrame) -> Truth:
    """The relevant sets of one holdout week's transactions.

    ``holdout_tx`` needs columns ``customer_id`` and ``article_id`` (category or
    string, as the warehouse returns them); every row is a purchase, repeated
    rows (several units) count once. Raises ``ValueError`` naming the missing
    column or the first row with a missing id.
    """
    what = "holdout transactions"
    sets = {c: frozenset(arts) for c, arts in _distinct_by_customer(holdout_tx, what)}
    if not sets:
        raise ValueError(f"{what} are empty: no scored customers")
    return Truth._trusted(sets)


def _distinct_by_customer(tx: pd.DataFrame, what: str) -> Iterator[tuple[str, list[str]]]:
    """``(customer_id, [distinct article_id, ...])`` per customer of ``tx``, vectorised over rows."""
    cc, cust = _codes(tx, "customer_id", what)
    ac, art = _codes(tx, "article_id", what)
    if cc.size == 0:
        return iter(())
    width = np.int64(max(len(art), 1))
    pc, pa = np.divmod(unique(cc * width + ac), width)
    starts = np.flatnonzero(np.r_[True, pc[1:] != pc[:-1]])
    names = art[pa].tolist()
    bounds = np.r_[starts, pc.size].tolist()
    return zip(cust[pc[starts]].tolist(), (names[s:e] for s, e in zip(bounds[:-1], bounds[1:])))


def _codes(df: pd.DataFrame, col: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``df[col]`` as ``(codes (n,) int64, categories (m,) object str)``, with clear errors.

    Categorical columns (the warehouse's) are used as they are: no per-row
    string conversion.
    """
    if col not in df.columns:
        raise ValueError(f"{what}: missing column {col!r} (have {list(df.columns)})")
    s = df[col]
    if s.dtype != "category":
        s = s.astype("category")
    codes = s.cat.codes.to_numpy().astype(np.int64)
    if (codes < 0).any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(codes < 0)[0])} has no {col}")
    return codes, np.asarray(s.cat.categories.astype(str), dtype=object)


# ---------------------------------------------------------------------------
# Hits: where each relevant article sits in each scored customer's list
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Hits:
    """Hit positions of the scored customers, the input of every metric.

    ``rows[i]`` indexes ``truth.customer_ids``, ``pos[i]`` is the 0-based
    first position of a relevant article in that customer's list (< max_k).
    """

    rows: np.ndarray  # (h,) int64
    pos: np.ndarray  # (h,) int64
    n_relevant: np.ndarray  # (n,) int64
    max_k: int

    @property
    def n(self) -> int:
        return int(self.n_relevant.size)


def _as_list(customer_id: str, ranked: object) -> list[str] | tuple[str, ...]:
    if isinstance(ranked, (list, tuple)):
        out = ranked
    elif isinstance(ranked, (str, bytes)):
        # a str is a Sequence[str]; scanning it would match substrings silently
        raise TypeError(f"predictions for customer {customer_id}: expected a sequence of article ids, got a str")
    elif isinstance(ranked, np.ndarray):
        out = ranked.tolist()
    else:
        out = list(ranked)  # type: ignore[call-overload]
    if out and not isinstance(out[0], str):
        raise TypeError(
            f"predictions for customer {customer_id}: article ids must be str (10-digit, zero-padded), "
            f"got {type(out[0]).__name__} {out[0]!r}"
        )
    return out


def _hits(predictions: Predictions, truth: Truth | Mapping[str, Iterable[str]], max_k: int) -> _Hits:
    if max_k < 1:
        raise ValueError(f"k must be >= 1, got {max_k}")
    t = as_truth(truth)
    rows: list[int] = []
    pos: list[int] = []
    get = predictions.get
    for i, (c, rel) in enumerate(zip(t.customer_ids, t.relevant())):
        ranked = get(c)
        if ranked is None:
            continue
        top = _as_list(c, ranked)
        if len(top) > max_k:
            top = top[:max_k]
        # One C-level pass of the list's (cached) string hashes against the
        # small relevant set, then .index for the few hits: .index gives the
        # first occurrence, which is Kaggle's rule for repeated ids.
        for a in rel.intersection(top):
            rows.append(i)
            pos.append(top.index(a))
    return _Hits(np.asarray(rows, dtype=np.int64), np.asarray(pos, dtype=np.int64), t.n_relevant, max_k)


def _recall(h: _Hits, k: int) -> np.ndarray:
    keep = h.pos < k
    return np.bincount(h.rows[keep], minlength=h.n) / h.n_relevant


def _ap(h: _Hits, k: int = MAP_K) -> np.ndarray:
    keep = h.pos < k
    rows, pos = h.rows[keep], h.pos[keep]
    order = np.lexsort((pos, rows))
    rows, pos = rows[order], pos[order]
    # rank of each hit within its customer's list of hits (1, 2, ...)
    first = np.r_[True, rows[1:] != rows[:-1]] if rows.size else np.zeros(0, dtype=bool)
    idx = np.arange(rows.size)
    start = np.maximum.accumulate(np.where(first, idx, 0)) if rows.size else idx
    hit_rank = idx - start + 1
    precision = hit_rank / (pos + 1)
    return np.bincount(rows, weights=precision, minlength=h.n) / np.minimum(h.n_relevant, k)


def _ndcg(h: _Hits, k: int = MAP_K) -> np.ndarray:
    keep = h.pos < k
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    dcg = np.bincount(h.rows[keep], weights=discount[h.pos[keep]], minlength=h.n)
    ideal = np.cumsum(discount)[np.minimum(h.n_relevant, k) - 1]
    return dcg / ideal


# ---------------------------------------------------------------------------
# Public metrics
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CustomerMetrics:
    """Per-customer metric values, aligned to ``customer_ids`` (sorted ascending).

    The champion/challenger gate pairs two models' arrays: both come from the
    same ``Truth``, so index i is the same customer in both. Shapes ``(n,)``.
    """

    customer_ids: np.ndarray  # object (str)
    n_relevant: np.ndarray  # int64
    recall: np.ndarray  # float64, recall@k
    ap12: np.ndarray  # float64, Kaggle AP@12
    ndcg12: np.ndarray  # float64
    k: int


def per_customer_metrics(predictions: Predictions, truth: Truth | Mapping[str, Iterable[str]],
                         k: int = 12) -> CustomerMetrics:
    """Recall@k, AP@12 and NDCG@12 of every scored customer (see ``CustomerMetrics``)."""
    t = as_truth(truth)
    h = _hits(predictions, t, max(k, MAP_K))
    return CustomerMetrics(t.customer_ids, t.n_relevant, _recall(h, k), _ap(h), _ndcg(h), k)


def recall_at_k(predictions: Predictions, truth: Truth | Mapping[str, Iterable[str]], k: int) -> float:
    """Mean Recall@k over the scored customers."""
    return float(_recall(_hits(predictions, truth, k), k).mean())


def map_at_12(predictions: Predictions, truth: Truth | Mapping[str, Iterable[str]]) -> float:
    """Kaggle's MAP@12 over the scored customers."""
    return float(_ap(_hits(predictions, truth, MAP_K)).mean())


def ndcg_at_12(predictions: Predictions, truth: Truth | Mapping[str, Iterable[str]]) -> float:
    """Mean binary NDCG@12 over the scored customers."""
    return float(_ndcg(_hits(predictions, truth, MAP_K)).mean())


def coverage(predictions: Predictions, customers: Iterable[str], catalogue_size: int | None,
             k: int = MAP_K) -> float:
    """Distinct articles in the top-k lists of ``customers`` / ``catalogue_size``.

    NaN when ``catalogue_size`` is None (unknown catalogue).
    """
    if catalogue_size is None:
        return math.nan
    if catalogue_size < 1:
        raise ValueError(f"catalogue_size must be >= 1, got {catalogue_size}")
    seen: set[str] = set()
    get = predictions.get
    for c in customers:
        ranked = get(c)
        if ranked is not None:
            seen.update(_as_list(c, ranked)[:k])
    return len(seen) / catalogue_size


def recall_curve(predictions: Predictions, truth: Truth | Mapping[str, Iterable[str]],
                 max_k: int = 100) -> np.ndarray:
    """Mean Recall@K for K = 1..max_k: ``(max_k,)`` float64, non-decreasing.

    One pass: each hit at position p adds 1/|relevant| to every K > p.
    """
    h = _hits(predictions, truth, max_k)
    return _curve(h)


def _curve(h: _Hits) -> np.ndarray:
    gain = np.bincount(h.pos, weights=1.0 / h.n_relevant[h.rows], minlength=h.max_k)
    return np.cumsum(gain) / h.n


def evaluate_rankings(predictions: Predictions, truth: Truth | Mapping[str, Iterable[str]],
                      ks: Sequence[int] = (12, 100), catalogue_size: int | None = None) -> dict[str, float]:
    """Every headline metric of one model on one holdout.

    Returns ``{"recall@<k>" for k in ks, "map@12", "ndcg@12", "coverage@12",
    "n_customers"}`` (with the default ks exactly ``recall@12, recall@100,
    map@12, ndcg@12, coverage@12, n_customers``); ``coverage@12`` is NaN
    without ``catalogue_size``. ``n_customers`` is a float for a uniform dict.
    """
    if not ks:
        raise ValueError("ks must name at least one cutoff")
    t = as_truth(truth)
    return _headline(_hits(predictions, t, max(max(ks), MAP_K)), predictions, t, ks, catalogue_size)


def _headline(h: _Hits, predictions: Predictions, t: Truth, ks: Sequence[int],
              catalogue_size: int | None) -> dict[str, float]:
    out = {f"recall@{k}": float(_recall(h, k).mean()) for k in ks}
    out["map@12"] = float(_ap(h).mean())
    out["ndcg@12"] = float(_ndcg(h).mean())
    out["coverage@12"] = coverage(predictions, t.customer_ids, catalogue_size)
    out["n_customers"] = float(len(t))
    return out


def score_all(models: Mapping[str, Predictions], truth: Truth | Mapping[str, Iterable[str]],
              catalogue_size: int | None = None, max_k: int = 100
              ) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """``evaluate_rankings`` and ``recall_curve`` for several models on one truth.

    Returns ``(results, curves)`` keyed like ``models``, ready for
    ``comparison_table`` and ``plot_recall_curves``.
    """
    t = as_truth(truth)
    ks = (12, max_k) if max_k != 12 else (12,)
    results, curves = {}, {}
    for name, preds in models.items():
        h = _hits(preds, t, max(max_k, MAP_K))  # one pass serves the metrics and the curve
        results[name] = _headline(h, preds, t, ks, catalogue_size)
        curves[name] = _curve(h)[:max_k]
    return results, curves


# ---------------------------------------------------------------------------
# Building predictions from arrays and frames
# ---------------------------------------------------------------------------
def predictions_from_index(customer_ids: Sequence[str], article_ids: Sequence[str],
                           rows: np.ndarray) -> dict[str, list[str]]:
    """Turn an index's ``(n, k)`` row numbers into ``predictions``.

    ``rows[i, j]`` is the j-th best article (a row of ``article_ids``) for
    ``customer_ids[i]``; negative rows (padding) are dropped.
    """
    r = np.asarray(rows)
    if r.ndim != 2 or r.shape[0] != len(customer_ids):
        raise ValueError(f"rows must have shape ({len(customer_ids)}, k), got {r.shape}")
    vocab = np.asarray(list(article_ids) + [""], dtype=object)  # "" = padding slot
    names = vocab[np.where(r < 0, len(vocab) - 1, r)].tolist()
    if (r < 0).any():
        names = [[a for a in row if a] for row in names]
    return dict(zip((str(c) for c in customer_ids), names))


def predictions_from_frame(df: pd.DataFrame, rank_col: str = "rank", k: int | None = None) -> dict[str, list[str]]:
    """Long-format rankings (``customer_id, article_id, <rank_col>``; rank 1 = best) to ``predictions``."""
    if rank_col not in df.columns:
        raise ValueError(f"rankings frame: missing column {rank_col!r} (have {list(df.columns)})")
    what = "rankings frame"
    cc, cust = _codes(df, "customer_id", what)
    ac, art = _codes(df, "article_id", what)
    order = np.lexsort((df[rank_col].to_numpy(), cc))
    cc, ac = cc[order], ac[order]
    starts = np.flatnonzero(np.r_[True, cc[1:] != cc[:-1]]) if cc.size else np.zeros(0, dtype=np.int64)
    if k is not None:
        # position inside each customer's run of rows; keep the first k
        within = np.arange(cc.size) - np.repeat(starts, np.diff(np.r_[starts, cc.size]))
        keep = within < k
        cc, ac = cc[keep], ac[keep]
        starts = np.flatnonzero(np.r_[True, cc[1:] != cc[:-1]]) if cc.size else starts[:0]
    names = art[ac].tolist()
    bounds = np.r_[starts, cc.size].tolist()
    return {c: names[s:e] for c, s, e in zip(cust[cc[starts]].tolist(), bounds[:-1], bounds[1:])}


# ---------------------------------------------------------------------------
# Baselines (pure: DataFrames of transactions in, predictions out)
# ---------------------------------------------------------------------------
def popularity_ranking(tx: pd.DataFrame, k: int | None = None) -> list[str]:
    """Articles ordered by purchases (rows, so several units count several times) in ``tx``.

    Ties are broken by article_id ascending, so the order is deterministic.
    """
    import pandas as pd

    codes, art = _codes(tx, "article_id", "popularity transactions")
    counts = np.bincount(codes, minlength=len(art))
    sold = counts > 0
    table = pd.DataFrame({"n": counts[sold], "article_id": art[sold]})
    ranked = table.sort_values(["n", "article_id"], ascending=[False, True], kind="stable")["article_id"].tolist()
    return ranked if k is None else ranked[:k]


def purchased_by(tx: pd.DataFrame, customers: Iterable[str] | None = None) -> dict[str, set[str]]:
    """Distinct articles each customer bought in ``tx`` (limited to ``customers`` if given)."""
    what = "purchase history"
    return {c: set(arts) for c, arts in _distinct_by_customer(_only_customers(tx, customers, what), what)}


def _only_customers(tx: pd.DataFrame, customers: Iterable[str] | None, what: str) -> pd.DataFrame:
    """Rows of ``customers`` only (vectorised, before any per-row Python work)."""
    if customers is None:
        return tx
    if "customer_id" not in tx.columns:
        raise ValueError(f"{what}: missing column 'customer_id' (have {list(tx.columns)})")
    return tx[tx["customer_id"].isin(list(customers)).to_numpy()]


class _Filler:
    """Builds ``own + popular`` lists: no repeats, nothing banned, at most k ids.

    The popular part is copied as list slices between the few positions to
    skip, so a customer costs O(|own| + |banned|), not O(k) Python steps.
    """

    def __init__(self, popular: list[str], k: int):
        self.popular, self.k = popular, k
        self.position = {a: i for i, a in enumerate(popular)}
        self.shared = popular[:k]  # the list of everyone with nothing of their own

    def __call__(self, own: Sequence[str] = (), banned: Iterable[str] = ()) -> list[str]:
        seen = set(banned)
        if not own and not seen:
            return self.shared
        out: list[str] = []
        for a in own:
            if a not in seen:
                out.append(a)
                seen.add(a)
                if len(out) == self.k:
                    return out
        need = self.k - len(out)
        skip = sorted([i for i in map(self.position.get, seen) if i is not None])
        start = 0
        for stop in [*skip, len(self.popular)]:
            take = self.popular[start : min(stop, start + need)]
            out.extend(take)
            need -= len(take)
            if need == 0:
                break
            start = stop + 1
        return out


def popularity_baseline(last_week_tx: pd.DataFrame, customers: Iterable[str], k: int = 100,
                        exclude: Mapping[str, Iterable[str]] | None = None) -> dict[str, list[str]]:
    """The same top-k of the previous week for every customer in ``customers``.

    ``exclude`` (customer -> articles) removes each customer's articles from
    their list, which is then refilled from further down the ranking.
    Customers with nothing to exclude share one list object.
    """
    exclude = exclude or {}
    fill = _Filler(popularity_ranking(last_week_tx), k)
    return {c: fill((), exclude.get(c, ())) for c in customers}


def repurchase_ranking(recent_tx: pd.DataFrame, customers: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Each customer's own articles in ``recent_tx``, most recent first.

    Order: last purchase day descending, then number of purchases (rows)
    descending, then article_id ascending. ``recent_tx`` needs ``t_dat``.
    """
    import pandas as pd

    what = "recent transactions"
    if "t_dat" not in recent_tx.columns:
        raise ValueError(f"{what}: missing column 't_dat' (have {list(recent_tx.columns)})")
    recent_tx = _only_customers(recent_tx, customers, what)
    cc, cust = _codes(recent_tx, "customer_id", what)
    ac, art = _codes(recent_tx, "article_id", what)
    if cc.size == 0:
        return {}
    day = recent_tx["t_dat"].to_numpy().astype("datetime64[D]").astype(np.int64)
    g = (
        pd.DataFrame({"c": cc, "a": ac, "d": day})
        .groupby(["c", "a"], sort=False)["d"]
        .agg(["max", "size"])
        .reset_index()
    )
    c, a = g["c"].to_numpy(), g["a"].to_numpy()
    # ranks of the ids in string order: categories need not be sorted
    art_rank = np.argsort(np.argsort(art, kind="stable"), kind="stable")
    order = np.lexsort((art_rank[a], -g["size"].to_numpy(), -g["max"].to_numpy(), c))
    c, a = c[order], a[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    names = art[a].tolist()
    bounds = np.r_[starts, c.size].tolist()
    return {who: names[s:e] for who, s, e in zip(cust[c[starts]].tolist(), bounds[:-1], bounds[1:])}


def repurchase_popularity_baseline(recent_tx: pd.DataFrame, last_week_tx: pd.DataFrame,
                                   customers: Iterable[str], k: int = 100,
                                   exclude: Mapping[str, Iterable[str]] | None = None) -> dict[str, list[str]]:
    """Own recent articles first (``repurchase_ranking`` of ``recent_tx``), then last week's popularity.

    No repeats, at most k per customer; ``exclude`` drops articles from both parts.
    """
    customers = list(customers)
    own = repurchase_ranking(recent_tx, customers)
    exclude = exclude or {}
    fill = _Filler(popularity_ranking(last_week_tx), k)
    return {c: fill(own.get(c, ()), exclude.get(c, ())) for c in customers}


def _kernel_decay(days: np.ndarray) -> np.ndarray:
    """The published "trending products weekly" kernel's recency weight of a purchase ``days`` ago.

    ``a / sqrt(x) + b * exp(-c x) - d`` with x = max(days, 1), clipped at 0:
    a steep bonus for the last few days on top of a slow power-law tail that
    reaches zero after ~625 days (constants as published, a=2.5e4, b=1.5e5,
    c=0.2, d=1e3).
    """
    x = np.maximum(np.asarray(days, dtype=np.float64), 1.0)
    return np.maximum(2.5e4 / np.sqrt(x) + 1.5e5 * np.exp(-0.2 * x) - 1e3, 0.0)


def trending_scores(history_tx: pd.DataFrame, as_of: dt.date) -> tuple[pd.DataFrame, list[str]]:
    """The two halves of the strongest published H&M heuristic, as of ``as_of``.

    ``history_tx`` (``t_dat, customer_id, article_id``): the transactions
    before ``as_of``. Each row is weighted by its article's *trend quotient*,
    the article's sales in the last week before ``as_of`` divided by its sales
    in the row's own week (an article selling more now than when it was bought
    is trending up), so only articles sold in the last week count at all.

    Returns ``(own, trending)``: ``own`` has one row per (customer, article)
    with ``value`` = sum over the customer's purchases of quotient x
    ``_kernel_decay(days ago)``, positive values only; ``trending`` ranks the
    articles by the sum of their rows' quotients (ties by article id).
    """
    import pandas as pd

    what = "trending transactions"
    for col in ("t_dat", "customer_id", "article_id"):
        if col not in history_tx.columns:
            raise ValueError(f"{what}: missing column {col!r} (have {list(history_tx.columns)})")
    cc, cust = _codes(history_tx, "customer_id", what)
    ac, art = _codes(history_tx, "article_id", what)
    end = np.datetime64(as_of, "D").astype(np.int64)
    day = history_tx["t_dat"].to_numpy().astype("datetime64[D]").astype(np.int64)
    if (day >= end).any():
        raise ValueError(f"{what}: rows on or after {as_of} (the heuristic may only see the past)")
    week = (end - 1 - day) // 7  # 0 = the last week before as_of
    n_art = len(art)
    # sales per (week, article) and in the last week
    wkey = week * n_art + ac
    uniq, inv, counts = np.unique(wkey, return_inverse=True, return_counts=True)
    per_row_count = counts[inv]
    last = np.bincount(ac[week == 0], minlength=n_art)
    quotient = last[ac] / per_row_count
    target = np.bincount(ac, weights=quotient, minlength=n_art)
    sold = target > 0
    trend = pd.DataFrame({"s": target[sold], "article_id": art[sold]})
    trending = trend.sort_values(["s", "article_id"], ascending=[False, True], kind="stable")["article_id"].tolist()
    value = quotient * _kernel_decay(end - day)
    keep = value > 0
    own = (pd.DataFrame({"c": cc[keep], "a": ac[keep], "v": value[keep]})
           .groupby(["c", "a"], sort=False)["v"].sum().reset_index())
    own = pd.DataFrame({"customer_id": cust[own["c"].to_numpy()], "article_id": art[own["a"].to_numpy()],
                        "value": own["v"].to_numpy()})
    return own, trending


def trending_baseline(history_tx: pd.DataFrame, as_of: dt.date, customers: Iterable[str], k: int = 100,
                      exclude: Mapping[str, Iterable[str]] | None = None) -> dict[str, list[str]]:
    """Time-decayed repurchase + weekly trending: the strongest published H&M heuristic.

    The Kaggle kernel "H&M: Trending Products Weekly" (val MAP@12 0.0227, LB
    0.0217; see ``trending_scores``): each customer's own articles that still
    sell, ranked by recency-decayed, trend-weighted value (highest first),
    then the trending articles. No repeats, at most k per customer;
    ``exclude`` drops articles from both parts.
    """
    customers = list(customers)
    own, trending = trending_scores(history_tx, as_of)
    mine = own[own["customer_id"].isin(customers)]
    ranked = mine.sort_values(["value", "article_id"], ascending=[False, True], kind="stable")
    lists = predictions_from_frame(ranked.assign(rank=np.arange(len(ranked)))) if len(ranked) else {}
    exclude = exclude or {}
    fill = _Filler(trending, k)
    return {c: fill(lists.get(c, ()), exclude.get(c, ())) for c in customers}


def oracle_predictions(oracle: pd.DataFrame, k: int = 100) -> dict[str, list[str]]:
    """The generator's true top-k per buyer (``load_oracle`` frame: customer_id, article_id, prob, rank)."""
    return predictions_from_frame(oracle, rank_col="rank", k=k)


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
def comparison_table(results: Mapping[str, Mapping[str, float]], title: str | None = None) -> str:
    """Aligned text table: one row per model, one column per metric.

    Columns: recall@K by K, then the rest of ``METRIC_ORDER``, then any
    other metric by name. When a row named ``"oracle"`` is present, a last
    column gives each row's recall@12 as a fraction of the oracle's.
    """
    if not results:
        raise ValueError("comparison_table: no results to show")
    keys = {m for r in results.values() for m in r}
    recalls = sorted((m for m in keys if m.startswith("recall@") and m[7:].isdigit()), key=lambda m: int(m[7:]))
    rest = [m for m in METRIC_ORDER if m in keys and m not in recalls]
    cols = recalls + rest + sorted(keys - set(recalls) - set(rest))
    oracle = results.get(ORACLE, {}).get("recall@12")
    with_oracle = oracle is not None and oracle > 0

    def fmt(metric: str, v: float | None) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{int(v):,d}" if metric == "n_customers" else f"{v:.4f}"

    header = ["model", *cols] + (["of oracle r@12"] if with_oracle else [])
    body = []
    for name, r in results.items():
        row = [name, *(fmt(m, r.get(m)) for m in cols)]
        if with_oracle:
            rec = r.get("recall@12")
            row.append("-" if rec is None else f"{rec / oracle:.1%}")
        body.append(row)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = ([title] if title else []) + [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    return "\n".join(lines)


def plot_recall_curves(curves: Mapping[str, np.ndarray], path: Path | str, title: str = "Recall@K") -> Path:
    """PNG of Recall@K for K = 1..len(curve), one line per model; returns the path.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_recall_curves: no curves to plot")
    path = Path(path)
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        y = np.asarray(curve, dtype=float)
        style = {"linestyle": "--", "color": "black"} if name == ORACLE else {}
        ax.plot(np.arange(1, y.size + 1), y, label=f"{name} (R@12 {y[min(11, y.size - 1)]:.3f})", **style)
    ax.axvline(12, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("K (articles recommended)")
    ax.set_ylabel("Recall@K (mean over scored customers)")
    ax.set_title(title)
    ax.set_xlim(1, max(np.asarray(c).size for c in curves.values()))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# -- I/O: loaders over the warehouse, the CLI ---------------------------------
def holdout_truth(warehouse: Warehouse, split: Split) -> Truth:
    """The scored customers and their relevant sets for ``split``'s holdout week."""
    tx = warehouse.transactions(split.holdout_start, split.holdout_end, columns=["customer_id", "article_id"])
    if len(tx) == 0:
        raise ValueError(f"no transactions in the holdout week [{split.holdout_start}, {split.holdout_end}) "
                         f"of {warehouse.root}")
    return relevant_sets(tx)


def warehouse_catalogue_size(warehouse: Warehouse) -> int | None:
    """Number of articles in the warehouse's catalogue (from Parquet metadata), None if absent."""
    import pyarrow.parquet as pq

    p = warehouse.paths.articles
    return pq.ParquetFile(p).metadata.num_rows if p.exists() else None


def load_oracle_predictions(warehouse: Warehouse, week: dt.date, k: int = 100) -> dict[str, list[str]] | None:
    """The oracle's rankings for ``week`` if the warehouse holds generator truth, else None."""
    if not warehouse.paths.oracle_dir.exists():
        return None  # real Kaggle data: there is no oracle
    from hm_recsys.data.synthetic import load_oracle

    frame = load_oracle(warehouse.paths.oracle_dir, week)
    return None if frame is None else oracle_predictions(frame, k)


def baselines_for_split(warehouse: Warehouse, split: Split, k: int = 100, exclude_purchased: bool = False,
                        lookback_weeks: int = DEFAULT_LOOKBACK_WEEKS, customers: Iterable[str] | None = None,
                        include_oracle: bool = True, progress: bool = True,
                        trending_lookback_weeks: int = TRENDING_LOOKBACK_WEEKS) -> dict[str, dict[str, list[str]]]:
    """Every heuristic baseline (and the oracle if any) for ``split``'s holdout.

    * popularity: top-k by purchases in the week right before the holdout;
    * repurchase+popularity: the customer's own articles of the
      ``lookback_weeks`` weeks before the holdout, then popularity;
    * trending+decayed-repurchase (``trending_baseline``): own articles that
      still sell, by recency-decayed trend-weighted value, then weekly
      trending, over the ``trending_lookback_weeks`` weeks before the holdout;
    * ``exclude_purchased``: drop from every baseline each article the
      customer bought in the split's window before the holdout
      (``[train_start, holdout_start)``); the oracle is never filtered;
    * ``customers``: whom to rank; default the holdout's scored customers.

    Returns ``{name: predictions}`` with names ``BASELINES`` (+ ``oracle``).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if lookback_weeks < 1 or trending_lookback_weeks < 1:
        raise ValueError(f"lookback weeks must be >= 1, got {lookback_weeks} and {trending_lookback_weeks}")
    steps = tqdm(total=4, desc="baselines", unit="step", disable=not progress)
    who = list(holdout_truth(warehouse, split).customer_ids) if customers is None else list(customers)
    steps.update()
    cols = ["t_dat", "customer_id", "article_id"]
    last_week = warehouse.transactions(split.last_week_start, split.holdout_start, columns=cols)
    if len(last_week) == 0:
        raise ValueError(f"no transactions in the week before the holdout [{split.last_week_start}, "
                         f"{split.holdout_start})")
    recent_start = split.holdout_start - dt.timedelta(weeks=lookback_weeks)
    trend_start = split.holdout_start - dt.timedelta(weeks=trending_lookback_weeks)
    history_start = min(recent_start, trend_start, split.train_start) if exclude_purchased \
        else min(recent_start, trend_start)
    history = warehouse.transactions(history_start, split.holdout_start, columns=cols)
    steps.update()
    exclude = None
    if exclude_purchased:
        exclude = purchased_by(history[history["t_dat"] >= pd.Timestamp(split.train_start)], who)
    recent = history[history["t_dat"] >= pd.Timestamp(recent_start)]
    trend = history[history["t_dat"] >= pd.Timestamp(trend_start)]
    out: dict[str, dict[str, list[str]]] = {
        POPULARITY: popularity_baseline(last_week, who, k, exclude),
        REPURCHASE: repurchase_popularity_baseline(recent, last_week, who, k, exclude),
        TRENDING: trending_baseline(trend, split.holdout_start, who, k, exclude),
    }
    steps.update()
    if include_oracle:
        oracle = load_oracle_predictions(warehouse, split.holdout_start, k)
        if oracle is not None:
            out[ORACLE] = oracle
    steps.update()
    steps.close()
    return out


def best_baseline(results: Mapping[str, Mapping[str, float]], metric: str = "recall@12") -> str:
    """The name of the heuristic baseline (of ``BASELINES`` present in ``results``) with the highest ``metric``."""
    present = [b for b in BASELINES if b in results]
    if not present:
        raise ValueError(f"no baseline among {list(results)}")
    return max(present, key=lambda b: (results[b][metric], -BASELINES.index(b)))




def main(argv: list[str] | None = None) -> int:
    """``hm-recsys evaluate``: score the baselines (and the oracle) on a holdout week."""
    from hm_recsys.config import Settings
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.split import Split

    p = argparse.ArgumentParser(
        prog="hm-recsys evaluate",
        description="Score the heuristic baselines (last-week popularity, repurchase+popularity, time-decayed "
                    "repurchase + weekly trending) and the generator's oracle, when the data is synthetic, on one "
                    "holdout week and print the comparison table.",
    )
    p.add_argument("--warehouse", type=Path, metavar="DIR", help="warehouse folder (default $HM_RECSYS_HOME/data/warehouse)")
    p.add_argument("--holdout-week", type=iso_date, metavar="YYYY-MM-DD",
                   help="a day in the holdout week (default: the last complete week in the warehouse)")
    p.add_argument("--train-weeks", type=int, default=12, metavar="N", help="training weeks before the validation week (default 12)")
    p.add_argument("--exclude-purchased", action="store_true",
                   help="drop articles each customer bought in the split's window from the baselines")
    p.add_argument("--lookback-weeks", type=int, default=DEFAULT_LOOKBACK_WEEKS, metavar="N",
                   help=f"weeks of own history for repurchase (default {DEFAULT_LOOKBACK_WEEKS})")
    p.add_argument("--k", type=int, default=100, metavar="K", help="list length per customer (default 100)")
    p.add_argument("--plot", type=Path, metavar="PATH", help="also write the Recall@K curves as a PNG here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    a = p.parse_args(argv)
    if a.k < MAP_K:
        p.error(f"--k must be >= {MAP_K}")

    warehouse = Warehouse(a.warehouse or Settings.from_env().layout.warehouse_dir)
    try:
        split = Split.from_warehouse(warehouse, train_weeks=a.train_weeks, holdout_week=a.holdout_week)
        truth = holdout_truth(warehouse, split)
        models = baselines_for_split(warehouse, split, k=a.k, exclude_purchased=a.exclude_purchased,
                                     lookback_weeks=a.lookback_weeks, customers=truth.customer_ids,
                                     progress=not a.no_progress)
    except (ValueError, RuntimeError) as e:  # WarehouseEmpty is a RuntimeError
        print(f"hm-recsys evaluate: {e}", file=sys.stderr)
        return 1
    results, curves = score_all(models, truth, warehouse_catalogue_size(warehouse), max_k=a.k)
    week = f"{split.holdout_start}..{split.holdout_end - dt.timedelta(days=1)}"
    title = (f"holdout week {week}: {len(truth):,} scored customers"
             f"{', purchased articles excluded' if a.exclude_purchased else ''}")
    print(comparison_table(results, title=title))
    if ORACLE not in models:
        print("(no oracle: the warehouse holds no generator truth for this week)")
    if a.plot:
        path = plot_recall_curves(curves, a.plot, title=f"Recall@K, holdout week {week}")
        print(f"recall curves: {path}")
    return 0
