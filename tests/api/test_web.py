"""The web UI of `dsdnode api` in a real browser: Debian's headless Chromium driven by Playwright,
against a real local swarm (two `dsdnode start` processes and a bootstrap peer) and a `dsdnode api`
process that needs an API key. In order: the page asks for the key and shows the coverage map; a
chat message streams back the same text as the API's greedy answer, with DSD statistics; a server
stopped by its pid shows as a gap, and the chat then says no route exists.

Screenshots go to $DSDNODE_WEB_SCREENSHOTS (docs/ holds the committed ones) or the test's tmp dir."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from dsdnode.local_swarm import LocalSwarm
from tests.api.test_api import MODEL, ApiProcess

pytestmark = pytest.mark.heavy

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI") == "true"
if not IN_CI:  # in CI the browser is part of the setup (scripts/system-deps.sh): its absence fails there
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: scripts/system-deps.sh installs Debian's chromium",
                    allow_module_level=True)
    pytest.importorskip("playwright", reason="playwright is in the `test` extra: pip install -e '.[test]'")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

expect.set_options(timeout=60_000)  # a generation on a shared 2-core machine can take a while
API_KEY = "web-test-key"
QUESTION = "Write a short poem about the sea."
MAX_TOKENS = 24
SPANS = [(0, 15), (15, 30)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def swarm(workdir, smollm2_dir):
    with LocalSwarm(MODEL, SPANS, workdir / "swarm", dtype="float32") as swarm:
        yield swarm


@pytest.fixture(scope="module")
def api(swarm, workdir):
    api = ApiProcess(["--bootstrap", swarm.bootstrap_addrs[0]], workdir / "api.log", api_key=API_KEY, timeout_s=300)
    yield api
    api.stop()


@pytest.fixture(scope="module")
def shots(workdir) -> Path:
    out = Path(os.environ.get("DSDNODE_WEB_SCREENSHOTS") or workdir / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def page(api, workdir):
    """One browser page for the whole module (a fresh profile), recording every URL it asks for."""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(workdir / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.requested = []
        page.on("request", lambda r: page.requested.append(r.url))
        page.set_default_timeout(60_000)
        yield page
        context.close()


def test_the_page_asks_for_the_key_then_shows_the_coverage_map(page, api, swarm, shots):
    page.goto(api.root + "/")
    expect(page.get_by_test_id("key-form")).to_be_visible()  # /v1/swarm answered 401: the page asks
    page.fill("#key-input", API_KEY)
    page.click("#key-form button")
    expect(page.get_by_test_id("key-form")).to_be_hidden()
    blocks = page.locator(".server-block")
    expect(blocks).to_have_count(len(SPANS))
    expect(page.get_by_test_id("swarm-summary")).to_contain_text("2 live servers, every layer covered")
    expect(page.get_by_test_id("route-state")).to_have_text("route ok")
    for server, (start, end) in zip(swarm.servers, SPANS):
        block = page.locator(f'.server-block[data-peer="{server.peer_id}"]')
        expect(block).to_have_attribute("data-alive", "true")
        text = block.inner_text()
        assert f"layers {start}:{end}" in text and "not banned" in text and "quant -" in text, text
        assert re.search(r"RTT \d+\.\d ms", text) and re.search(r"\d+\.\d tok/s", text) and "cpu" in text, text
    assert page.locator("#gaps .gap").count() == 0
    page.screenshot(path=str(shots / "web-swarm.png"))
    # self-contained: the page fetched nothing but its own server (no CDN, no fonts)
    assert page.requested and all(url.startswith(api.root + "/") for url in page.requested), page.requested


def test_a_chat_message_streams_the_greedy_answer_with_dsd_stats(page, api, shots):
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#prompt", QUESTION)
    page.click("#send")
    answer = page.locator(".answer").last
    expect(answer).to_have_attribute("data-done", "true")
    stats = answer.locator(".stats").inner_text()
    assert re.search(r"\d+ tokens · \d+\.\d\d tok/s · \d\.\d\d accepted/round", stats), stats
    assert "route" in stats and stats.count("→") == 1 and "audited" in stats, stats
    assert int(answer.get_attribute("data-chunks")) >= 2  # streamed piece by piece, not in one go
    whole = httpx.post(api.url + "/chat/completions", timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                             "max_tokens": MAX_TOKENS, "temperature": 0})
    assert whole.status_code == 200, whole.text
    assert answer.locator(".text").inner_text().strip() == whole.json()["choices"][0]["message"]["content"].strip()
    charts = page.get_by_test_id("charts")  # the live charts read the client's generations
    expect(charts).to_have_attribute("data-generations", re.compile(r"[1-9]\d*"))
    expect(page.locator('.chart[data-chart="tps"] .label .muted')).to_contain_text("tok/s")
    page.screenshot(path=str(shots / "web-chat.png"))


def test_a_stopped_server_shows_as_a_gap_and_the_chat_says_there_is_no_route(page, swarm, shots):
    stopped = swarm.servers[1]
    swarm.kill(stopped)  # SIGKILL to its process group (by pid): the machine is gone
    expect(page.locator("#gaps .gap")).to_contain_text("layers 15–29", timeout=60_000)
    expect(page.locator(f'.server-block[data-peer="{stopped.peer_id}"]')).to_have_attribute("data-alive", "false")
    expect(page.get_by_test_id("route-state")).to_have_text("no route", timeout=30_000)
    page.fill("#prompt", "Still there?")
    page.click("#send")
    error = page.locator(".chat-error").last
    expect(error).to_contain_text("No route through the swarm")
    expect(error).to_contain_text("15-29")
    page.screenshot(path=str(shots / "web-gap.png"))
