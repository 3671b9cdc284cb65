"""Nearest-neighbour index over article-tower embeddings: ScaNN, with an exact twin.

Both implementations answer the same question through one interface::

    index.search(queries: float32[n, d], k) -> (rows: int64[n, k], scores: float32[n, k])

``rows`` index into ``index.article_ids``; scores are dot products (the towers
L2-normalise, so they are cosines). ``ExactIndex`` is brute force and is the
reference. ScaNN is built once; its search-time settings (leaves searched,
reorder size) are then chosen by one of three rules, whichever applies first
(``build_index``; each is recorded in the manifest's ``tuning``):

* ``holdout``: with a ``QueryTruth`` (what the queries' customers went on to
  buy), the cheapest setting whose holdout Recall@12 through the index is at
  least ``IndexRule.floor`` (0.99) x through exact search (the two-tower
  candidate source's recall, what the fusion sees, is reported beside it);
* ``carried``: with a ``SearchSetting`` chosen that way for the same model
  (a later state has no truth yet), that setting, widened only while its
  recall@12 vs exact is below the one measured when it was chosen minus
  ``IndexRule.carry_tolerance``;
* ``recall_vs_exact``: otherwise recall@12 vs exact >= ``min_recall`` (0.98).

A ScaNN index that meets none is never published (``IndexQualityError``).

On disk an index is a folder that describes itself::

    index/
      manifest.json      model version, dims, checksums of every file, ScaNN
                         config, measured recall@12 vs exact, how the
                         search-time setting was chosen (``tuning``)
      article_ids.json   row -> article_id
      embeddings.npy     the exact embeddings (the exact twin and the checksum)
      scann/             ScaNN's serialized searcher (relative paths)

``load_index`` verifies the manifest and every checksum, the model version and
the dimension *before* ScaNN reads anything, so a truncated or swapped file is
a clear error instead of a crash or, worse, silently wrong neighbours.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hm_recsys.arrays import score_buffer, scores_into, top_k
from hm_recsys.fsutil import file_sha256, staged_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "article_ids.json"
EMB_FILE = "embeddings.npy"
SCANN_DIR = "scann"


class IndexFailure(RuntimeError):
    """Base class: an index could not be built or loaded."""


class IndexQualityError(IndexFailure):
    """No search-time setting of ScaNN met the quality floor; nothing was published."""


class IndexIntegrityError(IndexFailure):
    """An index folder failed verification (tampered, truncated, wrong model or dimension)."""


class Index(Protocol):
    article_ids: list[str]

    @property
    def dim(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (n, {dim}), got {q.shape}")
    return np.ascontiguousarray(q)


class ExactIndex:
    """Brute-force maximum inner product search (numpy matmul + partial sort)."""

    def __init__(self, article_ids: list[str], embeddings: np.ndarray):
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(article_ids):
            raise ValueError(f"embeddings {emb.shape} do not match {len(article_ids)} article ids")
        self.article_ids = list(article_ids)
        self.embeddings = emb

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    # Queries scored per chunk so the (chunk, N) score matrix stays ~256 MiB.
    _CHUNK_FLOATS = 1 << 26

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_queries(queries, self.dim)
        k = min(int(k), len(self.article_ids))
        step = max(1, self._CHUNK_FLOATS // len(self.article_ids))
        if q.shape[0] <= step:
            return self._search_chunk(q, k)
        buffer = score_buffer(step, self.embeddings)
        parts = [self._search_chunk(q[s : s + step], k, buffer) for s in range(0, q.shape[0], step)]
        return np.concatenate([r for r, _ in parts]), np.concatenate([s for _, s in parts])

    def _search_chunk(self, q: np.ndarray, k: int, buffer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        # exact, ties broken by row so the answer is deterministic
        rows, scores = top_k(scores_into(q, self.embeddings, buffer), k)
        return rows, scores.astype(np.float32)


@dataclass(frozen=True)
class ScannConfig:
    """ScaNN settings. ``brute_force`` skips the tree and quantisation (exact, for small catalogues)."""

    num_leaves: int = 0
    leaves_to_search: int = 0
    reorder: int = 0
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    training_sample_size: int = 0
    brute_force: bool = False

    @classmethod
    def for_size(cls, n: int) -> ScannConfig:
        """Starting point for a catalogue of ``n`` articles (then tuned on real queries).

        Small catalogues are searched exactly: a tree over a few hundred points
        buys nothing and loses recall. Otherwise leaves ~ sqrt(n), as ScaNN's
        authors recommend, searching ~5% of them, reordering 100 candidates.
        """
        if n < 2000:
            return cls(brute_force=True)
        leaves = max(16, int(math.sqrt(n)))
        return cls(
            num_leaves=leaves,
            leaves_to_search=max(8, leaves // 20),
            reorder=100,
            training_sample_size=min(n, 250_000),
        )

    def widened(self) -> ScannConfig:
        """The next, more exhaustive setting tried when recall is below the floor."""
        return ScannConfig(
            num_leaves=self.num_leaves,
            leaves_to_search=min(self.num_leaves, self.leaves_to_search * 2),
            reorder=self.reorder * 2,
            dims_per_block=self.dims_per_block,
            anisotropic_quantization_threshold=self.anisotropic_quantization_threshold,
            training_sample_size=self.training_sample_size,
        )


class ScannIndex:
    """ScaNN searcher plus the article id list it was built over."""

    def __init__(self, article_ids: list[str], searcher, dim: int, config: ScannConfig):
        self.article_ids = list(article_ids)
        self._searcher = searcher
        self._dim = dim
        self.config = config

    @property
    def dim(self) -> int:
        return self._dim

    @classmethod
    def build(cls, article_ids: list[str], embeddings: np.ndarray, config: ScannConfig, k: int = 100) -> ScannIndex:
        import scann

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        n = emb.shape[0]
        builder = scann.scann_ops_pybind.builder(emb, min(k, n), "dot_product")
        if config.brute_force:
            searcher = builder.score_brute_force().build()
        else:
            searcher = (
                builder.tree(
                    num_leaves=min(config.num_leaves, n),
                    num_leaves_to_search=min(config.leaves_to_search, config.num_leaves, n),
                    training_sample_size=min(config.training_sample_size or n, n),
                    # k-means++ seeding: ScaNN's random centre initialisation differs from build to build,
                    # which made the same embeddings give other neighbours (and the same seed other metrics)
                    random_init=False,
                )
                .score_ah(config.dims_per_block, anisotropic_quantization_threshold=config.anisotropic_quantization_threshold)
                .reorder(config.reorder)
                .build()
            )
        return cls(article_ids, searcher, emb.shape[1], config)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_queries(queries, self.dim)
        k = min(int(k), len(self.article_ids))
        if self.config.brute_force:
            rows, scores = self._searcher.search_batched(q, final_num_neighbors=k)
        else:
            rows, scores = self._searcher.search_batched(
                q,
                final_num_neighbors=k,
                pre_reorder_num_neighbors=max(self.config.reorder, k),
                leaves_to_search=self.config.leaves_to_search,
            )
        return np.asarray(rows, dtype=np.int64), np.asarray(scores, dtype=np.float32)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._searcher.serialize(str(folder), relative_path=True)


def recall_vs_exact(approx: Index, exact: ExactIndex, queries: np.ndarray, k: int = 12) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries (ids compared, never scores)."""
    return overlap(approx.search(queries, k)[0], exact.search(queries, k)[0])


def overlap(got: np.ndarray, want: np.ndarray) -> float:
    """Mean |got row ∩ want row| / k, ``want`` (n, k) the exact top-k rows (rows compared, never scores)."""
    if not len(want):
        return 1.0
    return float((got[:, :, None] == want[:, None, :]).any(axis=2).sum(axis=1).mean() / want.shape[1])


# -- choosing the search-time setting ----------------------------------------------------
@dataclass(frozen=True)
class IndexRule:
    """How a search-time setting is judged (see ``build_index``).

    floor: holdout Recall@12 through the index / through exact search that the
        ``holdout`` rule needs (``HM_RECSYS_INDEX_FLOOR``, 0.99). The two-tower
        source's candidate recall (top ``candidate_k``) is measured and
        reported beside it, not required: the fusion rescores every candidate
        with the exact cosine, and at full scale no setting short of exact
        search reached 0.99x on it (0.986 with every leaf searched).
    sanity_recall: recall@12 vs exact below which no setting passes on truth
        alone: a guard against a holdout whose quality barely depends on the
        neighbours (0.8).
    min_truth_hits: the truth judges only when exact search finds at least this
        many (customer, bought article) pairs in the top-12; with fewer, one
        lucky or unlucky hit moves the ratio by over 1% and the
        ``recall_vs_exact`` rule decides instead (100).
    carry_tolerance: how far below the recall@12 vs exact measured when a
        setting was chosen a carried setting may measure on a later state
        before it is widened (``HM_RECSYS_INDEX_CARRY_TOLERANCE``, 0.02).
    max_truth_queries: customers the truth judges on at most (an even,
        fixed sample of them beyond that): each setting tried costs one search
        of every one, and at full scale 70k holdout buyers made tuning take
        minutes (20,000).
    """

    floor: float = 0.99
    sanity_recall: float = 0.8
    min_truth_hits: int = 100
    carry_tolerance: float = 0.02
    max_truth_queries: int = 20_000

    def __post_init__(self):
        if not (0 < self.floor <= 1 and 0 <= self.sanity_recall <= 1 and 0 <= self.carry_tolerance < 1):
            raise ValueError(f"index rule out of range: {self}")
        if self.min_truth_hits < 1 or self.max_truth_queries < 1:
            raise ValueError(f"min_truth_hits and max_truth_queries must be >= 1: {self}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> IndexRule:
        env = os.environ if env is None else env

        def num(name: str, default: float) -> float:
            raw = (env.get(name) or "").strip()
            try:
                return float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None

        return cls(floor=num("HM_RECSYS_INDEX_FLOOR", cls.floor),
                   carry_tolerance=num("HM_RECSYS_INDEX_CARRY_TOLERANCE", cls.carry_tolerance))


@dataclass(frozen=True)
class QueryTruth:
    """What the customers behind some queries went on to buy: the ``holdout`` rule's judge.

    queries: float32 (n, d), one per scored customer (what serving sends: an
        unknown customer's is the cold-start query).
    relevant: n collections of the article ids each customer bought. Ids the
        index does not hold count in |relevant| but can never be found, by the
        index or by exact search.
    k: the list users see (Recall@k of the two-tower top-k).
    candidate_k: neighbours the two-tower candidate source asks for (what the
        fusion sees; ``RetrievalConfig.two_tower_k``).
    """

    queries: np.ndarray
    relevant: Sequence[Collection[str]]
    k: int = 12
    candidate_k: int = 100

    def __post_init__(self):
        if len(self.relevant) != len(self.queries):
            raise ValueError(f"{len(self.queries)} queries but {len(self.relevant)} relevant sets")

    def sample(self, n: int) -> QueryTruth:
        """At most ``n`` of the customers, evenly spaced (the same ones every time)."""
        if len(self.queries) <= n:
            return self
        pick = np.unique(np.linspace(0, len(self.queries) - 1, num=n).astype(np.int64))
        return dataclasses.replace(self, queries=self.queries[pick], relevant=[self.relevant[i] for i in pick])


@dataclass(frozen=True)
class SearchSetting:
    """A search-time setting chosen on truth for one model, carried to its later states.

    ``leaves_fraction`` (leaves searched / leaves) scales to another state's
    tree; ``None`` when the setting was ScaNN's brute force. ``payload`` is the
    whole record (``carry_payload``), kept in the later state's manifest.
    """

    leaves_fraction: float | None
    reorder: int
    recall_at_12_vs_exact: float
    payload: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSetting:
        try:
            frac = None if d.get("brute_force") else float(d["leaves_fraction"])
            out = cls(frac, int(d["reorder"]), float(d["recall_at_12_vs_exact"]), dict(d))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a search setting ({e!r}): {dict(d)}") from None
        bad_tree = frac is not None and (not 0 < frac <= 1 or out.reorder < 1)
        if bad_tree or not 0 <= out.recall_at_12_vs_exact <= 1:
            raise ValueError(f"search setting out of range: {dict(d)}")
        return out

    @classmethod
    def from_json(cls, text: str) -> SearchSetting:
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"not a search setting ({e!r}): {text[:200]!r}") from None

    def applied_to(self, cfg: ScannConfig) -> ScannConfig:
        """``cfg`` (a build-time config) searching the same share of its leaves, with the same reorder."""
        if cfg.brute_force or self.leaves_fraction is None:
            return cfg  # nothing to scale: a brute-force index, or a tree where the chosen one was exact
        # ceil: never search a smaller share; the slack keeps l / n * n == l (float rounding) from becoming l + 1
        leaves = max(1, min(cfg.num_leaves, math.ceil(self.leaves_fraction * cfg.num_leaves - 1e-6)))
        return dataclasses.replace(cfg, leaves_to_search=leaves, reorder=self.reorder)


# One reordered candidate costs about as much as 50 points scored by asymmetric hashing: bench/index.py on the
# full-scale gate state (55k articles, 64 dims, dims_per_block 2, 234 leaves): +11 leaves searched (+2.6k points)
# cost +4.8 us a query, reorder 50 -> 100 cost +4.0 us.
REORDER_COST = 50.0


def search_cost(cfg: ScannConfig, n: int) -> float:
    """Estimated work of one query, in points scored: the order in which settings are tried (cheapest first).

    A model, not a timing: the choice must not depend on what else the machine runs.
    """
    if cfg.brute_force:
        return float(n)
    return cfg.leaves_to_search * n / max(1, cfg.num_leaves) + REORDER_COST * cfg.reorder


def search_grid(cfg: ScannConfig, n: int, min_reorder: int = 12) -> list[ScannConfig]:
    """Search-time settings around ``cfg`` over ONE searcher of ``n`` points, cheapest first (``search_cost``).

    Leaves searched: x1/4, x1/2, then doubling up to every leaf; reorder:
    x1/2 .. x8, at least ``min_reorder`` (a search for k neighbours reorders
    at least k, so smaller values are the same search).
    """
    if cfg.brute_force:
        return [cfg]
    base = max(1, cfg.leaves_to_search)
    leaves = {math.ceil(base / 4), math.ceil(base / 2), cfg.num_leaves}
    x = base
    while x < cfg.num_leaves:
        leaves.add(x)
        x *= 2
    reorders = {max(min_reorder, int(cfg.reorder * f)) for f in (0.5, 1, 2, 4, 8)}
    grid = [dataclasses.replace(cfg, leaves_to_search=min(max(1, lv), cfg.num_leaves), reorder=r)
            for lv in sorted(leaves) for r in sorted(reorders)]
    return sorted(set(grid), key=lambda c: (search_cost(c, n), c.leaves_to_search))


def _exact_hits(queries: np.ndarray, emb: np.ndarray, pair_q: np.ndarray, pair_r: np.ndarray,
                ks: Sequence[int]) -> np.ndarray:
    """``bool (P, len(ks))``: is row ``pair_r[p]`` in ``ExactIndex``'s top-k of query ``pair_q[p]``, per k.

    One matmul and one ``arrays.top_k`` (for the k-th highest scores) per
    chunk of queries. A row is in the top-k when fewer than k rows beat it: a
    higher score, or the same score and a lower row (the order ``ExactIndex``
    sorts by).
    """
    n_art = emb.shape[0]
    ks = [min(int(k), n_art) for k in ks]
    out = np.zeros((pair_q.size, len(ks)), dtype=bool)
    step = max(1, ExactIndex._CHUNK_FLOATS // n_art)
    buffer = score_buffer(min(step, queries.shape[0]), emb)
    for s in range(0, queries.shape[0], step):
        at = np.flatnonzero((pair_q >= s) & (pair_q < s + step))
        if not at.size:
            continue
        scores = scores_into(queries[s:s + step], emb, buffer)
        kth = top_k(scores, max(ks))[1]  # the k-th highest score of each query, per k
        q, r = pair_q[at] - s, pair_r[at]
        own = scores[q, r]
        for j, k in enumerate(ks):
            t = kth[q, k - 1]  # the k-th highest score of each pair's query
            hit = own > t
            for i in np.flatnonzero(own == t):  # a tie with the k-th: rare, settled the way ExactIndex does
                row = scores[q[i]]
                hit[i] = (row > t[i]).sum() + (row[:r[i]] == t[i]).sum() < k
            out[at, j] = hit
    return out


class _TruthJudge:
    """Recall@k and candidate recall through an index vs through exact search, on a ``QueryTruth``.

    The exact side is computed once; each setting then costs one search of
    the truth's queries for ``candidate_k`` neighbours (the two-tower source's
    search; its first k are the two-tower top-k).
    """

    _PAIRS_CHUNK = 1 << 15  # (customer, bought article) pairs looked up at once: (chunk, candidate_k) int64

    def __init__(self, truth: QueryTruth, exact: ExactIndex):
        n_art = len(exact.article_ids)
        self.k = min(int(truth.k), n_art)
        self.kc = min(max(int(truth.candidate_k), self.k), n_art)
        self.queries = _as_queries(truth.queries, exact.dim)
        row_of = {a: i for i, a in enumerate(exact.article_ids)}
        keep, pq, pr, pw = [], [], [], []
        for i, rel in enumerate(truth.relevant):
            rel = set(rel)
            if not rel:
                continue  # no relevant set: not a scored customer
            q = len(keep)
            keep.append(i)
            for a in rel:
                if a in row_of:
                    pq.append(q)
                    pr.append(row_of[a])
                    pw.append(1.0 / len(rel))
        self.queries = self.queries[keep]
        self.n = len(keep)
        self.pair_q = np.asarray(pq, dtype=np.int64)
        self.pair_r = np.asarray(pr, dtype=np.int64)
        self.pair_w = np.asarray(pw, dtype=np.float64)
        t = time.perf_counter()
        hits = _exact_hits(self.queries, exact.embeddings, self.pair_q, self.pair_r, (self.k, self.kc))
        self.seconds_exact = time.perf_counter() - t
        self.exact_hits = int(hits[:, 0].sum())
        self.exact = {"recall_at_k": self._per_query(hits[:, 0]), "candidate_recall": self._per_query(hits[:, 1])}

    def _per_query(self, hit: np.ndarray) -> np.ndarray:
        return np.bincount(self.pair_q, weights=self.pair_w * hit, minlength=self.n)

    def measure(self, index: Index) -> dict[str, dict[str, float]]:
        """Per measure: mean through the index and through exact search, their ratio and its paired SE."""
        rows, _ = index.search(self.queries, self.kc)
        in_k = np.zeros(self.pair_q.size, dtype=bool)
        in_kc = np.zeros(self.pair_q.size, dtype=bool)
        for s in range(0, self.pair_q.size, self._PAIRS_CHUNK):
            part = slice(s, s + self._PAIRS_CHUNK)
            found = rows[self.pair_q[part]] == self.pair_r[part, None]  # where each bought article was found
            in_k[part], in_kc[part] = found[:, :self.k].any(axis=1), found.any(axis=1)
        got = {"recall_at_k": self._per_query(in_k), "candidate_recall": self._per_query(in_kc)}
        out = {}
        for name, per in got.items():
            base = self.exact[name]
            mean_x = float(base.mean()) if self.n else 0.0
            diff = per - base  # paired: the same customers through both searches
            se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
            out[name] = {"index": round(float(per.mean()) if self.n else 0.0, 6), "exact": round(mean_x, 6),
                         "ratio": round(float(per.mean()) / mean_x, 6) if mean_x > 0 else 1.0,
                         "ratio_se": round(se / mean_x, 6) if mean_x > 0 else 0.0}
        return out

    def facts(self) -> dict[str, Any]:
        return {"n_queries": self.n, "n_pairs_in_index": int(self.pair_q.size), "exact_hits_at_k": self.exact_hits,
                "k": self.k, "candidate_k": self.kc, "seconds_exact": round(self.seconds_exact, 3)}


def _setting(cfg: ScannConfig) -> dict[str, Any]:
    return {"brute_force": cfg.brute_force, "num_leaves": cfg.num_leaves,
            "leaves_to_search": cfg.leaves_to_search, "reorder": cfg.reorder}


@dataclass
class IndexManifest:
    model_version: str
    n_articles: int
    dim: int
    embedding_sha256: str
    article_ids_sha256: str
    scann_config: dict
    recall_at_12_vs_exact: float
    n_eval_queries: int
    min_recall: float
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tuning: dict = field(default_factory=dict)  # how the search-time setting was chosen (build_index)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def carry_payload(index_facts: IndexManifest | Mapping[str, Any]) -> dict[str, Any] | None:
    """What a later state of the same model starts from (``SearchSetting.from_dict``); None unless chosen on truth.

    ``index_facts``: an ``IndexManifest``, or a served state manifest's
    ``index`` section (the same ``scann_config``, ``recall_at_12_vs_exact``
    and ``tuning``).
    """
    f = asdict(index_facts) if isinstance(index_facts, IndexManifest) else index_facts
    t = f.get("tuning") or {}
    if t.get("floor_kind") != "holdout":
        return None
    c = f["scann_config"]
    h = t["holdout"]
    return {
        "brute_force": bool(c["brute_force"]),
        "leaves_fraction": None if c["brute_force"] else c["leaves_to_search"] / c["num_leaves"],
        "leaves_to_search": c["leaves_to_search"], "num_leaves": c["num_leaves"], "reorder": c["reorder"],
        "recall_at_12_vs_exact": f["recall_at_12_vs_exact"], "floor": t["floor"],
        "recall_at_12_ratio": h["recall_at_k"]["ratio"], "candidate_recall_ratio": h["candidate_recall"]["ratio"],
        "candidate_k": h["candidate_k"], "n_queries": h["n_queries"],
    }


def build_index(
    article_ids: list[str],
    embeddings: np.ndarray,
    out_dir: Path,
    model_version: str,
    eval_queries: np.ndarray | None = None,
    min_recall: float = 0.98,
    config: ScannConfig | None = None,
    max_widenings: int = 6,
    seed: int = 0,
    truth: QueryTruth | None = None,
    carried: SearchSetting | None = None,
    rule: IndexRule | None = None,
) -> IndexManifest:
    """Build, tune, verify and atomically publish a ScaNN index at ``out_dir``.

    The searcher is built once (``config``, default ``ScannConfig.for_size``);
    leaves searched and reorder size are search-time settings, so every
    setting tried runs on the same searcher, and each exact answer it is
    judged against is computed once. ``eval_queries`` (float32[n, d]) should
    be real customer embeddings; without them a sample of the article
    embeddings is used (item-to-item queries). Recall@12 vs exact on them is
    recorded whatever the rule. The first rule that applies chooses the
    setting (``rule`` holds the numbers, ``IndexRule()`` by default):

    1. ``holdout`` (``truth`` given, and exact search finds at least
       ``rule.min_truth_hits`` bought articles in its top-12): the settings of
       ``search_grid`` are tried cheapest first (``search_cost``), and the
       first is taken whose recall@12 vs exact is >= ``rule.sanity_recall``
       and whose mean Recall@k of the top-k through the index is >=
       ``rule.floor`` x through exact search, on the truth's queries (at most
       ``rule.max_truth_queries`` of them); the recall of the top
       ``candidate_k`` is measured and reported beside it. ScaNN's brute force (small
       catalogues) is exact scoring and is taken as it is, measured.
    2. ``carried`` (``carried`` given): that setting, its leaves scaled to this
       tree; while recall@12 vs exact is below the carried one minus
       ``rule.carry_tolerance``, widened (2x leaves searched, 2x reorder).
    3. ``recall_vs_exact``: from ``config``'s setting, widened the same way
       while recall@12 vs exact is below ``min_recall``.

    Raises ``IndexQualityError`` and publishes nothing if the rule's floor is
    never met (rules 2-3: after ``max_widenings`` widenings). The manifest's
    ``tuning`` says which rule chose, why, and what it measured.
    """
    out_dir = Path(out_dir)
    rule = rule or IndexRule()
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(article_ids) != emb.shape[0] or len(set(article_ids)) != len(article_ids):
        raise ValueError("article_ids must be unique and match the embedding rows")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or inf; refusing to index them")
    exact = ExactIndex(article_ids, emb)
    if eval_queries is None:
        rng = np.random.default_rng(seed)
        eval_queries = emb[rng.choice(len(emb), size=min(1000, len(emb)), replace=False)]
    queries = _as_queries(eval_queries, exact.dim)

    cfg = config or ScannConfig.for_size(len(article_ids))
    if carried is not None:
        cfg = carried.applied_to(cfg)
    t0 = time.perf_counter()
    built = ScannIndex.build(article_ids, emb, cfg)
    seconds = {"build": time.perf_counter() - t0}
    k = min(12, len(article_ids))
    want, _ = exact.search(queries, k)

    def at(c: ScannConfig) -> ScannIndex:
        return ScannIndex(article_ids, built._searcher, exact.dim, c)

    def vs_exact(c: ScannConfig) -> float:
        return overlap(at(c).search(queries, k)[0], want)

    judge = _TruthJudge(truth.sample(rule.max_truth_queries), exact) if truth is not None else None
    note = ""
    if judge is not None and judge.exact_hits < rule.min_truth_hits:
        note = (f"the truth is too small to judge: exact search finds {judge.exact_hits} bought articles in the "
                f"top-{judge.k} of {judge.n} customers (< {rule.min_truth_hits}); ")
        judge = None
    t = time.perf_counter()
    if judge is not None:
        cfg, recall, tuning = _tune_on_truth(cfg, judge, at, vs_exact, rule, len(article_ids))
    elif carried is not None:
        target = round(carried.recall_at_12_vs_exact - rule.carry_tolerance, 6)
        cfg, recall, tuning = _widen(cfg, vs_exact, target, max_widenings, "carried")
        tuning["carried"] = carried.payload
        tuning["reason"] = (f"{note}carried from the setting chosen on truth for this model "
                            f"({_describe_payload(carried.payload)}): {tuning['reason']}")
    else:
        cfg, recall, tuning = _widen(cfg, vs_exact, min_recall, max_widenings, "recall_vs_exact")
        tuning["reason"] = note + tuning["reason"]
    seconds["tune"] = time.perf_counter() - t
    tuning["seconds"] = {k_: round(v, 3) for k_, v in seconds.items()}
    tuning["setting"] = _setting(cfg)
    index = at(cfg)

    with staged_dir(out_dir) as tmp:
        np.save(tmp / EMB_FILE, emb)
        (tmp / IDS_FILE).write_text(json.dumps(list(article_ids)))
        index.save(tmp / SCANN_DIR)
        files = {
            str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest = IndexManifest(
            model_version=str(model_version),
            n_articles=len(article_ids),
            dim=exact.dim,
            embedding_sha256=files[EMB_FILE],
            article_ids_sha256=files[IDS_FILE],
            scann_config=asdict(cfg),
            recall_at_12_vs_exact=round(recall, 6),
            n_eval_queries=int(queries.shape[0]),
            min_recall=min_recall,
            files=files,
            tuning=tuning,
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _describe(c: ScannConfig) -> str:
    return "brute force" if c.brute_force else \
        f"leaves_to_search={c.leaves_to_search}/{c.num_leaves} reorder={c.reorder}"


def _describe_payload(p: Mapping[str, Any]) -> str:
    if p.get("brute_force"):
        return f"brute force, recall@12 vs exact {p.get('recall_at_12_vs_exact')}"
    return (f"{p.get('leaves_to_search')}/{p.get('num_leaves')} leaves, reorder {p.get('reorder')}, "
            f"recall@12 vs exact {p.get('recall_at_12_vs_exact')}")


def _widen(cfg: ScannConfig, vs_exact, target: float, max_widenings: int, kind: str
           ) -> tuple[ScannConfig, float, dict[str, Any]]:
    """From ``cfg``, widen while recall@12 vs exact < ``target`` (rules ``carried`` and ``recall_vs_exact``)."""
    start, tried, detail = cfg, [], []
    for _ in range(max_widenings + 1):
        recall = vs_exact(cfg)
        tried.append({**_setting(cfg), "recall_at_12_vs_exact": round(recall, 6)})
        detail.append(f"{_describe(cfg)}: {recall:.4f}")
        if recall >= target or cfg.brute_force:
            break
        wider = cfg.widened()
        if wider == cfg:
            break
        cfg = wider
    detail = "; ".join(detail)
    if recall < target:
        raise IndexQualityError(f"ScaNN recall@12 vs exact {recall:.4f} < floor {target} ({kind}) after "
                                f"{len(tried)} settings ({detail}); not published")
    widened = len(tried) - 1
    reason = (f"{_describe(cfg)}: recall@12 vs exact {recall:.4f} >= {target}"
              + (f" after {widened} widening(s) from {_describe(start)}" if widened else ""))
    return cfg, recall, {"floor_kind": kind, "min_recall_at_12_vs_exact": target, "widened": widened,
                         "reason": reason, "tried": tried}


def _tune_on_truth(cfg: ScannConfig, judge: _TruthJudge, at, vs_exact, rule: IndexRule, n: int
                   ) -> tuple[ScannConfig, float, dict[str, Any]]:
    """Rule ``holdout``: the cheapest setting of the grid meeting the floor on truth (see ``build_index``)."""
    grid = search_grid(cfg, n, min_reorder=judge.kc)
    tried = []
    pick = None
    for c in grid:
        recall = vs_exact(c)
        entry = {"leaves_to_search": c.leaves_to_search, "reorder": c.reorder,
                 "recall_at_12_vs_exact": round(recall, 6)}
        tried.append(entry)
        if recall < rule.sanity_recall and not c.brute_force:
            entry["meets"] = False
            continue  # not worth a search of every truth query
        m = judge.measure(at(c))
        entry.update({"recall_at_k_ratio": m["recall_at_k"]["ratio"],
                      "candidate_recall_ratio": m["candidate_recall"]["ratio"]})
        entry["meets"] = bool(c.brute_force or entry["recall_at_k_ratio"] >= rule.floor)
        if entry["meets"]:
            pick = (c, recall, m)
            break
    holdout = {**judge.facts(), "floor": rule.floor, "sanity_recall": rule.sanity_recall}
    detail = "; ".join(f"{t['leaves_to_search']}/{t['reorder']}: vs exact {t['recall_at_12_vs_exact']:.4f}"
                       + (f", ratios {t['recall_at_k_ratio']:.4f}/{t['candidate_recall_ratio']:.4f}"
                          if "recall_at_k_ratio" in t else "") for t in tried)
    if pick is None:
        raise IndexQualityError(
            f"no search-time setting of {len(grid)} (leaves_to_search/reorder of {cfg.num_leaves} leaves) has "
            f"holdout Recall@{judge.k} through the index >= {rule.floor} x through exact search with recall@12 vs "
            f"exact >= {rule.sanity_recall} ({detail}; ratios: Recall@{judge.k}/two-tower recall@{judge.kc}); "
            f"not published")
    c, recall, m = pick
    holdout.update(m)
    r, cr = m["recall_at_k"], m["candidate_recall"]
    why = ("ScaNN brute force (exact scoring, nothing to tune)" if c.brute_force else
           f"{_describe(c)}, the cheapest meeting the floor ({len(tried)} of {len(grid)} settings tried, "
           f"cheapest first)")
    reason = (f"{why}: through the index / through exact search on {judge.n:,} holdout customers, "
              f"Recall@{judge.k} {r['ratio']:.4f} (SE {r['ratio_se']:.4f}; floor {rule.floor}), two-tower "
              f"recall@{judge.kc} {cr['ratio']:.4f} (SE {cr['ratio_se']:.4f}; reported); recall@12 vs exact "
              f"{recall:.4f} (sanity floor {rule.sanity_recall})")
    return c, recall, {"floor_kind": "holdout", "floor": rule.floor, "reason": reason, "holdout": holdout,
                       "tried": tried}


def read_manifest(folder: Path) -> IndexManifest:
    path = Path(folder) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise IndexIntegrityError(f"{path}: no manifest; not an index folder") from None
    except json.JSONDecodeError as e:
        raise IndexIntegrityError(f"{path}: manifest is not valid JSON ({e})") from None
    try:
        return IndexManifest(**raw)
    except TypeError as e:
        raise IndexIntegrityError(f"{path}: manifest has unexpected fields ({e})") from None


def verify_index(folder: Path, expected_model_version: str | None = None, expected_dim: int | None = None) -> IndexManifest:
    """Check manifest, model version, dimension and every file's checksum. Reads no ScaNN data."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m.format_version != FORMAT_VERSION:
        raise IndexIntegrityError(f"{folder}: index format {m.format_version}, this code reads {FORMAT_VERSION}")
    if expected_model_version is not None and m.model_version != str(expected_model_version):
        raise IndexIntegrityError(
            f"{folder}: index was built for model version {m.model_version}, not {expected_model_version}"
        )
    if expected_dim is not None and m.dim != expected_dim:
        raise IndexIntegrityError(f"{folder}: index dimension {m.dim} does not match the model's {expected_dim}")
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    if missing := sorted(set(m.files) - on_disk):
        raise IndexIntegrityError(f"{folder}: files listed in the manifest are missing: {missing}")
    if extra := sorted(on_disk - set(m.files)):
        raise IndexIntegrityError(f"{folder}: files not in the manifest: {extra}")
    for rel, digest in m.files.items():
        if file_sha256(folder / rel) != digest:
            raise IndexIntegrityError(f"{folder / rel}: checksum mismatch (truncated or modified)")
    return m


def load_index(
    folder: Path,
    expected_model_version: str | None = None,
    expected_dim: int | None = None,
    exact: bool = False,
) -> tuple[Index, IndexManifest]:
    """Verify, then load the ScaNN index (or its exact twin with ``exact=True``)."""
    folder = Path(folder)
    m = verify_index(folder, expected_model_version, expected_dim)
    ids = json.loads((folder / IDS_FILE).read_text())
    emb = np.load(folder / EMB_FILE, allow_pickle=False)
    if emb.shape != (m.n_articles, m.dim) or len(ids) != m.n_articles:
        raise IndexIntegrityError(f"{folder}: embeddings {emb.shape} / ids {len(ids)} disagree with the manifest")
    if exact:
        return ExactIndex(ids, emb), m
    import scann

    searcher = scann.scann_ops_pybind.load_searcher(str(folder / SCANN_DIR))
    return ScannIndex(ids, searcher, m.dim, ScannConfig(**m.scann_config)), m
