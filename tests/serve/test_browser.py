"""The search page in a real browser: headless Chromium (Debian's package) driven by playwright.

Starts the server on a free 127.0.0.1 port in a thread, loads the page, uploads a reference,
types a modification, sees results, clicks one to refine, reloads the shared URL, runs a
text-only search, and checks that no script error or CSP violation was logged and that ids
holding markup are shown as text. Screenshots go to the test's tmp dir, and also to
``$CIRKIT_SCREENSHOTS`` when it is set.

Chromium is required: ``.ci/run`` installs it. Without it this test fails, unless
``CIRKIT_SKIP_BROWSER=1`` is set outside CI (then it skips, saying so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from .conftest import Running, make_client

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CIRKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# what a headless browser on a build machine needs: no sandbox (root), no GPU, nothing fetched
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SKIP_ENV = "CIRKIT_SKIP_BROWSER"
TIMEOUT_MS = 20_000


def _missing(what: str) -> None:
    if os.environ.get(SKIP_ENV) and not os.environ.get("CI"):
        pytest.skip(f"{what}; skipped because {SKIP_ENV} is set")
    pytest.fail(f"{what}: install it (apt-get install -y chromium; pip install -e '.[dev]'), as .ci/run does, "
                f"or set {SKIP_ENV}=1 to skip the browser test on this machine", pytrace=False)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A fresh headless Chromium profile (a playwright browser context)."""
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    with sync_playwright() as p:
        # never `playwright install`: the system Chromium, a fresh --user-data-dir
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1180, "height": 760})
        ctx.set_default_timeout(TIMEOUT_MS)
        yield ctx
        ctx.close()


class Shots:
    def __init__(self, tmp_path: Path):
        self.dirs = [tmp_path]
        if os.environ.get("CIRKIT_SCREENSHOTS"):
            self.dirs.append(Path(os.environ["CIRKIT_SCREENSHOTS"]))
            self.dirs[-1].mkdir(parents=True, exist_ok=True)

    def __call__(self, page, name: str) -> None:
        for d in self.dirs:
            page.screenshot(path=str(d / f"serve-{name}.png"))
        assert (self.dirs[0] / f"serve-{name}.png").stat().st_size > 1000


def watch(page) -> list[str]:
    """Console errors, page errors and dialogs (an alert() would mean markup ran)."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    return problems


def first_hit(page, expected: str) -> None:
    page.wait_for_function("id => { const f = document.querySelector('#results figure');"
                           " return f && f.dataset.id === id && !document.querySelector('#results[aria-busy]'); }",
                           arg=expected)


def test_upload_type_refine_share_and_text_search(chromium, gallery, tmp_path):
    shots = Shots(tmp_path)
    client, service = make_client(gallery / "idx")
    with Running(client.app) as server:
        page = chromium.new_page()
        problems = watch(page)
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#info').textContent.includes('images')")
        assert "fake" in page.text_content("#info")

        # upload a reference (an image-only search runs at once), then type the modification
        page.set_input_files("#file", str(gallery / "images" / "blue.png"))
        first_hit(page, "blue")
        page.fill("#text", "make it red")
        page.click("#search")
        first_hit(page, "red")
        timing = page.text_content("#timing")
        assert "composed query" in timing and "embedding" in timing and "search" in timing
        page.wait_for_function("() => { const i = document.querySelector('#results figure img');"
                               " return i && i.complete && i.naturalWidth > 0; }")  # thumbnails load
        assert page.get_attribute("#ref-img", "src").startswith("blob:")
        shots(page, "1-composed")

        # click the red result: it becomes the reference, then refine with a new text
        page.click("#results figure[data-id='red']")
        page.wait_for_function("document.querySelector('#ref-label').textContent === 'Indexed image: red'")
        first_hit(page, "red")
        page.fill("#text", "make it yellow")
        page.click("#search")
        first_hit(page, "yellow")
        query = parse_qs(urlsplit(page.url).query)
        assert query["ref"] == ["red"] and query["text"] == ["make it yellow"] and query["k"] == ["24"]
        shots(page, "2-refined")
        shared = page.url

        # the shared URL reloads the same query in a fresh page
        other = chromium.new_page()
        problems += watch(other)
        other.goto(shared)
        first_hit(other, "yellow")
        assert other.input_value("#text") == "make it yellow"
        assert other.text_content("#ref-label") == "Indexed image: red"
        ids = other.eval_on_selector_all("#results figure", "fs => fs.map(f => f.dataset.id)")
        assert ids == page.eval_on_selector_all("#results figure", "fs => fs.map(f => f.dataset.id)")
        shots(other, "3-reloaded")
        other.close()

        # back returns to the previous query
        page.go_back()
        first_hit(page, "red")
        assert page.input_value("#text") == ""

        # text-only search box: no reference, the text in the URL
        page.fill("#text-only-input", "something green")
        page.click("#text-search")
        first_hit(page, "green")
        assert "ref" not in parse_qs(urlsplit(page.url).query)
        assert page.is_hidden("#ref-img")

        # ids holding markup are shown as text, never run
        page.fill("#text-only-input", "grey")
        page.click("#text-search")
        page.wait_for_selector("#results figure[data-id='it\\'s']")
        texts = page.eval_on_selector_all("#results figcaption .id", "es => es.map(e => e.textContent)")
        assert "<img src=x onerror=alert(1)>" in texts
        assert page.eval_on_selector_all("#results figcaption img", "es => es.length") == 0

        # a server error is shown on the page, and the page keeps working
        page.click("#options summary")
        page.fill("#where", "warm = = broken")
        page.click("#search")
        page.wait_for_selector("#error:not([hidden])")
        assert "where" in page.text_content("#error")
        page.fill("#where", "warm = true")
        page.fill("#text", "something green")
        page.click("#search")
        page.wait_for_function("document.querySelector('#error').hidden")
        page.wait_for_function("() => { const ids = [...document.querySelectorAll('#results figure')]"
                               ".map(f => f.dataset.id).sort().join(); return ids === 'orange,pink,red,yellow'; }")
        shots(page, "4-filtered")
        page.close()
    service.close()
    # the browser logs the deliberate bad filter's 400; nothing else (no script error, no CSP violation)
    assert problems == ["console error: Failed to load resource: the server responded with a status of 400 (Bad Request)"]


def test_page_asks_for_the_token(chromium, gallery, tmp_path):
    client, service = make_client(gallery / "idx", token="page-s3cret")
    with Running(client.app) as server:
        page = chromium.new_page()
        problems = watch(page)
        page.goto(server.url + "/?text=a+red+one&k=5")
        page.wait_for_selector("#auth:not([hidden])")
        page.fill("#token", "page-s3cret")
        page.click("#auth button")
        first_hit(page, "red")
        page.wait_for_function("() => { const i = document.querySelector('#results figure img');"
                               " return i && i.complete && i.naturalWidth > 0; }")  # thumbnails carry the token
        Shots(tmp_path)(page, "5-token")
        page.close()
    service.close()
    # the two 401 answers before the token was given are the only errors the browser logged
    assert all("401" in p for p in problems), problems


def test_api_docs_page_lists_the_routes(chromium, gallery):
    client, service = make_client(gallery / "idx")
    with Running(client.app) as server:
        page = chromium.new_page()
        problems = watch(page)
        page.goto(server.url + "/docs")
        page.wait_for_selector("#routes section.route")
        heads = page.eval_on_selector_all("#routes h2", "hs => hs.map(h => h.textContent)")
        assert {"GET /api/search", "POST /api/search", "GET /api/info", "GET /api/thumb"} <= set(heads)
        fields = page.text_content("#routes")
        assert "reference_id" in fields and "exclude_reference" in fields and "image" in fields
        page.close()
    service.close()
    assert problems == []
