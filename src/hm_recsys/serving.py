"""The serving core, free of any web framework: what ``hm_recsys.service`` (BentoML) runs.

* ``Served``: one loaded, verified served state (``hm_recsys.served``) of one
  model version as of one date: precomputed customer queries (memory-mapped),
  candidate tables, the fusion and the ScaNN index. Nothing is computed at
  load but checks; a request runs ``ServedState.recommend_rows``, the code
  path the evaluation and the gate scored. Immutable once built.
* ``ModelHolder``: the one reference to the ``Served`` answering requests.
  A request reads it **once** and uses that object for everything (answer,
  ``model_version`` and ``as_of`` of the response), so a swap can never mix
  two states inside one answer; a swap is a single reference assignment.
* ``Reloader``: resolves what to serve, (version, as_of): the registry's
  ``champion`` alias (or a pinned version) and that version's newest published
  served state; fetches and fully loads + verifies a new one in the
  background, and only then swaps it in. An older as_of of the same version
  never replaces a newer one. A state that fails to load is remembered and
  skipped (the old one keeps serving) until forced.
* Request validation (``check_customer_id``, ``normalise_article_id``,
  ``check_top_k``) raising ``RequestError`` with the offending field.

``hm-recsys serve`` (``main`` below) starts the BentoML service on
127.0.0.1; see docs/serving.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
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
    from hm_recsys.config import Settings
    from hm_recsys.registry import VersionFiles
    from hm_recsys.served import ServedState

log = logging.getLogger("hm_recsys.serving")

MAX_TOP_K = 100
DEFAULT_TOP_K = 12
# the load check repeats a measurement the state's manifest recorded on the same queries and index: it should
# agree exactly; this much below it is refused (an index of other embeddings scores near 0)
LOAD_CHECK_TOLERANCE = 0.02
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
        min_recall: recall@12 of the index vs exact search over the state's article
            embeddings that a new state must reach on sampled customers before it may serve (0.9).
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
            for i, (r, s) in enumerate(zip(rows, scores), start=1) if r >= 0]


@dataclass(frozen=True, eq=False)
class Served:
    """A verified served state of one version as of one date, plus what ``/metadata`` shows of it."""

    version: str
    as_of: dt.date
    state: ServedState
    metadata: dict[str, Any] = field(repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.version, self.as_of.isoformat()

    @property
    def n_articles(self) -> int:
        return len(self.state.article_ids)

    # -- answers ---------------------------------------------------------------------
    def recommend(self, customer_ids: Sequence[str], top_k: int = DEFAULT_TOP_K,
                  exclude_purchased: bool = False) -> list[dict[str, Any]]:
        """One answer per id: ``{customer_id, recommendations, count, model_version, as_of, fallback}``.

        Ids must be validated already (``check_customer_id``). Unknown customers
        get the cold-start query, the trending sources and ``fallback: True``.
        ``exclude_purchased`` drops the articles the customer bought within
        the history window. Scores are the fusion's (higher is better).
        """
        ans = self.state.recommend_rows(customer_ids, top_k, exclude_purchased)
        ids = self.state.article_ids
        as_of = self.as_of.isoformat()
        out = []
        for cid, r, s, cold in zip(customer_ids, ans.rows.tolist(), ans.scores.tolist(), ans.fallback.tolist()):
            recs = _ranked(ids, r, s)
            out.append({"customer_id": cid, "recommendations": recs, "count": len(recs),
                        "model_version": self.version, "as_of": as_of, "fallback": bool(cold)})
        return out

    def similar_items(self, article_id: str, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
        """Nearest recommendable articles to one article by embedding (itself excluded).

        Raises ``RequestError`` (404) for a well-formed id not in this state's catalogue.
        """
        try:
            row = int(self.state.article_index.get_loc(article_id))
        except KeyError:
            raise RequestError("article_id", f"{article_id} is not in the catalogue of model version "
                                             f"{self.version} as of {self.as_of}", status=404) from None
        rows, scores = self.state.similar_items(row, top_k)
        recs = _ranked(self.state.article_ids, rows.tolist(), scores.tolist())
        return {"article_id": article_id, "similar": recs, "count": len(recs), "model_version": self.version,
                "as_of": self.as_of.isoformat()}


def load_served(files: VersionFiles, *, min_recall: float = 0.9, progress: bool = True) -> Served:
    """Load and verify one version's served state. Raises ``LoadError`` if anything does not hold.

    Checks, before the result may serve: the state's manifest, every file's
    checksum, its model version (= ``files.version``), the index's manifest,
    and that the index agrees with the state's article embeddings: recall@12
    of ScaNN vs exact search on up to 256 of the state's customer queries
    (``served.index_agreement``) is at least ``min_recall``, or
    ``LOAD_CHECK_TOLERANCE`` below what ``build_state`` measured on the same
    queries (the manifest's ``index.load_check``), whichever is lower; for a
    state without that record, 0.1 below the index's tuning figure. An index
    built from other embeddings scores near 0 here even if its manifest says
    the right version. The customer queries are memory-mapped, not computed:
    a reload costs file reads and checks.
    """
    from hm_recsys import bundle
    from hm_recsys.served import ServedState, StateError, describe, index_agreement

    t0 = time.perf_counter()
    version = str(files.version)
    if files.state_dir is None:
        raise LoadError(f"version {version}: no served state to load")
    try:
        state = ServedState.load(files.state_dir, expected_version=version, verify=True, mmap=True)
    except (StateError, OSError, ValueError, KeyError) as e:
        raise LoadError(f"version {version}: cannot load the served state {files.state_dir.name}: {e}") from e
    n = state.n_customers
    if n:
        recall, n_checked, finite = index_agreement(state.queries, n, state.index,
                                                    state.article_embeddings[state.index_rows])
        if not finite:
            raise LoadError(f"version {version}: the index returned non-finite scores")
        index_facts = state.manifest.get("index") or {}
        recorded = (index_facts.get("load_check") or {}).get("recall_at_12_vs_exact")
        if recorded is not None:  # measured on these same queries when the state was built
            floor = min(min_recall, float(recorded) - LOAD_CHECK_TOLERANCE)
        else:  # a state from before load_check: the index's tuning figure, with room for other customers
            built = index_facts.get("recall_at_12_vs_exact")
            floor = min_recall if built is None else min(min_recall, float(built) - 0.1)
        if recall < floor:
            raise LoadError(f"version {version}: index recall@12 vs exact search over the state's embeddings is "
                            f"{recall:.3f} < {floor:.3f} on {n_checked} customers: index and state do not "
                            f"belong together")
    else:
        recall = float("nan")
    if not np.all(np.isfinite(state.queries[-1])):
        raise LoadError(f"version {version}: the cold-start query is not finite")
    facts = describe(state)
    metadata = {
        **facts,
        "loaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_seconds": round(time.perf_counter() - t0, 3),
        "index": {**(facts.get("index") or {}), "kind": type(state.index).__name__, "verify_recall_at_12": recall},
        "dim": state.dim,
        "data_window": _public(_read_json(files.bundle_dir / bundle.DATA_WINDOW)),
        "metrics": _read_json(files.bundle_dir / bundle.METRICS),
    }
    return Served(version, state.as_of, state, metadata)


def _public(window: Any) -> Any:
    """The data window without anything that names a path on the serving host."""
    if isinstance(window, dict):
        return {k: v for k, v in window.items() if k not in ("warehouse", "data_dir", "root")}
    return window


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


def settle_heap() -> None:
    """Collect once, then freeze what lives now (the served state, the web stack) out of the GC's sight.

    The worker holds ~400k GC-tracked objects once a state is loaded; without
    this, every full collection walks all of them and stops the event loop
    for ~150 ms under load (measured: the p99.9 of /recommend at concurrency 8
    went from ~10 ms in a bare app to ~160 ms). Called after each swap:
    ``unfreeze`` first, so the state just replaced is collected, not kept.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class VersionSource(Protocol):
    """Where served states come from: which (version, as_of) to serve now, and its files on local disk."""

    def describe(self) -> str: ...

    def resolve(self) -> tuple[str, str | None] | None: ...

    def fetch(self, version: str, as_of: str) -> VersionFiles: ...


class RegistrySource:
    """The MLflow registry: follow ``alias`` (or always ``pinned``) and the version's newest served state."""

    def __init__(self, settings: Settings, alias: str = "champion", pinned: str | None = None):
        self.settings = settings
        self.alias = alias
        self.pinned = pinned
        self._registry = None

    def describe(self) -> str:
        where = _public_uri(self.settings.mlflow_tracking_uri)
        return f"version {self.pinned} of {where}" if self.pinned else f"alias {self.alias!r} of {where}"

    @property
    def registry(self):
        if self._registry is None:  # created lazily, in the loader thread: mlflow is a heavy import
            from hm_recsys.registry import Registry

            self._registry = Registry(self.settings)
        return self._registry

    def resolve(self) -> tuple[str, str | None] | None:
        if self.pinned:
            version = self.pinned
        else:
            info = self.registry.get(self.alias)
            if info is None:
                return None
            version = info.version
        return version, self.registry.served_as_of(version)

    def fetch(self, version: str, as_of: str) -> VersionFiles:
        return self.registry.fetch_state(version, as_of)


def _public_uri(uri: str) -> str:
    """What ``/metadata`` may say of the tracking URI: the server's address, never a local path or a password."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return f"the MLflow registry at {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
    return f"the MLflow registry ({parts.scheme or 'local'} store)"


class BentoModelSource:
    """A BentoML model-store entry holding ``bundle/`` and ``state/`` (what a built Bento serves)."""

    def __init__(self, tag: str):
        self.tag = tag

    def describe(self) -> str:
        return f"BentoML model {self.tag}"

    def _model(self):
        import bentoml

        return bentoml.models.get(self.tag)

    def resolve(self) -> tuple[str, str | None] | None:
        labels = self._model().info.labels
        return str(labels["model_version"]), labels.get("as_of") or None

    def fetch(self, version: str, as_of: str) -> VersionFiles:
        from hm_recsys.registry import VersionFiles

        root = Path(self._model().path)
        return VersionFiles(version, root / "bundle", root / "state")


@dataclass(frozen=True)
class ReloadOutcome:
    """What one check did: ``unchanged``, ``swapped``, ``failed``, ``no-version`` or ``no-state``."""

    status: str
    version: str | None
    as_of: str | None = None
    previous: str | None = None  # "version@as_of" served before
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _label(key: tuple[str, str] | None) -> str | None:
    return f"{key[0]}@{key[1]}" if key else None


# absolute paths, and file/sqlite URIs, in error messages (not a URL's path: "//" or ":" before it)
_PATH_IN_TEXT = re.compile(r"\b(?:file|sqlite):/*[^\s'\"]*|(?<![\w.:/~-])/[\w.@~+-]+(?:/[\w.@~+-]*)*")


def without_paths(text: str) -> str:
    """``text`` with filesystem paths replaced by ``<path>``: error messages go to /metadata, the log keeps them."""
    return _PATH_IN_TEXT.sub("<path>", text)


class Reloader:
    """Keeps ``holder`` on the (version, as_of) ``source`` names, loading new states fully before the swap.

    ``check()`` is serialised by a lock (one load at a time). ``start()`` runs
    checks in a daemon thread every ``poll_seconds`` (the first at once) and
    whenever ``request()`` is called (the admin endpoint). For the version
    being served, a state older than the one in use is never loaded.
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
            previous = current.key if current else None
            try:
                target = self.source.resolve()
            except Exception as e:  # registry unreachable: keep serving what we have
                log.warning("cannot resolve %s: %s", self.source.describe(), e)
                outcome = ReloadOutcome("failed", None, None, _label(previous),
                                        without_paths(f"cannot resolve {self.source.describe()}: {e}"))
                return self._done(outcome)
            self.last_checked = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            if target is None:
                return self._done(ReloadOutcome("no-version", None, None, _label(previous),
                                                f"nothing to serve yet: {self.source.describe()} is not set"))
            version, as_of = target
            if as_of is None:
                return self._done(ReloadOutcome(
                    "no-state", version, None, _label(previous),
                    f"version {version} has no published served state yet (deploy or hm-recsys refresh makes one)"))
            key = (version, as_of)
            if previous is not None and not force and (
                    previous == key or (previous[0] == version and previous[1] > as_of)):
                return self._done(ReloadOutcome("unchanged", *previous, _label(previous)))
            label = _label(key)
            if label in self.failed and not force:
                return self._done(ReloadOutcome("failed", version, as_of, _label(previous), self.failed[label]))
            try:
                served = self.loader(self.source.fetch(version, as_of))
                if served.key != key:
                    raise LoadError(f"asked for {label}, loaded {_label(served.key)}")
            except Exception as e:
                self.failed[label] = without_paths(f"{type(e).__name__}: {e}")
                log.error("served state %s failed to load; still serving %s: %s", label, _label(previous), e)
                return self._done(ReloadOutcome("failed", version, as_of, _label(previous), self.failed[label],
                                                time.perf_counter() - t0))
            self.failed.pop(label, None)
            self.holder.swap(served)
            settle_heap()
            log.info("now serving %s (was %s), loaded in %.1f s", label, _label(previous), time.perf_counter() - t0)
            return self._done(ReloadOutcome("swapped", version, as_of, _label(previous), None,
                                            time.perf_counter() - t0))

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
                "failed": dict(self.failed)}


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
        # a pinned version still polls: its newest served state moves forward with each refresh
        poll = 0.0 if serve.bento_model else serve.poll_seconds
        self.reloader = Reloader(
            self.holder, source, lambda files: load_served(files, min_recall=serve.min_recall, progress=progress),
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
            return {"model_version": None, "as_of": None, **base}
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
        description="Serve recommendations (BentoML) for the registry's champion, hot-swapping its served state "
                    "(model version + as_of) when the champion or its refreshed state changes. Endpoints: "
                    "POST /recommend, "
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
