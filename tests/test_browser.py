"""An app without a backend, in a real browser: headless Chromium loads a page from
one origin, and the page calls the proxy on another.

The page (``tests/browser/app.html``) signs its user's JWT with WebCrypto, shows the
balance from ``/api/v1/paywall/{id}/user``, streams an answer through the API gateway
into the DOM and shows the balance again; once the trial credits are spent it shows the
402. The same page served from an origin the paywall does not list is refused by the
browser (CORS), and nothing reaches the upstream or the ledger.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright with its executable
path set: no browser is downloaded. Without it the test is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.conftest import credits_paywall, serving_proxy
from tests.upstream import free_port, serve_asgi

CHROMIUM = Path("/usr/bin/chromium")
PAGES = Path(__file__).resolve().parent / "browser"
STORY = ["Once", " upon", " a", " time", " a", " stream", " arrived", "."]
CHUNK_DELAY = 0.15  # seconds between two of the upstream's chunks
UPSTREAM_KEY = "sk-browser-upstream-key-5678"
JWT_SECRET = "browser-test-hs256-secret-0123456789abcdef"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium (apt-get install "
                              "chromium)"),
    pytest.mark.timeout(90),
]


# ---- the pieces: an upstream, two static sites, the proxy -------------------------------

class StoryUpstream:
    """An OpenAI-style chat API that streams :data:`STORY` a word per chunk, and keeps
    every request it was sent."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat,
                                           methods=["POST"])])

    async def chat(self, request: Request) -> StreamingResponse:
        self.calls.append({"headers": dict(request.headers),
                           "body": orjson.loads(await request.body())})

        async def events() -> AsyncIterator[bytes]:
            for i, word in enumerate(STORY):
                if i:
                    await asyncio.sleep(CHUNK_DELAY)
                chunk = {"id": "chatcmpl-story", "object": "chat.completion.chunk",
                         "created": int(time.time()), "model": "story-1",
                         "choices": [{"index": 0, "delta": {"content": word},
                                      "finish_reason": None}]}
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_pages() -> Iterator[str]:
    """``tests/browser/`` over HTTP on a port of its own: an origin of its own."""
    handler = functools.partial(_Quiet, directory=str(PAGES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def proxy_config(upstream_port: int, page_origin: str) -> str:
    return f"""
{credits_paywall("web", "Story app", JWT_SECRET, trial=2, origin=page_origin)}
[api_providers.story]
url = "http://127.0.0.1:{upstream_port}"
headers = {{ Authorization = "Bearer {UPSTREAM_KEY}" }}
body = {{ model = "story-1" }}
query_type = "standard"
"""


# ---- driving the page --------------------------------------------------------------------

def open_app(page: Page, site: str, proxy_url: str, user: str) -> None:
    query = urlencode({"proxy": proxy_url, "paywall": "web", "provider": "story",
                       "secret": JWT_SECRET, "user": user})
    page.goto(f"{site}/app.html?{query}")
    expect(page.locator("#state")).to_have_text("ready", timeout=15_000)


def asks(page: Page) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = page.evaluate(
        "window.calls.filter((c) => c.kind === 'ask')")
    return calls


def ask_and_watch(page: Page, n: int) -> str:
    """Click Ask (the ``n``-th time) and wait for the call to end; return the answer as
    the page showed it while the stream was still open (empty when no text came before
    the call ended)."""
    page.click("#ask")
    seen = page.wait_for_function(
        """(n) => {
            const state = document.getElementById('state').textContent;
            const text = document.getElementById('answer').textContent;
            if (state === 'streaming') return text.length > 0 ? text : false;
            return state === `done ${n}` ? {ended: state} : false;
        }""", arg=n)
    partial = seen.json_value()
    expect(page.locator("#state")).to_have_text(f"done {n}", timeout=15_000)
    return partial if isinstance(partial, str) else ""


def test_page_streams_answers_until_402_and_other_origins_are_refused(
        database_url: str, tmp_path: Path) -> None:
    story = "".join(STORY)
    user = f"reader-{secrets.token_hex(4)}"
    upstream = StoryUpstream()
    with serve_asgi(upstream.app) as upstream_port, serve_pages() as site, \
            serve_pages() as elsewhere, \
            serving_proxy(proxy_config(upstream_port, site), database_url, tmp_path) as proxy, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            refused = browser.new_page()
            refused.set_default_timeout(15_000)
            console: list[str] = []
            refused.on("console", lambda m: console.append(m.text))

            # Signed in from the listed origin: the trial balance shows.
            open_app(page, site, proxy.url, user)
            expect(page.locator("#user")).to_have_text(user)
            expect(page.locator("#balance")).to_have_text("2")

            # The same page from an unlisted origin: the browser refuses both
            # calls (their preflights get no CORS headers), so none is sent.
            open_app(refused, elsewhere, proxy.url, user)
            ask_and_watch(refused, 1)
            tried = refused.evaluate("window.calls")
            assert [c["kind"] for c in tried] == ["user", "ask", "user"]
            for call in tried:
                assert call.get("errorName") == "TypeError", call
                assert "status" not in call, call
            expect(refused.locator("#balance")).to_have_text("…")
            expect(refused.locator("#error")).to_contain_text("Failed to fetch")
            blocked = [t for t in console if "blocked by CORS policy" in t]
            assert any(elsewhere in t for t in blocked), console
            assert upstream.calls == []
            refused.close()

            # Nothing moved: the balance is still the trial's.
            page.reload()
            expect(page.locator("#state")).to_have_text("ready", timeout=15_000)
            expect(page.locator("#balance")).to_have_text("2")

            # Two answers stream into the page, a credit each.
            for n, left in ((1, "1"), (2, "0")):
                partial = ask_and_watch(page, n)
                expect(page.locator("#answer")).to_have_text(story)
                expect(page.locator("#balance")).to_have_text(left)
                expect(page.locator("#error")).to_have_text("")
                call = asks(page)[-1]
                assert call["status"] == 200 and call["queryType"] == "standard"
                assert call["answer"] == story and call["sawDone"] is True
                # Streamed, not delivered at the end: text was on the page while
                # the stream was open, read by read.
                assert partial and story.startswith(partial) and partial != story
                assert story.startswith(call["firstText"])
                assert call["firstText"] != story
                assert call["textReads"] >= 3, call
                assert call["endMs"] - call["firstTextMs"] >= \
                    (len(STORY) - 2) * CHUNK_DELAY * 1000, call

            # Out of credits: the 402 and the balance it names are shown.
            ask_and_watch(page, 3)
            call = asks(page)[-1]
            assert call["status"] == 402 and call["code"] == "not_enough_queries"
            assert call["currentBalance"] == {"type": "standard", "count": 0}
            expect(page.locator("#error")).to_contain_text(
                "402 not_enough_queries")
            expect(page.locator("#error")).to_contain_text("standard left: 0")
            expect(page.locator("#answer")).to_have_text("")
            expect(page.locator("#balance")).to_have_text("0")
        finally:
            browser.close()

    # The upstream got the two paid calls, with the provider's key, not the user's token.
    assert len(upstream.calls) == 2
    for seen in upstream.calls:
        assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert seen["body"]["stream"] is True and seen["body"]["model"] == "story-1"
        assert seen["body"]["messages"] == [{"role": "user", "content": "Tell me a story."}]
