"""The serving core, free of any web framework: what ``hm_recsys.service`` (BentoML) runs.

* ``Served``: one loaded, verified model version: the bundle's ``Recommender``,
  its ScaNN index (bound to the same model version by the index manifest),
  and what can be computed once at load: every known customer's query
  embedding and the cold-start query. Immutable once built.
* ``ModelHolder``: the one reference to the ``Served`` answering requests.
  A request reads it **once** and uses that object for everything (embedding,
  search, ``model_version`` of the response), so a swap can never mix two
  versions inside one answer; a swap is a single reference assignment.
* ``Reloader``: resolves the version to serve (the registry's ``champion``
  alias, or a pinned version), fetches and fully loads + verifies a new one
  in the background, and only then swaps it in. A version that fails to load
  is remembered and skipped (the old one keeps serving) until forced.
* Request validation (``check_customer_id``, ``normalise_article_id``,
  ``check_top_k``) raising ``RequestError`` with the offending field.

``hm-recsys serve`` (``main`` below) starts the BentoML service on
127.0.0.1; see docs/serving.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from hm_recsys.bundle import Recommender
    from hm_recsys.config import Settings
    from hm_recsys.index import Index, IndexManifest
    from hm_recsys.registry import VersionFiles

log = logging.getLogger("hm_recsys.serving")

MAX_TOP_K = 100
DEFAULT_TOP_K = 12
SERVICE_IMPORT = "hm_recsys.service:RecommendationService"
_CUSTOMER_ID = re.compile(r"[0-9a-f]{64}")
_ARTICLE_ID = re.compile(r"[0-9]{9,10}")


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeSettings:
    """Serving options, read from the environment at run time (``from_env``).

    Attributes:
        alias: registry alias followed by the service (``HM_RECSYS_SERVE_ALIAS``, default ``champion``).
        version: serve exactly this registered version and never follow the alias
            (``HM_RECSYS_SERVE_VERSION``; unset = follow the alias).
        bento_model: serve this BentoML model-store tag (``name:version``) holding ``bundle/`` and
            ``index/``; set inside a built Bento by ``hm-recsys deploy`` (``HM_RECSYS_SERVE_BENTO_MODEL``).
        poll_seconds: how often each worker checks the alias for a new version
            (``HM_RECSYS_SERVE_POLL_SECONDS``, default 10 s; 0 disables polling).
        admin_token: enables ``POST /admin/reload`` for callers presenting it
            (``HM_RECSYS_ADMIN_TOKEN``; unset = the endpoint answers 403).
        max_body_bytes: largest request body of the single-customer endpoints (64 KiB).
        max_batch_body_bytes: largest body of ``/recommend/batch`` (1 MiB).
        max_batch_ids: most customer ids in one batch request (1000).
        min_recall: recall@12 of the index vs the model's exact scores that a new
            version must reach on sampled customers before it may serve (0.9).
    """

    alias: str = "champion"
    version: str | None = None
    bento_model: str | None = None
    poll_seconds: float = 10.0
    admin_token: str | None = None
    max_body_bytes: int = 64 * 1024
    max_batch_body_bytes: int = 1024 * 1024
    max_batch_ids: int = 1000
    min_recall: float = 0.9

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeSettings:
        env = os.environ if env is None else env

        def num(name: str, default: float, kind: type = float) -> Any:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {raw!r}")
            return value

        return cls(
            alias=env.get("HM_RECSYS_SERVE_ALIAS", "").strip() or cls.alias,
            version=env.get("HM_RECSYS_SERVE_VERSION", "").strip() or None,
            bento_model=env.get("HM_RECSYS_SERVE_BENTO_MODEL", "").strip() or None,
            poll_seconds=num("HM_RECSYS_SERVE_POLL_SECONDS", cls.poll_seconds),
            admin_token=env.get("HM_RECSYS_ADMIN_TOKEN") or None,
            max_body_bytes=num("HM_RECSYS_SERVE_MAX_BODY_BYTES", cls.max_body_bytes, int),
            max_batch_body_bytes=num("HM_RECSYS_SERVE_MAX_BATCH_BODY_BYTES", cls.max_batch_body_bytes, int),
            max_batch_ids=num("HM_RECSYS_SERVE_MAX_BATCH", cls.max_batch_ids, int),
            min_recall=num("HM_RECSYS_SERVE_MIN_RECALL", cls.min_recall),
        )

    def token_ok(self, presented: str | None) -> bool:
        """Constant-time comparison with the admin token; always False when none is configured."""
        if not self.admin_token or not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.admin_token.encode())


# ---------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------
class RequestError(ValueError):
    """A request the service refuses; ``status`` is the HTTP status, ``field`` the offending input."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}


class NotReady(RuntimeError):
    """No verified model is loaded yet."""


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_customer_id(value: object, field: str = "customer_id") -> str:
    """An H&M customer id: exactly 64 lowercase hex characters."""
    if not isinstance(value, str) or not _CUSTOMER_ID.fullmatch(value):
        raise RequestError(field, f"must be 64 lowercase hex characters (an H&M customer id), got {_preview(value)}")
    return value


def normalise_article_id(value: object, field: str = "article_id") -> str:
    """An H&M article id as the 10-character zero-padded string; the 9-digit form is accepted."""
    if isinstance(value, str) and _ARTICLE_ID.fullmatch(value):
        return value.zfill(10)
    raise RequestError(field, f"must be a 10-digit article id such as '0663713001' (9 digits accepted), "
                              f"got {_preview(value)}")


def check_top_k(value: object, field: str = "top_k") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise RequestError(field, f"must be an integer in 1..{MAX_TOP_K}, got {_preview(value)}")
    return value


# ---------------------------------------------------------------------------
# One loaded version
# ---------------------------------------------------------------------------
class LoadError(RuntimeError):
    """A version could not be loaded or failed verification; it must not serve."""


def _ranked(ids: list[str], rows: Sequence[int], scores: Sequence[float]) -> list[dict[str, Any]]:
    return [{"article_id": ids[r], "score": round(float(s), 6), "rank": i}
            for i, (r, s) in enumerate(zip(rows, scores), start=1)]


@dataclass(frozen=True, eq=False)
class Served:
    """A verified (model, feature state, index) of one version plus what was precomputed at load.

    ``queries`` is ``float32 (n_customers + 1, d)``: row i is customer i of the
    bundle's customer table (``customer_index``), the last row the cold-start
    query (out-of-vocabulary id, no demographics, no history). Never mutate:
    a new version is a new ``Served``.
    """

    version: str
    recommender: Recommender
    index: Index
    manifest: IndexManifest
    customer_index: Any  # pandas.Index of customer ids, row order of ``queries``
    article_index: Any  # pandas.Index of article ids, row order of the index
    queries: np.ndarray
    history_length: int
    metadata: dict[str, Any] = field(repr=False)

    # -- facts --------------------------------------------------------------------
    @property
    def n_articles(self) -> int:
        return len(self.index.article_ids)

    @property
    def cold_row(self) -> int:
        return self.queries.shape[0] - 1

    def customer_row(self, customer_id: str) -> int:
        """Row of ``queries`` for a customer id; ``cold_row`` when the id is unknown."""
        try:
            row = self.customer_index.get_loc(customer_id)
        except KeyError:
            return self.cold_row
        # get_loc returns an int on a unique index (checked at load)
        return int(row)

    # -- answers ---------------------------------------------------------------------
    def recommend(self, customer_ids: Sequence[str], top_k: int = DEFAULT_TOP_K,
                  exclude_purchased: bool = False) -> list[dict[str, Any]]:
        """One answer per id: ``{customer_id, recommendations, count, model_version, fallback}``.

        Ids must be validated already (``check_customer_id``). Unknown customers
        get the cold-start query and ``fallback: True``. ``exclude_purchased``
        drops the articles in the customer's history snapshot (the search asks
        for ``history_length`` extra neighbours so ``top_k`` remain).
        """
        rows = [self.customer_row(c) for c in customer_ids]
        q = self.queries[rows]
        extra = self.history_length if exclude_purchased else 0
        found, scores = self.index.search(q, min(top_k + extra, self.n_articles))
        ids = self.index.article_ids
        history = self.recommender.history
        out = []
        for cid, row, r, s in zip(customer_ids, rows, found.tolist(), scores.tolist()):
            cold = row == self.cold_row
            if exclude_purchased and not cold:
                bought = set(history.items(row).tolist())
                keep = [i for i, a in enumerate(r) if a not in bought][:top_k]
                r, s = [r[i] for i in keep], [s[i] for i in keep]
            else:
                r, s = r[:top_k], s[:top_k]
            recs = _ranked(ids, r, s)
            out.append({"customer_id": cid, "recommendations": recs, "count": len(recs),
                        "model_version": self.version, "fallback": cold})
        return out

    def similar_items(self, article_id: str, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
        """Nearest articles to one article through the same index (itself excluded).

        Raises ``RequestError`` (404) for a well-formed id not in this version's catalogue.
        """
        try:
            row = int(self.article_index.get_loc(article_id))
        except KeyError:
            raise RequestError("article_id", f"{article_id} is not in the catalogue of model version "
                                             f"{self.version}", status=404) from None
        q = self.recommender.article_embeddings()[row:row + 1]
        found, scores = self.index.search(q, min(top_k + 1, self.n_articles))
        pairs = [(r, s) for r, s in zip(found[0].tolist(), scores[0].tolist()) if r != row][:top_k]
        recs = _ranked(self.index.article_ids, [r for r, _ in pairs], [s for _, s in pairs])
        return {"article_id": article_id, "similar": recs, "count": len(recs), "model_version": self.version}


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def load_served(version: str, bundle_dir: Path | str, index_dir: Path | str, *, min_recall: float = 0.9,
                exact: bool = False, progress: bool = True, chunk: int = 65536) -> Served:
    """Load, precompute and verify one version. Raises ``LoadError`` if anything does not hold.

    Checks, before the result may serve: the index manifest and checksums, its
    model version (= ``version``) and dimension (= the model's); the index's
    article ids equal the bundle's catalogue, in order; every precomputed
    query is finite; and the index agrees with the model: recall@12 of index
    search vs the model's exact scores on up to 256 known customers is at
    least ``min_recall`` (an index built from another model's embeddings
    scores near 0 here even if its manifest says the right version).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from hm_recsys import bundle
    from hm_recsys.index import IndexFailure, load_index

    t0 = time.perf_counter()
    version = str(version)
    bundle_dir, index_dir = Path(bundle_dir), Path(index_dir)
    try:
        rec = bundle.load(bundle_dir)
    except (bundle.BundleError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"version {version}: cannot load the bundle {bundle_dir}: {e}") from e
    try:
        index, manifest = load_index(index_dir, expected_model_version=version, expected_dim=rec.dim, exact=exact)
    except (IndexFailure, OSError, ValueError) as e:
        raise LoadError(f"version {version}: {e}") from e
    if list(index.article_ids) != rec.article_ids:
        raise LoadError(f"version {version}: the index's article ids ({len(index.article_ids)}) are not the "
                        f"bundle's catalogue ({len(rec.article_ids)}) in the same order")

    cids = rec.known_customer_ids()
    customer_index = pd.Index(np.asarray(cids, dtype=object))
    if not customer_index.is_unique:
        raise LoadError(f"version {version}: duplicate customer ids in the bundle's customer table")
    d = rec.dim
    queries = np.empty((len(cids) + 1, d), dtype=np.float32)
    # in a service log (no terminal) one line every 10 s is enough
    bar = tqdm(total=len(cids), desc=f"customer embeddings v{version}", unit="cust", unit_scale=True,
               disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for sl in _chunks(len(cids), chunk):
        queries[sl] = rec.customer_embeddings(cids[sl])
        bar.update(sl.stop - sl.start)
    bar.close()
    # "" is never a customer id: the bundle gives it the out-of-vocabulary, feature-less query
    queries[-1] = rec.customer_embeddings([""])[0]
    if not np.all(np.isfinite(queries)):
        raise LoadError(f"version {version}: the customer tower produced NaN/inf embeddings")

    # the index must answer like the model's own exact scores
    if cids:
        sample = np.unique(np.linspace(0, len(cids) - 1, num=min(256, len(cids))).astype(np.int64))
        q = queries[sample]
        k = min(12, len(rec.article_ids))
        got, got_scores = index.search(q, k)
        want, _ = rec.top_k(q, k)
        if not np.all(np.isfinite(got_scores)):
            raise LoadError(f"version {version}: the index returned non-finite scores")
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), want.tolist())]))
        if recall < min_recall:
            raise LoadError(f"version {version}: index recall@{k} vs the model's exact scores is {recall:.3f} "
                            f"< {min_recall} on {len(sample)} customers: index and model do not belong together")
    else:
        recall = float("nan")

    article_index = pd.Index(np.asarray(rec.article_ids, dtype=object))
    metadata = {
        "model_version": version,
        "loaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_seconds": round(time.perf_counter() - t0, 3),
        "bundle_dir": str(bundle_dir),
        "index_dir": str(index_dir),
        "index": {**_manifest_dict(manifest), "kind": type(index).__name__, "verify_recall_at_12": recall},
        "history_as_of": rec.as_of.isoformat(),
        "n_customers": len(cids),
        "n_articles": len(rec.article_ids),
        "dim": d,
        "data_window": _read_json(bundle_dir / bundle.DATA_WINDOW),
        "metrics": _read_json(bundle_dir / bundle.METRICS),
    }
    return Served(version, rec, index, manifest, customer_index, article_index, queries,
                  rec.state.config.history_length, metadata)


def _manifest_dict(manifest: IndexManifest) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(manifest)
    d.pop("files", None)  # checksums of every file: long, and verified already
    return d


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"{path.name}: {e}"}


# ---------------------------------------------------------------------------
# Holding and swapping
# ---------------------------------------------------------------------------
class ModelHolder:
    """The single reference to the ``Served`` in use.

    Readers call ``current()`` once per request; the swap is one attribute
    assignment (atomic in CPython), so every request sees either the old or the
    new version, never a mix. The old object lives until its last request ends.
    """

    def __init__(self, served: Served | None = None):
        self._served = served

    def current(self) -> Served | None:
        return self._served

    def require(self) -> Served:
        served = self._served
        if served is None:
            raise NotReady("no verified model is loaded yet; see /metadata and the service log")
        return served

    def swap(self, served: Served) -> Served | None:
        old, self._served = self._served, served
        return old


class VersionSource(Protocol):
    """Where versions come from: which one to serve now, and its files on local disk."""

    def describe(self) -> str: ...

    def resolve(self) -> str | None: ...

    def fetch(self, version: str) -> VersionFiles: ...


class RegistrySource:
    """The MLflow registry: follow ``alias`` (or always ``pinned``); files via ``Registry.fetch``."""

    def __init__(self, settings: Settings, alias: str = "champion", pinned: str | None = None):
        self.settings = settings
        self.alias = alias
        self.pinned = pinned
        self._registry = None

    def describe(self) -> str:
        where = self.settings.mlflow_tracking_uri
        return f"version {self.pinned} of {where}" if self.pinned else f"alias {self.alias!r} of {where}"

    @property
    def registry(self):
        if self._registry is None:  # created lazily, in the loader thread: mlflow is a heavy import
            from hm_recsys.registry import Registry

            self._registry = Registry(self.settings)
        return self._registry

    def resolve(self) -> str | None:
        if self.pinned:
            return self.pinned
        info = self.registry.get(self.alias)
        return info.version if info else None

    def fetch(self, version: str) -> VersionFiles:
        return self.registry.fetch(version)


class BentoModelSource:
    """A BentoML model-store entry holding ``bundle/`` and ``index/`` (what a built Bento serves)."""

    def __init__(self, tag: str):
        self.tag = tag

    def describe(self) -> str:
        return f"BentoML model {self.tag}"

    def _model(self):
        import bentoml

        return bentoml.models.get(self.tag)

    def resolve(self) -> str | None:
        return str(self._model().info.labels["model_version"])

    def fetch(self, version: str) -> VersionFiles:
        from hm_recsys.registry import VersionFiles

        root = Path(self._model().path)
        return VersionFiles(version, root / "bundle", root / "index")


@dataclass(frozen=True)
class ReloadOutcome:
    """What one check did: ``unchanged``, ``swapped``, ``failed`` or ``no-version``."""

    status: str
    version: str | None
    previous: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class Reloader:
    """Keeps ``holder`` on the version ``source`` names, loading new ones fully before the swap.

    ``check()`` is serialised by a lock (one load at a time). ``start()`` runs
    checks in a daemon thread every ``poll_seconds`` (the first at once) and
    whenever ``request()`` is called (the admin endpoint).
    """

    def __init__(self, holder: ModelHolder, source: VersionSource,
                 loader: Callable[[VersionFiles], Served], poll_seconds: float = 10.0):
        self.holder = holder
        self.source = source
        self.loader = loader
        self.poll_seconds = poll_seconds
        self.failed: dict[str, str] = {}
        self.last: ReloadOutcome | None = None
        self.last_checked: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._force = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, force: bool = False) -> ReloadOutcome:
        with self._lock:
            t0 = time.perf_counter()
            current = self.holder.current()
            previous = current.version if current else None
            try:
                target = self.source.resolve()
            except Exception as e:  # registry unreachable: keep serving what we have
                outcome = ReloadOutcome("failed", None, previous, f"cannot resolve {self.source.describe()}: {e}")
                return self._done(outcome)
            self.last_checked = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            if target is None:
                return self._done(ReloadOutcome("no-version", None, previous,
                                                f"nothing to serve yet: {self.source.describe()} is not set"))
            if previous == target and not force:
                return self._done(ReloadOutcome("unchanged", target, previous))
            if target in self.failed and not force:
                return self._done(ReloadOutcome("failed", target, previous, self.failed[target]))
            try:
                served = self.loader(self.source.fetch(target))
                if served.version != target:
                    raise LoadError(f"asked for version {target}, loaded {served.version}")
            except Exception as e:
                self.failed[target] = f"{type(e).__name__}: {e}"
                log.error("version %s failed to load; still serving %s: %s", target, previous, e)
                return self._done(ReloadOutcome("failed", target, previous, self.failed[target],
                                                time.perf_counter() - t0))
            self.failed.pop(target, None)
            self.holder.swap(served)
            log.info("now serving version %s (was %s), loaded in %.1f s", target, previous,
                     time.perf_counter() - t0)
            return self._done(ReloadOutcome("swapped", target, previous, None, time.perf_counter() - t0))

    def _done(self, outcome: ReloadOutcome) -> ReloadOutcome:
        self.last = outcome
        return outcome

    def request(self, force: bool = False) -> None:
        """Ask the background thread for a check now (returns at once)."""
        self._force = self._force or force
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="hm-recsys-reloader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            force, self._force = self._force, False
            try:
                self.check(force=force)
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("reload check crashed")
            timeout = self.poll_seconds if self.poll_seconds > 0 else None
            if self.holder.current() is None and timeout is None:
                timeout = 5.0  # nothing loaded yet: keep trying even with polling off
            self._wake.wait(timeout)
            self._wake.clear()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def status(self) -> dict[str, Any]:
        return {"source": self.source.describe(), "poll_seconds": self.poll_seconds,
                "last_checked": self.last_checked, "last": self.last.to_dict() if self.last else None,
                "failed_versions": dict(self.failed)}


class Runtime:
    """Everything a service worker holds: settings, the holder and its reloader."""

    def __init__(self, settings: Settings, serve: ServeSettings, source: VersionSource | None = None,
                 progress: bool = True):
        self.settings = settings
        self.serve = serve
        self.holder = ModelHolder()
        if source is None:
            source = (BentoModelSource(serve.bento_model) if serve.bento_model
                      else RegistrySource(settings, serve.alias, serve.version))
        poll = 0.0 if (serve.version or serve.bento_model) else serve.poll_seconds
        self.reloader = Reloader(
            self.holder, source,
            lambda files: load_served(files.version, files.bundle_dir, files.index_dir,
                                      min_recall=serve.min_recall, progress=progress),
            poll_seconds=poll)
        self.started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    @classmethod
    def from_env(cls) -> Runtime:
        from hm_recsys.config import Settings

        return cls(Settings.from_env(), ServeSettings.from_env())

    @property
    def ready(self) -> bool:
        return self.holder.current() is not None

    def metadata(self) -> dict[str, Any]:
        served = self.holder.current()
        base = {"ready": served is not None, "pid": os.getpid(), "started_at": self.started_at,
                "reloader": self.reloader.status()}
        if served is None:
            return {"model_version": None, **base}
        return {**served.metadata, **base}


# ---------------------------------------------------------------------------
# `hm-recsys serve`
# ---------------------------------------------------------------------------
def serve_command(host: str, port: int, working_dir: Path | None = None) -> list[str]:
    """The ``bentoml serve`` command line for the service (run from this interpreter)."""
    import hm_recsys

    src = Path(hm_recsys.__file__).resolve().parent.parent
    return [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port),
            "--working-dir", str(working_dir or src)]


def _deep_merge(into: dict, more: Mapping) -> dict:
    for k, v in more.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v
    return into


def serve_env(settings: Settings, workers: int | None = None, base: Mapping[str, str] | None = None,
              bentoml_config: Mapping[str, Any] | None = None, **overrides: str | None) -> dict[str, str]:
    """The environment of the service process: runtime folder, BentoML home, telemetry off, options.

    ``workers`` and ``bentoml_config`` (options of the ``hm_recsys`` service, e.g.
    ``{"metrics": {"enabled": True}}``) go into ``BENTOML_CONFIG_OVERRIDES``
    (JSON), which BentoML applies over the defaults set in ``hm_recsys.service``.
    """
    env = dict(os.environ if base is None else base)
    env["HM_RECSYS_HOME"] = str(settings.home)
    env.setdefault("BENTOML_HOME", str(settings.layout.bentoml_home))
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["DO_NOT_TRACK"] = "1"
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file would flood the log
    service: dict[str, Any] = dict(bentoml_config or {})
    if workers is not None:
        service["workers"] = int(workers)
    if service:
        try:
            config = json.loads(env.get("BENTOML_CONFIG_OVERRIDES") or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"BENTOML_CONFIG_OVERRIDES is not valid JSON: {e}") from None
        _deep_merge(config, {"services": {"hm_recsys": service}})
        env["BENTOML_CONFIG_OVERRIDES"] = json.dumps(config)
    for k, v in overrides.items():
        if v is not None:
            env[k] = v
    return env


def main(argv: list[str] | None = None) -> int:
    """``hm-recsys serve``: run the BentoML recommendation service in the foreground."""
    p = argparse.ArgumentParser(
        prog="hm-recsys serve",
        description="Serve recommendations (BentoML) for the registry's champion, hot-swapping model and "
                    "index together when the champion changes. Endpoints: POST /recommend, "
                    "/recommend/batch, /similar-items, /admin/reload; GET /livez, /readyz, /metadata.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; use 0.0.0.0 only "
                                                       "inside a container)")
    p.add_argument("--port", type=int, default=int(os.environ.get("HM_RECSYS_SERVE_PORT") or 3000),
                   help="port (default $HM_RECSYS_SERVE_PORT or 3000)")
    p.add_argument("--workers", type=int, help="worker processes (default 1: measured best on 2 cores; "
                                               "each worker holds its own copy of the model)")
    p.add_argument("--version", help="serve this registered version and do not follow the alias")
    p.add_argument("--alias", help="registry alias to follow (default champion)")
    p.add_argument("--poll-seconds", type=float, help="how often to check the alias (default 10; 0 = never)")
    a = p.parse_args(argv)
    if a.workers is not None and a.workers < 1:
        p.error("--workers must be >= 1")
    from hm_recsys.config import Settings

    settings = Settings.from_env()
    env = serve_env(settings, a.workers, HM_RECSYS_SERVE_VERSION=a.version, HM_RECSYS_SERVE_ALIAS=a.alias,
                    HM_RECSYS_SERVE_POLL_SECONDS=None if a.poll_seconds is None else str(a.poll_seconds))
    try:
        ServeSettings.from_env(env)
    except ValueError as e:
        print(f"hm-recsys serve: {e}", file=sys.stderr)
        return 2
    Path(env["BENTOML_HOME"]).mkdir(parents=True, exist_ok=True)
    cmd = serve_command(a.host, a.port)
    print(f"serving {SERVICE_IMPORT} on http://{a.host}:{a.port} (runtime folder {settings.home})", flush=True)
    # exec: the service keeps this PID, so `scripts/stack.sh stop` (process group) stops it
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


__all__ = [
    "ServeSettings", "RequestError", "NotReady", "LoadError", "Served", "ModelHolder", "Reloader",
    "ReloadOutcome", "RegistrySource", "BentoModelSource", "Runtime", "load_served", "check_customer_id",
    "normalise_article_id", "check_top_k", "MAX_TOP_K", "DEFAULT_TOP_K", "main",
]
