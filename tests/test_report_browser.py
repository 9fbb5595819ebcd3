"""The HTML report in a real browser: headless Chromium driven over the DevTools protocol (``--remote-debugging-pipe``).

Checks: no console message or error, no network request (anything but the file itself), a non-blank
screenshot, every SAE and assertion of the JSON present in the DOM, hostile strings escaped. A positive control
makes sure the harness does see console errors and network requests. Skipped when ``chromium`` is not
installed (CI installs Debian's ``chromium`` package).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_saecheck.report.collect import build_document
from pytest_saecheck.report.html import CONTENT_SECURITY_POLICY, render_html
from pytest_saecheck.report.sample import FakeReport, sae_test_reports, sample_reports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium); CI installs it"
)


def _screenshot_script_flags() -> tuple[str, ...]:
    """The Chromium flags of scripts/screenshot_report.py (a script, not importable as a module)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.CHROMIUM_FLAGS)


FLAGS = _screenshot_script_flags()
TIMEOUT = 60.0


class Browser:
    """A minimal DevTools-protocol client over Chromium's pipe transport (fd 3: commands in, fd 4: out)."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="saecheck-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes() -> None:  # runs in the child, before exec
            os.dup2(to_chrome_r, 100)
            os.dup2(from_chrome_w, 101)
            os.dup2(100, 3)
            os.dup2(101, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes,
            close_fds=False,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    # -- transport ----------------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], remaining)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise ConnectionError("Chromium closed the DevTools pipe")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        number = self._next_id
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == number:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds`` (late console messages, requests)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while True:
                self.events.append(self._read_message(deadline))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    # -- pages --------------------------------------------------------------------------------------------

    def open(self, url: str, width: int = 1280, height: int = 2000) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        start = len(self.events)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired", session)
        self.drain(0.5)
        return Page(self, session, target, start)


class Page:
    def __init__(self, browser: Browser, session: str, target: str, start: int) -> None:
        self.browser, self.session, self.target, self.start = browser, session, target, start

    def events(self, *methods: str) -> list[dict[str, Any]]:
        return [
            event
            for event in self.browser.events[self.start :]
            if event.get("sessionId") == self.session and event.get("method") in methods
        ]

    def console(self) -> list[str]:
        """Every console message, uncaught exception, log entry (CSP violations included) and dialog."""
        found = []
        for event in self.events("Runtime.consoleAPICalled"):
            args = event["params"].get("args", [])
            found.append(f"console.{event['params']['type']}: {[a.get('value') for a in args]}")
        for event in self.events("Runtime.exceptionThrown"):
            found.append(f"exception: {event['params']['exceptionDetails'].get('text')}")
        for event in self.events("Log.entryAdded"):
            entry = event["params"]["entry"]
            found.append(f"log {entry.get('level')} ({entry.get('source')}): {entry.get('text')}")
        for event in self.events("Page.javascriptDialogOpening"):
            found.append(f"dialog: {event['params'].get('message')}")
        return found

    def requests(self) -> list[str]:
        return [event["params"]["request"]["url"] for event in self.events("Network.requestWillBeSent")]

    def evaluate(self, expression: str) -> Any:
        result = self.browser.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self.session
        )
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        else:
            params["captureBeyondViewport"] = True
        data = self.browser.send("Page.captureScreenshot", params, session=self.session)["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        self.browser.send("Target.closeTarget", {"targetId": self.target})


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Decode an 8-bit RGB/RGBA PNG (all five filter types) to (width, height, pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, compressed = 8, b""
    width = height = channels = 0
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8, f"bit depth {depth}"
            channels = {2: 3, 6: 4}[colour]
        elif kind == b"IDAT":
            compressed += body
    raw = zlib.decompress(compressed)
    stride = width * channels
    previous = bytearray(stride)
    pixels: list[tuple[int, ...]] = []
    offset = 0
    for _ in range(height):
        kind, line = raw[offset], bytearray(raw[offset + 1 : offset + 1 + stride])
        offset += 1 + stride
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = previous[x]
            c = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels.extend(tuple(line[i : i + 3]) for i in range(0, stride, channels))
        previous = line
    return width, height, pixels


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    instance = Browser(CHROMIUM)
    try:
        instance.send("Browser.getVersion")
        yield instance
    finally:
        instance.close()


HOSTILE_LABEL = "<script>alert('sae')</script>"
HOSTILE_MODULE = 'tests/test_x.py::test_"><img src=x onerror=alert(1)>'


def hostile_reports() -> list[FakeReport]:
    reports = sae_test_reports("examples/test_hostile.py", HOSTILE_LABEL, ce_sae=2.6)
    for report in sae_test_reports("examples/test_hostile2.py", "demo/<b>bold</b>&amp;", ce_sae=2.3):
        report.nodeid = HOSTILE_MODULE + report.nodeid.rsplit("::", 1)[1]
        reports.append(report)
    return reports


def write_report(directory: Path, reports: list[FakeReport]) -> tuple[dict[str, Any], Path]:
    document = build_document(reports)
    document["report_sections"].append(
        {"title": "An extension <section>", "text": "<i>plain</i>", "html": None, "sae": None}
    )
    path = directory / "report.html"
    path.write_text(render_html(document), encoding="utf-8")
    return document, path


def check_everything_is_shown(page: Page, document: dict[str, Any]) -> None:
    for sae in document["saes"]:
        text = page.evaluate(f"document.getElementById({json.dumps(sae['id'])})?.innerText ?? null")
        assert text is not None, f"SAE {sae['id']} has no section"
        assert sae["label"] in text
        assert sae["status"] in text
        overview = page.evaluate("document.getElementById('overview-table').innerText")
        assert sae["label"] in overview
        for number, assertion in enumerate(sae["assertions"]):
            row = page.evaluate(
                f"document.getElementById({json.dumps(sae['id'] + '-a-' + str(number))})?.innerText ?? null"
            )
            assert row is not None, f"assertion {number} of {sae['label']} is missing"
            for field in ("test_id", "assertion", "metric", "outcome"):
                assert assertion[field] in row, (field, assertion[field], row)
    for number, assertion in enumerate(document["unattached_assertions"]):
        row = page.evaluate(f"document.getElementById('unattached-a-{number}')?.innerText ?? null")
        assert row is not None and assertion["test_id"] in row and assertion["outcome"] in row


# -- tests ----------------------------------------------------------------------------------------------


def test_harness_sees_console_errors_and_network_requests(browser: Browser, tmp_path: Path) -> None:
    """Positive control: without the report's CSP, a script and an image are caught."""
    page_path = tmp_path / "noisy.html"
    page_path.write_text(
        "<!DOCTYPE html><html><body><p>noisy</p>"
        '<img src="http://127.0.0.1:9/never.png"><script>console.error("boom")</script></body></html>'
    )
    page = browser.open(page_path.as_uri(), height=400)
    try:
        assert any("boom" in message for message in page.console())
        assert any(url.startswith("http://127.0.0.1:9/") for url in page.requests())
    finally:
        page.close()
    # with the report's Content-Security-Policy the fetch is blocked, and the block itself is reported
    page_path.write_text(
        f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        '</head><body><p>noisy</p><img src="http://127.0.0.1:9/never.png"><script>console.error("boom")</script>'
        "</body></html>"
    )
    page = browser.open(page_path.as_uri(), height=400)
    try:
        messages = page.console()
        assert not any("boom" in message for message in messages)  # the script did not run
        assert any("Content Security Policy" in message for message in messages), messages
        # the attempt is still seen, so a report that merely tried to fetch something would fail the tests
        assert any(url.startswith("http://127.0.0.1:9/") for url in page.requests())
    finally:
        page.close()


def test_report_renders_offline_without_console_messages(browser: Browser, tmp_path: Path) -> None:
    document, path = write_report(tmp_path, sample_reports())
    page = browser.open(path.as_uri())
    try:
        assert page.console() == []
        assert [url for url in page.requests() if url != path.as_uri()] == []
        assert (
            page.evaluate("document.querySelectorAll('script, link, iframe, img, object, embed').length") == 0
        )
        check_everything_is_shown(page, document)
        assert page.evaluate("document.querySelectorAll('svg.chart').length") >= 3 * len(document["saes"])

        full = page.screenshot()
        blank = browser.open("about:blank")
        try:
            empty = blank.screenshot(clip={"x": 0, "y": 0, "width": 1280, "height": 2000})
        finally:
            blank.close()
        assert len(full) > 5 * len(empty), "the screenshot compresses like an empty page"
        width, height, pixels = png_pixels(
            page.screenshot(clip={"x": 0, "y": 0, "width": 320, "height": 160})
        )
        assert (width, height) == (320, 160)
        assert len(set(pixels)) > 8, "the top of the report is one flat colour"
        dark = sum(1 for pixel in pixels if sum(pixel) < 300)
        assert dark > 0.005 * len(pixels), "no text drawn at the top of the report"
    finally:
        page.close()


def test_hostile_strings_are_escaped(browser: Browser, tmp_path: Path) -> None:
    document, path = write_report(tmp_path, hostile_reports())
    html = path.read_text(encoding="utf-8")
    assert "<script>" not in html and "<img src=x" not in html and "<b>bold</b>" not in html
    page = browser.open(path.as_uri())
    try:
        assert page.console() == []
        assert [url for url in page.requests() if url != path.as_uri()] == []
        assert page.evaluate("document.querySelectorAll('script, img, b, i').length") == 0
        text = page.evaluate("document.body.innerText")
        assert HOSTILE_LABEL in text
        assert "demo/<b>bold</b>&amp;" in text
        assert 'test_"><img src=x onerror=alert(1)>' in text
        assert "An extension <section>" in text and "<i>plain</i>" in text
        check_everything_is_shown(page, document)
    finally:
        page.close()


def test_empty_run_renders(browser: Browser, tmp_path: Path) -> None:
    _, path = write_report(tmp_path, [])
    page = browser.open(path.as_uri(), height=600)
    try:
        assert page.console() == []
        assert "No SAE was checked" in page.evaluate("document.body.innerText")
    finally:
        page.close()


SECTION_ATTACK = (
    "<style>.banner.bad{display:none}</style>"
    '<meta http-equiv="refresh" content="0; url=about:blank#moved">'
    '<base href="https://example.invalid/"><link rel="stylesheet" href="https://example.invalid/x.css">'
    '<div class="banner good" style="position:fixed;inset:0;z-index:9">Every SAE passed</div>'
)


@pytest.mark.parametrize("markup_from_hooks", [False, True], ids=["from a file", "from an in-process hook"])
def test_a_section_cannot_hide_or_redirect_the_verdict(
    browser: Browser, tmp_path: Path, markup_from_hooks: bool
) -> None:
    document = build_document(sample_reports())
    failing = [sae for sae in document["saes"] if sae["status"] == "failed"]
    assert failing
    document["report_sections"].append({"title": "Shard", "text": None, "html": SECTION_ATTACK, "sae": None})
    path = tmp_path / "report.html"
    path.write_text(render_html(document, markup_from_hooks=markup_from_hooks), encoding="utf-8")
    page = browser.open(path.as_uri())
    try:
        page.browser.drain(1.5)  # time for a refresh to fire
        assert page.evaluate("location.href") == path.as_uri()
        assert [url for url in page.requests() if url != path.as_uri()] == []
        assert page.evaluate("document.querySelectorAll('style').length") == 1
        assert page.evaluate("document.querySelectorAll('meta[http-equiv=refresh], base, link').length") == 0
        assert page.evaluate("document.querySelectorAll('.banner.good').length") == 0
        banner = "[...document.querySelectorAll('.banner.bad')].find(e => e.innerText.includes('failed'))"
        assert page.evaluate(f"getComputedStyle({banner}).display") != "none"
        assert f"{len(failing)} of {len(document['saes'])} SAEs failed" in page.evaluate(
            f"{banner}.innerText"
        )
    finally:
        page.close()
