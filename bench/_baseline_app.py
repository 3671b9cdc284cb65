"""The baselines of bench/serve.py: two FastAPI + uvicorn apps over the SAME served state folder as the service.

    python bench/_baseline_app.py bare --bundle B --state S --version V --port P
    python bench/_baseline_app.py seed --bundle B --state S --version V --port P

* ``bare``: the honest baseline. It loads the served state exactly as a
  service worker does (``hm_recsys.serving.load_served``: ``ServedState.load``
  of the same folder, memory-mapped queries, every checksum and the index's
  recall verified) and answers ``/recommend`` and ``/recommend/batch`` with
  the service's own code path (``Served.recommend`` ->
  ``ServedState.recommend_rows``), validating requests with the service's
  validators (``check_customer_id``, strict ``top_k``/``exclude_purchased``)
  and serialising the answers the same way (one ``json.dumps`` to bytes). Async
  endpoints answered on the event loop (batches over 32 ids go to a thread, as
  in the service); one uvicorn worker, access log off. What is left between
  it and the service is BentoML (its ASGI stack, middleware, request
  handling) and the service's own shell (``RequestGuard``, the reloader
  thread): the ratio of the two measures what they cost or save.
* ``seed``: the PyTorch seed's ``/recommend`` the naive way, kept for
  continuity with earlier runs: a sync endpoint that runs the customer tower
  for every request (``bundle.Recommender.customer_embeddings``), then
  searches the state's ScaNN index and ranks by the towers alone (no
  candidate pooling, no fusion), so it answers different lists. Its batch
  endpoint runs the tower once for the batch.

Both answer ``GET /readyz`` (and ``/livez``) once loaded and ``GET /metadata``
with ``model_version``, ``as_of`` and ``loaded_at``; neither reloads.
"""

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, Field

from hm_recsys.serving import DEFAULT_TOP_K, MAX_TOP_K, check_customer_id

# No `from __future__ import annotations` here: FastAPI reads the request models from these annotations.
CustomerId = Annotated[str, AfterValidator(check_customer_id)]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K, strict=True)]
Flag = Annotated[bool, Field(strict=True)]
JSON = "application/json"


class RecommendRequest(BaseModel):
    customer_id: CustomerId
    top_k: TopK = DEFAULT_TOP_K
    exclude_purchased: Flag = False


class BatchRequest(BaseModel):
    customer_ids: Annotated[list[CustomerId], Field(min_length=1, max_length=1000)]
    top_k: TopK = DEFAULT_TOP_K
    exclude_purchased: Flag = False


def _json(body) -> Response:
    return Response(json.dumps(body, separators=(",", ":")).encode(), media_type=JSON)


def _common(app: FastAPI, meta: dict) -> None:
    @app.get("/readyz")
    async def readyz() -> Response:
        return _json({"ready": True})

    @app.get("/livez")
    async def livez() -> Response:
        return _json({"live": True})

    @app.get("/metadata")
    async def metadata() -> Response:
        return _json(meta)


def bare_app(bundle_dir: Path, state_dir: Path, version: str) -> FastAPI:
    """The served state behind plain FastAPI, answered by the service's own code path."""
    import anyio.to_thread

    from hm_recsys.registry import VersionFiles
    from hm_recsys.serving import load_served

    served = load_served(VersionFiles(version, bundle_dir, state_dir), progress=False)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    _common(app, {"model_version": served.version, "as_of": served.as_of.isoformat(),
                  "loaded_at": served.metadata["loaded_at"], "load_seconds": served.metadata["load_seconds"]})

    @app.post("/recommend")
    async def recommend(req: RecommendRequest) -> Response:
        return _json(served.recommend([req.customer_id], req.top_k, req.exclude_purchased)[0])

    @app.post("/recommend/batch")
    async def recommend_batch(req: BatchRequest) -> Response:
        ids = req.customer_ids
        results = await anyio.to_thread.run_sync(served.recommend, ids, req.top_k, req.exclude_purchased) \
            if len(ids) > 32 else served.recommend(ids, req.top_k, req.exclude_purchased)
        return _json({"results": results, "count": len(results), "model_version": served.version,
                      "as_of": served.as_of.isoformat()})

    return app


def seed_app(bundle_dir: Path, state_dir: Path, version: str) -> FastAPI:
    """The seed's naive /recommend: the customer tower per request, then the same ScaNN index."""
    import time

    from hm_recsys import bundle
    from hm_recsys.index import load_index
    from hm_recsys.served import INDEX, read_manifest

    t0 = time.perf_counter()
    rec = bundle.load(bundle_dir)
    index, _ = load_index(state_dir / INDEX, expected_model_version=version, expected_dim=rec.dim)
    as_of = read_manifest(state_dir)["as_of"]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    _common(app, {"model_version": version, "as_of": as_of,
                  "loaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "load_seconds": round(time.perf_counter() - t0, 3)})

    def answer(customer_ids: list[str], top_k: int) -> list[dict]:
        q = rec.customer_embeddings(customer_ids)  # the customer tower, per request
        rows, scores = index.search(q, top_k)
        out = []
        for cid, rr, ss in zip(customer_ids, rows.tolist(), scores.tolist()):
            recs = [{"article_id": index.article_ids[r], "score": float(s), "rank": i}
                    for i, (r, s) in enumerate(zip(rr, ss), start=1) if r >= 0]
            out.append({"customer_id": cid, "recommendations": recs, "count": len(recs)})
        return out

    @app.post("/recommend")
    def recommend(req: RecommendRequest):  # sync: FastAPI runs it in its thread pool, as the seed did
        return answer([req.customer_id], req.top_k)[0]

    @app.post("/recommend/batch")
    def recommend_batch(req: BatchRequest):
        results = answer(req.customer_ids, req.top_k)
        return {"results": results, "count": len(results)}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["bare", "seed"])
    p.add_argument("--bundle", type=Path, required=True, help="the version's bundle folder")
    p.add_argument("--state", type=Path, required=True, help="the served state folder")
    p.add_argument("--version", required=True, help="the model version of both")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    import uvicorn

    app = (bare_app if a.mode == "bare" else seed_app)(a.bundle, a.state, a.version)
    uvicorn.run(app, host="127.0.0.1", port=a.port, workers=1, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
