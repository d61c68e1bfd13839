"""``cirkit serve``: a web page and an HTTP JSON API for composed search over one index.

The model is loaded and the index opened once (the model the index's manifest names, as
``cirkit query`` does, unless ``--model`` says otherwise); then every request pays only for
decoding its reference, embedding and searching. Clip-retrieval's ``clip_back`` is the
example: one long-lived back-end over an index built by another command.

Modules: :mod:`cirkit.serve.service` (requests without HTTP: checks, decoding within
:mod:`cirkit.io.images`' limits, micro-batched embedding and search, thumbnails, picking up
new index versions), :mod:`cirkit.serve.batching` (the micro-batcher),
:mod:`cirkit.serve.app` (the FastAPI app: routes, token, limits, security headers) and
``static/`` (the page: plain HTML, CSS and JS, no build step, nothing from a CDN).

API (all JSON; errors are ``{"error": "..."}`` with a 4xx status):

| route | what |
|---|---|
| ``GET /api/health`` | ``{"status": "ok"}`` (no token needed) |
| ``GET /api/info`` | rows, model manifest, ``exact`` or ``ann``, table version, metadata columns |
| ``POST /api/search`` | multipart: ``image`` (upload) or ``reference_id``, ``text``, ``k``, ``where``, ``exclude_reference`` |
| ``GET /api/search`` | the same without an upload (query string) |
| ``GET /api/thumb?id=ID&size=256`` | JPEG thumbnail of an indexed image |
| ``GET /openapi.json``, ``GET /docs`` | the OpenAPI schema and a page listing it |

FastAPI and uvicorn are the optional extra ``cirkit[serve]``; this module imports neither
(``cirkit serve --help`` reads only :class:`ServeConfig`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cirkit.config import batch_size_setting, check_settings, device_setting, setting
from cirkit.errors import CirkitError
from cirkit.io.images import MAX_PIXELS
from cirkit.summary import StageResult, timed

log = logging.getLogger("cirkit")

TOKEN_ENV = "CIRKIT_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class ServeConfig:
    """Settings of ``cirkit serve``."""

    index: str | None = setting(None, help="Index made by 'cirkit index'.")
    table: str = setting("images", help="Table name inside the index.")
    model: str | None = setting(None, short="-m", show_default="the index's model",
                                help="Checkpoint folder or model name.")
    backbone: str | None = setting(None, help="clip, vit, mllm or fake.")
    pretrained: str | None = setting(None, help="open_clip pretrained tag (clip).")
    mode: str = setting("composed", help="composed, image, text or sum.")
    device: str | None = device_setting()
    search: str = setting("auto", choices=("auto", "exact", "ann"), help="How to search the index.")
    nprobes: int | None = setting(None, ge=1, show_default="max(16, 2% of partitions)",
                                  help="ANN partitions probed per query.")
    refine_factor: int | None = setting(None, ge=1, show_default="30", help="ANN: re-rank k*factor candidates exactly.")
    host: str = setting("127.0.0.1", help="Address to listen on; 0.0.0.0 opens it to the network (set a --token).")
    port: int = setting(8000, ge=0, le=65535, help="Port to listen on (0: any free port).")
    token: str | None = setting(None, show_default=f"${TOKEN_ENV}, else none",
                                help="Require 'Authorization: Bearer TOKEN' on the API.")
    cors_origin: list[str] = setting([], help="Origins whose pages may call the API (CORS); none by default.")
    max_k: int = setting(100, ge=1, le=10_000, help="Largest k a request may ask for.")
    max_upload_mb: float = setting(16.0, gt=0, help="Largest request body (an uploaded image), in MB.")
    max_pixels: int = setting(MAX_PIXELS, ge=1, help="Largest image (width x height) decoded.")
    batch_size: int = batch_size_setting(32, "Concurrent queries embedded and searched together")
    batch_wait_ms: float = setting(5.0, ge=0, le=1000,
                                   help="Longest wait of a batch for requests that are already arriving.")
    refresh_s: float = setting(1.0, ge=0, help="Check the index for new versions this often, in seconds (0: every request).")
    cache_dir: Path | None = setting(None, cli=False, show_default="beside a local index",
                                     help="Folder of the exact-search vector cache.")

    def __post_init__(self) -> None:
        check_settings(self)


def _check(config: ServeConfig) -> None:
    if not config.index:
        raise CirkitError("no index given; pass --index INDEX (made by 'cirkit index')")
    check_settings(config)
    for origin in config.cors_origin:
        if origin != "*" and "://" not in origin:
            raise CirkitError(f"--cors-origin {origin!r}: give an origin like https://example.org")


def token_of(config: ServeConfig) -> str | None:
    """The bearer token: ``--token``, else ``$CIRKIT_SERVE_TOKEN`` (kept off the process list), else none."""
    token = config.token if config.token is not None else os.environ.get(TOKEN_ENV)
    return token or None


def _listen(host: str, port: int):
    """A listening socket on ``host:port`` (so the real port is known before uvicorn starts)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CirkitError(f"--host {host!r}: not an address this machine has ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets whose proto says TCP,
    # and with it on, each response (headers, then body) waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise CirkitError(f"{host}:{port}: cannot listen ({e.strerror}); choose another --port, "
                          f"or stop what is using it") from None
    return sock


def run(config: ServeConfig, ready: Callable[[str], None] | None = None) -> StageResult:
    """Serve until interrupted (Ctrl-C, SIGTERM); ``ready(url)`` is called once it listens."""
    try:
        import uvicorn

        from cirkit.serve.app import create_app
    except ImportError as e:
        raise CirkitError(f"cirkit serve needs the serve extra ({e.name} is missing): "
                          "pip install 'cirkit[serve]'") from None
    from cirkit.serve.service import Service

    _check(config)
    token = token_of(config)
    result = StageResult("serve")
    with timed(result):
        service = Service.open(config)
        try:
            app = create_app(service, token=token, cors_origins=config.cors_origin,
                             max_upload_bytes=int(config.max_upload_mb * 1_000_000))
            sock = _listen(config.host, config.port)
            port = sock.getsockname()[1]
            shown_host = f"[{config.host}]" if ":" in config.host else config.host
            url = f"http://{shown_host}:{port}/"
            if config.host not in LOOPBACK and token is None:
                log.warning("listening on %s without a token: anyone who can reach it can search the index "
                            "and see its images; set --token or $%s", config.host, TOKEN_ENV)
            info = service.info()
            log.info("serving %s (%d rows, %s %s, %s search) at %s", info["index"], info["rows"],
                     service.model.backbone, service.model.checkpoint, info["search"], url)
            if ready is not None:
                ready(url)
            server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                                   lifespan="off", timeout_graceful_shutdown=5))
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                # uvicorn shuts down gracefully on Ctrl-C, then raises it again: for a server,
                # being stopped is the normal end, not an interruption of unfinished work
                pass
        finally:
            service.close()
    result.counts = {"requests": service.batcher.stats["jobs"], "batches": service.batcher.stats["batches"]}
    result.details.update(index=str(config.index), largest_batch=service.batcher.stats["largest"])
    return result
