"""The recommendation service (BentoML): the champion's model and index behind HTTP.

Run it with ``hm-recsys serve`` (or ``make serve``); it binds 127.0.0.1.

=======================  =====================================================
``POST /recommend``       ``{customer_id, top_k=12 (1..100), exclude_purchased=false}``
                          -> ``{customer_id, recommendations: [{article_id, score, rank}],
                          count, model_version, as_of, fallback}``
``POST /recommend/batch`` ``{customer_ids: [...] (1..1000), top_k, exclude_purchased}``
                          -> ``{results: [<as /recommend>], count, model_version, as_of}``
``POST /similar-items``   ``{article_id, top_k}`` -> ``{article_id, similar, count, model_version, as_of}``
``POST /admin/reload``    header ``Authorization: Bearer $HM_RECSYS_ADMIN_TOKEN``; ``{force}``
                          -> 202, the check runs in the background
``GET /livez``            the process is up (BentoML built-in)
``GET /readyz``           200 only once a verified model+index is loaded (``__is_ready__``)
``GET /metadata``         model version, as_of, index facts, fusion, data window, metrics, reloader state
``GET /docs.json``        the OpenAPI document of all of the above (``contract_document``)
=======================  =====================================================

Errors, all with one JSON body (``ERROR_SCHEMA``: ``{error, field?, detail?}``):
malformed input -> 400 naming the field (pydantic, ``detail[].loc``); no or
wrong admin token -> 401 (403: admin disabled); unknown article -> 404; a
method a path does not serve -> 405 with ``Allow``; body over the limit ->
413; any content type but JSON (pickle, multipart, form) -> 415; too many
ids in a batch -> 422; no model yet -> 503. Unknown but well-formed customer
ids are not errors: they get the cold-start answer, ``fallback: true``.
``tests/integration/test_contract.py`` runs schemathesis (all checks) against
``/docs.json`` to keep the document and the answers in step.

All the logic lives in ``hm_recsys.serving`` (framework-free, unit-tested);
this module is the HTTP shell and BentoML's configuration. Tuning (measured
by ``bench/serve.py``): one worker (each worker is a process holding its own
model copy, and 2 cores are shared with the load), async endpoints answered on
the event loop (a single lookup + ScaNN search costs less than a thread hop),
responses serialised once to JSON bytes, access log and Prometheus metrics off
on the hot path, OpenTelemetry skipped for the API routes (its unsampled spans
cost more than the search). Override any of it with ``BENTOML_CONFIG_OVERRIDES``
(JSON, e.g. ``{"services": {"hm_recsys": {"metrics": {"enabled": true}}}}``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Annotated, Any

import bentoml
from pydantic import AfterValidator, BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hm_recsys.serving import (
    DEFAULT_TOP_K,
    MAX_TOP_K,
    NotReady,
    RequestError,
    Runtime,
    ServeSettings,
    check_customer_id,
    normalise_article_id,
)

log = logging.getLogger("hm_recsys.service")

SERVICE_NAME = "hm_recsys"
JSON = "application/json"

# -- request fields (validated by pydantic; a failure is a 400 naming the field) ---------
# The patterns are for the OpenAPI document only (json_schema_extra): the validators are the
# checks, with their own messages. Booleans and integers are strict: "yes", 1 or "12" are 400s,
# as the document says, not silently coerced.
CustomerId = Annotated[str, Field(description="H&M customer id: 64 lowercase hex characters",
                                  examples=["00007d2de826758b65a93dd24ce629ed66842531df6699338c5570910a014cc2"],
                                  json_schema_extra={"pattern": "^[0-9a-f]{64}$"}),
                       AfterValidator(check_customer_id)]
ArticleId = Annotated[str, Field(description="H&M article id, 10 digits (the 9-digit form is accepted)",
                                 examples=["0663713001"], json_schema_extra={"pattern": "^[0-9]{9,10}$"}),
                      AfterValidator(normalise_article_id)]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K, strict=True, description=f"list length, 1..{MAX_TOP_K}")]
Flag = Annotated[bool, Field(strict=True)]


# -- response shapes (the OpenAPI schema; bodies are serialised straight from dicts) ----
class Recommendation(BaseModel):
    article_id: str
    score: float = Field(description="the fused score of the candidate sources (higher is better); for "
                                     "/similar-items, the cosine of the two articles' embeddings")
    rank: int = Field(description="1 = best")


AsOf = Field(description="the served state's date: customer histories and article facts use transactions "
                         "strictly before it (YYYY-MM-DD)")


class RecommendResponse(BaseModel):
    customer_id: str
    recommendations: list[Recommendation]
    count: int
    model_version: str
    as_of: str = AsOf
    fallback: bool = Field(description="true: unknown customer, answered by the cold-start query and trending")


class BatchResponse(BaseModel):
    results: list[RecommendResponse]
    count: int
    model_version: str
    as_of: str = AsOf


class SimilarResponse(BaseModel):
    article_id: str
    similar: list[Recommendation]
    count: int
    model_version: str
    as_of: str = AsOf


def _json(body: Any, status: int = 200) -> Response:
    # json.dumps once, straight from the serving core's dicts: no pydantic round trip per answer
    return Response(json.dumps(body, separators=(",", ":")).encode(), status_code=status, media_type=JSON)


def _error(e: Exception) -> Response:
    if isinstance(e, RequestError):
        return _json(e.to_dict(), e.status)
    if isinstance(e, NotReady):
        return _json({"error": str(e)}, 503)
    raise e


# -- the OpenAPI document (/docs.json) ---------------------------------------------------
# BentoML generates it from the API signatures, but declares its own error shapes (`detail`
# a string, while a validation failure sends a list), a 200 where /admin/reload answers 202,
# no 401/413/415/503, and /metrics even when metrics are off. `contract_document` corrects it
# to what this service answers; tests/integration/test_contract.py holds the two together.

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "description": "The body of every error answer (4xx and 5xx) of the API routes.",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was refused and why, for a person"},
        "field": {"type": "string", "description": "the request field at fault (404, 422)"},
        "detail": {
            "type": "array",
            "description": "400 from validation: one entry per problem; loc[0] names the field",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}

POST_ROUTES = ("/recommend", "/recommend/batch", "/similar-items", "/admin/reload")
GET_ROUTES = ("/livez", "/healthz", "/readyz", "/metadata", "/docs.json")  # and /metrics when metrics are on

_ERRORS = {  # the error statuses each API route can answer
    "/recommend": (400, 413, 415, 500, 503),
    "/recommend/batch": (400, 413, 415, 422, 500, 503),
    "/similar-items": (400, 404, 413, 415, 500, 503),
    "/admin/reload": (400, 401, 403, 413, 415, 500),
}

_NULLABLE_STR = {"type": "string", "nullable": True}
_RELOAD_ACCEPTED = {
    "description": "the check runs in the background; watch /metadata",
    "content": {JSON: {"schema": {
        "type": "object", "title": "ReloadAccepted", "required": ["status", "serving", "as_of", "pid"],
        "properties": {"status": {"type": "string", "enum": ["reload requested"]},
                       "serving": {**_NULLABLE_STR, "description": "the version served now"},
                       "as_of": _NULLABLE_STR, "pid": {"type": "integer"}}}}},
}
_METADATA = {
    "tags": ["Service APIs"],
    "description": "What is being served (or why nothing is): model version, as_of, index facts, fusion, "
                   "data window, metrics, reloader state. No filesystem paths.",
    "operationId": f"{SERVICE_NAME}__metadata",
    "responses": {"200": {"description": "Successful Response", "content": {JSON: {"schema": {
        "type": "object", "title": "Metadata", "required": ["ready", "model_version", "as_of", "pid", "reloader"],
        "properties": {"ready": {"type": "boolean"}, "model_version": _NULLABLE_STR, "as_of": _NULLABLE_STR,
                       "pid": {"type": "integer"}, "started_at": {"type": "string"},
                       "reloader": {"type": "object"}}}}}}},
}


def _error_description(status: int, path: str, settings: ServeSettings) -> str:
    limit = settings.max_batch_body_bytes if path == "/recommend/batch" else settings.max_body_bytes
    return {
        400: "malformed input: the body is not JSON, or a field fails validation (detail[].loc names it)",
        401: "no or wrong admin token (Authorization: Bearer <HM_RECSYS_ADMIN_TOKEN>)",
        403: "the admin endpoint is disabled: the service runs without HM_RECSYS_ADMIN_TOKEN",
        404: "the article is not in the served state's catalogue",
        413: f"the body is over {limit} bytes",
        415: "the body is not application/json (pickle, multipart and form bodies never reach a handler)",
        422: f"more than {settings.max_batch_ids} customer ids",
        500: "unexpected server error; see the service log",
        503: "no verified model is loaded yet; see /metadata",
    }[status]


def _request_schema(doc: dict, op: dict) -> dict:
    schema = op["requestBody"]["content"][JSON]["schema"]
    if "$ref" in schema:
        return doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def contract_document(base: dict, settings: ServeSettings, metrics: bool = False) -> dict:
    """BentoML's OpenAPI document (``svc.openapi_spec.asdict()``) made true to what this service answers.

    One error model (``ERROR_SCHEMA``) for every error status of the API routes, each route
    declaring the ones it can answer; ``/admin/reload`` answers 202 and needs the bearer token
    (``securitySchemes``); request bodies are required, ``customer_ids`` is capped at
    ``max_batch_ids``; ``/readyz`` may answer 503; ``/metadata`` is listed; ``/metrics`` only
    when BentoML's metrics are on (off by default, see the module docstring).
    """
    doc = copy.deepcopy(base)
    paths = doc["paths"]
    for item in paths.values():  # BentoML keys some statuses by int, some by str
        for op in item.values():
            if isinstance(op, dict) and "responses" in op:
                op["responses"] = {str(k): v for k, v in op["responses"].items()}
    if not metrics:
        paths.pop("/metrics", None)
    paths["/readyz"]["get"]["responses"]["503"] = {"description": "not ready: no verified model loaded yet"}
    paths["/metadata"] = {"get": copy.deepcopy(_METADATA)}
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):  # BentoML's, with `detail` a string
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = {"adminToken": {
        "type": "http", "scheme": "bearer", "description": "the service's HM_RECSYS_ADMIN_TOKEN"}}
    for path, statuses in _ERRORS.items():
        op = paths[path]["post"]
        ok = {"202": _RELOAD_ACCEPTED} if path == "/admin/reload" else {"200": op["responses"]["200"]}
        op["responses"] = {**ok, **{str(s): {
            "description": _error_description(s, path, settings),
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}} for s in statuses}}
        op["requestBody"]["required"] = True
    for batch in (_request_schema(doc, paths["/recommend/batch"]["post"]), schemas.get("recommend_batch__Input")):
        if batch:
            batch["properties"]["customer_ids"]["maxItems"] = settings.max_batch_ids
    paths["/admin/reload"]["post"]["security"] = [{"adminToken": []}]
    return doc


def _metrics_enabled() -> bool:
    """Whether BentoML serves /metrics (the same setting its router reads)."""
    try:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return bool(BentoMLContainer.api_server_config.metrics.enabled.get())
    except Exception:  # no BentoML configuration (a bare ASGI test): nothing extra to route
        return False


class RequestGuard:
    """ASGI middleware in front of every route: methods, the OpenAPI document, body types and sizes.

    * A method a known path does not serve -> 405 with ``Allow``, decided first:
      ``POST /livez`` is a 405, not a 415 (BentoML's health routes take any method).
      Unknown paths go on to the router (404).
    * ``GET /docs.json`` -> ``contract_document``: BentoML's document, corrected.
    * POST content types other than ``application/json`` -> 415: no pickle
      (``application/vnd.bentoml+pickle``), multipart or form input reaches the
      API handlers.
    * Bodies over the limit -> 413, decided from ``Content-Length`` when given,
      otherwise while reading (the body is buffered, then replayed to the app).

    Every refusal has the one error body, ``{"error": ...}``.
    """

    def __init__(self, app, settings: ServeSettings | None = None):
        self.app = app
        s = self.settings = settings or ServeSettings.from_env()
        self.limits = {"/recommend/batch": s.max_batch_body_bytes}
        self.default_limit = s.max_body_bytes
        self._routes: dict[str, tuple[str, ...]] | None = None
        self._document: bytes | None = None

    def routes(self) -> dict[str, tuple[str, ...]]:
        """Path -> the methods it answers (GET paths answer HEAD too, as Starlette does)."""
        if self._routes is None:
            get = ("GET", "HEAD")
            routes = {**{p: ("POST",) for p in POST_ROUTES}, **{p: get for p in GET_ROUTES}}
            if _metrics_enabled():
                routes["/metrics"] = get
            self._routes = routes
        return self._routes

    def document(self) -> bytes:
        if self._document is None:
            base = RecommendationService.openapi_spec.asdict()
            doc = contract_document(base, self.settings, metrics="/metrics" in self.routes())
            self._document = json.dumps(doc).encode()
        return self._document

    @staticmethod
    async def _send(send, status: int, body: bytes, headers: tuple = (), head: bool = False) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _refuse(self, send, status: int, message: str, headers: tuple = ()) -> None:
        await self._send(send, status, json.dumps({"error": message}).encode(), headers)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        allowed = self.routes().get(path)
        if allowed is None:
            return await self.app(scope, receive, send)
        if method not in allowed:
            return await self._refuse(send, 405, f"{method} {path}: not allowed; this path answers "
                                                 f"{', '.join(allowed)}",
                                      ((b"allow", ", ".join(allowed).encode()),))
        if path == "/docs.json":
            return await self._send(send, 200, self.document(), head=method == "HEAD")
        if method != "POST":
            return await self.app(scope, receive, send)
        limit = self.limits.get(path, self.default_limit)
        ctype, length = b"", None
        for k, v in scope["headers"]:
            if k == b"content-type":
                ctype = v
            elif k == b"content-length":
                length = v
        media = ctype.split(b";")[0].strip().lower()
        if media != b"application/json":
            return await self._refuse(send, 415, f"{path}: send the body as application/json "
                                                 f"(got {media.decode('latin-1') or 'no content type'})")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await self._refuse(send, 400, "invalid Content-Length header")
            if too_big:
                return await self._refuse(send, 413, f"{path}: request body of {int(length)} bytes is over the "
                                                     f"limit of {limit} bytes")
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read up to the limit, then replay
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._refuse(send, 413, f"{path}: request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class _DropClientErrors(logging.Filter):
    """BentoML logs a traceback at ERROR for every request that fails validation; those are 400s, not faults."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        return not (record.exc_info and isinstance(record.exc_info[1], ValidationError))


def _configure_logging() -> None:
    """Validation failures are not logged as server errors; our own log lines go where BentoML's go."""
    from bentoml._internal.server import http_app

    logger = logging.getLogger(http_app.__name__)
    if not any(isinstance(f, _DropClientErrors) for f in logger.filters):
        logger.addFilter(_DropClientErrors())
    ours, theirs = logging.getLogger("hm_recsys"), logging.getLogger("bentoml")
    if not ours.handlers and theirs.handlers:
        for h in theirs.handlers:
            ours.addHandler(h)
        ours.setLevel(logging.INFO)
        ours.propagate = False


async def metadata_endpoint(request: Request) -> Response:
    """``GET /metadata``: what is being served (or why nothing is)."""
    svc = bentoml.get_current_service()
    return _json(svc.runtime.metadata())


_web = Starlette(routes=[Route("/metadata", metadata_endpoint, methods=["GET"])])


@bentoml.service(
    name=SERVICE_NAME,
    workers=1,
    threads=2,
    traffic={"timeout": 30, "max_concurrency": 512},
    http={"host": "127.0.0.1", "port": 3000},
    logging={"access": {"enabled": False, "request_content_length": True, "request_content_type": True,
                        "response_content_length": True, "response_content_type": True,
                        "skip_paths": ["/metrics", "/healthz", "/livez", "/readyz"],
                        "format": {"trace_id": "032x", "span_id": "016x"}}},
    metrics={"enabled": False, "namespace": "bentoml_service"},
    monitoring={"enabled": False},
    # OpenTelemetry still builds (unsampled) spans for every request unless the route is excluded
    tracing={"excluded_urls": ["/recommend", "/similar-items", "/metadata", "/readyz", "/livez"]},
)
@bentoml.asgi_app(_web, path="/")
class RecommendationService:
    """Recommendations from the served state of the version the registry's alias names; hot-swapped, never mixed."""

    def __init__(self, runtime: Runtime | None = None, start: bool = True):
        self.runtime = runtime or Runtime.from_env()
        _configure_logging()
        if start:
            # the first load runs in the background: /livez answers at once, /readyz when loaded
            self.runtime.reloader.start()

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    @bentoml.on_shutdown
    def _stop_reloader(self) -> None:
        self.runtime.reloader.stop()

    @bentoml.api(route="/recommend")
    async def recommend(self, customer_id: CustomerId, top_k: TopK = DEFAULT_TOP_K,
                        exclude_purchased: Flag = False) -> RecommendResponse:
        """Top-k articles for one customer; unknown customers get the cold-start answer (fallback)."""
        try:
            served = self.runtime.holder.require()  # read once: one version per answer
            return _json(served.recommend([customer_id], top_k, exclude_purchased)[0])
        except (RequestError, NotReady) as e:
            return _error(e)

    @bentoml.api(route="/recommend/batch")
    async def recommend_batch(self, customer_ids: Annotated[list[CustomerId], Field(min_length=1)],
                              top_k: TopK = DEFAULT_TOP_K, exclude_purchased: Flag = False) -> BatchResponse:
        """Top-k articles for many customers at once (one pass of the candidate sources for all)."""
        import anyio.to_thread

        try:
            limit = self.runtime.serve.max_batch_ids
            if len(customer_ids) > limit:
                raise RequestError("customer_ids", f"at most {limit} ids per request, got {len(customer_ids)}")
            served = self.runtime.holder.require()
            # big batches leave the event loop so single requests keep flowing meanwhile
            results = await anyio.to_thread.run_sync(served.recommend, customer_ids, top_k, exclude_purchased) \
                if len(customer_ids) > 32 else served.recommend(customer_ids, top_k, exclude_purchased)
            return _json({"results": results, "count": len(results), "model_version": served.version,
                          "as_of": served.as_of.isoformat()})
        except (RequestError, NotReady) as e:
            return _error(e)

    @bentoml.api(route="/similar-items")
    async def similar_items(self, article_id: ArticleId, top_k: TopK = DEFAULT_TOP_K) -> SimilarResponse:
        """Recommendable articles nearest to an article by embedding, through the served index."""
        try:
            served = self.runtime.holder.require()
            return _json(served.similar_items(article_id, top_k))
        except (RequestError, NotReady) as e:
            return _error(e)

    @bentoml.api(route="/admin/reload")
    async def admin_reload(self, ctx: bentoml.Context, force: Flag = False) -> dict:
        """Check the alias now (202; watch /metadata). Needs ``Authorization: Bearer <HM_RECSYS_ADMIN_TOKEN>``."""
        # with a context parameter BentoML takes the status from ctx.response, not from the Response
        serve = self.runtime.serve
        if not serve.admin_token:
            ctx.response.status_code = 403
            return _json({"error": "the admin endpoint is disabled: start the service with "
                                   "HM_RECSYS_ADMIN_TOKEN set"}, 403)
        auth = ctx.request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not serve.token_ok(token.strip()):
            ctx.response.status_code = 401
            return _json({"error": "missing or wrong admin token (Authorization: Bearer <token>)"}, 401)
        self.runtime.reloader.request(force=force)
        current = self.runtime.holder.current()
        ctx.response.status_code = 202
        return _json({"status": "reload requested", "serving": current.version if current else None,
                      "as_of": current.as_of.isoformat() if current else None, "pid": os.getpid()}, 202)


RecommendationService.add_asgi_middleware(RequestGuard)
