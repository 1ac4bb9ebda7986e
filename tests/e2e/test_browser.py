"""Real-browser end-to-end tests: Chromium (via Playwright) and a TCP client in one room.

Needs ``pip install playwright`` and a Chromium binary (Debian's ``/usr/bin/chromium``, or
``SHARDCHAT_CHROMIUM=/path``); ``playwright install`` is never needed. Without them these
tests skip locally and fail in CI (``CI=true``), where they must run.

Set ``SHARDCHAT_SAVE_SCREENSHOT=docs/screenshot.png`` to also save the desktop screenshot
there (for the README).
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.cluster import Cluster, LineClient

CHROMIUM = os.environ.get("SHARDCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WAIT_MS = 10_000  # longest any expected change on a page may take before the test fails
XSS = "<img src=x onerror=alert(1)>"

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

    MISSING = "" if os.path.exists(CHROMIUM) else f"no Chromium at {CHROMIUM}"
except ImportError as error:  # pragma: no cover - depends on the machine
    MISSING = f"playwright is not installed ({error})"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(MISSING) and not IN_CI, reason=f"browser tests need Playwright and Chromium: {MISSING}"
    ),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(extra_args=["--poll-timeout", "5", "--session-ttl", "20"]) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if MISSING:
        pytest.fail(f"CI must run the browser tests: {MISSING}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


class Watched:
    """A page plus the dialogs and console errors it produced."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: List[str] = []
        self.errors: List[str] = []
        page.on("dialog", self._on_dialog)
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _on_dialog(self, dialog) -> None:  # noqa: ANN001
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_console(self, message) -> None:  # noqa: ANN001
        if message.type == "error":
            self.errors.append(message.text)


def open_chat(browser: Browser, cluster: Cluster, **context_options: object) -> Watched:
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    watched = Watched(page)
    page.goto(f"http://127.0.0.1:{cluster.http_port}/")
    return watched


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join(watched: Watched, username: str, room: str) -> None:
    page = watched.page
    page.get_by_label("Your name").fill(username)
    page.get_by_label("Room", exact=True).fill(room)
    page.get_by_role("button", name="Join", exact=True).click()
    expect(page.locator("#room-title")).to_have_text(f"#{room}", timeout=WAIT_MS)
    expect(page.locator("#status")).to_have_attribute("data-state", "online", timeout=WAIT_MS)


def send(watched: Watched, text: str) -> None:
    box = watched.page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def log_line(watched: Watched, text: str):  # noqa: ANN201
    return watched.page.locator("#log li").filter(has_text=text)


def expect_line(watched: Watched, text: str) -> None:
    expect(log_line(watched, text)).to_have_count(1, timeout=WAIT_MS)


@pytest.mark.timeout(60)
def test_browsers_and_tcp_chat_in_one_room(
    browser: Browser, cluster: Cluster, tmp_path: Path
) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}/") as response:
        policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy

    alice = open_chat(browser, cluster, viewport={"width": 1200, "height": 760})
    join(alice, "alice", "lobby")
    expect_line(alice, "alice joined lobby")

    carol = cluster.connect()  # a line-protocol user
    try:
        carol.join("lobby", "carol")
        expect_line(alice, "carol joined lobby")

        bob = open_chat(browser, cluster, viewport={"width": 390, "height": 780}, is_mobile=True)
        join(bob, "bob", "lobby")
        expect_line(alice, "bob joined lobby")
        carol.expect("INFO bob joined lobby")

        send(alice, "hello from alice")
        expect_line(bob, "alice: hello from alice")
        carol.expect("MSG lobby alice hello from alice")

        carol.send("MSG lobby hi from the terminal")
        carol.expect("MSG lobby carol hi from the terminal")
        expect_line(alice, "carol: hi from the terminal")
        expect_line(bob, "carol: hi from the terminal")

        send(bob, XSS)
        carol.expect(f"MSG lobby bob {XSS}")
        for watched in (alice, bob):
            expect(watched.page.locator("#log .text").filter(has_text=XSS)).to_have_text(XSS)
            assert watched.page.locator("#log img").count() == 0

        expect(alice.page.locator("#member-list li")).to_have_text(["alice", "bob", "carol"])

        alice.page.reload()
        expect(alice.page.locator("#room-title")).to_have_text("#lobby")
        for text in ("alice: hello from alice", "carol: hi from the terminal", XSS):
            expect_line(alice, text)

        alice.page.screenshot(path=str(tmp_path / "desktop.png"))
        bob.page.screenshot(path=str(tmp_path / "phone.png"))
        save_to = os.environ.get("SHARDCHAT_SAVE_SCREENSHOT")
        if save_to:
            shutil.copyfile(tmp_path / "desktop.png", save_to)

        bob.page.get_by_role("button", name="Leave room").click()
        expect(bob.page.locator("#join-view")).to_be_visible()
        expect_line(alice, "bob left lobby")
        carol.expect("INFO bob left lobby")
    finally:
        carol.close()
    expect_line(alice, "carol left lobby")

    for watched in (alice, bob):
        assert watched.dialogs == []
        assert watched.errors == []


@pytest.mark.timeout(30)
def test_name_taken_over_tcp_is_refused_in_the_browser(browser: Browser, cluster: Cluster) -> None:
    tcp = LineClient("127.0.0.1", cluster.tcp_port)
    try:
        tcp.join("dev", "dora")
        page = open_chat(browser, cluster)
        page.page.get_by_label("Your name").fill("Dora")
        page.page.get_by_label("Room", exact=True).fill("dev")
        page.page.get_by_role("button", name="Join", exact=True).click()
        expect(page.page.locator("#join-error")).to_contain_text("already has that name")
        expect(page.page.locator("#chat-view")).to_be_hidden()
    finally:
        tcp.close()


@pytest.mark.timeout(60)
def test_page_reconnects_after_a_server_restart(browser: Browser) -> None:
    port = free_port()
    first = Cluster(shards=1, http_port=port).start()
    second = Cluster(shards=1, http_port=port)
    try:
        rita = open_chat(browser, first)
        join(rita, "rita", "lobby")
        send(rita, "before the restart")
        expect_line(rita, "rita: before the restart")
        first.stop()
        status = rita.page.locator("#status")
        expect(status).to_have_attribute("data-state", "offline", timeout=WAIT_MS)
        second.start()
        # The session is gone with the old server: the page joins again by itself, and the
        # new epoch makes the gap explicit instead of silently skipping the new room's ids.
        expect(status).to_have_attribute("data-state", "online", timeout=3 * WAIT_MS)
        expect_line(rita, "The server restarted this room")
        expect_line(rita, "rita joined lobby")
        send(rita, "after the restart")
        expect_line(rita, "rita: after the restart")
        assert rita.dialogs == []
    finally:
        second.stop()
        first.stop()


def left_to_right(*locators) -> bool:  # noqa: ANN002
    """True if the elements' boxes come one after the other from left to right."""
    lefts = [locator.bounding_box()["x"] for locator in locators]
    return lefts == sorted(lefts) and len(set(lefts)) == len(lefts)


@pytest.mark.timeout(60)
def test_right_to_left_names_and_overrides_stay_in_their_places(
    browser: Browser, cluster: Cluster
) -> None:
    alice = open_chat(browser, cluster, viewport={"width": 1200, "height": 760})
    join(alice, "alice", "bidi")
    tcp = cluster.connect()
    try:
        tcp.join("bidi", "محمد")  # an Arabic name saying something in Hebrew
        tcp.send("MSG bidi שלום 123")
        tcp.expect("MSG bidi محمد שלום 123")
        tcp.send("MSG bidi \u202eevil")  # an override left open...
        tcp.expect("MSG bidi محمد \u202eevil\u202c")  # ...is closed by the server
        tcp.send("MSG bidi after")
        tcp.expect("MSG bidi محمد after")
        expect_line(alice, "محمد: after")
    finally:
        tcp.close()
    chats = alice.page.locator("#log li.chat")
    expect(chats).to_have_count(3)
    for index in range(3):
        item = chats.nth(index)
        # Without isolation the Arabic name, ": " and the Hebrew text would form one
        # right-to-left run, the text drawn left of the name.
        assert left_to_right(item.locator("time"), item.locator(".user"), item.locator(".text"))
    evil = chats.nth(1).locator(".text")
    assert evil.evaluate("node => node.tagName") == "BDI"
    assert evil.evaluate("node => node.textContent") == "\u202eevil\u202c"
    assert alice.errors == []
