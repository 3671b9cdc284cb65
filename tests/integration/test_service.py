"""The real service: ``hm-recsys serve`` (BentoML) on a free 127.0.0.1 port, over HTTP.

Checks every endpoint, the error answers and the cold start against two tiny
registered versions (``served_models``), then promotes the second version and
hammers ``/recommend`` from several clients while ``hm-recsys deploy`` builds
the Bento and switches the service: no request may fail, and every answer
must be exactly what its ``model_version`` (model + index) answers. Runs in
about a minute, most of it training the two tiny models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.conftest import ServerProcess

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


@pytest.fixture(scope="module")
def expected(served_models):
    """Exact top-12 article ids per (version, customer), from each version's own bundle."""
    from hm_recsys import bundle
    from hm_recsys.config import Settings
    from hm_recsys.registry import Registry

    reg = Registry(Settings.from_env({"HM_RECSYS_HOME": str(served_models.home)}))
    ids = [*served_models.known_customers[:20], UNKNOWN]
    out = {}
    for v in served_models.versions:
        rec = bundle.load(reg.fetch(v).bundle_dir)
        out[v] = {c: [a for a, _ in r] for c, r in zip(ids, rec.recommend(ids, k=12))}
    return out


def post(client, path: str, body) -> tuple[int, dict]:
    r = client.post(path, json=body)
    return r.status_code, r.json()


def test_health_and_metadata(client, served_models):
    v1, _ = served_models.versions
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    md = client.get("/metadata").json()
    assert md["ready"] is True and md["model_version"] == v1 and md["index"]["model_version"] == v1
    assert md["n_articles"] == len(served_models.article_ids) and md["data_window"]["history_as_of"]
    assert md["metrics"]["seed"] == 1 and md["reloader"]["last"]["status"] == "swapped"


def test_recommend_known_customer(client, served_models, expected):
    v1, _ = served_models.versions
    cid = served_models.known_customers[0]
    status, out = post(client, "/recommend", {"customer_id": cid})
    assert status == 200
    assert (out["customer_id"], out["count"], out["model_version"], out["fallback"]) == (cid, 12, v1, False)
    recs = out["recommendations"]
    assert [r["rank"] for r in recs] == list(range(1, 13))
    assert [r["article_id"] for r in recs] == expected[v1][cid]
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)


def test_unknown_customer_gets_cold_start(client, served_models, expected):
    v1, _ = served_models.versions
    status, out = post(client, "/recommend", {"customer_id": UNKNOWN, "top_k": 5})
    assert status == 200 and out["fallback"] is True and out["count"] == 5
    assert [r["article_id"] for r in out["recommendations"]] == expected[v1][UNKNOWN][:5]


def test_exclude_purchased(client, served_models):
    from hm_recsys import bundle

    md = client.get("/metadata").json()
    rec = bundle.load(md["bundle_dir"])
    cid = next(c for c in served_models.known_customers if rec.purchased(c))
    status, out = post(client, "/recommend", {"customer_id": cid, "top_k": 20, "exclude_purchased": True})
    assert status == 200 and out["count"] == 20
    assert not set(rec.purchased(cid)) & {r["article_id"] for r in out["recommendations"]}


def test_batch_and_similar_items(client, served_models, expected):
    v1, _ = served_models.versions
    ids = [served_models.known_customers[1], UNKNOWN, served_models.known_customers[2]]
    status, out = post(client, "/recommend/batch", {"customer_ids": ids, "top_k": 12})
    assert status == 200 and out["count"] == 3 and out["model_version"] == v1
    assert [r["customer_id"] for r in out["results"]] == ids
    assert [r["fallback"] for r in out["results"]] == [False, True, False]
    assert [[x["article_id"] for x in r["recommendations"]] for r in out["results"]] == [expected[v1][c] for c in ids]
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
    assert client.get("/recommend").status_code == 405
    assert client.post("/admin/reload", json={}).status_code == 401
    r = client.post("/admin/reload", json={}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_swap_under_load_has_no_failed_or_mixed_answers(server, served_models, expected):
    """Promote v2 and deploy while 4 clients hammer /recommend: zero failures, no mixed versions."""
    import httpx

    from hm_recsys.config import Settings
    from hm_recsys.registry import Registry

    v1, v2 = served_models.versions
    customers = list(expected[v1])
    assert sum(expected[v1][c] != expected[v2][c] for c in customers) >= len(customers) // 2  # tells them apart
    stop = threading.Event()
    answers: list[tuple[str, str, list[str]]] = []
    failures: list[str] = []

    def hammer(offset: int):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = offset
            while not stop.is_set():
                cid = customers[i % len(customers)]
                i += 1
                try:
                    r = c.post("/recommend", json={"customer_id": cid})
                except httpx.HTTPError as e:
                    failures.append(f"{cid}: {e!r}")
                    continue
                if r.status_code != 200:
                    failures.append(f"{cid}: {r.status_code} {r.text[:200]}")
                    continue
                out = r.json()
                answers.append((cid, out["model_version"], [x["article_id"] for x in out["recommendations"]]))

    threads = [threading.Thread(target=hammer, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        Registry(Settings.from_env({"HM_RECSYS_HOME": str(served_models.home)})).promote(v2)
        deployed = subprocess.run([sys.executable, "-m", "hm_recsys.cli", "deploy", "--url", server.url,
                                   "--timeout", "120"], env=served_models.env(HM_RECSYS_ADMIN_TOKEN=TOKEN),
                                  capture_output=True, text=True, timeout=240)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    result = json.loads(deployed.stdout[deployed.stdout.index("{"):])
    assert (result["version"], result["bento"], result["service"]["status"]) == (v2, f"hm_recsys:v{v2}", "switched")
    assert failures == []
    versions = [v for _, v, _ in answers]
    assert set(versions) == {v1, v2} and versions.index(v2) > 0
    mixed = [(c, v) for c, v, arts in answers if arts != expected[v][c]]
    assert mixed == [], f"{len(mixed)} of {len(answers)} answers differ from their version's own answer"
    assert len(answers) > 100

    # deploy is idempotent: nothing rebuilt, the service already serves v2
    again = subprocess.run([sys.executable, "-m", "hm_recsys.cli", "deploy", "--url", server.url],
                           env=served_models.env(HM_RECSYS_ADMIN_TOKEN=TOKEN), capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout[again.stdout.index("{"):])
    assert (result["built"], result["service"]["status"]) == (False, "already serving")
