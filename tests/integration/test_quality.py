"""Quality smoke tests that can fail: the served model must beat real baselines, not random.

* tiny data: the towers alone beat last-week popularity, and what the service
  answers (every candidate source, fused) beats the BEST heuristic on the
  holdout week;
* small data (5,000 articles: above ScaNN's brute-force threshold, so the
  approximate tree + quantisation path runs): the whole retraining flow
  (``pipeline.retrain``: snapshot, train, register, gate state, gate, promote,
  deploy's state as of the newest week), then the real service answers
  exactly what the evaluation scores, through that ScaNN index.
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.integration

# tiny data needs a longer window than the default to learn tastes (see tests/dags/test_retrain_dag.py)
TINY_GOOD = [
    "features.history_weeks=8", "features.history_length=8", "features.postal_buckets=64",
    "model.embedding_dim=8", "model.customer_layers=[32]", "model.article_layers=[32]", "model.output_dim=16",
    "train.batch_size=256", "train.uniform_negatives=64", "train.temperature=0.1", "train.sparse_lr=0.02",
    "train.valid_max_customers=0", "train.threads=1", "train.lr=0.005", "train.epochs=8", "train.train_weeks=28",
]


def test_tiny_served_model_beats_every_heuristic(tiny_warehouse_ro, tmp_path):
    from hm_recsys import evaluate as ev
    from hm_recsys import train as T
    from hm_recsys.data.warehouse import Warehouse

    wh = Warehouse(tiny_warehouse_ro)
    config = T.load_config(None, TINY_GOOD)
    split = T.resolve_split(wh, config)
    prep = T.prepare(wh, split, config, tmp_path / "shards", progress=False)
    model, _, _ = T.fit(prep, config, progress=False)
    fusion = T.fit_fusion(model, prep, config, wh, tmp_path, "smoke", progress=False)
    rec = T.recommender(model, prep, prep.end_history, prep.end_raw)
    models, truth = T.holdout_models(rec, fusion, config, wh, split, tmp_path / "state", "smoke", progress=False)
    r12 = {name: r["recall@12"] for name, r in ev.score_all(models, truth)[0].items()}
    best = ev.best_baseline({k: {"recall@12": v} for k, v in r12.items()})
    assert r12[T.MODEL_NAME] > r12[ev.POPULARITY], r12  # the towers alone beat last week's best-sellers
    assert r12[T.SERVED] > r12[best], r12  # what the service answers beats the best heuristic
    assert r12[T.SERVED] >= r12[T.MODEL_NAME], r12


@pytest.mark.slow
def test_small_data_runs_the_approximate_index_through_the_gate_and_the_service(home, tmp_path, monkeypatch):
    import datetime as dt
    import json

    import httpx

    from hm_recsys import pipeline
    from hm_recsys.config import Settings
    from hm_recsys.data.ingest import ingest_history
    from hm_recsys.data.synthetic import generate
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.registry import CHAMPION, INDEX_SEARCH_TAG, Registry
    from hm_recsys.served import ServedState
    from tests.integration.conftest import ServedModels, ServerProcess

    # `home`: a private HM_RECSYS_HOME, and no MLFLOW_TRACKING_URI left over from another test's registry
    monkeypatch.setenv("HM_RECSYS_DEPLOY_BENTO", "0")  # the Bento build is tested with the service
    settings = Settings.from_env()
    generate(settings.layout.raw_dir, scale="small", seed=42, progress=False)
    ingest_history(settings.layout.raw_dir, settings.layout.warehouse_dir, progress=False)
    shutil.rmtree(settings.layout.raw_dir)
    params = {"train_weeks": 4, "epochs": 2, "overrides": ["train.threads=2"], "gate_margin": 0.02}
    decision = pipeline.retrain(params, "small-e2e", deploy_after=True, progress=False)
    assert decision["promote"] and decision["rule"] == "no-champion", decision["reason"]
    assert decision["challenger_recall"] > decision["best_baseline_recall"]

    reg = Registry(settings)
    version = reg.get(CHAMPION).version
    gate_state = ServedState.load(settings.layout.run_dir("small-e2e") / "gate" / f"v{version}")
    files = reg.fetch_state(version)
    served = ServedState.load(files.state_dir)
    for state in (gate_state, served):
        cfg = state.manifest["index"]["scann_config"]
        assert state.index_rows.size >= 2000 and not cfg["brute_force"], cfg  # a tree, not brute force
        assert cfg["leaves_to_search"] < cfg["num_leaves"], cfg  # and it does not search every partition
        assert state.manifest["index"]["recall_at_12_vs_exact"] >= 0.8  # the sanity floor of the holdout rule
    assert served.as_of > gate_state.as_of  # deploy serves the newest week, the gate scored the holdout's start

    # the gate's index setting was chosen on the holdout's truth, recorded on the version, and carried to the
    # newest state (which has no truth yet)
    gate_tuning, served_tuning = gate_state.manifest["index"]["tuning"], served.manifest["index"]["tuning"]
    assert gate_tuning["floor_kind"] == "holdout", gate_tuning["reason"]
    holdout = gate_tuning["holdout"]
    week = Warehouse(settings.layout.warehouse_dir).transactions(
        gate_state.as_of, gate_state.as_of + dt.timedelta(weeks=1), columns=["customer_id"])
    assert holdout["n_queries"] == week["customer_id"].nunique()  # every holdout buyer, known or not
    assert holdout["recall_at_k"]["ratio"] >= 0.99 and 0 < holdout["candidate_recall"]["ratio"] <= 1.0  # reported
    assert holdout["candidate_k"] == gate_state.config.two_tower_k
    tag = json.loads(reg.version(version).tags[INDEX_SEARCH_TAG])
    assert tag["reorder"] == gate_state.manifest["index"]["scann_config"]["reorder"]
    assert tag["recall_at_12_vs_exact"] == gate_state.manifest["index"]["recall_at_12_vs_exact"]
    assert served_tuning["floor_kind"] == "carried" and served_tuning["carried"] == tag, served_tuning["reason"]
    assert served.manifest["index"]["recall_at_12_vs_exact"] >= served_tuning["min_recall_at_12_vs_exact"]
    assert served_tuning["min_recall_at_12_vs_exact"] == pytest.approx(tag["recall_at_12_vs_exact"] - 0.02)

    env = ServedModels(home, (version, version), (), (), ("", "")).env()
    server = ServerProcess(env, tmp_path / "service.log")
    try:
        server.wait_ready()
        customers = [str(c) for c in served.customer_index[:: max(1, served.n_customers // 40)][:40]]
        want = served.predictions(customers, k=12)
        for cid in customers:
            out = httpx.post(f"{server.url}/recommend", json={"customer_id": cid}, timeout=30).json()
            assert (out["model_version"], out["as_of"]) == (version, served.as_of.isoformat())
            assert [r["article_id"] for r in out["recommendations"]] == want[cid], cid
        md = httpx.get(f"{server.url}/metadata", timeout=30).json()
        assert md["index"]["kind"] == "ScannIndex" and not md["index"]["scann_config"]["brute_force"]
        assert md["index"]["tuning"]["floor_kind"] == "carried"  # /metadata says how the setting was chosen
    finally:
        server.stop()
