"""Headless Chromium (the Debian package) driven over the DevTools protocol through a pipe.

``chromium --remote-debugging-pipe`` reads protocol messages on fd 3 and writes them on fd 4,
each a JSON object ended by a NUL byte: no websocket client, no npm package, nothing but the
standard library. A test opens a page, reads every request the page made (``Network`` events),
runs JavaScript in it, clicks, and takes a screenshot. An ``alert()`` opens a dialog, which the
protocol reports as ``Page.javascriptDialogOpening`` (and is dismissed, so nothing hangs).

``.ci/run`` installs the package when it is missing; without it these tests fail (never skip
silently) unless ``DPC_LENS_NO_BROWSER=1`` says the machine has no browser on purpose.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest

EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium_path() -> str:
    for name in EXECUTABLES:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("DPC_LENS_NO_BROWSER") == "1":
        pytest.skip("DPC_LENS_NO_BROWSER=1: no browser on this machine on purpose")
    pytest.fail("headless Chromium is not installed: apt-get install -y chromium (.ci/run does it), "
                "or set DPC_LENS_NO_BROWSER=1 to skip the browser tests on purpose")


class Browser:
    """One headless Chromium; :meth:`open` gives a :class:`Page`."""

    def __init__(self, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="dpc-lens-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def wire() -> None:  # in the child: the protocol pipes on fds 3 and 4
            # copies at fd >= 10 first, so neither pipe end is overwritten by the other, and dup2
            # always onto a different number, so the new fds 3 and 4 are inheritable
            import fcntl

            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                f"--user-data-dir={self._profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
                "--allow-file-access-from-files", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=wire)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ protocol
    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the protocol pipe (it crashed or exited)")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._next:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._on_event(m)

    def _on_event(self, m: dict[str, Any]) -> None:
        self.events.append(m)
        if m.get("method") == "Page.javascriptDialogOpening":  # never leave a dialog open
            msg = {"id": 10**9 + len(self.events), "method": "Page.handleJavaScriptDialog",
                   "params": {"accept": True}, "sessionId": m.get("sessionId")}
            os.write(self._w, json.dumps(msg).encode() + b"\0")

    def wait_event(self, method: str, session: str, since: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for m in self.events[since:]:
                if m.get("method") == method and m.get("sessionId") == session:
                    return m
            self._on_event(self._read_message(deadline))

    # ------------------------------------------------------------------ pages
    def open(self, path: str, *, width: int = 1280, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable", {}, session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        since = len(self.events)
        url = path if "://" in path else "file://" + os.path.abspath(path)
        t0 = time.monotonic()
        self.send("Page.navigate", {"url": url}, session)
        self.wait_event("Page.loadEventFired", session, since)
        return Page(self, session, since, time.monotonic() - t0)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, session: str, since: int, load_seconds: float) -> None:
        self.browser, self.session, self.since, self.load_seconds = browser, session, since, load_seconds

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        r = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True}, self.session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def events(self, method: str) -> list[dict[str, Any]]:
        self.js("1")  # let pending events arrive
        return [m for m in self.browser.events[self.since:]
                if m.get("method") == method and m.get("sessionId") == self.session]

    def requested_urls(self) -> list[str]:
        return [m["params"]["request"]["url"] for m in self.events("Network.requestWillBeSent")]

    def screenshot(self, *, full_page: bool = False) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.js("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1})
        return base64.b64decode(self.browser.send("Page.captureScreenshot", params, self.session)["data"])
