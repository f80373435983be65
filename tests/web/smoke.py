"""Browser smoke test: a static page served by http.server, opened in
headless chromium through Playwright; a button's click handler changes a
text. Proves the browser test setup works (tests/web/run-smoke)."""

import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import Checks, browser, serve_dir  # noqa: E402

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ferry smoke</title></head>
<body>
<p id="msg">before</p>
<button id="go" onclick="document.getElementById('msg').textContent = 'after ' + (1 + 1)">Go</button>
</body></html>
"""


def main():
    c = Checks()
    with tempfile.TemporaryDirectory(prefix="ferry-web-smoke-") as d:
        (Path(d) / "index.html").write_text(PAGE)
        try:
            with serve_dir(d) as base, browser() as b:
                c.check("chromium launched", True, b.version)
                page = b.new_page()
                resp = page.goto(base + "index.html")
                c.check("page served (HTTP 200)", resp is not None and resp.status == 200,
                        f"status {resp.status if resp else None}")
                c.check("title", page.title() == "ferry smoke", page.title())
                before = page.text_content("#msg")
                c.check("text before click", before == "before", repr(before))
                page.click("#go")
                page.wait_for_function("document.getElementById('msg').textContent !== 'before'", timeout=5000)
                after = page.text_content("#msg")
                c.check("text after click (JS ran)", after == "after 2", repr(after))
        except Exception as e:  # one line, not a traceback wall
            c.check("browser session", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc(file=sys.stderr)
    c.exit()


if __name__ == "__main__":
    main()
