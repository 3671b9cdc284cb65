"""The serving core (hm_recsys.serving) and the BentoML service class, in process.

* Hand-built 4-article, 2-customer versions with exact answers: ranking, ties,
  cold start, exclusion of purchases, item-to-item.
* The reloader: load-before-swap, a broken version never serves and is not
  retried until forced, an unreachable registry keeps the old version.
* Swaps under concurrent requests: every answer comes from one version.
* ``load_served`` on a real (random-weight) bundle and ScaNN index: same
  answers as the bundle's exact ``Recommender``; mismatched indexes refused.
* The service class' handlers and the request guard (415/413), without a server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from hm_recsys.features import History
from hm_recsys.index import ExactIndex
from hm_recsys.serving import (
    LoadError,
    ModelHolder,
    NotReady,
    Reloader,
    RequestError,
    Served,
    ServeSettings,
    check_customer_id,
    check_top_k,
    load_served,
    normalise_article_id,
    serve_command,
    serve_env,
)

C0, C1, UNKNOWN = "a" * 64, "b" * 64, "c" * 64
ARTICLES = ["0000000001", "0000000002", "0000000003", "0000000004"]
# unit vectors in 2-d: scores are easy to compute by hand
EMB = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)


class FakeRecommender:
    """The two things ``Served`` reads from a Recommender: histories and article embeddings."""

    def __init__(self, history: History, emb: np.ndarray):
        self.history = history
        self._emb = emb

    def article_embeddings(self) -> np.ndarray:
        return self._emb


def make_served(version: str = "1", ids: list[str] = ARTICLES) -> Served:
    # customer row 0 (C0) bought article row 0; C1 bought nothing
    history = History(dt.date(2020, 9, 16), np.array([0], np.int32), np.array([0, 1], np.int64),
                      np.array([0], np.int32), np.array([3], np.int32))
    queries = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)  # C0, C1, cold start
    return Served(version, FakeRecommender(history, EMB), ExactIndex(ids, EMB), None,
                  pd.Index([C0, C1], dtype=object), pd.Index(ids, dtype=object), queries, 8,
                  {"model_version": version})


def recs(answer: dict) -> list[tuple[str, float, int]]:
    return [(r["article_id"], r["score"], r["rank"]) for r in answer["recommendations"]]


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def test_customer_id_must_be_64_lowercase_hex():
    assert check_customer_id(C0) == C0
    for bad in ("A" * 64, "a" * 63, "a" * 65, "g" * 64, 123, None, ""):
        with pytest.raises(RequestError, match="customer_id: must be 64 lowercase hex") as e:
            check_customer_id(bad)
        assert e.value.field == "customer_id" and e.value.status == 422


def test_article_id_is_normalised_to_ten_digits():
    assert normalise_article_id("0663713001") == "0663713001"
    assert normalise_article_id("663713001") == "0663713001"
    for bad in ("66371300", "06637130011", "06637130x1", 663713001):
        with pytest.raises(RequestError, match="article_id: must be a 10-digit article id"):
            normalise_article_id(bad)


def test_top_k_range():
    assert check_top_k(1) == 1 and check_top_k(100) == 100
    for bad in (0, 101, -3, True, "12", 12.0):
        with pytest.raises(RequestError, match=r"top_k: must be an integer in 1..100"):
            check_top_k(bad)


def test_serve_settings_from_env():
    s = ServeSettings.from_env({})
    assert (s.alias, s.version, s.poll_seconds, s.admin_token, s.max_body_bytes, s.max_batch_ids) == \
        ("champion", None, 10.0, None, 65536, 1000)
    s = ServeSettings.from_env({"HM_RECSYS_SERVE_VERSION": "4", "HM_RECSYS_SERVE_POLL_SECONDS": "0.5",
                                "HM_RECSYS_ADMIN_TOKEN": "t0k", "HM_RECSYS_SERVE_MAX_BATCH": "7"})
    assert (s.version, s.poll_seconds, s.max_batch_ids) == ("4", 0.5, 7)
    assert s.token_ok("t0k") and not s.token_ok("t0K") and not s.token_ok("") and not s.token_ok(None)
    assert not ServeSettings.from_env({}).token_ok("")  # no token configured: nothing opens it
    with pytest.raises(ValueError, match="HM_RECSYS_SERVE_POLL_SECONDS='soon' is not a valid float"):
        ServeSettings.from_env({"HM_RECSYS_SERVE_POLL_SECONDS": "soon"})
    with pytest.raises(ValueError, match="HM_RECSYS_SERVE_MAX_BATCH must be >= 0"):
        ServeSettings.from_env({"HM_RECSYS_SERVE_MAX_BATCH": "-1"})


# ---------------------------------------------------------------------------
# answers (exact, by hand)
# ---------------------------------------------------------------------------
def test_recommend_known_customers_exact():
    s = make_served()
    a0, a1 = s.recommend([C0, C1], top_k=4)
    assert recs(a0) == [("0000000001", 1.0, 1), ("0000000002", 0.8, 2), ("0000000003", 0.0, 3),
                        ("0000000004", -1.0, 4)]
    # C1: articles 1 and 4 tie at 0.0; the lower catalogue row wins
    assert recs(a1) == [("0000000003", 1.0, 1), ("0000000002", 0.6, 2), ("0000000001", 0.0, 3),
                        ("0000000004", 0.0, 4)]
    assert {k: a0[k] for k in ("customer_id", "count", "model_version", "fallback")} == \
        {"customer_id": C0, "count": 4, "model_version": "1", "fallback": False}


def test_unknown_customer_gets_cold_start_with_fallback():
    (a,) = make_served().recommend([UNKNOWN], top_k=2)
    assert recs(a) == [("0000000002", 0.96, 1), ("0000000003", 0.8, 2)]
    assert a["fallback"] is True and a["count"] == 2 and a["customer_id"] == UNKNOWN


def test_exclude_purchased_drops_history_and_keeps_top_k():
    s = make_served()
    (a,) = s.recommend([C0], top_k=3, exclude_purchased=True)
    assert recs(a) == [("0000000002", 0.8, 1), ("0000000003", 0.0, 2), ("0000000004", -1.0, 3)]
    # nothing bought: the same as without exclusion
    assert s.recommend([C1], 2, exclude_purchased=True) == s.recommend([C1], 2)


def test_top_k_larger_than_catalogue_returns_everything():
    (a,) = make_served().recommend([C0], top_k=100)
    assert a["count"] == 4 and [r["rank"] for r in a["recommendations"]] == [1, 2, 3, 4]


def test_similar_items_excludes_the_article_itself():
    s = make_served()
    out = s.similar_items("0000000001", top_k=2)
    assert out == {"article_id": "0000000001", "count": 2, "model_version": "1",
                   "similar": [{"article_id": "0000000002", "score": 0.8, "rank": 1},
                               {"article_id": "0000000003", "score": 0.0, "rank": 2}]}
    with pytest.raises(RequestError, match="0000000009 is not in the catalogue of model version 1") as e:
        s.similar_items("0000000009")
    assert e.value.status == 404


def test_holder_require_before_load():
    with pytest.raises(NotReady, match="no verified model is loaded yet"):
        ModelHolder().require()


# ---------------------------------------------------------------------------
# reloading
# ---------------------------------------------------------------------------
class FakeSource:
    def __init__(self):
        self.alias: str | None = None
        self.broken_registry = False

    def describe(self) -> str:
        return "fake alias"

    def resolve(self) -> str | None:
        if self.broken_registry:
            raise ConnectionError("registry down")
        return self.alias

    def fetch(self, version: str):
        return SimpleNamespace(version=version, bundle_dir=Path("b"), index_dir=Path("i"))


def make_reloader():
    loads: list[str] = []

    def loader(files):
        loads.append(files.version)
        if files.version == "bad":
            raise LoadError("index checksum mismatch")
        return make_served(files.version)

    source = FakeSource()
    holder = ModelHolder()
    return Reloader(holder, source, loader, poll_seconds=0), source, holder, loads


def test_reloader_swaps_only_verified_versions():
    r, source, holder, loads = make_reloader()
    assert r.check().status == "no-version" and holder.current() is None
    source.alias = "1"
    assert r.check().to_dict()["status"] == "swapped" and holder.current().version == "1"
    assert r.check().status == "unchanged" and loads == ["1"]
    source.alias = "bad"
    out = r.check()
    assert (out.status, out.version, out.previous) == ("failed", "bad", "1")
    assert "index checksum mismatch" in out.error and holder.current().version == "1"
    assert r.check().status == "failed" and loads == ["1", "bad"]  # remembered, not reloaded
    assert r.check(force=True).status == "failed" and loads == ["1", "bad", "bad"]  # forced: tried again
    source.alias = "2"
    out = r.check()
    assert (out.status, out.version, out.previous) == ("swapped", "2", "1") and holder.current().version == "2"
    source.broken_registry = True
    out = r.check()
    assert out.status == "failed" and "registry down" in out.error and holder.current().version == "2"
    assert r.status()["failed_versions"] == {"bad": "LoadError: index checksum mismatch"}


def test_reloader_thread_loads_in_background_and_on_request():
    r, source, holder, _ = make_reloader()
    source.alias = "1"
    r.start()
    try:
        for _ in range(200):
            if holder.current() is not None:
                break
            threading.Event().wait(0.01)
        assert holder.current().version == "1"
        source.alias = "2"
        r.request()
        for _ in range(200):
            if holder.current().version == "2":
                break
            threading.Event().wait(0.01)
        assert holder.current().version == "2"
    finally:
        r.stop()


def test_answers_never_mix_versions_during_swaps():
    v1 = make_served("1", [f"1{a[1:]}" for a in ARTICLES])
    v2 = make_served("2", [f"2{a[1:]}" for a in ARTICLES])
    holder = ModelHolder(v1)
    stop = threading.Event()
    bad: list[dict] = []
    seen = {"1": 0, "2": 0}

    def client():
        while not stop.is_set():
            for a in holder.require().recommend([C0, UNKNOWN], 3, exclude_purchased=True):
                seen[a["model_version"]] += 1
                if any(r["article_id"][0] != a["model_version"] for r in a["recommendations"]):
                    bad.append(a)
            time.sleep(0)  # let the swapping thread have the GIL now and then

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    i = 0
    while (min(seen.values()) < 200 or i < 20) and time.monotonic() < deadline:
        holder.swap(v2 if i % 2 == 0 else v1)
        i += 1
        time.sleep(0.0002)
    stop.set()
    for t in threads:
        t.join()
    assert bad == [] and min(seen.values()) >= 200 and i >= 20, (seen, i)


# ---------------------------------------------------------------------------
# a real bundle and index
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_version(tiny_warehouse_ro, tmp_path_factory):
    """A random-weight (untrained, seeded) model of the tiny data, its bundle and a ScaNN index for version 7."""
    import torch

    from hm_recsys import bundle, train
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.features import FeatureConfig
    from hm_recsys.index import build_index
    from hm_recsys.model import ModelConfig
    from hm_recsys.split import Split

    root = tmp_path_factory.mktemp("served")
    wh = Warehouse(tiny_warehouse_ro)
    cfg = train.Config(FeatureConfig(history_weeks=4, history_length=8),
                       ModelConfig(embedding_dim=8, customer_layers=(16,), article_layers=(16,), output_dim=8),
                       train.TrainConfig(train_weeks=2, epochs=1, batch_size=64, threads=1))
    split = Split.from_warehouse(wh, train_weeks=2)
    prep = train.prepare(wh, split, cfg, root / "scratch", progress=False)
    torch.manual_seed(3)
    model = train.build_model(cfg, prep.state).eval()
    rec = train.recommender(model, prep, prep.end_history, prep.end_raw)
    full = {"features": cfg.features.to_dict(), "model": model.config.to_dict(),
            "train": dataclasses.asdict(cfg.train)}
    bundle_dir = bundle.save(root / "bundle", rec, full, prep.data_window, {"holdout": {"x": 1}})
    rec = bundle.load(bundle_dir)
    build_index(rec.article_ids, rec.article_embeddings(), root / "index", "7",
                eval_queries=rec.customer_embeddings(rec.known_customer_ids()[:100]))
    return SimpleNamespace(root=root, bundle_dir=bundle_dir, index_dir=root / "index", rec=rec)


def test_load_served_answers_like_the_exact_recommender(real_version):
    rv = real_version
    s = load_served("7", rv.bundle_dir, rv.index_dir, progress=False)
    assert s.queries.shape == (len(rv.rec.known_customer_ids()) + 1, 8)
    known = rv.rec.known_customer_ids()[::97][:20]
    ids = [*known, UNKNOWN]
    want = rv.rec.recommend(ids, k=12)
    got = s.recommend(ids, top_k=12)
    for w, g in zip(want, got):
        assert [r["article_id"] for r in g["recommendations"]] == [a for a, _ in w]
        assert [r["score"] for r in g["recommendations"]] == pytest.approx([sc for _, sc in w], abs=1e-5)
    assert [g["fallback"] for g in got] == [False] * len(known) + [True]
    # exclusion: no purchased article comes back, and still 12
    for g in s.recommend(known, top_k=12, exclude_purchased=True):
        bought = set(rv.rec.purchased(g["customer_id"]))
        assert g["count"] == 12 and not bought & {r["article_id"] for r in g["recommendations"]}
    md = s.metadata
    assert (md["model_version"], md["index"]["model_version"], md["n_customers"], md["dim"]) == \
        ("7", "7", len(rv.rec.known_customer_ids()), 8)
    assert md["metrics"] == {"holdout": {"x": 1}} and md["data_window"]["history_as_of"] == md["history_as_of"]
    assert md["index"]["verify_recall_at_12"] == 1.0 and "files" not in md["index"]


def test_load_served_refuses_an_index_of_another_version(real_version):
    with pytest.raises(LoadError, match="index was built for model version 7, not 8"):
        load_served("8", real_version.bundle_dir, real_version.index_dir, progress=False)


def test_load_served_refuses_an_index_of_another_model(real_version, tmp_path):
    from hm_recsys.index import build_index

    rec = real_version.rec
    # right version in the manifest, embeddings of some other model
    other = np.random.default_rng(0).normal(size=rec.article_embeddings().shape).astype(np.float32)
    build_index(rec.article_ids, other, tmp_path / "index", "7")
    with pytest.raises(LoadError, match="index and model do not belong together"):
        load_served("7", real_version.bundle_dir, tmp_path / "index", progress=False)


def test_load_served_refuses_a_missing_bundle(tmp_path, real_version):
    with pytest.raises(LoadError, match="cannot load the bundle"):
        load_served("7", tmp_path / "nothing", real_version.index_dir, progress=False)


# ---------------------------------------------------------------------------
# the BentoML service class, in process
# ---------------------------------------------------------------------------
def make_service(served: Served | None, token: str | None = None):
    from hm_recsys.config import Settings
    from hm_recsys.service import RecommendationService
    from hm_recsys.serving import Runtime

    runtime = Runtime(Settings.from_env({"HM_RECSYS_HOME": "/nonexistent"}),
                      ServeSettings(admin_token=token, max_batch_ids=3), source=FakeSource())
    if served is not None:
        runtime.holder.swap(served)
    return RecommendationService.inner(runtime=runtime, start=False)


def body(resp) -> tuple[int, dict]:
    return resp.status_code, json.loads(resp.body)


def test_service_handlers():
    svc = make_service(make_served())
    assert svc.__is_ready__()
    status, out = body(asyncio.run(svc.recommend(customer_id=UNKNOWN, top_k=1)))
    assert status == 200 and out == {"customer_id": UNKNOWN, "count": 1, "model_version": "1", "fallback": True,
                                     "recommendations": [{"article_id": "0000000002", "score": 0.96, "rank": 1}]}
    status, out = body(asyncio.run(svc.recommend_batch(customer_ids=[C0, C1], top_k=1)))
    assert status == 200 and (out["count"], out["model_version"]) == (2, "1")
    assert [r["recommendations"][0]["article_id"] for r in out["results"]] == ["0000000001", "0000000003"]
    status, out = body(asyncio.run(svc.recommend_batch(customer_ids=[C0] * 4)))
    assert status == 422 and out == {"error": "customer_ids: at most 3 ids per request, got 4",
                                     "field": "customer_ids"}
    status, out = body(asyncio.run(svc.similar_items(article_id="0000000009")))
    assert status == 404 and out["field"] == "article_id"
    status, out = body(asyncio.run(svc.similar_items(article_id="0000000004", top_k=1)))
    assert status == 200 and out["similar"] == [{"article_id": "0000000003", "score": 0.0, "rank": 1}]


def test_service_not_ready_answers_503():
    svc = make_service(None)
    assert not svc.__is_ready__()
    status, out = body(asyncio.run(svc.recommend(customer_id=C0)))
    assert status == 503 and "no verified model is loaded yet" in out["error"]
    assert svc.runtime.metadata()["model_version"] is None


def test_admin_reload_requires_the_token():
    def ctx(auth: str | None):
        headers = {"authorization": auth} if auth is not None else {}
        return SimpleNamespace(request=SimpleNamespace(headers=headers), response=SimpleNamespace(status_code=200))

    disabled = make_service(make_served(), token=None)
    c = ctx("Bearer anything")
    assert body(asyncio.run(disabled.admin_reload(c)))[0] == 403 and c.response.status_code == 403
    svc = make_service(make_served(), token="s3cret")
    for auth in (None, "Bearer wrong", "s3cret", "Basic s3cret"):
        c = ctx(auth)
        assert body(asyncio.run(svc.admin_reload(c)))[0] == 401 and c.response.status_code == 401
    assert not svc.runtime.reloader._wake.is_set()
    c = ctx("Bearer s3cret")
    status, out = body(asyncio.run(svc.admin_reload(c, force=True)))
    assert status == 202 == c.response.status_code and out["serving"] == "1"
    assert svc.runtime.reloader._wake.is_set() and svc.runtime.reloader._force


async def _asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    pending = list(chunks)

    async def receive():
        chunk = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_request_guard_refuses_non_json_and_big_bodies():
    from hm_recsys.service import RequestGuard

    received = []

    async def app(scope, receive, send):
        msg = await receive()
        received.append(msg["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    guard = RequestGuard(app, ServeSettings(max_body_bytes=10, max_batch_body_bytes=20))
    jh = [(b"content-type", b"application/json")]

    def status(method, path, headers, chunks):
        return asyncio.run(_asgi(guard, method, path, headers, chunks))[0]["status"]

    assert status("POST", "/recommend", [(b"content-type", b"application/vnd.bentoml+pickle")], [b"x"]) == 415
    assert status("POST", "/recommend", [(b"content-type", b"multipart/form-data; boundary=x")], [b"x"]) == 415
    assert status("POST", "/recommend", [], [b"{}"]) == 415
    assert status("POST", "/recommend", [*jh, (b"content-length", b"11")], [b"x" * 11]) == 413
    assert status("POST", "/recommend/batch", [*jh, (b"content-length", b"11")], [b"x" * 11]) == 200
    assert status("POST", "/recommend", [*jh, (b"content-length", b"ten")], [b"x"]) == 400
    # chunked (no Content-Length): counted while reading, replayed whole to the app
    assert status("POST", "/recommend", jh, [b"x" * 6, b"y" * 6]) == 413
    assert status("POST", "/recommend", [(b"content-type", b"application/json; charset=utf-8")],
                  [b"{\"a\"", b":1}"]) == 200
    assert received[-1] == b"{\"a\":1}"
    assert status("GET", "/metadata", [], []) == 200


def test_serve_command_and_env(tmp_path):
    from hm_recsys.config import Settings

    cmd = serve_command("127.0.0.1", 3123)
    assert cmd[1:5] == ["-m", "bentoml", "serve", "hm_recsys.service:RecommendationService"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "3123"
    settings = Settings.from_env({"HM_RECSYS_HOME": str(tmp_path)})
    env = serve_env(settings, workers=2, base={"BENTOML_CONFIG_OVERRIDES": '{"services": {"hm_recsys": {"x": 1}}}'},
                    bentoml_config={"metrics": {"enabled": True}}, HM_RECSYS_SERVE_VERSION="3",
                    HM_RECSYS_SERVE_ALIAS=None)
    assert json.loads(env["BENTOML_CONFIG_OVERRIDES"]) == \
        {"services": {"hm_recsys": {"x": 1, "metrics": {"enabled": True}, "workers": 2}}}
    assert "BENTOML_CONFIG_OVERRIDES" not in serve_env(settings, base={})
    assert env["BENTOML_HOME"] == str(tmp_path / "bentoml") and env["HM_RECSYS_SERVE_VERSION"] == "3"
    assert "HM_RECSYS_SERVE_ALIAS" not in env and env["BENTOML_DO_NOT_TRACK"] == "true"
