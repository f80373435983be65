"""The configuration server's dashboard in headless chromium, timed
(scripts/bench-cs): log in through the API (the session cookie lands in the
browser context), open `/` ROUNDS times (a new page each, cache kept as a
returning user has it) and print one JSON object: the HTTP status, and
medians of the navigation's responseEnd, first contentful paint,
DOMContentLoaded and load, in ms from the start of navigation.

    tests/web/run tests/web/bench_dashboard.py http://127.0.0.1:PORT/ USER PASSWORD_FILE [ROUNDS]

A page that paints nothing (a 404 from a website not built yet) gives null
timings and the status; the exit status is 0 whenever the browser ran.
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import browser  # noqa: E402

TIMING = """() => {
  const n = performance.getEntriesByType('navigation')[0];
  const fcp = performance.getEntriesByName('first-contentful-paint')[0];
  return {
    response_end: n ? n.responseEnd : null,
    dcl: n ? n.domContentLoadedEventEnd : null,
    load: n ? n.loadEventEnd : null,
    fcp: fcp ? fcp.startTime : null,
  };
}"""


def med(v):
    v = [x for x in v if x is not None]
    return round(statistics.median(v), 1) if v else None


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    base, user, pw_file = sys.argv[1], sys.argv[2], sys.argv[3]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    password = Path(pw_file).read_text().rstrip("\n")
    base = base.rstrip("/") + "/"
    out = {"status": None, "rounds": rounds}
    with browser() as b:
        ctx = b.new_context()
        r = ctx.request.post(base + "api/v1/login", data={"user": user, "password": password})
        if not r.ok:
            out["error"] = f"login: HTTP {r.status}"
            print(json.dumps(out))
            return
        # No dashboard yet (the website a stub): chromium refuses an empty
        # error page (ERR_HTTP_RESPONSE_CODE_FAILURE); say the status.
        probe = ctx.request.get(base)
        if probe.status != 200:
            out["status"] = probe.status
            out["error"] = f"GET / answers HTTP {probe.status}"
            print(json.dumps(out))
            return
        t = {"response_end": [], "dcl": [], "load": [], "fcp": []}
        for _ in range(rounds):
            page = ctx.new_page()
            resp = page.goto(base, wait_until="load", timeout=120_000)
            out["status"] = resp.status if resp else None
            # FCP is recorded just after the paint: give it a moment.
            try:
                page.wait_for_function(
                    "performance.getEntriesByName('first-contentful-paint').length > 0", timeout=3000)
            except Exception:  # nothing painted (an empty or error page)
                pass
            m = page.evaluate(TIMING)
            for k in t:
                t[k].append(m[k])
            out["title"] = page.title()
            page.close()
        out.update({f"{k}_ms": med(v) for k, v in t.items()})
        ctx.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
