"""The real service: ``hm-recsys serve`` (BentoML) on a free 127.0.0.1 port, over HTTP.

Checks every endpoint, the error answers and the cold start against two tiny
registered versions (``served_models``). Parity: for a sample of customers
the service answers exactly what the evaluation scored for them
(``ServedState.predictions`` on the same published state). Then, while
several clients hammer ``/recommend``: ``hm-recsys refresh`` publishes the
champion's state as of the newest week and the service swaps to it, and a
promotion + ``hm-recsys deploy`` switches to the other version. No request
may fail, and every answer must be exactly what its (version, as_of) state
answers. Runs in about a minute, most of it training the two tiny models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.conftest import Hammer, ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "test-admin-token-0123456789"
UNKNOWN = "f" * 64


@pytest.fixture(scope="module")
def server(served_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("service-log") / "service.log"
    # polling slow on purpose: the switch in the swap test must come from deploy's reload request
    srv = ServerProcess(served_models.env(HM_RECSYS_ADMIN_TOKEN=TOKEN, HM_RECSYS_SERVE_POLL_SECONDS="600"), log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def sample(served_models) -> list[str]:
    return [*served_models.known_customers[:20], UNKNOWN]


@pytest.fixture(scope="module")
def expected(served_models):
    """Top-12 article ids per (version, as_of) and customer, as the evaluation scores them."""
    v1, v2 = served_models.versions
    old, new = served_models.as_of
    ids = sample(served_models)
    return {(v, a): served_models.state(v, a).predictions(ids, k=12) for v, a in ((v1, old), (v2, new))}


def post(client, path: str, body) -> tuple[int, dict]:
    r = client.post(path, json=body)
    return r.status_code, r.json()


def test_health_and_metadata(client, served_models):
    v1, _ = served_models.versions
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    md = client.get("/metadata").json()
    assert md["ready"] is True and (md["model_version"], md["as_of"]) == (v1, served_models.as_of[0])
    assert md["n_articles"] == len(served_models.article_ids) and md["data_window"]["split"]
    assert md["metrics"]["seed"] == 1 and md["reloader"]["last"]["status"] == "swapped"
    assert str(served_models.home) not in json.dumps(md)  # no filesystem paths to anyone


def test_service_answers_exactly_what_the_evaluation_scored(client, served_models, expected):
    """Parity: one customer per request over HTTP == the evaluation's batch on the same served state."""
    key = (served_models.versions[0], served_models.as_of[0])
    for cid in sample(served_models):
        status, out = post(client, "/recommend", {"customer_id": cid})
        assert status == 200 and (out["model_version"], out["as_of"]) == key
        assert [r["article_id"] for r in out["recommendations"]] == expected[key][cid], cid


def test_recommend_known_customer(client, served_models, expected):
    v1, _ = served_models.versions
    cid = served_models.known_customers[0]
    status, out = post(client, "/recommend", {"customer_id": cid})
    assert status == 200
    assert (out["customer_id"], out["count"], out["model_version"], out["fallback"]) == (cid, 12, v1, False)
    recs = out["recommendations"]
    assert [r["rank"] for r in recs] == list(range(1, 13))
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True)


def test_unknown_customer_gets_cold_start(client, served_models, expected):
    key = (served_models.versions[0], served_models.as_of[0])
    status, out = post(client, "/recommend", {"customer_id": UNKNOWN, "top_k": 5})
    assert status == 200 and out["fallback"] is True and out["count"] == 5
    assert [r["article_id"] for r in out["recommendations"]] == expected[key][UNKNOWN][:5]


def test_exclude_purchased(client, served_models):
    state = served_models.state(served_models.versions[0], served_models.as_of[0])
    cid = next(c for c in served_models.known_customers if state.purchased(c))
    status, out = post(client, "/recommend", {"customer_id": cid, "top_k": 20, "exclude_purchased": True})
    assert status == 200 and out["count"] == 20
    assert not set(state.purchased(cid)) & {r["article_id"] for r in out["recommendations"]}


def test_batch_and_similar_items(client, served_models, expected):
    key = (served_models.versions[0], served_models.as_of[0])
    ids = [served_models.known_customers[1], UNKNOWN, served_models.known_customers[2]]
    status, out = post(client, "/recommend/batch", {"customer_ids": ids, "top_k": 12})
    assert status == 200 and out["count"] == 3 and (out["model_version"], out["as_of"]) == key
    assert [r["customer_id"] for r in out["results"]] == ids
    assert [r["fallback"] for r in out["results"]] == [False, True, False]
    assert [[x["article_id"] for x in r["recommendations"]] for r in out["results"]] == [expected[key][c] for c in ids]
    article = next(a for a in served_models.article_ids if a.startswith("0"))
    # the 9-digit form of an id is accepted and answered with the 10-digit one
    status, out = post(client, "/similar-items", {"article_id": article[1:], "top_k": 4})
    assert status == 200 and out["article_id"] == article and out["count"] == 4
    assert article not in [r["article_id"] for r in out["similar"]]


@pytest.mark.parametrize("path,body,status,field", [
    ("/recommend", {"customer_id": "XYZ"}, 400, "customer_id"),
    ("/recommend", {"customer_id": "A" * 64}, 400, "customer_id"),
    ("/recommend", {"top_k": 5}, 400, "customer_id"),
    ("/recommend", {"customer_id": UNKNOWN, "top_k": 0}, 400, "top_k"),
    ("/recommend", {"customer_id": UNKNOWN, "top_k": 101}, 400, "top_k"),
    ("/recommend", {"customer_id": UNKNOWN, "top_k": "12"}, 400, "top_k"),
    ("/recommend", {"customer_id": UNKNOWN, "exclude_purchased": "yes"}, 400, "exclude_purchased"),
    ("/recommend", {"customer_id": UNKNOWN, "exclude_purchased": 1}, 400, "exclude_purchased"),
    ("/recommend/batch", {"customer_ids": []}, 400, "customer_ids"),
    ("/recommend/batch", {"customer_ids": [UNKNOWN, "nope"]}, 400, "customer_ids"),
    ("/similar-items", {"article_id": "12345"}, 400, "article_id"),
])
def test_malformed_input_is_a_400_naming_the_field(client, path, body, status, field):
    code, out = post(client, path, body)
    assert code == status
    assert out["detail"][0]["loc"][0] == field and out["detail"][0]["msg"]


def test_other_refusals(client, served_models):
    code, out = post(client, "/similar-items", {"article_id": "0999999999"})
    assert code == 404 and "not in the catalogue" in out["error"]
    code, out = post(client, "/recommend/batch", {"customer_ids": [UNKNOWN] * 1001})
    assert code == 422 and out["error"] == "customer_ids: at most 1000 ids per request, got 1001"
    # pickle, multipart and form bodies never reach a handler
    for ctype in ("application/vnd.bentoml+pickle", "multipart/form-data; boundary=x",
                  "application/x-www-form-urlencoded", "text/plain"):
        r = client.post("/recommend", content=b"x", headers={"content-type": ctype})
        assert r.status_code == 415 and "application/json" in r.json()["error"]
    big = json.dumps({"customer_id": UNKNOWN, "pad": "x" * 70_000})
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit of 65536 bytes" in r.json()["error"]
    r = client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.get("/recommend")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]
    r = client.post("/livez", content=b"x", headers={"content-type": "text/plain"})  # 405 before 415
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert client.post("/admin/reload", json={}).status_code == 401
    r = client.post("/admin/reload", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def _cli(served_models, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "hm_recsys.cli", *args],
                         env=served_models.env(HM_RECSYS_ADMIN_TOKEN=TOKEN), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{"):])


def test_refresh_under_load_swaps_to_the_newest_week_with_no_failed_or_mixed_answers(server, served_models):
    """`hm-recsys refresh` publishes v1 as of the newest week; the service swaps with zero failed requests."""
    v1, _ = served_models.versions
    old, new = served_models.as_of
    ids = sample(served_models)
    want = {a: served_models.state(v1, a).predictions(ids, k=12) for a in (old,)}
    with Hammer(server.url, ids) as h:
        result = _cli(served_models, "refresh", "--no-live-quality", "--url", server.url)
    assert (result["version"], result["as_of"], result["status"], result["service"]) == (v1, new, "built",
                                                                                         "switched")
    want[new] = served_models.state(v1, new).predictions(ids, k=12)
    assert h.failures == [] and len(h.answers) > 100
    seen = [a for _, _, a, _ in h.answers]
    assert set(seen) == {old, new} and seen.index(new) > 0
    assert all(v == v1 for _, v, _, _ in h.answers)
    mixed = [(c, a) for c, _, a, arts in h.answers if arts != want[a][c]]
    assert mixed == [], f"{len(mixed)} of {len(h.answers)} answers differ from their state's own answer"
    import httpx

    assert httpx.get(f"{server.url}/metadata").json()["as_of"] == new
    again = _cli(served_models, "refresh", "--no-live-quality", "--url", server.url)  # idempotent: nothing newer to build
    assert (again["status"], again["as_of"]) == ("current", new)


def test_live_quality_scores_the_state_that_served_each_week(served_models):
    """The week v1 served with its state as of that week is scored on its buyers, once, in MLflow."""
    import datetime as dt

    import mlflow

    from hm_recsys import evaluate as ev
    from hm_recsys import monitor
    from hm_recsys.data.warehouse import Warehouse
    from hm_recsys.registry import Registry

    settings = served_models.settings
    v1, _ = served_models.versions
    old = dt.date.fromisoformat(served_models.as_of[0])  # the newest ingested week; v1's state as of its start
    out = monitor.live_quality(settings)
    assert out["status"] == "scored" and [r["week"] for r in out["weeks"]] == [old.isoformat()]
    row = out["weeks"][0]
    wh = Warehouse(settings.layout.warehouse_dir)
    truth = ev.relevant_sets(wh.transactions(old, old + dt.timedelta(weeks=1), ["customer_id", "article_id"]))
    want = ev.evaluate_rankings(served_models.state(v1, old.isoformat()).predictions(truth.customer_ids, 100), truth)
    assert row["as_of"] == old.isoformat() and row["customers"] == len(truth)
    assert row["served_recall_at_12"] == pytest.approx(want["recall@12"])
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    hist = client.get_metric_history(out["run_id"], "live.recall_at_12")
    assert [(m.step, m.value) for m in hist] == [(monitor.week_step(old), pytest.approx(want["recall@12"]))]
    best = client.get_metric_history(out["run_id"], "live.best_baseline.recall_at_12")[0].value
    assert best == pytest.approx(row["best_baseline_recall_at_12"]) and row["best_baseline"] in ev.BASELINES
    assert "plots/live_quality.png" in {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    assert client.get_run(out["run_id"]).data.tags["monitor_version"] == v1
    assert Registry(settings).version(v1).tags["live_quality_weeks"] == f'["{old.isoformat()}"]'
    assert monitor.live_quality(settings)["status"] == "nothing-new"  # each week is scored once


def test_swap_under_load_has_no_failed_or_mixed_answers(server, served_models, expected):
    """Promote v2 and deploy while 4 clients hammer /recommend: zero failures, no mixed versions."""
    from hm_recsys.registry import Registry

    v1, v2 = served_models.versions
    new = served_models.as_of[1]
    ids = sample(served_models)
    want = {v1: served_models.state(v1, new).predictions(ids, k=12), v2: expected[(v2, new)]}
    assert sum(want[v1][c] != want[v2][c] for c in ids) >= len(ids) // 2  # tells them apart
    with Hammer(server.url, ids) as h:
        Registry(served_models.settings).promote(v2)
        result = _cli(served_models, "deploy", "--url", server.url, "--timeout", "120")
    assert (result["version"], result["as_of"], result["bento"], result["service"]["status"]) == \
        (v2, new, f"hm_recsys:v{v2}", "switched")
    assert h.failures == []
    versions = [v for _, v, _, _ in h.answers]
    assert set(versions) == {v1, v2} and versions.index(v2) > 0
    mixed = [(c, v) for c, v, _, arts in h.answers if arts != want[v][c]]
    assert mixed == [], f"{len(mixed)} of {len(h.answers)} answers differ from their version's own answer"
    assert len(h.answers) > 100

    # deploy is idempotent: nothing rebuilt, the service already serves v2
    again = _cli(served_models, "deploy", "--url", server.url)
    assert (again["built"], again["service"]["status"]) == (False, "already serving")
