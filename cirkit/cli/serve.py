"""``cirkit serve``: a web page and an HTTP API for composed search over an index."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.serve import ServeConfig


@command("cirkit.serve.ServeConfig", section="serve")
def serve(config: ServeConfig, json_out: bool) -> None:
    """Serve an index: a search page and a JSON API, with the model loaded once.

    Open the printed address in a browser: drop a reference image, type the change, click a
    result to refine. The API is described at /docs. Listens on 127.0.0.1 unless --host says
    otherwise. Needs FastAPI and uvicorn (cirkit's serve extra). Ctrl-C stops it.

    Examples

      cirkit serve --index my-index

      cirkit serve --index my-index --port 8080 -m runs/vit

      CIRKIT_SERVE_TOKEN=s3cret cirkit serve --index my-index --host 0.0.0.0

      cirkit serve --index my-index --cors-origin https://intranet.example.org --max-k 50
    """
    from rich.console import Console

    from cirkit.serve import run

    def ready(url: str) -> None:
        Console(stderr=True, highlight=False).print(f"cirkit serve: listening on {url} (Ctrl-C to stop)",
                                                    soft_wrap=True)

    emit(run(config, ready=ready), json_out)
