"""Candidate sources and their features: what heuristics know, next to the towers.

Published H&M solutions that worked (see docs/model.md) pool candidates from
several sources and rank them together; a two-tower model alone does not beat
"buy again what you bought" + "what sells now". Here every candidate of a
customer comes from at least one source:

* ``two_tower``: the ``two_tower_k`` nearest articles to the customer's query
  embedding, through the served index (ScaNN);
* ``repurchase``: the customer's own recent distinct purchases (the feature
  history, at most ``features.history_length`` within ``history_weeks``);
* ``item_to_item``: co-purchase neighbours of those purchases (articles that
  customers who bought one also bought within ``item_to_item_weeks``),
  aggregated with recency weights, best ``item_to_item_k`` kept;
* ``same_product``: the other articles (colours, sizes) of the product codes
  the customer bought;
* ``trending``: the ``trending_k`` articles with most recency-decayed sales
  (the same list for everyone);
* ``age_trending``: the ``age_trending_k`` articles with most recency-decayed
  sales among customers of the customer's age bucket (published H&M solutions
  answer cold customers with popularity by age; it is one list per bucket).

Candidates are restricted to articles sold within the last
``sold_within_weeks`` weeks (0 = no restriction): the index itself only holds
those. Each (customer, candidate) pair carries one value per ``FEATURES`` name,
whatever source(s) proposed it, so the fusion (``hm_recsys.fusion``) can
weigh them:

* ``two_tower``: cosine of query and article embeddings (always computed, exact);
* ``repurchase``: ``0.5 ** (days_ago / recency_half_life_days)`` of the
  customer's latest purchase of the article (0 if never);
* ``item_to_item``: sum over the customer's purchases h of recency weight(h) x
  P(article | h) (share of h's buyers who also bought the article);
* ``same_product``: largest recency weight of a purchase of the same product code;
* ``trending``: ``log1p`` of recency-decayed sales over ``trending_weeks`` weeks;
* ``age_trending``: the same within the customer's age bucket (``features.age_edges``);
* ``last_week``: ``log1p`` of the article's sales in the last week.

Nothing here depends on the list length a caller asks for: the candidate set
of a customer is fixed by the state and this config, so the top 12 of a
request is always the prefix of the top 100 the evaluation scored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hm_recsys.arrays import unique
from hm_recsys.features import History, config_from_dict, config_to_dict

SOURCES = ("two_tower", "repurchase", "item_to_item", "same_product", "trending", "age_trending")
FEATURES = ("two_tower", "repurchase", "item_to_item", "same_product", "trending", "age_trending", "last_week")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RetrievalConfig:
    """Which candidate sources feed the served ranking, and how much of each (config section ``[retrieval]``).

    Attributes:
        sources: candidate sources, from ``SOURCES``.
        features: what the fusion may weigh, from ``FEATURES`` (each source's own
            feature plus ``last_week``); an empty tuple = all.
        two_tower_k: nearest articles asked of the index per customer.
        trending_k: trending articles offered to everyone (also the floor of a list's length).
        age_trending_k: trending articles of the customer's age bucket offered.
        item_to_item_k: co-purchase candidates kept per customer (best aggregated score).
        item_to_item_neighbours: neighbours stored per article.
        item_to_item_weeks: co-purchases counted within this many weeks before the state's date (at most
            ``features.history_weeks``: they are counted over the customers' feature histories).
        recency_half_life_days: half-life of the recency weight of a customer's purchase.
        trending_weeks: weeks of sales in the trending score.
        trending_half_life_weeks: half-life of a week's sales in the trending score.
        sold_within_weeks: only articles sold in the last N weeks are candidates (0 = all).
        fusion_prior: strength of the fusion fit's Gaussian prior on its weights, in customers: the
            penalty on the mean per-customer loss is ``fusion_prior / n_customers * |w|^2`` (standardised
            features), so a sparse validation set (MovieLens: ~150 customers) is held near zero and an
            H&M week (tens of thousands) speaks for itself.
    """

    sources: tuple[str, ...] = SOURCES
    features: tuple[str, ...] = ()
    two_tower_k: int = 100
    trending_k: int = 100
    age_trending_k: int = 50
    item_to_item_k: int = 50
    item_to_item_neighbours: int = 20
    item_to_item_weeks: int = 8
    recency_half_life_days: float = 14.0
    trending_weeks: int = 4
    trending_half_life_weeks: float = 1.0
    sold_within_weeks: int = 4
    fusion_prior: float = 10.0

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise ValueError(f"retrieval.sources: unknown or no source(s) {unknown}; choose from {list(SOURCES)}")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"retrieval.features: unknown feature(s) {unknown}; choose from {list(FEATURES)}")
        for k in ("two_tower_k", "trending_k", "age_trending_k", "item_to_item_k", "item_to_item_neighbours", "item_to_item_weeks",
                  "trending_weeks"):
            if getattr(self, k) < 1:
                raise ValueError(f"retrieval.{k} must be >= 1, got {getattr(self, k)}")
        if self.sold_within_weeks < 0 or self.fusion_prior < 0:
            raise ValueError("retrieval.sold_within_weeks and fusion_prior must be >= 0")
        if self.recency_half_life_days <= 0 or self.trending_half_life_weeks <= 0:
            raise ValueError("retrieval half-lives must be > 0")

    @property
    def fusion_features(self) -> tuple[str, ...]:
        return self.features or FEATURES

    def lookback_weeks(self) -> int:
        """Weeks of transactions before the state's date that the candidate tables read."""
        return max(self.item_to_item_weeks, self.trending_weeks, self.sold_within_weeks, 1)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetrievalConfig:
        return config_from_dict(cls, d, "retrieval")


# ---------------------------------------------------------------------------
# Tables: everything the sources need, as of one date
# ---------------------------------------------------------------------------
@dataclass
class CandidateTables:
    """Article-side facts of the candidate sources as of ``as_of``. Arrays over catalogue rows (N).

    ``nb_*`` is a CSR of co-purchase neighbours (row a holds up to
    ``item_to_item_neighbours`` articles, best first, with P(b | a));
    ``pc_*`` groups catalogue rows by product code.
    """

    as_of: dt.date
    allowed: np.ndarray  # bool (N,): sold within sold_within_weeks
    trend: np.ndarray  # float32 (N,): log1p(decayed sales)
    last_week: np.ndarray  # float32 (N,): log1p(last week's sales)
    trending_top: np.ndarray  # int64 (<= trending_k,): allowed rows by trend, best first
    age_trend: np.ndarray  # float32 (n_age_buckets, N): log1p(decayed sales) within each age bucket
    age_top: np.ndarray  # int64 (n_age_buckets, age_trending_k): allowed rows by age_trend, -1 padded
    nb_indptr: np.ndarray  # int64 (N + 1,)
    nb_rows: np.ndarray  # int32
    nb_scores: np.ndarray  # float32
    product: np.ndarray  # int64 (N,): product-code group of each row
    pc_indptr: np.ndarray  # int64 (n_products + 1,)
    pc_rows: np.ndarray  # int32: rows sorted by product group

    @property
    def n_articles(self) -> int:
        return int(self.allowed.size)

    def save(self, path: Path) -> None:
        np.savez(path, format_version=np.array(FORMAT_VERSION), as_of=np.array(self.as_of.isoformat()),
                 **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "as_of"})

    @classmethod
    def load(cls, path: Path) -> CandidateTables:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"{path}: candidate tables format {int(z['format_version'])}, "
                                 f"this code reads {FORMAT_VERSION}")
            kw = {f.name: z[f.name] for f in dataclasses.fields(cls) if f.name != "as_of"}
            return cls(as_of=dt.date.fromisoformat(str(z["as_of"])), **kw)


def build_tables(config: RetrievalConfig, as_of: dt.date, weekly_sales: Mapping[dt.date, np.ndarray],
                 history: History, product_codes: Sequence[str] | np.ndarray) -> CandidateTables:
    """The candidate tables as of ``as_of`` (a Wednesday).

    Args:
        weekly_sales: week start -> ``int (n_age_buckets, N)`` purchases per
            customer age bucket and catalogue row, for (at least) the
            ``config.lookback_weeks()`` weeks before ``as_of``; missing weeks
            count as no sales.
        history: customers' recent distinct purchases as of ``as_of``
            (``features.History``); the co-purchase table is counted from it.
        product_codes: ``(N,)`` product code of each catalogue row.
    """
    import pandas as pd

    n = len(product_codes)
    buckets = next(iter(weekly_sales.values())).shape[0] if weekly_sales else 1
    zero = np.zeros((buckets, n), dtype=np.float64)

    def sales(weeks_ago: int) -> np.ndarray:
        return np.asarray(weekly_sales.get(as_of - dt.timedelta(weeks=weeks_ago), zero), dtype=np.float64)

    by_age = sum(sales(w) * 0.5 ** ((w - 1) / config.trending_half_life_weeks)
                 for w in range(1, config.trending_weeks + 1))
    decayed = by_age.sum(axis=0)
    last = sales(1).sum(axis=0)
    if config.sold_within_weeks:
        allowed = sum(sales(w).sum(axis=0) for w in range(1, config.sold_within_weeks + 1)) > 0
    else:
        allowed = np.ones(n, dtype=bool)
    trend = np.log1p(decayed).astype(np.float32)
    age_trend = np.log1p(by_age).astype(np.float32)
    trending_top = _best(trend, allowed, config.trending_k)
    age_top = np.full((buckets, config.age_trending_k), -1, dtype=np.int64)
    for b in range(buckets):
        top = _best(age_trend[b], allowed & (by_age[b] > 0), config.age_trending_k)
        age_top[b, :top.size] = top
    nb_indptr, nb_rows, nb_scores = co_purchase(history, n, config.item_to_item_weeks * 7,
                                                config.item_to_item_neighbours, allowed)
    codes = pd.Index(np.asarray(product_codes, dtype=object))
    product = np.asarray(codes.factorize()[0], dtype=np.int64)
    pc_rows = np.argsort(product, kind="stable").astype(np.int32)
    pc_indptr = np.r_[0, np.cumsum(np.bincount(product, minlength=int(product.max(initial=-1)) + 1))].astype(np.int64)
    return CandidateTables(as_of, allowed, trend, np.log1p(last).astype(np.float32), trending_top, age_trend, age_top,
                           nb_indptr, nb_rows, nb_scores, product, pc_indptr, pc_rows)


def _best(score: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` allowed rows by ``score`` descending (ties: lower row first)."""
    order = np.lexsort((np.arange(score.size), -score))
    return order[allowed[order]][:k].astype(np.int64)


def co_purchase(history: History, n_articles: int, within_days: int, neighbours: int,
                allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top co-purchase neighbours of every article: CSR ``(indptr (N+1,), rows, P(b | a))``.

    Counted over the customers' distinct purchases of the last ``within_days``
    days in ``history``: C[a, b] = customers who bought both, P(b | a) =
    C[a, b] / buyers(a). Only ``allowed`` articles are kept as neighbours;
    ties are broken by row, so the table is reproducible.
    """
    import scipy.sparse as sp

    keep = history.days_ago <= within_days
    counts = np.diff(history.indptr)
    owner = np.repeat(np.arange(len(history)), counts)[keep]
    arts = history.article_rows[keep].astype(np.int64)
    if arts.size == 0:
        return np.zeros(n_articles + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    x = sp.csr_matrix((np.ones(arts.size, dtype=np.float32), (owner, arts)), shape=(len(history), n_articles))
    x.sum_duplicates()
    x.data[:] = 1.0
    buyers = np.asarray(x.sum(axis=0)).ravel()
    c = (x.T @ x).tocoo()
    a, b, v = c.row.astype(np.int64), c.col.astype(np.int64), c.data.astype(np.float64)
    ok = (a != b) & allowed[b]
    a, b, v = a[ok], b[ok], v[ok]
    p = v / np.maximum(buyers[a], 1.0)
    order = np.lexsort((b, -p, a))
    a, b, p = a[order], b[order], p[order]
    top = _rank_in_group(a) < neighbours
    a, b, p = a[top], b[top], p[top]
    indptr = np.r_[0, np.cumsum(np.bincount(a, minlength=n_articles))].astype(np.int64)
    return indptr, b.astype(np.int32), p.astype(np.float32)


# ---------------------------------------------------------------------------
# Generation: the candidates of a batch of customers, with features
# ---------------------------------------------------------------------------
@dataclass
class Candidates:
    """Candidate pairs of a batch of B customers, grouped by customer (ascending), rows ascending within.

    ``group[i]`` is the batch position of pair i, ``rows[i]`` its catalogue
    row, ``features[i]`` its values in ``FEATURES`` order; ``bought[i]``
    says the customer bought the article within the history window.
    """

    group: np.ndarray  # int64 (P,)
    rows: np.ndarray  # int64 (P,)
    features: np.ndarray  # float32 (P, len(FEATURES))
    bought: np.ndarray  # bool (P,)
    n_customers: int

    def column(self, name: str) -> np.ndarray:
        return self.features[:, FEATURES.index(name)]


def generate(config: RetrievalConfig, tables: CandidateTables, history: History, history_rows: np.ndarray,
             segments: np.ndarray, queries: np.ndarray, article_embeddings: np.ndarray, search) -> Candidates:
    """Pool every source's candidates for B customers and compute their features.

    Args:
        history: the customers' recent purchases (``History``) as of ``tables.as_of``.
        history_rows: ``(B,)`` each customer's row in ``history`` (-1: no history, e.g. unknown).
        segments: ``(B,)`` each customer's age bucket (row of ``tables.age_trend``).
        queries: ``float32 (B, d)`` query embeddings.
        article_embeddings: ``float32 (N, d)``, row = catalogue row.
        search: ``search(queries, k) -> (rows int64 (B, k'), scores)`` over allowed catalogue rows
            (padding rows < 0 are ignored).
    """
    cfg = config
    b = queries.shape[0]
    n = tables.n_articles
    hl = cfg.recency_half_life_days
    groups: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    # -- own purchases: seeds of repurchase, item_to_item and same_product
    hr = np.asarray(history_rows, dtype=np.int64)
    start, count = _positions(history, hr)
    own_g = np.repeat(np.arange(b), count)
    src = _expand(start, count)
    own_a = history.article_rows[src].astype(np.int64)
    own_w = np.power(0.5, history.days_ago[src].astype(np.float64) / hl)
    if "two_tower" in cfg.sources:
        found, _ = search(queries, min(cfg.two_tower_k, int(tables.allowed.sum()) or 1))
        found = np.asarray(found, dtype=np.int64)
        g = np.repeat(np.arange(b), found.shape[1])
        f = found.ravel()
        groups.append(g[f >= 0])
        rows.append(f[f >= 0])
    if "repurchase" in cfg.sources:
        groups.append(own_g)
        rows.append(own_a)
    if "trending" in cfg.sources and tables.trending_top.size:
        groups.append(np.repeat(np.arange(b), tables.trending_top.size))
        rows.append(np.tile(tables.trending_top, b))
    seg = np.asarray(segments, dtype=np.int64)
    if "age_trending" in cfg.sources:
        top = tables.age_top[seg]  # (B, age_trending_k), -1 padded
        g = np.repeat(np.arange(b), top.shape[1])
        f = top.ravel()
        groups.append(g[f >= 0])
        rows.append(f[f >= 0])
    i2i_key = i2i_val = None
    if own_a.size and ("item_to_item" in cfg.sources or "item_to_item" in cfg.fusion_features):
        nb_start = tables.nb_indptr[own_a]
        nb_count = tables.nb_indptr[own_a + 1] - nb_start
        g = np.repeat(own_g, nb_count)
        pos = _expand(nb_start, nb_count)
        a = tables.nb_rows[pos].astype(np.int64)
        v = np.repeat(own_w, nb_count) * tables.nb_scores[pos]
        i2i_key, inv = np.unique(g * n + a, return_inverse=True)
        i2i_val = np.bincount(inv, weights=v, minlength=i2i_key.size)
        if "item_to_item" in cfg.sources:
            kg, ka = np.divmod(i2i_key, n)
            order = np.lexsort((ka, -i2i_val, kg))
            pick = order[_rank_in_group(kg[order]) < cfg.item_to_item_k]
            groups.append(kg[pick])
            rows.append(ka[pick])
    sp_key = sp_val = None
    if own_a.size and ("same_product" in cfg.sources or "same_product" in cfg.fusion_features):
        prod = tables.product[own_a]
        p_start = tables.pc_indptr[prod]
        p_count = tables.pc_indptr[prod + 1] - p_start
        g = np.repeat(own_g, p_count)
        pos = _expand(p_start, p_count)
        a = tables.pc_rows[pos].astype(np.int64)
        w = np.repeat(own_w, p_count)
        other = a != np.repeat(own_a, p_count)
        sp_key, sp_val = _max_by_key(g[other] * n + a[other], w[other])
        if "same_product" in cfg.sources:
            kg, ka = np.divmod(sp_key, n)
            groups.append(kg)
            rows.append(ka)
    # -- the pool: unique (customer, article) pairs of allowed articles
    if groups:
        key = unique(np.concatenate(groups) * n + np.concatenate(rows))
    else:
        key = np.zeros(0, dtype=np.int64)
    g, a = np.divmod(key, n)
    ok = tables.allowed[a]
    key, g, a = key[ok], g[ok], a[ok]
    feats = np.zeros((key.size, len(FEATURES)), dtype=np.float32)
    # two_tower: exact cosine of every pair, chunked so (pairs, d) stays small
    for s in range(0, key.size, 1 << 18):
        sl = slice(s, s + (1 << 18))
        # a row-wise sum, not einsum/BLAS: a pair's value must not depend on its batch
        feats[sl, 0] = (queries[g[sl]].astype(np.float64) * article_embeddings[a[sl]]).sum(axis=1)
    rep_key, rep_val = _max_by_key(own_g * n + own_a, own_w)
    feats[:, 1] = _lookup(key, rep_key, rep_val)
    if i2i_key is not None:
        feats[:, 2] = _lookup(key, i2i_key, i2i_val)
    if sp_key is not None:
        feats[:, 3] = _lookup(key, sp_key, sp_val)
    feats[:, 4] = tables.trend[a]
    feats[:, 5] = tables.age_trend[seg[g], a]
    feats[:, 6] = tables.last_week[a]
    return Candidates(g, a, feats, feats[:, 1] > 0, b)


def _expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Positions ``starts[i] .. starts[i] + counts[i] - 1`` of every i, concatenated (a CSR gather)."""
    total = int(counts.sum())
    return np.repeat(starts, counts) + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted ``groups`` array."""
    if groups.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(groups.size) - np.repeat(starts, np.diff(np.r_[starts, groups.size]))


def _positions(history: History, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, count) of each row's entries in ``history``; rows < 0 or absent -> (0, 0)."""
    start, count = history._positions(np.maximum(rows, 0))
    count = np.where(rows >= 0, count, 0)
    return start, count


def _max_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ``keys`` (ascending) and the largest value of each."""
    if keys.size == 0:
        return keys.astype(np.int64), values.astype(np.float64)
    uniq, inv = np.unique(keys, return_inverse=True)
    out = np.full(uniq.size, -np.inf)
    np.maximum.at(out, inv, values)
    return uniq, out


def _lookup(keys: np.ndarray, table_keys: np.ndarray, table_values: np.ndarray) -> np.ndarray:
    """``table_values`` at each of ``keys`` (sorted ``table_keys``), 0 where absent."""
    if table_keys.size == 0 or keys.size == 0:
        return np.zeros(keys.size, dtype=np.float32)
    pos = np.minimum(np.searchsorted(table_keys, keys), table_keys.size - 1)
    hit = table_keys[pos] == keys
    return np.where(hit, table_values[pos], 0.0).astype(np.float32)


def top_k(cands: Candidates, scores: np.ndarray, k: int, exclude_bought: bool = False
          ) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` candidates of each customer by ``scores`` (ties: lower catalogue row first).

    Returns ``(rows int64 (B, k), scores float32 (B, k))``, padded with -1 / -inf
    where a customer has fewer candidates.
    """
    keep = ~cands.bought if exclude_bought else np.ones(cands.rows.size, dtype=bool)
    g, a, s = cands.group[keep], cands.rows[keep], scores[keep]
    order = np.lexsort((a, -s, g))
    g, a, s = g[order], a[order], s[order]
    rank = _rank_in_group(g)
    top = rank < k
    out_rows = np.full((cands.n_customers, k), -1, dtype=np.int64)
    out_scores = np.full((cands.n_customers, k), -np.inf, dtype=np.float32)
    out_rows[g[top], rank[top]] = a[top]
    out_scores[g[top], rank[top]] = s[top]
    return out_rows, out_scores
