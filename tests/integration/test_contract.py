"""Contract: schemathesis, all checks, against the service's own OpenAPI document (``/docs.json``).

The real service (``hm-recsys serve`` on the ``served_models`` champion, with an
admin token) is fuzzed by the ``st run`` CLI as a user would run it: every
operation of the document, positive and negative bodies, undeclared methods,
wrong content types, the admin endpoint with its token and (``ignored_auth``)
without it and with a wrong one. At least ``MIN_CASES`` generated cases in
total and no failure; on a failure the assertion shows schemathesis' report,
each failure with a curl line that replays it. About 30 s of fuzzing, with a
fixed seed; ``/recommend/batch`` gets fewer examples than the others (a case
can carry 1000 ids and a 5 MB answer to validate).

By hand, against a running service (``make serve``)::

    st run http://127.0.0.1:3000/docs.json --checks all --max-examples 300 \\
        -H "Authorization: Bearer $HM_RECSYS_ADMIN_TOKEN"

The other tests check what the contract rests on without schemathesis: the
document itself (no server), 405 with ``Allow``, no ``/metrics`` while
BentoML's metrics are off, no filesystem paths in ``/metadata``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.integration.conftest import ServerProcess

TOKEN = "contract-admin-token-0123456789"
MIN_CASES = 1000
SEED = 20200922
# schemathesis.toml for the run: examples per operation (the coverage phase adds its own cases)
ST_CONFIG = """
[generation]
max-examples = 300

[[operations]]
include-path = "/recommend/batch"
generation = { max-examples = 60 }
"""


@pytest.fixture(scope="module")
def server(served_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("contract-log") / "service.log"
    srv = ServerProcess(served_models.env(HM_RECSYS_ADMIN_TOKEN=TOKEN), log)
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


def run_schemathesis(url: str, workdir) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``st run --checks all`` on ``url``/docs.json in ``workdir``; its output and its NDJSON events."""
    config, events = workdir / "schemathesis.toml", workdir / "events.ndjson"
    config.write_text(ST_CONFIG)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(config),
           "run", f"{url}/docs.json", "--checks", "all", "--seed", str(SEED), "--workers", "1",
           "--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30",
           "--report", "ndjson", "--report-ndjson-path", str(events)]
    # its own folder: no schemathesis.toml or .hypothesis/ of the checkout is read or written
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS_")})
    lines = events.read_text().splitlines() if events.exists() else []
    return out, [json.loads(line) for line in lines if line.strip()]


def tally(events: list[dict]) -> tuple[int, list[str], dict[str, int]]:
    """(cases generated, failed checks as 'check: operation', cases per operation) from the NDJSON events."""
    cases, failures, per_op = 0, [], {}
    for event in events:
        scenario = event.get("ScenarioFinished")
        if scenario is None:
            continue
        rec = scenario["recorder"]
        n = len(rec.get("cases", {}))
        cases += n
        per_op[rec["label"]] = per_op.get(rec["label"], 0) + n
        failures += [f"{c['name']}: {rec['label']}" for checks in rec.get("checks", {}).values()
                     for c in checks if c["status"] != "success"]
    return cases, failures, per_op


@pytest.mark.integration
@pytest.mark.slow
def test_schemathesis_all_checks_find_no_failure(server, tmp_path):
    out, events = run_schemathesis(server.url, tmp_path)
    report = f"{out.stdout[-15000:]}\n{out.stderr[-3000:]}"
    cases, failures, per_op = tally(events)
    print(f"schemathesis: {cases} cases, {len(failures)} failures; per operation: {per_op}")
    assert out.returncode == 0 and failures == [], report
    assert cases >= MIN_CASES, f"only {cases} cases: {per_op}\n{report}"
    assert re.search(r"(\d+) generated, \1 passed", out.stdout), report  # the CLI's own count agrees: none failed
    # every operation of the document was exercised, /admin/reload with and without the token
    assert set(per_op) == {"POST /recommend", "POST /recommend/batch", "POST /similar-items", "POST /admin/reload",
                           "GET /livez", "GET /healthz", "GET /readyz", "GET /metadata"}, per_op


@pytest.mark.integration
@pytest.mark.slow
def test_undeclared_methods_are_405_with_allow_and_the_one_error_body(client):
    for method, path, allow in (("POST", "/healthz", "GET, HEAD"), ("POST", "/livez", "GET, HEAD"),
                                ("POST", "/readyz", "GET, HEAD"), ("PUT", "/metadata", "GET, HEAD"),
                                ("DELETE", "/docs.json", "GET, HEAD"), ("GET", "/recommend", "POST"),
                                ("TRACE", "/recommend/batch", "POST"), ("OPTIONS", "/admin/reload", "POST")):
        # a body that would be a 415 (or a 200 on BentoML's any-method health routes) if it got that far
        r = client.request(method, path, content=b"x", headers={"content-type": "text/plain"})
        assert (r.status_code, r.headers.get("allow")) == (405, allow), (method, path, r.text)
        assert r.headers["content-type"] == "application/json" and r.json()["error"].startswith(f"{method} {path}")


@pytest.mark.integration
@pytest.mark.slow
def test_the_document_advertises_only_what_is_served(client):
    doc = client.get("/docs.json").json()
    assert "/metrics" not in doc["paths"]  # BentoML's metrics are off (see hm_recsys.service)
    assert client.get("/metrics").status_code == 404 and client.request("TRACE", "/metrics").status_code == 404
    for path, item in doc["paths"].items():
        for method in item:
            r = client.request(method.upper(), path, json={})  # served: anything but 404/405
            assert r.status_code not in (404, 405), (method, path, r.status_code)
    assert client.head("/docs.json").status_code == 200


@pytest.mark.integration
@pytest.mark.slow
def test_metadata_has_no_filesystem_paths(client, served_models):
    md = client.get("/metadata").json()
    text = json.dumps(md)
    assert md["ready"] is True and str(served_models.home) not in text and os.path.expanduser("~") not in text

    def strings(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    pathlike = [s for s in strings(md) if re.search(r"(^|[\s'\"(=])/\w|file:|sqlite:", s)]
    assert pathlike == []


# -- no server --------------------------------------------------------------------------

def test_the_document_declares_the_one_error_model_and_the_real_statuses():
    from hm_recsys.service import ERROR_SCHEMA, RecommendationService, contract_document
    from hm_recsys.serving import ServeSettings

    doc = contract_document(RecommendationService.openapi_spec.asdict(), ServeSettings(max_batch_ids=7))
    json.dumps(doc)  # serialisable as it is served
    schemas = doc["components"]["schemas"]
    assert schemas["Error"] == ERROR_SCHEMA
    assert not {"InvalidArgument", "NotFound", "InternalServerError"} & set(schemas)  # BentoML's
    assert ERROR_SCHEMA["properties"]["detail"]["type"] == "array"  # what a validation 400 sends
    assert "/metrics" not in doc["paths"] and "/metadata" in doc["paths"]
    want = {"/recommend": {"200", "400", "413", "415", "500", "503"},
            "/recommend/batch": {"200", "400", "413", "415", "422", "500", "503"},
            "/similar-items": {"200", "400", "404", "413", "415", "500", "503"},
            "/admin/reload": {"202", "400", "401", "403", "413", "415", "500"}}
    for path, statuses in want.items():
        op = doc["paths"][path]["post"]
        assert set(op["responses"]) == statuses, path
        assert op["requestBody"]["required"] is True
        for status in statuses - {"200", "202"}:
            assert op["responses"][status]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/Error"}, (path, status)
    assert doc["paths"]["/admin/reload"]["post"]["security"] == [{"adminToken": []}]
    assert doc["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    body = doc["paths"]["/recommend/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["customer_ids"]["maxItems"] == 7
    assert body["properties"]["customer_ids"]["items"]["pattern"] == "^[0-9a-f]{64}$"
    assert body["properties"]["exclude_purchased"]["type"] == "boolean"
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    assert "/metrics" in contract_document(RecommendationService.openapi_spec.asdict(), ServeSettings(),
                                           metrics=True)["paths"]


def test_error_messages_shown_in_metadata_lose_their_paths():
    from hm_recsys.serving import without_paths

    assert without_paths("FileNotFoundError: [Errno 2] No such file or directory: '/srv/var/models/1/x.npy'") == \
        "FileNotFoundError: [Errno 2] No such file or directory: '<path>'"
    assert without_paths("cannot open sqlite:////srv/var/mlflow.db") == "cannot open <path>"
    assert without_paths("file:///srv/var/a b") == "<path> b"
    for kept in ("LoadError: asked for 1@2020-09-16, loaded 2@2020-09-16", "recall 0.8 < 0.9 on 3/4 customers",
                 "cannot reach http://mlflow:5000/api/2.0/mlflow"):
        assert without_paths(kept) == kept
