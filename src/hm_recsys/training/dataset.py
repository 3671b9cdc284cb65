"""Warehouse -> training data: weekly example shards, fitted features, validation weeks, and the batches.

``prepare`` replays the warehouse week by week (``features.Replay``) up to
the holdout week. For each training week, the examples are that week's
(customer, article) purchases with the customer's history *as of the week's
start* (no leakage from the future); they go to one NPZ shard per week under
the run's scratch folder, so memory is bounded by one week plus the history
lookback, whatever the window. Vocabularies are then fitted on the training
weeks only. The validation weeks keep their buyers' purchases and the
features as of each week's start; the holdout's start gives the bundle's
snapshot.

``iterate_batches`` reads the shards back as encoded batches: B positives of
one week plus ``uniform_negatives`` articles drawn uniformly from the
catalogue, each candidate with ``log Q``, its expected count in the candidate
set (``B * q_week(a) + M / n_articles``), for the loss's sampling-bias
correction (``training.fit``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm_recsys.features import ArticleRaw, FeatureState, History, Replay, Tables

if TYPE_CHECKING:
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.split import Split
    from hm_recsys.training.config import Config


# ---------------------------------------------------------------------------
# Data preparation: replay the warehouse once, write weekly shards
# ---------------------------------------------------------------------------
@dataclass
class ValidWeek:
    """One validation week: features as of its start and its (sampled) buyers' purchases."""

    as_of: dt.date
    history: History
    raw: ArticleRaw
    truth: dict[str, list[str]]


@dataclass
class Prepared:
    """Everything training and evaluation need, with the big parts on disk (``shards``)."""

    tables: Tables
    state: FeatureState
    article_static: dict[str, np.ndarray]
    customer_static: np.ndarray  # (n_customers + 1, n_static)
    shards: list[Path]
    n_examples: int
    valid: list[ValidWeek]  # the validation weeks, oldest first
    end_history: History  # as of holdout_start: the bundle's snapshot
    end_raw: ArticleRaw
    data_window: dict[str, Any]


def fingerprint(files: Sequence[Path], root: Path) -> str:
    """SHA-256 over each file's path (relative to ``root``), size and bytes, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _dedupe(cust: np.ndarray, art: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each (customer, article) pair, in original order."""
    key = cust.astype(np.int64) * (int(art.max()) + 1 if art.size else 1) + art
    _, first = np.unique(key, return_index=True)
    return np.sort(first)


def prepare(warehouse: Warehouse, split: Split, config: Config, scratch: Path, progress: bool = True) -> Prepared:
    """Replay the warehouse up to the holdout week: shards, fitted features, validation data."""
    fc, tc = config.features, config.train
    tables = Tables(warehouse.articles(), warehouse.customers())
    replay = Replay(tables, fc)
    scratch.mkdir(parents=True, exist_ok=True)
    n_art = tables.n_articles
    art_counts = np.zeros(n_art, dtype=np.int64)
    cust_counts = np.zeros(tables.n_customers, dtype=np.int64)
    price_sum = np.zeros(n_art, dtype=np.float64)
    price_n = np.zeros(n_art, dtype=np.int64)
    shards: list[Path] = []
    n_examples = 0
    valid: list[tuple[dt.date, History, ArticleRaw, Any]] = []
    history_from = split.train_start - dt.timedelta(weeks=fc.history_weeks)
    for week, rows in replay.weeks(warehouse, split.holdout_start, history_from=history_from, progress=progress,
                                   desc="replay weeks"):
        if split.train_start <= week < split.train_end:
            np.add.at(cust_counts, rows.customer_rows, 1)
            art_counts += np.bincount(rows.article_rows, minlength=n_art)
            priced = ~np.isnan(rows.prices)
            price_sum += np.bincount(rows.article_rows[priced], weights=rows.prices[priced], minlength=n_art)
            price_n += np.bincount(rows.article_rows[priced], minlength=n_art)
            keep = _dedupe(rows.customer_rows, rows.article_rows) if tc.dedupe_week else np.arange(len(rows))
            cust, art = rows.customer_rows[keep], rows.article_rows[keep]
            if cust.size < 2:
                continue
            hist = replay.history_at(week).subset(cust)
            raw = replay.article_raw_at(week)
            path = scratch / f"week={week.isoformat()}.npz"
            np.savez(path, customer_rows=cust, article_rows=art, h_customer_rows=hist.customer_rows,
                     h_indptr=hist.indptr, h_article_rows=hist.article_rows, h_days_ago=hist.days_ago,
                     age_days=raw.age_days, sales_last_week=raw.sales_last_week, mean_price=raw.mean_price,
                     as_of=np.array(week.isoformat()))
            shards.append(path)
            n_examples += int(cust.size)
        elif split.valid_start <= week < split.holdout_start and len(rows):
            valid.append((week, replay.history_at(week).subset(rows.customer_rows), replay.article_raw_at(week), rows))
    if not shards:
        raise ValueError(f"no training examples in {split.describe()} of {warehouse.root}")
    if not valid:
        raise ValueError(f"the validation weeks [{split.valid_start}, {split.holdout_start}) have no transactions "
                         f"in {warehouse.root}")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_price = np.where(price_n > 0, price_sum / np.maximum(price_n, 1), np.nan)
    state = FeatureState.fit(fc, tables, art_counts, cust_counts, mean_price)
    ids_c, ids_a = np.asarray(tables.customer_index), np.asarray(tables.article_index)
    truths: list[dict[str, set[str]]] = []
    for _, _, _, vrows in valid:
        truth: dict[str, set[str]] = {}
        for c, a in zip(vrows.customer_rows.tolist(), vrows.article_rows.tolist()):
            truth.setdefault(ids_c[c], set()).add(ids_a[a])
        truths.append(truth)
    pairs = [(i, c) for i, t in enumerate(truths) for c in sorted(t)]  # scored customer-weeks
    if tc.valid_max_customers and len(pairs) > tc.valid_max_customers:
        pick = set(np.random.default_rng(tc.seed).choice(len(pairs), tc.valid_max_customers, replace=False).tolist())
        kept = [p for j, p in enumerate(pairs) if j in pick]
        truths = [{c: truths[i][c] for j, c in kept if j == i} for i in range(len(truths))]
    valid_weeks = [ValidWeek(week, hist, raw, {c: sorted(v) for c, v in t.items()})
                   for (week, hist, raw, _), t in zip(valid, truths) if t]
    files = [warehouse.paths.articles, warehouse.paths.customers]
    weeks_read = [w for w in warehouse.weeks() if w < split.holdout_start]
    for w in weeks_read:
        files += warehouse.part_files(w)
    window = {
        "split": split.to_dict(),
        "describe": split.describe(),
        "history_weeks": fc.history_weeks,
        "weeks_read": [weeks_read[0].isoformat(), weeks_read[-1].isoformat()] if weeks_read else [],
        "data_sha256": fingerprint(files, warehouse.root),
        "data_files": len(files),
        "n_train_examples": n_examples,
        "n_train_customers": int((cust_counts > 0).sum()),
        "n_train_articles": int((art_counts > 0).sum()),
        "n_valid_customer_weeks": int(sum(len(v.truth) for v in valid_weeks)),
        "n_articles": n_art,
        "n_customers": tables.n_customers,
        "history_as_of": split.holdout_start.isoformat(),
    }
    return Prepared(tables, state, state.article_static(tables.articles), state.customer_static(tables.customers),
                    shards, n_examples, valid_weeks,
                    replay.history_at(split.holdout_start), replay.article_raw_at(split.holdout_start), window)


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------
@dataclass
class Batch:
    """One training batch, encoded. B positives, C = B + M candidates."""

    cust_cats: np.ndarray  # int64 (B, n_customer_features)
    hist: np.ndarray  # int64 (B, L, n_history_features)
    weights: np.ndarray  # float32 (B, L)
    cand_rows: np.ndarray  # int64 (C,) catalogue rows; the first B are the positives
    cand_cats: np.ndarray  # int64 (U, n_article_features), unique candidates
    cand_inverse: np.ndarray  # int64 (C,) -> row of cand_cats
    log_q: np.ndarray  # float32 (C,)
    customer_rows: np.ndarray  # int64 (B,)


def _load_shard(path: Path) -> tuple[np.ndarray, np.ndarray, History, ArticleRaw]:
    with np.load(path, allow_pickle=False) as z:
        as_of = dt.date.fromisoformat(str(z["as_of"]))
        hist = History(as_of, z["h_customer_rows"], z["h_indptr"], z["h_article_rows"], z["h_days_ago"])
        raw = ArticleRaw(as_of, z["age_days"], z["sales_last_week"], z["mean_price"])
        return z["customer_rows"].astype(np.int64), z["article_rows"].astype(np.int64), hist, raw


def iterate_batches(prep: Prepared, config: Config, rng: np.random.Generator) -> Iterator[Batch]:
    """One epoch: shards in random order, rows shuffled within a shard, ``batch_size`` per batch."""
    tc = config.train
    state = prep.state
    hist_table = state.history_table(prep.article_static)
    cust_id_col = state.config.customer.index("customer_id") if "customer_id" in state.config.customer else None
    art_id_col = state.config.article.index("article_id") if "article_id" in state.config.article else None
    n_art = prep.tables.n_articles
    for i in rng.permutation(len(prep.shards)):
        cust, art, hist, raw = _load_shard(prep.shards[i])
        matrix = state.article_matrix(prep.article_static, raw)
        q_week = np.bincount(art, minlength=n_art) / art.size  # sampling probability of a positive
        order = rng.permutation(art.size)
        for s in range(0, order.size, tc.batch_size):
            idx = order[s:s + tc.batch_size]
            if idx.size < 2:
                continue
            b = idx.size
            cr, ar = cust[idx], art[idx]
            cats, h, w = state.customer_inputs(prep.customer_static[cr], hist, cr, hist_table)
            if tc.id_dropout and cust_id_col is not None:
                cats[rng.random(b) < tc.id_dropout, cust_id_col] = 0
            neg = rng.integers(0, n_art, tc.uniform_negatives)
            cand = np.concatenate([ar, neg])
            uniq, inv = np.unique(cand, return_inverse=True)
            ccats = matrix[uniq]
            if tc.id_dropout and art_id_col is not None:
                ccats[rng.random(uniq.size) < tc.id_dropout, art_id_col] = 0
            expected = b * q_week[cand] + tc.uniform_negatives / n_art
            yield Batch(cats, h, w, cand, ccats, inv, np.log(expected).astype(np.float32), cr)
