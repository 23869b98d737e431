"""A real headless Chromium driven over the W3C WebDriver protocol (Debian's
``chromium-driver``): plain JSON over HTTP, so the tests need no client library."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from centerlib import wait_for
from fleetlib import free_port

ELEMENT = "element-6066-11e4-a52f-4d6f2c6e5f06"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars"]


def available() -> bool:
    return bool(shutil.which("chromedriver") and (shutil.which("chromium")
                                                  or shutil.which("chromium-browser")))


class Browser:
    def __init__(self, root: Path, width: int = 1440, height: int = 1000) -> None:
        self.port = free_port()
        self.log = root / "chromedriver.log"
        self.proc = subprocess.Popen(["chromedriver", f"--port={self.port}",
                                      f"--log-path={self.log}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_for(self._ready, 20, "chromedriver")
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": binary, "args": [*CHROMIUM_FLAGS, f"--window-size={width},{height}",
                                       f"--user-data-dir={root / 'chromium-profile'}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/status", timeout=2) as r:
                return bool(json.load(r)["value"]["ready"])
        except (OSError, ValueError, KeyError):
            return False

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"webdriver {method} {path}: {exc.read()[:500]!r}") from None

    def _s(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    # ------------------------------------------------------------------ what tests use
    def get(self, url: str) -> None:
        self._s("POST", "/url", {"url": url})

    @property
    def url(self) -> str:
        return str(self._s("GET", "/url"))

    def js(self, script: str, *args: Any) -> Any:
        return self._s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        found = self._s("POST", "/elements", {"using": "css selector", "value": css})
        assert found, f"no element matches {css!r} on {self.url}"
        ref = found[0]
        return str(ref.get(ELEMENT) or ref.get("ELEMENT") or next(iter(ref.values())))

    def click(self, css: str) -> None:
        self._s("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self._s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def cookies(self) -> list[dict[str, Any]]:
        return list(self._s("GET", "/cookie"))

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._s("GET", "/screenshot")))

    def resize(self, width: int, height: int) -> None:
        self._s("POST", "/window/rect", {"width": width, "height": height})

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self._s("DELETE", "")
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
