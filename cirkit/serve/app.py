"""The FastAPI app of ``cirkit serve``: routes, bearer token, body limit, security headers, errors.

Every error is JSON, ``{"error": "one line saying what is wrong and what to send"}``, with a
4xx status for what the client can fix (400 bad values or filter, 401 token, 404 unknown id
or route, 413 too large, 422 wrong types) and 503 when the index no longer matches the model.
The page and its assets are fixed package files served from memory: no part of a request
path reaches the file system.
"""

from __future__ import annotations

import hmac
import json
import logging
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi import Query as Param
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from cirkit import __version__
from cirkit.errors import CirkitError
from cirkit.serve.batching import Closed
from cirkit.serve.service import THUMB_SIZES, Query, RequestError, Service

log = logging.getLogger("cirkit")

# No inline script or style anywhere, so the policy can forbid both; thumbnails are blob: URLs
# (fetched with the token), the preview of an upload too.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CSP.encode()),
    (b"cross-origin-opener-policy", b"same-origin"),
]
ASSETS = {  # name -> media type: the only files the app serves
    "index.html": "text/html; charset=utf-8",
    "docs.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _assets() -> dict[str, bytes]:
    folder = resources.files("cirkit.serve") / "static"
    return {name: (folder / name).read_bytes() for name in ASSETS}


class Secured:
    """ASGI wrapper: security headers on every response, and the request body limit.

    A body over the limit is refused before it is read when its Content-Length says so, and
    as soon as it passes the limit otherwise (chunked uploads).
    """

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, int(max_body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_secured(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in SECURITY_HEADERS if k not in have)]}
            await send(message)

        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await _raw_error(send_secured, 413 if declared.isdigit() else 400,
                                    self._too_large() if declared.isdigit() else "bad Content-Length header")
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, self._too_large())
            return message

        try:
            await self.app(scope, receive_limited, send_secured)
        except HTTPException as e:  # raised while a middleware or parser read the body
            if started:
                raise
            await _raw_error(send_secured, e.status_code, str(e.detail))

    def _too_large(self) -> str:
        return f"the request is larger than {self.max_body} bytes (--max-upload-mb); send a smaller image"


async def _raw_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _hit(h) -> dict[str, Any]:
    """A hit as the API shows it: no server file paths (thumbnails are fetched by id)."""
    d = h.to_dict()
    out = {"rank": d["rank"], "id": d["id"], "score": d["score"]}
    if d.get("metadata"):
        out["metadata"] = d["metadata"]
    return out


def create_app(service: Service, *, token: str | None = None, cors_origins=(), max_upload_bytes: int = 16_000_000):
    """The ASGI app serving ``service`` (wrapped in :class:`Secured`; ``.api`` is the FastAPI app)."""
    api = FastAPI(
        title="cirkit serve", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
        description="Composed image retrieval over one cirkit index: a reference image (upload or indexed id) "
                    "and/or a modification text in, ranked indexed images out.",
    )
    api.state.service = service
    _error_handlers(api)
    _page_routes(api, _assets())
    _api_routes(api, service, [Depends(_authorizer(token))])
    app = api
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(api, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"], max_age=600)
    secured = Secured(app, max_upload_bytes)
    secured.api = api  # type: ignore[attr-defined]
    secured.service = service  # type: ignore[attr-defined]
    return secured


def _error_handlers(api: FastAPI) -> None:
    """Every error as ``{"error": one line}`` with its status (see :func:`_error`)."""
    @api.exception_handler(CirkitError)
    async def cirkit_error(request: Request, e: CirkitError):
        status = getattr(e, "status", 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return _error(status, str(e), headers)

    @api.exception_handler(Closed)
    async def closed(request: Request, e: Closed):
        return _error(503, "the server is shutting down; try again")

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            return _error(404, f"no such page or API route: {request.url.path} (see /docs)")
        if e.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path} (see /docs)")
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @api.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # logged with its traceback by the server
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details")

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _error(422, _validation_message(e))


def _authorizer(token: str | None):
    """The dependency that checks ``Authorization: Bearer TOKEN`` (nothing when no token is set)."""

    def authorized(authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise RequestError(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN'")

    return authorized


def _page_routes(api: FastAPI, assets: dict[str, bytes]) -> None:
    """The search page, the API docs page and their static files."""
    def asset(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @api.get("/", include_in_schema=False)
    def page() -> Response:
        return asset("index.html")

    @api.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return asset("docs.html")

    @api.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404)
        return asset(name)


def _api_routes(api: FastAPI, service: Service, guarded: list) -> None:
    """``/api/*``: health, info, search (GET and POST) and thumbnails."""
    @api.get("/api/health", summary="Liveness: the server answers (no token needed).")
    def health() -> JSONResponse:
        if service.stale:
            return JSONResponse({"status": "stale", "error": service.stale}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/api/info", dependencies=guarded, summary="The index served: rows, model, exact or ANN search, version.")
    def info() -> JSONResponse:
        return JSONResponse(service.info(), headers={"Cache-Control": "no-store"})

    def answer(q: Query) -> JSONResponse:
        a = service.search(q)
        return JSONResponse({
            "query": {"kind": q.kind, "reference_id": q.reference_id, "upload": q.image is not None, "text": q.text,
                      "k": q.k, "where": q.where, "exclude_reference": q.exclude_reference},
            "hits": [_hit(h) for h in a.hits],
            "version": a.version,
            "batch": a.batch,
            "timing_ms": a.timing_ms,
        }, headers={"Cache-Control": "no-store"})

    @api.post("/api/search", dependencies=guarded, summary="Search with an uploaded or indexed reference and/or a text.")
    def search_post(
        image: Annotated[UploadFile | None, File(description="Reference image (JPEG, PNG, WebP, ...).")] = None,
        reference_id: Annotated[str | None, Form(description="Id of an indexed image to use as the reference.")] = None,
        text: Annotated[str | None, Form(description="Modification text, e.g. 'make it red'.")] = None,
        k: Annotated[int, Form(description="Results wanted (1 to the server's max_k).")] = 10,
        where: Annotated[str | None, Form(description="SQL filter on metadata columns, e.g. \"year > 2020\".")] = None,
        exclude_reference: Annotated[bool, Form(description="Drop an indexed reference from its results.")] = False,
    ) -> JSONResponse:
        data = None
        if image is not None:
            data = image.file.read()
            if not data and not image.filename:
                data = None  # an empty file field of an HTML form: no upload
        return answer(Query(data, reference_id, text, k, where, exclude_reference))

    @api.get("/api/search", dependencies=guarded, summary="Search with an indexed reference and/or a text.")
    def search_get(
        reference_id: Annotated[str | None, Param(description="Id of an indexed image to use as the reference.")] = None,
        text: Annotated[str | None, Param(description="Modification text.")] = None,
        k: Annotated[int, Param(description="Results wanted.")] = 10,
        where: Annotated[str | None, Param(description="SQL filter on metadata columns.")] = None,
        exclude_reference: Annotated[bool, Param(description="Drop the reference from its results.")] = False,
    ) -> JSONResponse:
        return answer(Query(None, reference_id, text, k, where, exclude_reference))

    @api.get("/api/thumb", dependencies=guarded, summary="A JPEG thumbnail of an indexed image, by id.",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumb(
        item_id: Annotated[str, Param(alias="id", description="Id of an indexed image.")],
        size: Annotated[int, Param(description=f"Longest side: one of {', '.join(map(str, THUMB_SIZES))}.")] = 256,
    ) -> Response:
        return Response(service.thumbnail(item_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=60"})
