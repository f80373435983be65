"""Helpers for ferry's browser tests: Playwright (PyPI, in the venv that
scripts/install-deps makes) driving Debian's chromium, headless.

Playwright's own browser download cannot work on ferry's machines, so the
browser is always Debian's `chromium` package, given by `executable_path`.

    from lib import browser, serve_dir, Checks
    with browser() as b:
        page = b.new_page()
        ...
"""

import contextlib
import functools
import http.server
import os
import socket
import sys
import threading

from playwright.sync_api import sync_playwright

# FERRY_CHROMIUM overrides the browser binary.
CHROMIUM = os.environ.get("FERRY_CHROMIUM", "/usr/bin/chromium")


def chromium_args():
    """Flags for headless chromium on a test machine."""
    args = [
        # /dev/shm can be small in containers; the renderer then crashes.
        "--disable-dev-shm-usage",
        "--disable-gpu",
    ]
    # Chromium refuses to run as root without it (ferry's tests run as root).
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    return args


@contextlib.contextmanager
def browser(headless=True):
    """A launched chromium (Playwright Browser), closed on exit."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=headless, args=chromium_args())
        try:
            yield b
        finally:
            b.close()


def free_port():
    """A free loopback TCP port (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_dir(path):
    """Serve folder `path` over HTTP on 127.0.0.1 (a thread); yields the base
    URL, e.g. http://127.0.0.1:PORT/. Stopped on exit."""
    handler = functools.partial(_QuietHandler, directory=str(path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()


class Checks:
    """One line per check (`PASS what` / `FAIL what: detail`); `exit()` ends
    the script with 0 if all passed, else 1."""

    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, what, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"PASS {what}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def exit(self):
        print(f"{self.passed} passed, {self.failed} failed", flush=True)
        sys.exit(1 if self.failed or not self.passed else 0)
