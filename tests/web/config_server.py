"""Browser acceptance test of the configuration server's website.

Started by the Rust test `config_web::browser_dashboard_charts_and_a_test_failover`
(tests/integration/config_web.rs), which runs a config server, a master
target and two agents reporting to it, and passes:

    FERRY_WEB_URL              http://127.0.0.1:PORT
    FERRY_WEB_ADMIN            the admin's user name, FERRY_WEB_ADMIN_PASSWORD
    FERRY_WEB_VIEWER           a viewer's user name, FERRY_WEB_VIEWER_PASSWORD
    FERRY_WEB_DISKS            the two protected disks, comma-separated
    FERRY_WEB_PLAN             the name of the recovery plan to make

It logs in as the admin, sees both disks with their RPO changing (the
dashboard's script updates the cells in place), finds recovery points on a
disk's chart, makes a plan from the website, runs a test failover of it and
cleans it up, then checks that a viewer has no button and that a forged
POST is refused with 403. One PASS/FAIL line per check (lib.Checks).
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import Checks, browser  # noqa: E402

BASE = os.environ["FERRY_WEB_URL"].rstrip("/")
ADMIN = os.environ.get("FERRY_WEB_ADMIN", "admin")
ADMIN_PW = os.environ["FERRY_WEB_ADMIN_PASSWORD"]
VIEWER = os.environ["FERRY_WEB_VIEWER"]
VIEWER_PW = os.environ["FERRY_WEB_VIEWER_PASSWORD"]
DISKS = [d for d in os.environ["FERRY_WEB_DISKS"].split(",") if d]
PLAN = os.environ["FERRY_WEB_PLAN"]


def log_in(c, page, user, pw):
    page.goto(BASE + "/")
    c.check(f"{user}: not logged in, sent to /login", page.url == BASE + "/login", page.url)
    page.fill("#user", user)
    page.fill("#password", pw)
    page.click("#login")
    page.wait_for_url(BASE + "/")
    c.check(f"{user}: logged in", page.text_content("#me") == user, page.text_content("#me") or "")


def rpo_cells(page):
    """Each disk's RPO cell: (its text, its value in ms)."""
    return {d: ((page.text_content(f"#rpo-{d}") or "").strip(), page.get_attribute(f"#rpo-{d}", "data-ms") or "")
            for d in DISKS}


def wait_state(page, url, want, secs):
    """Reload the run's page until #run-state says one of `want`."""
    deadline = time.time() + secs
    state = ""
    while time.time() < deadline:
        page.goto(url)
        state = (page.text_content("#run-state") or "").strip()
        if state in want:
            return state
        page.wait_for_timeout(1000)
    return state


def admin_part(c, page):
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    log_in(c, page, ADMIN, ADMIN_PW)

    # The dashboard: both disks, headers, live RPO.
    resp = page.goto(BASE + "/")
    h = resp.headers if resp else {}
    c.check("CSP allows scripts from the site only", "script-src 'self'" in h.get("content-security-policy", ""),
            h.get("content-security-policy", ""))
    c.check("X-Frame-Options DENY", h.get("x-frame-options") == "DENY", h.get("x-frame-options", ""))
    for d in DISKS:
        c.check(f"dashboard lists {d}", page.locator(f'#disks tr[data-disk="{d}"]').count() == 1)
    first = rpo_cells(page)
    c.check("both disks have an RPO", all(t and t != "\u2014" and ms for t, ms in first.values()), str(first))
    # The script polls every 2 s; wait for two updates, then read again without reloading.
    # (Polled from here: the page's CSP forbids the eval that wait_for_function needs.)
    deadline = time.time() + 10
    while page.get_attribute("#disks", "data-updated") is None and time.time() < deadline:
        page.wait_for_timeout(200)
    c.check("the page's script updated the table", page.get_attribute("#disks", "data-updated") is not None)
    page.wait_for_timeout(5000)
    second = rpo_cells(page)
    c.check("RPO changes live (read twice, 5 s apart, no reload)",
            all(first[d][1] != second[d][1] and second[d][0] not in ("", "\u2014") for d in DISKS), f"{first} then {second}")
    c.check("no stale marker", "stale" not in (page.get_attribute("#disks", "class") or ""))

    # A disk's page: charts with recovery points.
    page.click(f'#disks tr[data-disk="{DISKS[0]}"] td.name a')
    page.wait_for_url(BASE + "/disks/" + DISKS[0])
    n_points = page.locator("svg#chart-rpo circle.point").count()
    c.check("the RPO chart marks recovery points", n_points > 0, f"{n_points} points")
    c.check("the lag chart has a line", page.locator("svg#chart-lag polyline.series").count() > 0)
    c.check("the recovery points table", page.locator("#points tr.point-row").count() > 0)

    # A plan, made on the website.
    page.goto(BASE + "/plans")
    page.fill("#plan-name", PLAN)
    page.fill("#plan-json", json.dumps({"steps": [{"name": "both disks", "disks": DISKS}]}, indent=2))
    page.click("#plan-save")
    page.wait_for_url(BASE + "/plans")
    c.check("the plan is listed", page.locator(f'section[data-plan="{PLAN}"]').count() == 1)

    # Test failover from the website, then clean up.
    page.click(f"#test-failover-{PLAN}")
    page.wait_for_url(BASE + "/runs/*")
    run_url = page.url
    c.check("the run page opens", "/runs/" in run_url, run_url)
    state = wait_state(page, run_url, ("ready", "failed", "interrupted"), 90)
    c.check("test failover ready", state == "ready", f"state {state}\n{page.text_content('#run-log')}")
    log = page.text_content("#run-log") or ""
    c.check("the log has each disk's step", all(f"{d}: done:" in log for d in DISKS), log)
    c.check("the jobs brought up exports", page.locator("#jobs td", has_text="NBD export").count() == len(DISKS))
    c.check("a Clean up button, no Commit", page.locator("#cleanup").count() == 1 and page.locator("#commit").count() == 0)
    page.click("#cleanup")
    page.wait_for_url(run_url)
    state = wait_state(page, run_url, ("cleaned", "failed"), 90)
    c.check("cleaned up", state == "cleaned", f"state {state}\n{page.text_content('#run-log')}")
    c.check("the runs list shows it", page.goto(BASE + "/plans") and
            page.locator("#runs td.state", has_text="cleaned").count() >= 1)
    c.check("no console errors (CSP violations included)", not console, "; ".join(console))

    page.click("#logout")
    page.wait_for_url(BASE + "/login")
    c.check("logged out", page.url == BASE + "/login", page.url)


def viewer_part(c, page):
    log_in(c, page, VIEWER, VIEWER_PW)
    for d in DISKS:
        c.check(f"the viewer sees {d}", page.locator(f'#disks tr[data-disk="{d}"]').count() == 1)
    page.goto(BASE + "/plans")
    c.check("the viewer sees the plan", page.locator(f'section[data-plan="{PLAN}"]').count() == 1)
    c.check("no Test failover button for a viewer", page.locator(f"#test-failover-{PLAN}").count() == 0
            and page.locator("button.test-failover, button.failover").count() == 0)
    runs_before = page.locator("#runs tr[data-run]").count()
    csrf = page.get_attribute('#nav input[name="csrf"]', "value") or ""
    c.check("the viewer's page has its CSRF token", len(csrf) > 10)
    # A forged POST with the viewer's own session and token: refused.
    r = page.request.post(BASE + f"/plans/{PLAN}/run",
                          form={"csrf": csrf, "kind": "test-failover", "point": "latest"}, max_redirects=0)
    c.check("a viewer's forged POST gets 403", r.status == 403, f"HTTP {r.status}")
    page.goto(BASE + "/plans")
    c.check("no run was started", page.locator("#runs tr[data-run]").count() == runs_before)
    r = page.request.get(BASE + "/users", max_redirects=0)
    c.check("the viewer gets 403 on /users", r.status == 403, f"HTTP {r.status}")


def main():
    c = Checks()
    try:
        with browser() as b:
            ctx = b.new_context()
            admin_part(c, ctx.new_page())
            ctx.close()
            ctx = b.new_context()
            viewer_part(c, ctx.new_page())
            ctx.close()
    except Exception as e:  # one line, not a traceback wall
        c.check("browser session", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        traceback.print_exc(file=sys.stderr)
    c.exit()


if __name__ == "__main__":
    main()
