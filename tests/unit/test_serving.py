"""The serving core (hm_recsys.serving) and the BentoML service class, in process.

* Hand-built 4-article, 2-customer served states with exact answers: ranking,
  ties, cold start, exclusion of purchases, item-to-item.
* The reloader: load-before-swap, a broken state never serves and is not
  retried until forced, an unreachable registry keeps the old state, a newer
  as_of replaces an older one and never the reverse.
* Swaps under concurrent requests: every answer comes from one state.
* ``load_served`` on a real (random-weight) model's served state: answers
  equal ``ServedState``'s, one customer at a time or in a batch; states of
  another version, tampered states and mismatched indexes refused.
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


AS_OF = dt.date(2020, 9, 16)


def make_state(version: str = "1", ids: list[str] = ARTICLES, as_of: dt.date = AS_OF):
    """The towers' ranking alone (one source, fusion = the cosine) over a hand-made 4-article catalogue."""
    from hm_recsys.candidates import CandidateTables, RetrievalConfig
    from hm_recsys.fusion import Fusion
    from hm_recsys.served import ServedState

    # customer row 0 (C0) bought article row 0 three days ago; C1 bought nothing
    history = History(as_of, np.array([0], np.int32), np.array([0, 1], np.int64), np.array([0], np.int32),
                      np.array([3], np.int32))
    queries = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)  # C0, C1, cold start
    n = len(ids)
    tables = CandidateTables(as_of, np.ones(n, bool), np.zeros(n, np.float32), np.zeros(n, np.float32),
                             np.zeros(0, np.int64), np.zeros((1, n), np.float32), np.full((1, 4), -1, np.int64),
                             np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                             np.arange(n), np.arange(n + 1), np.arange(n, dtype=np.int32))
    return ServedState(version, as_of, pd.Index([C0, C1], dtype=object), queries, np.zeros(3, np.int64), list(ids),
                       EMB, history, tables, Fusion.single("two_tower"), RetrievalConfig(sources=("two_tower",)),
                       ExactIndex(ids, EMB), np.arange(n))


def make_served(version: str = "1", ids: list[str] = ARTICLES, as_of: dt.date = AS_OF) -> Served:
    return Served(version, as_of, make_state(version, ids, as_of), {"model_version": version,
                                                                     "as_of": as_of.isoformat()})


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
    assert {k: a0[k] for k in ("customer_id", "count", "model_version", "as_of", "fallback")} == \
        {"customer_id": C0, "count": 4, "model_version": "1", "as_of": "2020-09-16", "fallback": False}


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
    assert out == {"article_id": "0000000001", "count": 2, "model_version": "1", "as_of": "2020-09-16",
                   "similar": [{"article_id": "0000000002", "score": 0.8, "rank": 1},
                               {"article_id": "0000000003", "score": 0.0, "rank": 2}]}
    with pytest.raises(RequestError, match="0000000009 is not in the catalogue of model version 1 as of") as e:
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
        self.as_of: str | None = "2020-09-16"
        self.broken_registry = False

    def describe(self) -> str:
        return "fake alias"

    def resolve(self):
        if self.broken_registry:
            raise ConnectionError("registry down")
        return None if self.alias is None else (self.alias, self.as_of)

    def fetch(self, version: str, as_of: str):
        return SimpleNamespace(version=version, as_of=as_of, bundle_dir=Path("b"), state_dir=Path(as_of))


def make_reloader():
    loads: list[str] = []

    def loader(files):
        loads.append(f"{files.version}@{files.as_of}")
        if files.version == "bad":
            raise LoadError("state checksum mismatch")
        return make_served(files.version, as_of=dt.date.fromisoformat(files.as_of))

    source = FakeSource()
    holder = ModelHolder()
    return Reloader(holder, source, loader, poll_seconds=0), source, holder, loads


def test_reloader_swaps_only_verified_states():
    r, source, holder, loads = make_reloader()
    assert r.check().status == "no-version" and holder.current() is None
    source.alias = "1"
    assert r.check().to_dict()["status"] == "swapped" and holder.current().version == "1"
    assert r.check().status == "unchanged" and loads == ["1@2020-09-16"]
    source.alias = "bad"
    out = r.check()
    assert (out.status, out.version, out.previous) == ("failed", "bad", "1@2020-09-16")
    assert "state checksum mismatch" in out.error and holder.current().version == "1"
    assert r.check().status == "failed" and len(loads) == 2  # remembered, not reloaded
    assert r.check(force=True).status == "failed" and len(loads) == 3  # forced: tried again
    source.alias = "2"
    out = r.check()
    assert (out.status, out.version, out.previous) == ("swapped", "2", "1@2020-09-16")
    assert holder.current().version == "2"
    source.broken_registry = True
    out = r.check()
    assert out.status == "failed" and "registry down" in out.error and holder.current().version == "2"
    assert r.status()["failed"] == {"bad@2020-09-16": "LoadError: state checksum mismatch"}


def test_a_swap_freezes_the_loaded_state_out_of_the_collectors_sight():
    """After a swap the heap is frozen (full collections skip the state: no ~150 ms pauses under load),
    and the next swap unfreezes first, so the replaced state can be collected."""
    import gc
    import weakref

    r, source, holder, _ = make_reloader()
    try:
        source.alias = "1"
        assert r.check().status == "swapped"
        first = weakref.ref(holder.current())
        assert gc.get_freeze_count() > 0
        source.alias = "2"
        assert r.check().status == "swapped" and holder.current().version == "2"
        assert first() is None  # the old state is gone, not kept frozen
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_reloader_follows_newer_states_and_never_goes_back():
    r, source, holder, loads = make_reloader()
    source.alias = "1"
    r.check()
    source.as_of = "2020-09-23"  # a refresh published a newer state of the same version
    out = r.check()
    assert (out.status, out.as_of, out.previous) == ("swapped", "2020-09-23", "1@2020-09-16")
    assert holder.current().as_of == dt.date(2020, 9, 23)
    source.as_of = "2020-09-16"  # an older one: never replaces the newer
    assert r.check().status == "unchanged" and holder.current().as_of == dt.date(2020, 9, 23)
    assert loads == ["1@2020-09-16", "1@2020-09-23"]
    source.alias, source.as_of = "2", None  # a new champion without a published state yet: keep serving
    out = r.check()
    assert out.status == "no-state" and "no published served state" in out.error
    assert holder.current().key == ("1", "2020-09-23")
    source.as_of = "2020-09-16"  # a new version may be older than the state it replaces
    assert r.check().status == "swapped" and holder.current().key == ("2", "2020-09-16")


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
# a real model's served state
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_version(tiny_warehouse_ro, tmp_path_factory):
    """A random-weight (untrained, seeded) model of the tiny data, its bundle and served state for version 7."""
    import torch

    from hm_recsys import bundle, train
    from hm_recsys.candidates import RetrievalConfig
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.features import FeatureConfig
    from hm_recsys.fusion import Fusion
    from hm_recsys.model import ModelConfig
    from hm_recsys.served import build_state
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
            "train": dataclasses.asdict(cfg.train), "retrieval": cfg.retrieval.to_dict()}
    # every source, weighed by hand: the answers must not depend on how the features are combined
    fusion = Fusion(("two_tower", "repurchase", "item_to_item", "trending", "age_trending"),
                    (1.0, 0.5, 0.8, 0.3, 0.2), (0.0,) * 5, (1.0,) * 5)
    bundle_dir = bundle.save(root / "bundle", rec, full, prep.data_window, {"holdout": {"x": 1}}, fusion=fusion)
    rec = bundle.load(bundle_dir)
    config, fusion = bundle.retrieval(bundle_dir)
    state = build_state(rec, wh, split.holdout_start, "7", root / "state", config, fusion, progress=False)
    return SimpleNamespace(root=root, bundle_dir=bundle_dir, state_dir=root / "state", rec=rec, state=state,
                           wh=wh, split=split)


def _files(version: str, rv, state_dir=None):
    from hm_recsys.registry import VersionFiles

    return VersionFiles(version, rv.bundle_dir, state_dir or rv.state_dir)


def test_load_served_answers_exactly_as_the_state_scored_one_by_one_or_in_batches(real_version):
    rv = real_version
    s = load_served(_files("7", rv), progress=False)
    assert s.state.queries.shape == (len(rv.rec.known_customer_ids()) + 1, 8)
    known = rv.rec.known_customer_ids()[::37][:40]
    ids = [*known, UNKNOWN]
    # what the evaluation scores: ServedState.predictions over a batch of thousands
    want = rv.state.predictions(rv.rec.known_customer_ids() + [UNKNOWN], k=12)
    got = [s.recommend([c], top_k=12)[0] for c in ids]  # what /recommend answers, one at a time
    for g in got:
        assert [r["article_id"] for r in g["recommendations"]] == want[g["customer_id"]]
    batch = s.recommend(ids, top_k=12)
    assert [[(r["article_id"], r["score"]) for r in g["recommendations"]] for g in got] == \
        [[(r["article_id"], r["score"]) for r in g["recommendations"]] for g in batch]
    assert [g["fallback"] for g in got] == [False] * len(known) + [True]
    assert all(g["count"] == 12 and g["as_of"] == rv.split.holdout_start.isoformat() for g in got)
    # exclusion: no recently bought article comes back, and still 12
    for g in s.recommend(known, top_k=12, exclude_purchased=True):
        bought = set(rv.state.purchased(g["customer_id"]))
        assert g["count"] == 12 and not bought & {r["article_id"] for r in g["recommendations"]}
    md = s.metadata
    assert (md["model_version"], md["as_of"], md["n_customers"], md["dim"]) == \
        ("7", rv.split.holdout_start.isoformat(), len(rv.rec.known_customer_ids()), 8)
    assert md["metrics"] == {"holdout": {"x": 1}} and "two_tower +1.000" in md["fusion"]
    assert md["index"]["verify_recall_at_12"] == 1.0 and "files" not in md["index"]
    assert str(rv.root) not in json.dumps(md)  # no filesystem paths in what /metadata shows


def test_load_served_refuses_a_state_of_another_version(real_version):
    with pytest.raises(LoadError, match="state of model version 7, not 8"):
        load_served(_files("8", real_version), progress=False)


def test_load_served_refuses_a_tampered_state(real_version, tmp_path):
    import shutil

    bad = tmp_path / "state"
    shutil.copytree(real_version.state_dir, bad)
    q = np.load(bad / "queries.npy")
    q[0] += 1.0
    np.save(bad / "queries.npy", q)
    with pytest.raises(LoadError, match="queries.npy: checksum mismatch"):
        load_served(_files("7", real_version, bad), progress=False)


def test_load_served_refuses_an_index_of_other_embeddings(real_version, tmp_path):
    import shutil

    from hm_recsys.fsutil import file_sha256
    from hm_recsys.index import build_index
    from hm_recsys.served import MANIFEST

    bad = tmp_path / "state"
    shutil.copytree(real_version.state_dir, bad)
    st = real_version.state
    other = np.random.default_rng(0).normal(size=(st.index_rows.size, st.dim)).astype(np.float32)
    shutil.rmtree(bad / "index")
    build_index([st.article_ids[r] for r in st.index_rows], other, bad / "index", "7")
    m = json.loads((bad / MANIFEST).read_text())  # re-signed: every checksum right, the index wrong
    m["files"] = {str(p.relative_to(bad)): file_sha256(p) for p in bad.rglob("*")
                  if p.is_file() and p != bad / MANIFEST}
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(LoadError, match="index and state do not belong together"):
        load_served(_files("7", real_version, bad), progress=False)


def test_load_served_accepts_a_narrow_index_its_manifest_vouches_for(real_version, tmp_path):
    """A search setting chosen on truth may sit below 0.9 recall vs exact: the load check follows the manifest."""
    import shutil

    from hm_recsys.fsutil import file_sha256
    from hm_recsys.index import ExactIndex, ScannConfig, build_index, load_index
    from hm_recsys.served import MANIFEST

    st = real_version.state
    narrow = tmp_path / "state"
    shutil.copytree(real_version.state_dir, narrow)
    shutil.rmtree(narrow / "index")
    n = st.index_rows.size
    build_index([st.article_ids[r] for r in st.index_rows], st.article_embeddings[st.index_rows], narrow / "index",
                "7", config=ScannConfig(num_leaves=16, leaves_to_search=1, reorder=12, training_sample_size=n),
                min_recall=0.0, max_widenings=0)
    # what load_served measures: 256 customers spread over the state
    index, _ = load_index(narrow / "index")
    sample = np.unique(np.linspace(0, st.n_customers - 1, num=min(256, st.n_customers)).astype(np.int64))
    q = np.asarray(st.queries[sample], dtype=np.float32)
    got, _ = index.search(q, 12)
    want, _ = ExactIndex(index.article_ids, st.article_embeddings[st.index_rows]).search(q, 12)
    at_load = float(np.mean([len(set(a) & set(b)) / 12 for a, b in zip(got.tolist(), want.tolist())]))
    assert at_load < 0.85, at_load  # the default floor (0.9) alone would refuse it

    def sign(load_check: float | None, tuned: float) -> None:
        m = json.loads((narrow / MANIFEST).read_text())
        m["index"]["recall_at_12_vs_exact"] = tuned
        m["index"]["load_check"] = None if load_check is None else {"recall_at_12_vs_exact": load_check,
                                                                    "queries": len(sample)}
        m["files"] = {str(p.relative_to(narrow)): file_sha256(p) for p in narrow.rglob("*")
                      if p.is_file() and p != narrow / MANIFEST}
        (narrow / MANIFEST).write_text(json.dumps(m))

    # the state recorded what its loader measures (build_state does): accepted, however far below the tuning figure
    sign(round(at_load, 6), tuned=round(at_load + 0.3, 6))
    assert load_served(_files("7", real_version, narrow), progress=False).metadata["index"]["verify_recall_at_12"] \
        == pytest.approx(at_load)
    sign(round(at_load + 0.05, 6), tuned=round(at_load + 0.05, 6))  # the record vouches for more: refused
    with pytest.raises(LoadError, match="index and state do not belong together"):
        load_served(_files("7", real_version, narrow), progress=False)
    # a state from before the record: judged against its tuning figure, less 0.1
    sign(None, tuned=round(at_load + 0.05, 6))
    assert load_served(_files("7", real_version, narrow), progress=False).metadata["index"]["verify_recall_at_12"] \
        == pytest.approx(at_load)
    sign(None, tuned=round(at_load + 0.2, 6))
    with pytest.raises(LoadError, match="index and state do not belong together"):
        load_served(_files("7", real_version, narrow), progress=False)


def test_built_state_records_what_its_load_check_measures(real_version):
    """build_state measures the load check on the queries and index it publishes; the loader gets the same."""
    from hm_recsys.served import MANIFEST

    recorded = json.loads((real_version.state_dir / MANIFEST).read_text())["index"]["load_check"]
    measured = load_served(_files("7", real_version), progress=False).metadata["index"]["verify_recall_at_12"]
    assert recorded["queries"] == min(256, real_version.state.n_customers)
    assert recorded["recall_at_12_vs_exact"] == pytest.approx(measured, abs=1e-6)


def test_load_served_refuses_a_missing_state(tmp_path, real_version):
    with pytest.raises(LoadError, match="cannot load the served state"):
        load_served(_files("7", real_version, tmp_path / "nothing"), progress=False)


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
                                     "as_of": "2020-09-16",
                                     "recommendations": [{"article_id": "0000000002", "score": 0.96, "rank": 1}]}
    status, out = body(asyncio.run(svc.recommend_batch(customer_ids=[C0, C1], top_k=1)))
    assert status == 200 and (out["count"], out["model_version"], out["as_of"]) == (2, "1", "2020-09-16")
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
    assert status == 202 == c.response.status_code and out["serving"] == "1" and out["as_of"] == "2020-09-16"
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
