"""``hm-recsys train``: fit the two towers on a time split and log the run to MLflow.

One run, in order:

1. Split (``hm_recsys.split.Split``): ``train_weeks`` training weeks, the
   validation week (early stopping), the holdout week (final metrics).
2. Replay the warehouse week by week (``features.Replay``). For each training
   week, the examples are that week's (customer, article) purchases with the
   customer's history *as of the week's start* (no leakage from the future);
   they go to one NPZ shard per week under the run's scratch folder, so
   memory is bounded by one week plus the history lookback, whatever the
   window. Vocabularies are then fitted on the training weeks only.
3. Train with an in-batch sampled softmax (``in_batch_softmax_loss``): the B
   positives of a batch (all from one week) plus ``uniform_negatives``
   articles drawn uniformly from the catalogue are the candidates; logits are
   ``cos / temperature - log Q`` where Q is a candidate's expected count in
   the candidate set (``B * q_week(a) + M / n_articles``: the logQ sampling-
   bias correction, without which popular articles are over-penalised as
   negatives); other rows' copies of a row's positive (accidental hits) and
   the same customer's other purchases are masked out. Sparse gradients
   (SparseAdam) for the id tables, Adam for the rest. Early stopping on the
   validation week's Recall@12; the best epoch's weights are kept.
4. Evaluate on the holdout week with histories as of its start, next to the
   popularity and repurchase+popularity baselines and, on generated data, the
   oracle (``hm_recsys.evaluate``).
5. Write the bundle (``hm_recsys.bundle``) and log params, per-epoch metrics,
   final metrics, plots and the pyfunc model to MLflow (``hm_recsys.tracking``).

Typed config: ``Config`` = ``FeatureConfig`` + ``ModelConfig`` + ``TrainConfig``,
read from a TOML file (``configs/two_tower.toml`` documents every option) with
``--set section.key=value`` overrides, saved with every model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import shutil
import sys
import time
import tomllib
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm_recsys.candidates import RetrievalConfig
from hm_recsys.features import (
    ArticleRaw,
    FeatureConfig,
    FeatureState,
    History,
    Replay,
    Tables,
)
from hm_recsys.model import ModelConfig

if TYPE_CHECKING:
    import torch

    from hm_recsys.bundle import Recommender
    from hm_recsys.config import Settings
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.fusion import Fusion
    from hm_recsys.model import TwoTower
    from hm_recsys.split import Split

MODEL_NAME = "two-tower"  # the towers alone, through the served index
SERVED = "served"  # what /recommend answers: every candidate source, fused
EARLY_STOPPING_METRICS = ("recall@12", "recall@100", "map@12", "ndcg@12")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Training options (the schema's training half).

    Attributes:
        train_weeks: weeks in the training window (before the validation week).
        epochs: maximum passes over the training window.
        batch_size: positives per batch (B); every batch comes from one week.
        temperature: softmax temperature tau on cosine scores.
        lr / sparse_lr: Adam learning rate of the dense weights / SparseAdam of the id tables.
        weight_decay: L2 on the dense weights (AdamW).
        uniform_negatives: extra negatives per batch drawn uniformly from the catalogue (M; 0 = in-batch only).
        logq_correction: subtract log Q (expected count in the candidate set) from each logit.
        mask_accidental_hits: mask other copies of a row's positive article among the candidates.
        mask_same_customer: mask the same customer's other purchases in the batch (they are positives too).
        id_dropout: probability of replacing a customer/article id with the OOV id during training,
            so the OOV embeddings (new customers, new articles) are trained.
        dedupe_week: count a customer's repeated purchases of an article within a week once.
        patience: epochs without improvement of ``early_stopping_metric`` before stopping.
        early_stopping_metric: validation metric to maximise.
        valid_weeks: validation weeks before the holdout (early stopping, fusion fit); 0 = the fewest
            (up to ``max_valid_weeks``) holding ``min_valid_customers`` buyers (``split.choose_valid_weeks``).
        max_valid_weeks: most weeks pooled by the automatic choice.
        min_valid_customers: scored customer-weeks early stopping needs; with fewer, all ``epochs`` run
            and the last epoch's weights are kept (a few customers must not pick the epoch).
        valid_max_customers: validation customers scored per epoch (a fixed random sample; 0 = all).
        eval_k: list length for Recall@K curves and recall@eval_k.
        exclude_purchased: drop already-purchased articles from model and baseline lists.
        seed: seeds data order, negatives, id dropout and initialisation.
        threads: torch intra-op threads.
    """

    train_weeks: int = 12
    epochs: int = 10
    batch_size: int = 2048
    temperature: float = 0.05
    lr: float = 0.002
    sparse_lr: float = 0.01
    weight_decay: float = 0.0
    uniform_negatives: int = 512
    logq_correction: bool = True
    mask_accidental_hits: bool = True
    mask_same_customer: bool = True
    id_dropout: float = 0.1
    dedupe_week: bool = True
    patience: int = 2
    early_stopping_metric: str = "recall@12"
    valid_weeks: int = 0
    max_valid_weeks: int = 2
    min_valid_customers: int = 1000
    valid_max_customers: int = 20000
    eval_k: int = 100
    exclude_purchased: bool = False
    seed: int = 42
    threads: int = 2

    def __post_init__(self) -> None:
        for k in ("train_weeks", "epochs", "batch_size", "patience", "threads", "max_valid_weeks"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.valid_weeks < 0 or self.min_valid_customers < 0:
            raise ValueError("train.valid_weeks and train.min_valid_customers must be >= 0")
        if self.batch_size < 2:
            raise ValueError("train.batch_size must be >= 2 (in-batch negatives need company)")
        if self.temperature <= 0:
            raise ValueError(f"train.temperature must be > 0, got {self.temperature}")
        if self.uniform_negatives < 0 or self.valid_max_customers < 0:
            raise ValueError("train.uniform_negatives and train.valid_max_customers must be >= 0")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"train.id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.early_stopping_metric not in EARLY_STOPPING_METRICS:
            raise ValueError(f"train.early_stopping_metric must be one of {EARLY_STOPPING_METRICS}")
        if self.eval_k < 12:
            raise ValueError(f"train.eval_k must be >= 12, got {self.eval_k}")


@dataclass(frozen=True)
class Config:
    """The whole schema: features, model, training and retrieval options. Saved with every model."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features.to_dict(), "model": self.model.to_dict(),
                "train": dataclasses.asdict(self.train), "retrieval": self.retrieval.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> Config:
        unknown = set(d) - {"features", "model", "train", "retrieval"}
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {sorted(unknown)}; sections: features, model, train, "
                             f"retrieval")
        feats = _checked(FeatureConfig, d.get("features", {}), f"{where} [features]")
        model = _checked(ModelConfig, d.get("model", {}), f"{where} [model]")
        train = _checked(TrainConfig, d.get("train", {}), f"{where} [train]")
        retrieval = _checked(RetrievalConfig, d.get("retrieval", {}), f"{where} [retrieval]")
        try:
            return cls(FeatureConfig.from_dict(feats), ModelConfig.from_dict(model), TrainConfig(**train),
                       RetrievalConfig.from_dict(retrieval))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def _checked(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check option names and value types against ``cls``'s annotations; ints are accepted as floats."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a table of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in values.items():
        if k not in fields:
            raise ValueError(f"{where}: unknown option {k!r}; known: {sorted(fields)}")
        hint = hints[k]
        origin = typing.get_origin(hint)
        ok: bool
        if hint is bool:
            ok = isinstance(v, bool)
        elif hint is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif hint is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif hint is str:
            ok = isinstance(v, str)
        elif origin is tuple:
            ok = isinstance(v, (list, tuple))
            (inner, *_) = typing.get_args(hint) or (Any,)
            if ok and inner in (int, str):
                ok = all(isinstance(x, inner) and not isinstance(x, bool) for x in v)
            v = tuple(v) if ok else v
        elif origin in (Mapping, dict, typing.Mapping) or hint is Mapping:
            ok = isinstance(v, Mapping)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{where}: option {k!r} must be {getattr(hint, '__name__', hint)}, got {v!r}")
        out[k] = v
    if cls is ModelConfig:
        resolved = [k for k in ("customer", "article", "history") if k in out and out[k] and
                    not isinstance(next(iter(out[k])), Mapping)]
        if resolved:
            raise ValueError(f"{where}: {resolved} are set from [features], not [model]")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> ``(["train", "epochs"], 3)``; the value is read as TOML, else as a bare string."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if len(path) < 2 or not all(path):
        raise ValueError(f"--set {text!r}: the key must name a section and an option, e.g. train.epochs=3")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def load_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Config from a TOML file (default: the dataclass defaults) with ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return Config.from_dict(data, where=where + (" + --set" if overrides else ""))


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------
def corrected_logits(queries: torch.Tensor, candidates: torch.Tensor, log_q: torch.Tensor | None,
                     temperature: float) -> torch.Tensor:
    """``(B, d) x (C, d) -> (B, C)``: ``<q, c> / temperature - log_q[c]``.

    ``log_q`` (``(C,)``) is the log of each candidate's expected count in the
    sampled candidate set; subtracting it turns the sampled softmax into an
    unbiased estimate of the full softmax (Yi et al. 2019, "Sampling-bias-
    corrected neural modeling"): popular articles, sampled as negatives more
    often, get their logits lowered by exactly how much more often.
    """
    import torch

    scaled = queries / temperature  # (B, d): cheaper than dividing the (B, C) product
    if log_q is None:
        return scaled @ candidates.T
    return torch.addmm(-log_q, scaled, candidates.T)  # one fused op: -log_q broadcast over rows


def equal_pairs(row_keys: torch.Tensor, col_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(i, j)`` with ``row_keys[i] == col_keys[j]`` and ``i != j``, without a dense (B, C) mask.

    Sorting the columns once makes this O((B + C) log C + pairs); in-batch
    duplicates are rare, so the pairs are few.
    """
    import torch

    sorted_keys, order = torch.sort(col_keys, stable=True)
    lo = torch.searchsorted(sorted_keys, row_keys, right=False)
    hi = torch.searchsorted(sorted_keys, row_keys, right=True)
    counts = hi - lo
    rows = torch.repeat_interleave(torch.arange(row_keys.numel()), counts)
    starts = torch.repeat_interleave(lo, counts)
    within = torch.arange(rows.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    cols = order[starts + within]
    keep = rows != cols
    return rows[keep], cols[keep]


def in_batch_softmax_loss(queries: torch.Tensor, candidates: torch.Tensor, candidate_ids: torch.Tensor,
                          log_q: torch.Tensor | None, temperature: float,
                          query_ids: torch.Tensor | None = None,
                          mask_accidental_hits: bool = True) -> torch.Tensor:
    """Mean cross-entropy of each query against its positive among all candidates.

    Args:
        queries: ``(B, d)`` customer embeddings.
        candidates: ``(C, d)``, C >= B; candidate i < B is the positive of query i,
            the rest are extra negatives.
        candidate_ids: ``(C,)`` article identity of each candidate.
        log_q: ``(C,)`` log expected count of each candidate (None: no correction).
        query_ids: ``(B,)`` customer identity; if given, candidate j < B with the
            same customer as query i (another of its purchases) is masked for i.
        mask_accidental_hits: mask candidates j != i carrying query i's positive article.

    Returns:
        scalar loss.
    """
    import torch
    import torch.nn.functional as F

    b = queries.shape[0]
    logits = corrected_logits(queries, candidates, log_q, temperature)
    masked = []
    if mask_accidental_hits:
        masked.append(equal_pairs(candidate_ids[:b], candidate_ids))
    if query_ids is not None:
        masked.append(equal_pairs(query_ids, query_ids))
    if masked:
        rows = torch.cat([r for r, _ in masked])
        cols = torch.cat([c for _, c in masked])
        if rows.numel():
            logits = logits.index_put_((rows, cols), torch.tensor(float("-inf")))
    return F.cross_entropy(logits, torch.arange(b))


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


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
def build_model(config: Config, state: FeatureState) -> TwoTower:
    """The towers for ``config`` with the fitted cardinalities (the bundle's model args)."""
    from hm_recsys.model import TwoTower

    cards = state.cardinalities()
    fc = config.features
    mc = config.model.with_features({n: cards[n] for n in fc.customer}, {n: cards[n] for n in fc.article},
                                    {n: cards[n] for n in fc.history})
    return TwoTower(mc)


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    valid: dict[str, float]
    seconds: float
    examples: int
    step_losses: list[float] = field(repr=False, default_factory=list)
    first_step: int = 0  # global step of step_losses[0]

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


def train_epoch(model: TwoTower, optimizers: Sequence[torch.optim.Optimizer], prep: Prepared, config: Config,
                rng: np.random.Generator, progress: bool = True, desc: str = "train") -> tuple[list[float], int]:
    """One pass over the training shards; returns (per-step losses, examples seen)."""
    import torch
    from tqdm.auto import tqdm

    tc = config.train
    model.train()
    losses: list[float] = []
    seen = 0
    bar = tqdm(total=prep.n_examples, desc=desc, unit="ex", unit_scale=True, disable=not progress)
    for batch in iterate_batches(prep, config, rng):
        q = model.customer_embedding(torch.from_numpy(batch.cust_cats), torch.from_numpy(batch.hist),
                                     torch.from_numpy(batch.weights))
        a = model.article_embedding(torch.from_numpy(batch.cand_cats))[torch.from_numpy(batch.cand_inverse)]
        loss = in_batch_softmax_loss(
            q, a, torch.from_numpy(batch.cand_rows),
            torch.from_numpy(batch.log_q) if tc.logq_correction else None, tc.temperature,
            query_ids=torch.from_numpy(batch.customer_rows) if tc.mask_same_customer else None,
            mask_accidental_hits=tc.mask_accidental_hits)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {len(losses)}; lower train.lr "
                                     f"or raise train.temperature")
        losses.append(value)
        b = batch.customer_rows.size
        seen += b
        bar.update(b)
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return losses, seen


def make_optimizers(model: TwoTower, config: Config) -> list[torch.optim.Optimizer]:
    """SparseAdam for the sparse id tables (only touched rows move), AdamW for the rest."""
    import torch

    tc = config.train
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(model.dense_parameters(), lr=tc.lr,
                                                           weight_decay=tc.weight_decay)]
    sparse = model.sparse_parameters()
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=tc.sparse_lr))
    return opts


def recommender(model: TwoTower, prep: Prepared, history: History, raw: ArticleRaw) -> Recommender:
    from hm_recsys.bundle import Recommender

    return Recommender(model, prep.state, prep.tables, raw, history, article_static=prep.article_static,
                       customer_static=prep.customer_static)


def rank(rec: Recommender, customer_ids: Sequence[str], k: int, exclude_purchased: bool = False,
         batch: int = 8192) -> dict[str, list[str]]:
    """Top-k article ids for each customer (exact), as ``evaluate`` predictions."""
    from hm_recsys.evaluate import predictions_from_index

    ids = list(customer_ids)
    out: dict[str, list[str]] = {}
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        rows, _ = rec.recommend_rows(chunk, k=k, exclude_purchased=exclude_purchased)
        out.update(predictions_from_index(chunk, rec.article_ids, rows))
    return out


def evaluate_valid(model: TwoTower, prep: Prepared, config: Config) -> dict[str, float]:
    """The towers' validation metrics, pooled over every validation customer-week (each week as of its start)."""
    from hm_recsys.evaluate import evaluate_rankings

    tc = config.train
    per_week = []
    for vw in prep.valid:
        rec = recommender(model, prep, vw.history, vw.raw)
        preds = rank(rec, list(vw.truth), tc.eval_k, tc.exclude_purchased)
        per_week.append(evaluate_rankings(preds, vw.truth, ks=(12, tc.eval_k), catalogue_size=prep.tables.n_articles))
    n = np.array([r["n_customers"] for r in per_week])
    out = {k: float(np.dot(n, [r[k] for r in per_week]) / n.sum()) for k in per_week[0] if k != "n_customers"}
    out["n_customers"] = float(n.sum())
    return out


def early_stopping(prep: Prepared, config: Config) -> bool:
    """Whether the validation sample is large enough (``train.min_valid_customers``) to pick the epoch."""
    return sum(len(v.truth) for v in prep.valid) >= config.train.min_valid_customers


def fit(prep: Prepared, config: Config, progress: bool = True,
        on_epoch: typing.Callable[[EpochLog], None] | None = None) -> tuple[TwoTower, list[EpochLog], int]:
    """Train with early stopping; returns (model with the best epoch's weights, epoch logs, best epoch).

    Bit-reproducible for a seed at any thread count: torch's deterministic
    kernels are switched on for the fit and restored after. (Without them,
    two 2-thread fits on `small` differed in 32 of their tensors; with them,
    in none, for ~7% more fit time.)
    """
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _fit(prep, config, progress, on_epoch)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _fit(prep: Prepared, config: Config, progress: bool,
         on_epoch: typing.Callable[[EpochLog], None] | None) -> tuple[TwoTower, list[EpochLog], int]:
    import torch

    tc = config.train
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    model = build_model(config, prep.state)
    optimizers = make_optimizers(model, config)
    logs: list[EpochLog] = []
    best, best_epoch, best_state, waited = -math.inf, 0, None, 0
    if not early_stopping(prep, config):
        # too few validation customers to pick an epoch: a fixed number of epochs, the last one kept
        for epoch in range(1, tc.epochs + 1):
            t0 = time.perf_counter()
            losses, seen = train_epoch(model, optimizers, prep, config, rng, progress,
                                       desc=f"epoch {epoch}/{tc.epochs}")
            seconds = time.perf_counter() - t0
            first = sum(len(e.step_losses) for e in logs)
            log = EpochLog(epoch, float(np.mean(losses)), evaluate_valid(model, prep, config), seconds, seen,
                           losses, first)
            logs.append(log)
            if on_epoch:
                on_epoch(log)
        return model.eval(), logs, tc.epochs
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        losses, seen = train_epoch(model, optimizers, prep, config, rng, progress, desc=f"epoch {epoch}/{tc.epochs}")
        seconds = time.perf_counter() - t0
        valid = evaluate_valid(model, prep, config)
        first = sum(len(e.step_losses) for e in logs)
        log = EpochLog(epoch, float(np.mean(losses)), valid, seconds, seen, losses, first)
        logs.append(log)
        if on_epoch:
            on_epoch(log)
        score = valid[tc.early_stopping_metric]
        if score > best:
            best, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= tc.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    return model.eval(), logs, best_epoch


# ---------------------------------------------------------------------------
# The fusion of candidate sources, fitted on the validation weeks
# ---------------------------------------------------------------------------
def fit_fusion(model: TwoTower, prep: Prepared, config: Config, warehouse: Warehouse, scratch: Path,
               label: str, progress: bool = True) -> Fusion:
    """Fit the fusion on the validation weeks' buyers, never the holdout.

    Each validation week is served as it would have been: a served state as
    of the week's start (``served.build_state``: features replayed, the
    candidate tables, the index), the candidates of the week's (sampled)
    buyers from every source, labelled by what they bought that week.
    """
    from hm_recsys import fusion as fusion_mod
    from hm_recsys.candidates import Candidates
    from hm_recsys.fusion import Fusion
    from hm_recsys.served import build_state

    rec = recommender(model, prep, prep.end_history, prep.end_raw)
    parts, labels, offset = [], [], 0
    for vw in prep.valid:
        ids = sorted(vw.truth)
        state = build_state(rec, warehouse, vw.as_of, label, scratch / f"valid-state-{vw.as_of}", config.retrieval,
                            Fusion.single("two_tower"), customers=ids, progress=progress)
        cands, _ = state.candidates(ids)
        labels.append(state.labels(cands, ids, vw.truth))
        parts.append(dataclasses.replace(cands, group=cands.group + offset))
        offset += cands.n_customers
    pooled = Candidates(np.concatenate([p.group for p in parts]), np.concatenate([p.rows for p in parts]),
                        np.concatenate([p.features for p in parts]), np.concatenate([p.bought for p in parts]), offset)
    y = np.concatenate(labels)
    fitted = fusion_mod.fit(pooled, y, features=config.retrieval.fusion_features, prior=config.retrieval.fusion_prior)
    facts = {**fitted.fitted, "weeks": [vw.as_of.isoformat() for vw in prep.valid],
             "candidates_per_customer": round(y.size / max(offset, 1), 1),
             "candidate_recall": round(float(y.sum()) / max(sum(len(v) for vw in prep.valid for v in vw.truth.values()),
                                                           1), 4)}
    return dataclasses.replace(fitted, fitted=facts)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run produced.

    ``metrics``: holdout results by model name (``served``: what ``/recommend``
    answers; ``two-tower``: the towers alone; every ``evaluate.BASELINES``; and
    ``oracle`` when the data has one), each ``evaluate.evaluate_rankings``' dict.
    ``table``: the comparison table text. ``seconds``: wall time of
    ``prepare``, ``fit``, ``fusion``, ``evaluate``, ``log`` (bundle + MLflow) and ``total``.
    """

    run_id: str
    bundle_dir: Path
    metrics: dict[str, dict[str, float]]
    split: Split
    table: str = ""
    model_uri: str = ""
    best_epoch: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage


def holdout_models(rec: Recommender, fusion: Fusion, config: Config, warehouse: Warehouse, split: Split,
                   out_dir: Path, label: str, progress: bool = True) -> tuple[dict[str, dict[str, list[str]]], Any]:
    """Rankings of the holdout's buyers: served (fused), the towers alone, every baseline (+ oracle).

    The served and tower rows go through a served state as of the holdout's
    start (``served.build_state``: the same code path as ``/recommend``);
    returns ``(models, truth)``.
    """
    from hm_recsys import evaluate
    from hm_recsys.fusion import Fusion
    from hm_recsys.served import build_state

    tc = config.train
    truth = evaluate.holdout_truth(warehouse, split)
    ids = list(truth.customer_ids)
    state = build_state(rec, warehouse, split.holdout_start, label, out_dir, config.retrieval, fusion, customers=ids,
                        progress=progress)
    towers = dataclasses.replace(config.retrieval, sources=("two_tower",))
    models = {SERVED: state.predictions(ids, tc.eval_k, tc.exclude_purchased),
              MODEL_NAME: state.predictions(ids, tc.eval_k, tc.exclude_purchased, fusion=Fusion.single("two_tower"),
                                            config=towers)}
    models.update(evaluate.baselines_for_split(warehouse, split, k=tc.eval_k, exclude_purchased=tc.exclude_purchased,
                                               customers=truth.customer_ids, progress=progress))
    return models, truth


def resolve_split(warehouse: Warehouse, config: Config, holdout_week: dt.date | None = None) -> Split:
    """The training split for ``config`` (validation weeks chosen as ``train.valid_weeks`` says)."""
    from hm_recsys.split import Split

    tc = config.train
    return Split.for_training(warehouse, tc.train_weeks, holdout_week, tc.valid_weeks, tc.min_valid_customers,
                              tc.max_valid_weeks)


def run_training(settings: Settings, config: Config, split: Split | None = None, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, progress: bool = True,
                 warehouse: Warehouse | Path | str | None = None) -> TrainResult:
    """Train the towers, fit the fusion, evaluate as served, write the bundle and log it all to one MLflow run.

    ``warehouse`` defaults to ``settings.layout.warehouse_dir``; ``split`` to
    ``resolve_split(warehouse, config)``. The bundle lands in
    ``settings.layout.bundle_dir(run_id)``.
    """
    import mlflow

    from hm_recsys import bundle, evaluate, tracking
    from hm_recsys.data.warehouse import Warehouse

    if not isinstance(warehouse, Warehouse):
        warehouse = Warehouse(warehouse or settings.layout.warehouse_dir)
    if split is None:
        split = resolve_split(warehouse, config)
    elif split.train_weeks != config.train.train_weeks:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, train_weeks=split.train_weeks))
    tracking.configure(settings)
    clock = {"start": time.perf_counter()}
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})) as run:
        run_id = run.info.run_id
        scratch = settings.layout.train_scratch_dir(run_id)
        label = f"run-{run_id[:12]}"  # the version label of this run's scratch states
        try:
            mlflow.set_tags({"split": split.describe(), "stage": "train", "model": MODEL_NAME,
                             "valid_weeks": str(split.valid_weeks)})
            tracking.log_params({"config": config.to_dict(), "split": split.to_dict()})
            prep = prepare(warehouse, split, config, scratch, progress)
            clock["prepare"] = time.perf_counter()
            mlflow.set_tag("data_sha256", prep.data_window["data_sha256"])
            tracking.log_params({"data": {k: v for k, v in prep.data_window.items() if k != "split"},
                                 "vocab": prep.state.cardinalities()})
            stopping = early_stopping(prep, config)
            mlflow.set_tag("early_stopping", "on" if stopping else
                           f"off: {prep.data_window['n_valid_customer_weeks']} validation customer-weeks < "
                           f"train.min_valid_customers {config.train.min_valid_customers}; "
                           f"{config.train.epochs} epochs, last kept")
            if not stopping and progress:
                print(f"early stopping off: {prep.data_window['n_valid_customer_weeks']} validation customer-weeks "
                      f"< {config.train.min_valid_customers}; training {config.train.epochs} epochs", flush=True)
            model, logs, best_epoch = fit(prep, config, progress, on_epoch=tracking.log_epoch)
            clock["fit"] = time.perf_counter()
            fusion = fit_fusion(model, prep, config, warehouse, scratch, label, progress)
            tracking.log_fusion(fusion)
            clock["fusion"] = time.perf_counter()
            rec = recommender(model, prep, prep.end_history, prep.end_raw)
            models, truth = holdout_models(rec, fusion, config, warehouse, split, scratch / "holdout-state", label,
                                           progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        tc = config.train
        results, curves = evaluate.score_all(models, truth, catalogue_size=prep.tables.n_articles, max_k=tc.eval_k)
        clock["evaluate"] = time.perf_counter()
        week = f"{split.holdout_start}..{split.holdout_end - dt.timedelta(days=1)}"
        table = evaluate.comparison_table(results, title=f"holdout week {week}: {len(truth):,} scored customers "
                                                         f"({SERVED} = what /recommend answers)")
        metrics = {
            "holdout": results,
            "best_epoch": best_epoch,
            "valid": logs[best_epoch - 1].valid,
            "epochs": [{"epoch": e.epoch, "train_loss": e.train_loss, "seconds": e.seconds,
                        "examples_per_second": e.examples_per_second, **{f"valid_{k}": v for k, v in e.valid.items()}}
                       for e in logs],
            "fusion": fusion.to_dict(),
        }
        full_config = {"features": config.features.to_dict(), "model": model.config.to_dict(),
                       "train": dataclasses.asdict(config.train), "retrieval": config.retrieval.to_dict()}
        bundle_dir = bundle.save(settings.layout.bundle_dir(run_id), rec, full_config, prep.data_window, metrics,
                                 fusion=fusion)
        tracking.log_results(results, best_epoch, model_name=SERVED)
        tracking.log_plots(logs, curves, title=f"holdout week {week}")
        mlflow.log_text(table + "\n", "metrics_table.txt")
        mlflow.log_dict(prep.data_window, "data_window.json")
        info = tracking.log_model(bundle_dir, example_ids=list(truth.customer_ids[:2]))
        clock["log"] = time.perf_counter()
        stages = ["start", "prepare", "fit", "fusion", "evaluate", "log"]
        seconds = {b: clock[b] - clock[a] for a, b in zip(stages, stages[1:])}
        seconds["total"] = clock["log"] - clock["start"]
        mlflow.log_metrics({f"seconds.{k}": v for k, v in seconds.items()})
    return TrainResult(run_id, bundle_dir, results, split, table, info.model_uri, best_epoch, seconds)


def main(argv: list[str] | None = None) -> int:
    """``hm-recsys train``."""
    from hm_recsys.config import Settings
    from hm_recsys.data.warehouse import Warehouse

    from hm_recsys.cli import iso_date

    p = argparse.ArgumentParser(
        prog="hm-recsys train",
        description="Train the two towers on a time split (train weeks, validation week(s), holdout week), "
                    "fit the fusion of candidate sources on the validation weeks, score what the service would "
                    "answer against every heuristic baseline and the oracle, write the model bundle and log the "
                    "run to MLflow.",
    )
    p.add_argument("--config", type=Path, help="TOML schema file (default: built-in defaults, "
                                               "documented in configs/two_tower.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one option, value in TOML syntax (repeatable), e.g. --set train.temperature=0.1")
    p.add_argument("--train-weeks", type=int, help="training weeks (= --set train.train_weeks=N)")
    p.add_argument("--holdout-week", type=iso_date, metavar="YYYY-MM-DD",
                   help="a day in the holdout week (default: the last complete week in the warehouse)")
    p.add_argument("--epochs", type=int, help="maximum epochs (= --set train.epochs=N)")
    p.add_argument("--seed", type=int, help="random seed (= --set train.seed=N)")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--warehouse", type=Path, help="warehouse folder (default $HM_RECSYS_HOME/data/warehouse)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    a = p.parse_args(argv)
    overrides = list(a.overrides)
    for flag, key in (("train_weeks", "train_weeks"), ("epochs", "epochs"), ("seed", "seed")):
        if getattr(a, flag) is not None:
            overrides.append(f"train.{key}={getattr(a, flag)}")
    settings = Settings.from_env()
    try:
        config = load_config(a.config, overrides)
        warehouse = Warehouse(a.warehouse or settings.layout.warehouse_dir)
        split = resolve_split(warehouse, config, a.holdout_week)
        print(f"split: {split.describe()}", flush=True)
        result = run_training(settings, config, split=split, run_name=a.run_name, progress=not a.no_progress,
                              warehouse=warehouse)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # WarehouseEmpty is a RuntimeError
        print(f"hm-recsys train: {e}", file=sys.stderr)
        return 1
    print(result.table)
    print(f"best epoch: {result.best_epoch}; wall time: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    print(f"mlflow run: {result.run_id} ({settings.mlflow_tracking_uri})")
    print(f"model: {result.model_uri}")
    print(f"bundle: {result.bundle_dir}")
    print(json.dumps({"run_id": result.run_id, "bundle_dir": str(result.bundle_dir)}))
    return 0
