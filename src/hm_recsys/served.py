"""The served state and the ONE code path from a customer id to a ranked list.

A served state is everything needed to answer ``/recommend`` for one model
version as of one date, computed offline and written as a self-verifying
folder::

    state/
      manifest.json           model version, as_of, counts, retrieval config, fusion,
                              index facts, sha256 of every other file
      customer_ids.npy        S-bytes ids of the state's customers, row order of queries.npy
      queries.npy             float32 (m + 1, d): customer query embeddings; last row = cold start
      segments.npy            int16 (m + 1,): each customer's age bucket (last row: unknown age)
      article_ids.json        the catalogue, row order of every article array
      article_embeddings.npy  float32 (N, d)
      history.npz             the customers' recent distinct purchases (rows = state rows)
      candidates.npz          candidate tables (trending, co-purchase, product codes, allowed)
      fusion.json             the fitted fusion of the model version
      index/                  ScaNN over the allowed articles (hm_recsys.index layout)

``build_state`` makes one from a model (``bundle.Recommender``) and a
warehouse, replaying only transactions before ``as_of`` through the same
feature code as training. ``ServedState.recommend`` is what the evaluation,
the gate, the benchmarks and the HTTP service all call: candidates from every
source (``hm_recsys.candidates``), the fusion's score, the top k. Nothing in
it depends on the batch: one customer asked alone gets exactly the list the
evaluation scored for them in a batch of thousands (a parity test checks it
through the running service).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm_recsys.arrays import unique
from hm_recsys.candidates import Candidates, CandidateTables, RetrievalConfig, build_tables, generate, top_k
from hm_recsys.features import History, positions
from hm_recsys.fsutil import file_sha256, staged_dir
from hm_recsys.fusion import Fusion

if TYPE_CHECKING:
    from hm_recsys.bundle import Recommender
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.index import Index, IndexRule, SearchSetting

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CUSTOMER_IDS = "customer_ids.npy"
QUERIES = "queries.npy"
SEGMENTS = "segments.npy"
ARTICLE_IDS = "article_ids.json"
ARTICLE_EMB = "article_embeddings.npy"
HISTORY = "history.npz"
CANDIDATES = "candidates.npz"
FUSION = "fusion.json"
INDEX = "index"


class StateError(RuntimeError):
    """A served state folder is missing, tampered with, or not the one asked for."""


@dataclass(frozen=True)
class Answer:
    """Ranked lists of B customers: ``rows``/``scores`` ``(B, k)`` padded with -1/-inf; ``fallback`` (B,)."""

    rows: np.ndarray
    scores: np.ndarray
    fallback: np.ndarray


@dataclass
class ServedState:
    """One model version's served state as of ``as_of`` (see the module docstring)."""

    version: str
    as_of: dt.date
    customer_index: Any  # pandas.Index of customer ids, row order of ``queries``
    queries: np.ndarray  # float32 (m + 1, d)
    segments: np.ndarray  # int (m + 1,): age bucket per state row, last row = cold
    article_ids: list[str]
    article_embeddings: np.ndarray  # float32 (N, d)
    history: History  # customer rows = state rows
    tables: CandidateTables
    fusion: Fusion
    config: RetrievalConfig
    index: Index  # over allowed catalogue rows
    index_rows: np.ndarray  # int64: catalogue row of each index row
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    _article_index: Any = field(default=None, repr=False)

    # -- facts -------------------------------------------------------------------
    @property
    def n_customers(self) -> int:
        return len(self.customer_index)

    @property
    def cold_row(self) -> int:
        return self.queries.shape[0] - 1

    @property
    def dim(self) -> int:
        return int(self.queries.shape[1])

    @property
    def article_index(self):
        if self._article_index is None:
            import pandas as pd

            self._article_index = pd.Index(np.asarray(self.article_ids, dtype=object))
        return self._article_index

    def rows_of(self, customer_ids: Sequence[str]) -> np.ndarray:
        """``int64 (B,)`` state rows of the ids; -1 for customers the state does not know."""
        return positions(self.customer_index, customer_ids)

    def purchased(self, customer_id: str) -> list[str]:
        """The customer's recent distinct purchases before ``as_of``, most recent first."""
        row = int(self.rows_of([customer_id])[0])
        return [] if row < 0 else [self.article_ids[r] for r in self.history.items(row)]

    # -- the one code path -----------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest allowed articles by the served index, as catalogue rows."""
        rows, scores = self.index.search(queries, k)
        return np.where(rows >= 0, self.index_rows[np.maximum(rows, 0)], -1), scores

    def candidates(self, customer_ids: Sequence[str], config: RetrievalConfig | None = None
                   ) -> tuple[Candidates, np.ndarray]:
        """Every source's candidates of the customers with their features, and the customers' state rows."""
        rows = self.rows_of(customer_ids)
        at = np.where(rows >= 0, rows, self.cold_row)
        cands = generate(config or self.config, self.tables, self.history, rows, self.segments[at],
                         np.asarray(self.queries[at], dtype=np.float32), self.article_embeddings, self.search)
        return cands, rows

    def recommend_rows(self, customer_ids: Sequence[str], k: int, exclude_purchased: bool = False,
                       fusion: Fusion | None = None, config: RetrievalConfig | None = None) -> Answer:
        """Top-k catalogue rows and fused scores of each customer, best first.

        Unknown customers get the cold-start query and no history
        (``fallback`` True). ``fusion``/``config`` replace the state's own
        (ablations); the service never passes them.
        """
        cands, rows = self.candidates(customer_ids, config)
        scores = (fusion or self.fusion).score(cands)
        top, sc = top_k(cands, scores, k, exclude_bought=exclude_purchased)
        return Answer(top, sc, rows < 0)

    def labels(self, cands: Candidates, customer_ids: Sequence[str], truth: Mapping[str, Iterable[str]]
               ) -> np.ndarray:
        """``bool (P,)``: candidate i was bought by its customer (``truth``: customer -> article ids)."""
        n = len(self.article_ids)
        keys = []
        for i, c in enumerate(customer_ids):
            rows = self.article_index.get_indexer(list(truth.get(c, ())))
            keys.append(i * n + rows[rows >= 0])
        bought = unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        return np.isin(cands.group * n + cands.rows, bought)

    def recommend(self, customer_ids: Sequence[str], k: int = 12, exclude_purchased: bool = False
                  ) -> list[list[tuple[str, float]]]:
        """``[(article_id, score), ...]`` per customer, best first (at most k)."""
        ans = self.recommend_rows(customer_ids, k, exclude_purchased)
        ids = self.article_ids
        return [[(ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(ans.rows.tolist(), ans.scores.tolist())]

    def predictions(self, customer_ids: Iterable[str], k: int = 100, exclude_purchased: bool = False,
                    batch: int = 2048, fusion: Fusion | None = None, config: RetrievalConfig | None = None,
                    progress: bool = False) -> dict[str, list[str]]:
        """``{customer_id: [article_id, ...]}`` for the evaluation: ``recommend_rows`` in batches."""
        from tqdm.auto import tqdm

        ids = [str(c) for c in customer_ids]
        names = np.asarray(self.article_ids + [""], dtype=object)
        out: dict[str, list[str]] = {}
        for s in tqdm(range(0, len(ids), batch), desc=f"rank v{self.version} @ {self.as_of}", unit="batch",
                      disable=not progress):
            chunk = ids[s:s + batch]
            ans = self.recommend_rows(chunk, k, exclude_purchased, fusion, config)
            lists = names[np.where(ans.rows >= 0, ans.rows, len(names) - 1)].tolist()
            for c, row in zip(chunk, lists):
                out[c] = [a for a in row if a]
        return out

    def similar_items(self, article_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest allowed articles to one catalogue row by embedding (itself excluded)."""
        rows, scores = self.search(self.article_embeddings[article_row:article_row + 1], k + 1)
        keep = rows[0] != article_row
        return rows[0][keep][:k], scores[0][keep][:k]

    # -- persistence ---------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path | str, expected_version: str | None = None, expected_as_of: dt.date | None = None,
             verify: bool = True, mmap: bool = True) -> ServedState:
        """Load (and by default verify every checksum of) a state folder written by ``build_state``."""
        import pandas as pd

        from hm_recsys.index import IndexFailure, load_index

        folder = Path(folder)
        m = read_manifest(folder)
        if expected_version is not None and m["model_version"] != str(expected_version):
            raise StateError(f"{folder}: state of model version {m['model_version']}, not {expected_version}")
        if expected_as_of is not None and m["as_of"] != expected_as_of.isoformat():
            raise StateError(f"{folder}: state as of {m['as_of']}, not {expected_as_of}")
        if verify:
            verify_files(folder, m)
        ids = np.load(folder / CUSTOMER_IDS, allow_pickle=False)
        queries = np.load(folder / QUERIES, allow_pickle=False, mmap_mode="r" if mmap else None)
        if queries.shape != (ids.size + 1, m["dim"]):
            raise StateError(f"{folder}: queries {queries.shape} do not match {ids.size} customers + cold row")
        segments = np.load(folder / SEGMENTS, allow_pickle=False).astype(np.int64)
        if segments.shape != (ids.size + 1,):
            raise StateError(f"{folder}: segments {segments.shape} do not match {ids.size} customers + cold row")
        article_ids = json.loads((folder / ARTICLE_IDS).read_text())
        emb = np.load(folder / ARTICLE_EMB, allow_pickle=False)
        try:
            index, imf = load_index(folder / INDEX, expected_model_version=m["model_version"], expected_dim=m["dim"])
        except IndexFailure as e:
            raise StateError(f"{folder}: {e}") from e
        index_rows = pd.Index(np.asarray(article_ids, dtype=object)).get_indexer(index.article_ids)
        if (index_rows < 0).any():
            raise StateError(f"{folder}: the index holds articles outside the state's catalogue")
        with np.load(folder / HISTORY, allow_pickle=False) as z:
            history = History(dt.date.fromisoformat(str(z["as_of"])), z["customer_rows"], z["indptr"],
                              z["article_rows"], z["days_ago"])
        tables = CandidateTables.load(folder / CANDIDATES)
        as_of = dt.date.fromisoformat(m["as_of"])
        if history.as_of != as_of or tables.as_of != as_of:
            raise StateError(f"{folder}: history/candidate tables are not as of {as_of}")
        customer_index = pd.Index(ids.astype(str).astype(object))
        return cls(m["model_version"], as_of, customer_index, queries, segments, article_ids, emb, history, tables,
                   Fusion.load(folder / FUSION), RetrievalConfig.from_dict(m["retrieval"]), index,
                   index_rows.astype(np.int64), m)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"{path}: no manifest; not a served state folder") from None
    except json.JSONDecodeError as e:
        raise StateError(f"{path}: manifest is not valid JSON ({e})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{path}: served state format {m.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return m


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Every file the manifest lists exists with its sha256, and nothing else is there."""
    files = manifest["files"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    if missing := sorted(set(files) - on_disk):
        raise StateError(f"{folder}: files listed in the manifest are missing: {missing}")
    if extra := sorted(on_disk - set(files)):
        raise StateError(f"{folder}: files not in the manifest: {extra}")
    for rel, digest in files.items():
        if file_sha256(folder / rel) != digest:
            raise StateError(f"{folder / rel}: checksum mismatch (truncated or modified)")


# ---------------------------------------------------------------------------
# Building a state
# ---------------------------------------------------------------------------
def replay_to(rec: Recommender, warehouse: Warehouse, as_of: dt.date, lookback_weeks: int,
              progress: bool = True) -> tuple[Recommender, dict[dt.date, np.ndarray]]:
    """The model with features as of ``as_of`` over the warehouse's current tables, and weekly sales.

    Replays every warehouse week before ``as_of`` through the training
    feature code (``features.Replay``). The catalogue and customer table are
    the warehouse's, so articles and customers added since training are
    served (with out-of-vocabulary ids and their real attributes, history
    and statistics). Returns the ``Recommender`` and the per-article sales of
    the ``lookback_weeks`` weeks before ``as_of``, per customer age bucket
    (``int (n_age_buckets, N)`` per week; ``features.age_bucket``).
    """
    from hm_recsys.bundle import Recommender
    from hm_recsys.features import Replay, Tables, age_bucket

    tables = Tables(warehouse.articles(), warehouse.customers())
    fc = rec.state.config
    replay = Replay(tables, fc)
    weekly: dict[dt.date, np.ndarray] = {}
    first = as_of - dt.timedelta(weeks=lookback_weeks)
    segment = age_bucket(tables.customers, fc.age_edges)
    n_seg, n_art = len(fc.age_edges) + 2, tables.n_articles
    # customer ids are read from the older of the two windows; the history itself keeps its own length
    history_from = min(first, as_of - dt.timedelta(weeks=fc.history_weeks))
    for week, rows in replay.weeks(warehouse, as_of, history_from=history_from, progress=progress,
                                   desc=f"replay to {as_of}"):
        if week >= first:
            key = segment[rows.customer_rows] * n_art + rows.article_rows
            weekly[week] = np.bincount(key, minlength=n_seg * n_art).reshape(n_seg, n_art)
    history, raw = replay.history_at(as_of), replay.article_raw_at(as_of)
    return Recommender(rec.model, rec.state, tables, raw, history), weekly


LOAD_CHECK_QUERIES = 256  # customer queries, evenly spread over the state, that a service checks its index on


def index_agreement(queries: np.ndarray, n_customers: int, index: Index,
                    index_embeddings: np.ndarray) -> tuple[float, int, bool]:
    """(recall@12 of ``index`` vs exact search, queries used, whether every score was finite) on up to
    ``LOAD_CHECK_QUERIES`` of the first ``n_customers`` rows of ``queries``, evenly spaced.

    ``index_embeddings`` are the article embeddings of the index's rows, in its
    order. A service runs this on every state it loads (``serving.load_served``:
    an index built from other embeddings scores near 0), and ``build_state``
    records its result in the manifest, so the loader compares the same
    measurement on the same queries. (The index's own tuning figure is measured
    on customers with a history; over all customers, most with none, the
    overlap with exact top-12 can be 0.1-0.15 lower for the same index.)
    """
    from hm_recsys.index import ExactIndex

    sample = np.unique(np.linspace(0, n_customers - 1, num=min(LOAD_CHECK_QUERIES, n_customers)).astype(np.int64))
    q = np.asarray(queries[sample], dtype=np.float32)
    k = min(12, index_embeddings.shape[0])
    got, got_scores = index.search(q, k)
    want, _ = ExactIndex([str(i) for i in range(index_embeddings.shape[0])], index_embeddings).search(q, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), want.tolist())]))
    return recall, int(sample.size), bool(np.all(np.isfinite(got_scores)))


def build_state(rec: Recommender, warehouse: Warehouse, as_of: dt.date, version: str, out_dir: Path | str,
                config: RetrievalConfig, fusion: Fusion, customers: Iterable[str] | None = None,
                min_recall: float = 0.98, progress: bool = True, chunk: int = 65536,
                truth: Mapping[str, Iterable[str]] | None = None, index_search: SearchSetting | None = None,
                index_rule: IndexRule | None = None) -> ServedState:
    """Compute, verify and atomically publish the served state of ``version`` as of ``as_of`` at ``out_dir``.

    ``customers``: whose query embeddings to precompute (default: every
    customer of the warehouse's table; the evaluation passes the holdout's
    buyers). Returns the loaded state. The ScaNN index's search-time setting
    is chosen by ``index.build_index``'s rules, else ``index.IndexQualityError``
    and nothing is published:

    * ``truth`` (customer id -> article ids bought in the week from
      ``as_of``; the gate passes the holdout's): on truth, through the queries
      serving would send those customers (unknown ones: the cold-start query),
      for the two-tower top-12 and its ``config.two_tower_k`` candidates;
    * ``index_search``: a setting chosen that way for this model earlier,
      re-verified on this state (recall@12 vs exact, ``index_rule.carry_tolerance``);
    * neither: recall@12 vs exact >= ``min_recall``.

    Recall@12 vs exact is always measured on up to 2,000 of the state's
    customers with a history (those a service sees most).
    """
    from tqdm.auto import tqdm

    from hm_recsys.features import age_bucket
    from hm_recsys.index import QueryTruth, build_index, load_index

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    out_dir = Path(out_dir)
    served, weekly = replay_to(rec, warehouse, as_of, config.lookback_weeks(), progress)
    seconds["replay"] = time.perf_counter() - t0
    tables = served.tables
    history = served.history
    art_emb = served.article_embeddings()
    cand = build_tables(config, as_of, weekly, history, tables.articles["product_code"].astype(str).to_numpy())
    seconds["candidate_tables"] = time.perf_counter() - t0 - sum(seconds.values())

    # the state's customers, in customer-table row order
    if customers is None:
        table_rows = np.arange(tables.n_customers, dtype=np.int64)
    else:
        found = tables.customer_rows(list(customers))
        table_rows = unique(found[found < tables.unknown_row])
    ids = np.asarray(tables.customer_index)[table_rows]
    d = served.dim
    queries = np.empty((table_rows.size + 1, d), dtype=np.float32)
    bar = tqdm(total=int(table_rows.size), desc=f"customer embeddings v{version} @ {as_of}", unit="cust",
               unit_scale=True, disable=not progress)
    for s in range(0, table_rows.size, chunk):
        part = ids[s:s + chunk].tolist()
        queries[s:s + len(part)] = served.customer_embeddings(part)
        bar.update(len(part))
    bar.close()
    queries[-1] = served.customer_embeddings([""])[0]  # "" is never an id: the cold-start query
    if not np.all(np.isfinite(queries)):
        raise ValueError(f"version {version}: the customer tower produced NaN/inf embeddings")
    seconds["customer_embeddings"] = time.perf_counter() - t0 - sum(seconds.values())

    local = _local_history(history, table_rows)
    allowed_rows = np.flatnonzero(cand.allowed)
    if allowed_rows.size == 0:
        raise ValueError(f"no article sold in the {config.sold_within_weeks} weeks before {as_of}: "
                         f"nothing to recommend (retrieval.sold_within_weeks)")
    segments = np.r_[age_bucket(tables.customers, rec.state.config.age_edges)[table_rows], 0].astype(np.int16)
    with staged_dir(out_dir) as tmp:
        np.save(tmp / CUSTOMER_IDS, ids.astype("S"))
        np.save(tmp / QUERIES, queries)
        np.save(tmp / SEGMENTS, segments)
        article_ids = [str(a) for a in tables.article_index]
        (tmp / ARTICLE_IDS).write_text(json.dumps(article_ids))
        np.save(tmp / ARTICLE_EMB, art_emb)
        np.savez(tmp / HISTORY, as_of=np.array(as_of.isoformat()), customer_rows=local.customer_rows,
                 indptr=local.indptr, article_rows=local.article_rows, days_ago=local.days_ago)
        cand.save(tmp / CANDIDATES)
        fusion.save(tmp / FUSION)
        # tune on the customers a service will see most: those with a history, then the rest
        with_history = np.flatnonzero(np.diff(local.indptr) > 0) if len(local) else np.zeros(0, np.int64)
        sample_rows = local.customer_rows[with_history] if with_history.size else np.arange(table_rows.size)
        pick = np.unique(np.linspace(0, max(sample_rows.size - 1, 0), num=min(2000, sample_rows.size)).astype(int))
        eval_q = queries[sample_rows[pick]] if sample_rows.size else queries[-1:]
        judge = None
        if truth is not None:
            import pandas as pd

            buyers = [str(c) for c in truth]
            at = positions(pd.Index(ids.astype(str).astype(object)), buyers)
            judge = QueryTruth(queries[np.where(at >= 0, at, queries.shape[0] - 1)], [truth[c] for c in buyers],
                               k=12, candidate_k=config.two_tower_k)
        imf = build_index([article_ids[r] for r in allowed_rows], art_emb[allowed_rows], tmp / INDEX,
                          model_version=version, eval_queries=eval_q, min_recall=min_recall, truth=judge,
                          carried=index_search, rule=index_rule)
        seconds["index"] = time.perf_counter() - t0 - sum(seconds.values())
        load_check = None
        if table_rows.size:
            built, _ = load_index(tmp / INDEX)
            recall, n_checked, _ = index_agreement(queries, int(table_rows.size), built, art_emb[allowed_rows])
            load_check = {"recall_at_12_vs_exact": round(recall, 6), "queries": n_checked}
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_version": str(version),
            "as_of": as_of.isoformat(),
            "dim": d,
            "n_customers": int(table_rows.size),
            "n_customers_with_history": int(with_history.size),
            "n_articles": len(article_ids),
            "n_recommendable_articles": int(allowed_rows.size),
            "retrieval": config.to_dict(),
            "fusion": fusion.to_dict(),
            "index": {"recall_at_12_vs_exact": imf.recall_at_12_vs_exact, "scann_config": imf.scann_config,
                      "n_eval_queries": imf.n_eval_queries, "min_recall": imf.min_recall, "load_check": load_check,
                      "tuning": {k: v for k, v in imf.tuning.items() if k != "tried"}},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return ServedState.load(out_dir, expected_version=str(version), expected_as_of=as_of, verify=False)


def _local_history(history: History, table_rows: np.ndarray) -> History:
    """``history`` restricted to ``table_rows`` (ascending), renumbered to positions 0..m-1."""
    sub = history.subset(table_rows)
    local = np.searchsorted(table_rows, sub.customer_rows).astype(np.int32)
    return dataclasses.replace(sub, customer_rows=local)


def describe(state: ServedState) -> dict[str, Any]:
    """What ``/metadata`` and the logs show of a state: no paths, no per-file checksums."""
    m = state.manifest
    return {"model_version": state.version, "as_of": state.as_of.isoformat(),
            **{k: m.get(k) for k in ("n_customers", "n_customers_with_history", "n_articles",
                                     "n_recommendable_articles", "index", "built_at")},
            "fusion": state.fusion.describe()}
