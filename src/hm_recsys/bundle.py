"""The trained-model bundle: a self-describing folder, and the ``Recommender`` that loads it.

::

    bundle/
      config.json                  {"format_version", "features": FeatureConfig, "model": ModelConfig
                                    (model args incl. every cardinality), "train": TrainConfig,
                                    "history_as_of", "files": what each file holds}
      model.pt                     state_dict only (torch.load(..., weights_only=True))
      features/state.json          fitted feature state: config, price edges, hash params, cardinalities
      features/vocabularies.parquet  every vocabulary (feature, value); value i of a feature has index i + 1
      features/articles.parquet    the catalogue in row order: id, attributes, first-sale age, last-week
                                   sales and mean price as of ``history_as_of``
      features/customers.parquet   the customer table (demographics) in row order
      features/history.npz         each customer's recent distinct purchases before ``history_as_of`` (CSR)
      fusion.json                  the fusion of candidate sources fitted on the validation weeks
                                   (``hm_recsys.fusion``); config.json's "retrieval" says which sources
      data_window.json             the split, the weeks read and a SHA-256 of the training data
      metrics.json                 holdout metrics (served, the towers alone, the baselines, the oracle;
                                   from the pipeline: a note that its gate scored them), best epoch,
                                   validation metrics per epoch, the fusion

Nothing is pickled: JSON, Parquet, NPZ (``allow_pickle=False``) and a tensor
state_dict. ``load(folder)`` rebuilds the towers from ``config.json`` alone.

The history snapshot is as of the holdout week's start, so evaluating the
bundle on its holdout never sees holdout purchases. What is served is not
this snapshot but a served state (``hm_recsys.served``) built from the
bundle's weights, feature state and fusion as of the newest week.
``retrieval(folder)`` reads the sources and fusion a state needs (bundles
written before the fusion existed serve the towers alone over the whole
catalogue, as they always did).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm_recsys.arrays import score_buffer, scores_into, top_k
from hm_recsys.features import (
    ARTICLE_ATTRIBUTES,
    CUSTOMER_CATEGORICAL,
    ArticleRaw,
    FeatureConfig,
    FeatureState,
    History,
    Tables,
)
from hm_recsys.fsutil import staged_dir

if TYPE_CHECKING:
    import pandas as pd

    from hm_recsys.candidates import RetrievalConfig
    from hm_recsys.fusion import Fusion
    from hm_recsys.model import TwoTower

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.pt"
FEATURES = "features"
ARTICLES = "articles.parquet"
CUSTOMERS = "customers.parquet"
HISTORY = "history.npz"
DATA_WINDOW = "data_window.json"
METRICS = "metrics.json"
FUSION = "fusion.json"

FILES = {
    CONFIG: "full typed config: features, model args (cardinalities, dims, layers), training options",
    WEIGHTS: "torch state_dict of hm_recsys.model.TwoTower; load with torch.load(weights_only=True)",
    f"{FEATURES}/state.json": "fitted feature state (price edges, hash params, cardinalities)",
    f"{FEATURES}/vocabularies.parquet": "vocabularies: (feature, value), index = position within feature + 1",
    f"{FEATURES}/{ARTICLES}": "catalogue in row order with raw attributes and as-of facts",
    f"{FEATURES}/{CUSTOMERS}": "customer table in row order (demographics)",
    f"{FEATURES}/{HISTORY}": "recent distinct purchases per customer row, most recent first (CSR)",
    DATA_WINDOW: "time split, weeks read, SHA-256 of the training data",
    METRICS: "holdout metrics: served, two-tower, every heuristic baseline, oracle",
}
# written by this code, optional when reading (bundles from before the fusion)
OPTIONAL_FILES = {FUSION: "fusion of the candidate sources (weights fitted on the validation weeks)"}
CUSTOMER_COLUMNS = ("customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age",
                    "postal_code")
# request columns that may override a customer's stored features (the pyfunc "features" path)
FEATURE_OVERRIDES = CUSTOMER_COLUMNS[1:] + ("recent_articles",)


class BundleError(RuntimeError):
    """A bundle folder is missing a file or does not match this code's format."""


class Recommender:
    """Exact top-k recommendations from a trained two-tower model and its feature state.

    Build it with ``load(folder)`` (or ``Recommender(...)`` from in-memory
    parts, as training does). ``article_ids[i]`` is row i of every article
    array; customer embeddings are computed per call (the customer table can
    hold millions of rows), article embeddings once.
    """

    def __init__(self, model: TwoTower, state: FeatureState, tables: Tables, raw: ArticleRaw, history: History,
                 article_static: Mapping[str, np.ndarray] | None = None,
                 customer_static: np.ndarray | None = None):
        import torch

        self.model = model.eval()
        self.state = state
        self.tables = tables
        self.raw = raw
        self.history = history
        self.article_ids: list[str] = [str(a) for a in tables.article_index]
        self._article_static = dict(article_static) if article_static is not None else \
            state.article_static(tables.articles)
        self._article_matrix = state.article_matrix(self._article_static, raw)
        self._history_table = state.history_table(self._article_static)
        self._customer_static = customer_static if customer_static is not None else \
            state.customer_static(tables.customers)
        self._article_emb: np.ndarray | None = None
        self._torch = torch

    # -- facts -----------------------------------------------------------------
    @property
    def as_of(self) -> dt.date:
        """Customer histories and article facts use transactions strictly before this date."""
        return self.history.as_of

    @property
    def dim(self) -> int:
        return self.model.config.output_dim

    def known_customer(self, customer_id: str) -> bool:
        """True if the customer is in the bundle's customer table (else: a features-only, OOV embedding)."""
        return bool(self.tables.customer_index.get_indexer([customer_id])[0] >= 0)

    def known_customer_ids(self) -> list[str]:
        """Every customer of the bundle's customer table, in table order."""
        return [str(c) for c in self.tables.customer_index]

    def purchased(self, customer_id: str) -> list[str]:
        """Articles in the customer's history snapshot, most recent first.

        That is the last ``features.history_length`` distinct articles bought in
        the ``features.history_weeks`` weeks before ``as_of``; [] if none.
        """
        row = int(self.tables.customer_rows([customer_id])[0])
        return [self.article_ids[r] for r in self.history.items(row)]

    # -- embeddings ----------------------------------------------------------------
    def article_embeddings(self) -> np.ndarray:
        """``float32 (n_articles, d)``, L2-normalised; row i is ``article_ids[i]``. Computed once."""
        if self._article_emb is None:
            torch = self._torch
            parts = []
            with torch.inference_mode():
                for s in range(0, self._article_matrix.shape[0], 65536):
                    cats = torch.from_numpy(self._article_matrix[s:s + 65536])
                    parts.append(self.model.article_embedding(cats).numpy())
            self._article_emb = np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)
        return self._article_emb

    def customer_embeddings(self, customer_ids: Sequence[str], features: pd.DataFrame | None = None) -> np.ndarray:
        """``float32 (n, d)`` L2-normalised query embeddings; never fails on an unknown id.

        An id missing from the customer table gets the out-of-vocabulary id and
        features (plus whatever ``features`` supplies). ``features`` (optional,
        one row per id) overrides stored values per cell where not null:
        ``FN, Active, club_member_status, fashion_news_frequency, age,
        postal_code`` and ``recent_articles`` (list of article ids, most recent
        first; replaces the stored history, equal weights).
        """
        rows = self.tables.customer_rows(list(customer_ids))
        cats, hist, w = self.state.customer_inputs(self._customer_static[rows], self.history, rows,
                                                   self._history_table)
        if features is not None:
            cats, hist, w = self._apply_overrides(list(customer_ids), features, cats, hist, w)
        return self.embed_inputs(cats, hist, w)

    def embed_inputs(self, cats: np.ndarray, hist: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Run the customer tower on encoded inputs (see ``FeatureState.customer_inputs``)."""
        torch = self._torch
        with torch.inference_mode():
            out = self.model.customer_embedding(torch.from_numpy(np.ascontiguousarray(cats, dtype=np.int64)),
                                                torch.from_numpy(np.ascontiguousarray(hist, dtype=np.int64)),
                                                torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)))
        return out.numpy()

    def _apply_overrides(self, ids: list[str], features: pd.DataFrame, cats, hist, w):
        import pandas as pd

        if len(features) != len(ids):
            raise ValueError(f"features has {len(features)} rows for {len(ids)} customer ids")
        unknown = [c for c in features.columns if c not in (*FEATURE_OVERRIDES, "customer_id")]
        if unknown:
            raise ValueError(f"features: unknown column(s) {unknown}; allowed: {list(FEATURE_OVERRIDES)}")
        features = features.reset_index(drop=True)
        rows = self.tables.customer_rows(ids)
        demo = list(CUSTOMER_COLUMNS[1:])
        if any(c in features.columns for c in demo):
            # stored demographics (none for unknown customers), then the request's non-null cells
            stored = self.tables.customers.iloc[np.minimum(rows, len(self.tables.customers) - 1)]
            base = stored[demo].astype("object").reset_index(drop=True)
            base.loc[rows == self.tables.unknown_row, demo] = None
            for col in demo:
                if col in features.columns:
                    keep = features[col].notna().to_numpy()
                    base.loc[keep, col] = features.loc[keep, col].astype("object").to_numpy()
            for col in ("FN", "Active", "age"):
                base[col] = pd.to_numeric(base[col], errors="raise").astype("float64")
            base.insert(0, "customer_id", ids)
            static = self.state.customer_static(base)[:-1]
        else:
            static = self._customer_static[rows]
        if "recent_articles" in features.columns:
            # keyed by request position: two unknown customers share a table row but not a history
            history = self._history_from_lists(rows, features["recent_articles"].tolist())
            return self.state.customer_inputs(static, history, np.arange(len(ids)), self._history_table)
        return self.state.customer_inputs(static, self.history, rows, self._history_table)

    def _history_from_lists(self, rows: np.ndarray, lists: list) -> History:
        """A history keyed by request position from article id lists (None keeps the stored history).

        Supplied lists get equal weights (no purchase dates); unknown article ids are dropped.
        """
        L = self.state.config.history_length
        items: list[np.ndarray] = []
        days: list[np.ndarray] = []
        for r, given in zip(rows.tolist(), lists):
            if given is None or (isinstance(given, float) and np.isnan(given)):
                a, d = self.history.entry(r)
            elif isinstance(given, str):
                raise ValueError("recent_articles must be a list of article ids, got a str")
            else:
                found = self.tables.article_rows([str(x) for x in given])
                a = np.asarray(list(dict.fromkeys(int(x) for x in found if x >= 0))[:L], dtype=np.int32)
                d = np.ones(a.size, dtype=np.int32)
            items.append(a)
            days.append(d)
        lens = [len(x) for x in items]
        cat = (lambda xs: np.concatenate(xs).astype(np.int32)) if items else (lambda xs: np.zeros(0, np.int32))
        return History(self.as_of, np.arange(len(items), dtype=np.int32), np.r_[0, np.cumsum(lens)].astype(np.int64),
                       cat(items), cat(days))

    # -- recommendations ---------------------------------------------------------------
    def top_k(self, queries: np.ndarray, k: int, exclude_rows: Sequence[np.ndarray] | None = None,
              chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Exact maximum-inner-product top-k over all articles.

        Args:
            queries: ``float32 (n, d)``.
            exclude_rows: per query, article rows that must not be returned.

        Returns:
            ``(rows int64 (n, k'), scores float32 (n, k'))``, best first, ties by
            article row; ``k' = min(k, n_articles)``.
        """
        emb = self.article_embeddings()
        n, k = queries.shape[0], min(int(k), emb.shape[0])
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        rows_out = np.empty((n, k), dtype=np.int64)
        scores_out = np.empty((n, k), dtype=np.float32)
        buffer = score_buffer(min(chunk, n), emb)  # one for every chunk (see scores_into)
        for s in range(0, n, chunk):
            scores = scores_into(np.asarray(queries[s:s + chunk], dtype=np.float32), emb, buffer)
            if exclude_rows is not None:
                for i, ex in enumerate(exclude_rows[s:s + chunk]):
                    if len(ex):
                        scores[i, np.asarray(ex, dtype=np.int64)] = -np.inf
            rows_out[s:s + chunk], scores_out[s:s + chunk] = top_k(scores, k)  # equal scores: lower row first
        return rows_out, scores_out

    def recommend_rows(self, customer_ids: Sequence[str], k: int = 12, exclude_purchased: bool = False,
                       features: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like ``recommend`` but as arrays: ``(rows int64 (n, k), scores float32 (n, k))``."""
        ids = list(customer_ids)
        q = self.customer_embeddings(ids, features)
        exclude = None
        if exclude_purchased:
            rows = self.tables.customer_rows(ids)
            exclude = [self.history.items(int(r)) for r in rows]
        return self.top_k(q, k, exclude)

    def recommend(self, customer_ids: Sequence[str], k: int = 12, exclude_purchased: bool = False,
                  features: pd.DataFrame | None = None) -> list[list[tuple[str, float]]]:
        """Top-k ``(article_id, score)`` per customer by exact dot product, best first.

        ``exclude_purchased`` drops the articles of ``purchased(customer)``.
        Scores are cosines in [-1, 1].
        """
        rows, scores = self.recommend_rows(customer_ids, k, exclude_purchased, features)
        ids = self.article_ids
        return [[(ids[r], float(sc)) for r, sc in zip(rr, ss) if np.isfinite(sc)]
                for rr, ss in zip(rows.tolist(), scores.tolist())]


# ---------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------
def save(folder: Path | str, rec: Recommender, config: Mapping[str, Any], data_window: Mapping[str, Any],
         metrics: Mapping[str, Any], fusion: Fusion | None = None) -> Path:
    """Write ``rec`` as a bundle folder (atomically: a temp sibling renamed into place).

    ``config`` is the full run config as a dict with ``features``, ``model``
    (the resolved ``ModelConfig``), ``train`` and ``retrieval`` sections;
    ``fusion`` the fitted fusion (``fusion.json``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    folder = Path(folder)
    with staged_dir(folder) as tmp:
        sections = [k for k in ("features", "model", "train", "retrieval") if k in config]
        files = {**FILES, **(OPTIONAL_FILES if fusion is not None else {})}
        doc = {"format_version": FORMAT_VERSION, **{k: config[k] for k in sections},
               "history_as_of": rec.as_of.isoformat(), "files": files}
        if fusion is not None:
            fusion.save(tmp / FUSION)
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        torch.save({k: v.detach().cpu().contiguous() for k, v in rec.model.state_dict().items()}, tmp / WEIGHTS)
        feats = tmp / FEATURES
        rec.state.save(feats)
        art_cols = ["article_id", *dict.fromkeys(ARTICLE_ATTRIBUTES.values())]
        arts = rec.tables.articles[art_cols].copy()
        arts["age_days"] = rec.raw.age_days
        arts["sales_last_week"] = rec.raw.sales_last_week
        arts["mean_price"] = rec.raw.mean_price
        pq.write_table(pa.Table.from_pandas(arts, preserve_index=False), feats / ARTICLES)
        custs = rec.tables.customers[list(CUSTOMER_COLUMNS)]
        pq.write_table(pa.Table.from_pandas(custs, preserve_index=False), feats / CUSTOMERS)
        rec.history.save(feats / HISTORY)
        (tmp / DATA_WINDOW).write_text(json.dumps(dict(data_window), indent=2, default=str) + "\n")
        (tmp / METRICS).write_text(json.dumps(dict(metrics), indent=2, default=_json_number) + "\n")
    return folder


def _json_number(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def read_config(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    if not path.exists():
        raise BundleError(f"{folder}: not a model bundle (no {CONFIG})")
    doc = json.loads(path.read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {doc.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return doc


def retrieval(folder: Path | str) -> tuple[RetrievalConfig, Fusion]:
    """The candidate sources and fusion a served state of this bundle uses.

    A bundle without ``fusion.json`` (written before the fusion existed) is
    served as it always was: the towers alone over the whole catalogue.
    """
    from hm_recsys.candidates import RetrievalConfig
    from hm_recsys.fusion import Fusion

    folder = Path(folder)
    doc = read_config(folder)
    if not (folder / FUSION).exists():
        return RetrievalConfig(sources=("two_tower",), sold_within_weeks=0), Fusion.single("two_tower")
    try:
        return RetrievalConfig.from_dict(doc.get("retrieval", {})), Fusion.load(folder / FUSION)
    except (ValueError, KeyError) as e:
        raise BundleError(f"{folder}: unreadable retrieval config or fusion: {e}") from e


def load(folder: Path | str) -> Recommender:
    """Rebuild the ``Recommender`` saved in ``folder`` (see the module docstring for the layout)."""
    import pandas as pd
    import torch

    from hm_recsys.model import ModelConfig, TwoTower

    folder = Path(folder)
    doc = read_config(folder)
    for name in FILES:
        if not (folder / name).exists():
            raise BundleError(f"{folder}: missing {name} ({FILES[name]})")
    model = TwoTower(ModelConfig.from_dict(doc["model"]))
    state_dict = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict)
    feats = folder / FEATURES
    state = FeatureState.load(feats)
    if state.config != FeatureConfig.from_dict(doc["features"]):
        raise BundleError(f"{folder}: features/state.json and config.json disagree on the feature config")
    arts = pd.read_parquet(feats / ARTICLES)
    custs = pd.read_parquet(feats / CUSTOMERS)
    as_of = dt.date.fromisoformat(doc["history_as_of"])
    raw = ArticleRaw(as_of, arts["age_days"].to_numpy(np.int32), arts["sales_last_week"].to_numpy(np.int32),
                     arts["mean_price"].to_numpy(np.float32))
    history = History.load(feats / HISTORY)
    if history.as_of != as_of:
        raise BundleError(f"{feats / HISTORY}: history as of {history.as_of}, config.json says {as_of}")
    return Recommender(model, state, Tables(arts, custs), raw, history)


__all__ = ["Recommender", "BundleError", "load", "save", "read_config", "retrieval", "CUSTOMER_CATEGORICAL"]
