"""Nearest-neighbour index over article-tower embeddings: ScaNN, with an exact twin.

Both implementations answer the same question through one interface::

    index.search(queries: float32[n, d], k) -> (rows: int64[n, k], scores: float32[n, k])

``rows`` index into ``index.article_ids``; scores are dot products (the towers
L2-normalise, so they are cosines). ``ExactIndex`` is brute force and is the
reference: a ScaNN index is only published after its recall@12 against the
exact twin, on real query embeddings, reaches a floor (0.98 by default).

On disk an index is a folder that describes itself::

    index/
      manifest.json      model version, dims, checksums of every file, ScaNN
                         config, measured recall@12 vs exact
      article_ids.json   row -> article_id
      embeddings.npy     the exact embeddings (the exact twin and the checksum)
      scann/             ScaNN's serialized searcher (relative paths)

``load_index`` verifies the manifest and every checksum, the model version and
the dimension *before* ScaNN reads anything, so a truncated or swapped file is
a clear error instead of a crash or, worse, silently wrong neighbours.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from hm_recsys.fsutil import file_sha256, staged_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "article_ids.json"
EMB_FILE = "embeddings.npy"
SCANN_DIR = "scann"


class IndexFailure(RuntimeError):
    """Base class: an index could not be built or loaded."""


class IndexQualityError(IndexFailure):
    """ScaNN could not reach the recall floor against the exact twin; nothing was published."""


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
        parts = [self._search_chunk(q[s : s + step], k) for s in range(0, q.shape[0], step)]
        return np.concatenate([r for r, _ in parts]), np.concatenate([s for _, s in parts])

    def _search_chunk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = q @ self.embeddings.T  # (n, N)
        if k < scores.shape[1]:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        part_scores = np.take_along_axis(scores, part, axis=1)
        # Ties broken by row so the exact answer is deterministic.
        order = np.lexsort((part, -part_scores), axis=1)
        rows = np.take_along_axis(part, order, axis=1).astype(np.int64)
        return rows, np.take_along_axis(part_scores, order, axis=1).astype(np.float32)


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
    a, _ = approx.search(queries, k)
    e, _ = exact.search(queries, k)
    hits = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, e)]
    return float(np.mean(hits) / min(k, len(exact.article_ids))) if hits else 1.0


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


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
) -> IndexManifest:
    """Build, tune, verify and atomically publish a ScaNN index at ``out_dir``.

    ``eval_queries`` (float32[n, d]) should be real customer embeddings (e.g.
    holdout customers); without them a sample of the article embeddings is
    used (item-to-item queries). Recall@12 vs the exact twin is measured on
    them; while below ``min_recall`` the search is widened (more leaves
    searched, more reordering: search-time settings, so the searcher is built
    once and the exact answer computed once). Raises ``IndexQualityError``
    and publishes nothing if the floor is never reached.
    """
    out_dir = Path(out_dir)
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
    tried = []
    # Built once: leaves searched and reorder size are search-time settings, so widening them needs no
    # rebuild, and the exact answer the candidates are judged against is computed once too.
    built = ScannIndex.build(article_ids, emb, cfg)
    k = min(12, len(article_ids))
    want, _ = exact.search(queries, k)
    for _ in range(max_widenings + 1):
        index = ScannIndex(article_ids, built._searcher, exact.dim, cfg)
        got, _ = index.search(queries, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), want.tolist())]))
        tried.append((cfg, recall))
        if recall >= min_recall or cfg.brute_force:
            break
        wider = cfg.widened()
        if wider == cfg:
            break
        cfg = wider
    if recall < min_recall:
        detail = "; ".join(f"leaves_to_search={c.leaves_to_search} reorder={c.reorder}: {r:.4f}" for c, r in tried)
        raise IndexQualityError(
            f"ScaNN recall@12 vs exact {recall:.4f} < floor {min_recall} after {len(tried)} settings ({detail}); not published"
        )

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
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


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
