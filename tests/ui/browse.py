#!/usr/bin/env python3
"""Drives the controller's web UI in headless Chromium (selenium + chromedriver).

Run by tests/tests/ui.rs. Prints one JSON object on its last line of stdout:
{"errors": [...], "console": [...], "checks": [...], "timings": {...}, ...};
"errors" empty means every check passed. Screenshots go to --out.

Modes:
  full  log in with the one-time URL, check every page (services with sources, agents
        with expiry, traffic, policy and its why form), search, keyboard focus, no
        console error; then reuse the login URL in a browser without cookies and expect
        the refusal on the login page.
  traffic  log in, open the traffic page and wait until the edge --edge-from ->
        --edge-to shows in the graph and the table, with its rate, error rate, p99 and
        "mTLS" as text.
  perf  log in, then measure the services page's first render (reported, not asserted).
"""

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 30

errors = []
checks = []
console = []
timings = {}


def check(ok, what):
    (checks if ok else errors).append(what)
    return ok


def driver_for(profile):
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,900", "--no-first-run", "--disable-extensions",
              "--disable-background-networking", "--user-data-dir=" + profile):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=opts)


def take_console(d, stage):
    """Collects the browser console since the last call; SEVERE entries are errors."""
    for entry in d.get_log("browser"):
        item = {"stage": stage, "level": entry.get("level"), "message": entry.get("message")}
        console.append(item)
        if entry.get("level") == "SEVERE" and stage != "replay":
            errors.append("console error on %s: %s" % (stage, entry.get("message")))


def wait_rendered(d, path):
    WebDriverWait(d, WAIT).until(
        lambda d: d.execute_script(
            "return location.pathname === arguments[0] && !!document.body.dataset.rendered", path))


def page_text(d):
    return d.find_element(By.ID, "content").text


def shot(d, out, name):
    path = os.path.join(out, name + ".png")
    d.save_screenshot(path)
    return path


def nav(d, link_text, path):
    d.find_element(By.LINK_TEXT, link_text).click()
    wait_rendered(d, path)


def full(args, d):
    t0 = time.monotonic()
    d.get(args.url)
    wait_rendered(d, "/ui/services")
    timings["login_to_services_ms"] = round((time.monotonic() - t0) * 1000)
    check("#code=" not in d.current_url, "the login code is gone from the address bar")
    cookies = d.get_cookies()
    session = [c for c in cookies if c["name"] == "causeway_ui"]
    check(len(session) == 1 and session[0].get("httpOnly") and session[0].get("sameSite") == "Strict",
          "session cookie is HttpOnly and SameSite=Strict: %s" % cookies)
    ls = d.execute_script("return JSON.stringify(Object.assign({}, localStorage))")
    check(ls == "{}", "nothing in local storage (%s)" % ls)

    names = [e.text for e in d.find_elements(By.CSS_SELECTOR, "th.service-name")]
    for key in args.service:
        check(key in names, "services page lists %s (listed: %s)" % (key, names))
    sources = " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "span.source"))
    for src in args.source:
        check(src in sources, "services page shows source %s (%s)" % (src, sources))
    identities = " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "span.identity"))
    check("spiffe://" in identities, "services page shows an agent identity (%s)" % identities)
    text = page_text(d)
    check("conflict" in text, "a registry conflict is highlighted as text")
    shot(d, args.out, "services")
    take_console(d, "services")

    # Live: a service added to the file source appears without a reload.
    if args.live_file:
        d.execute_script("window.causewayNoReload = true")
        with open(args.live_file) as f:
            text = f.read()
        tmp = args.live_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n" + args.live_append + "\n")
        os.replace(tmp, args.live_file)
        WebDriverWait(d, WAIT).until(lambda d: args.live_service in [
            e.text for e in d.find_elements(By.CSS_SELECTOR, "th.service-name")])
        check(d.execute_script("return window.causewayNoReload === true"),
              "%s appeared on the services page without a reload" % args.live_service)
        take_console(d, "live update")

    # Search, with the result in the page's URL.
    box = d.find_element(By.ID, "q")
    box.clear()
    box.send_keys(args.search + Keys.RETURN)
    WebDriverWait(d, WAIT).until(
        lambda d: "q=" in d.current_url and "1 matching" in d.find_element(By.ID, "pager-summary").text)
    names = [e.text for e in d.find_elements(By.CSS_SELECTOR, "th.service-name")]
    check(len(names) == 1 and args.search in names[0], "search %r finds one service: %s" % (args.search, names))
    take_console(d, "search")

    # Keyboard: the first Tab lands on the skip link, which leads to the content.
    d.get(args.base + "/ui/")
    wait_rendered(d, "/ui/")
    shot(d, args.out, "overview")
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    focused = d.execute_script("return document.activeElement.textContent")
    check(focused == "Skip to content", "first Tab focuses the skip link (%r)" % focused)
    text = page_text(d)
    check("Agents connected" in text and "1 of 1" in text, "overview shows agents connected 1 of 1: %r" % text[:300])
    check("Certificates expiring within 24 h" in text, "overview shows certificate expiry")
    for src in args.source:
        check(src in text, "overview lists source %s" % src)
    take_console(d, "overview")

    nav(d, "Agents", "/ui/agents")
    text = page_text(d)
    check(args.agent in text, "agents page lists agent %s" % args.agent)
    expiry = [e.text for e in d.find_elements(By.CSS_SELECTOR, "td.expiry")]
    check(len(expiry) >= 1 and all("UTC" in e and "(in " in e for e in expiry),
          "agents page shows certificate expiry: %s" % expiry)
    check("connected" in text, "agents page shows the agent connected")
    shot(d, args.out, "agents")
    take_console(d, "agents")

    nav(d, "Traffic", "/ui/traffic")
    check("No traffic data yet" in page_text(d), "traffic page says there is no traffic data yet")
    shot(d, args.out, "traffic")
    take_console(d, "traffic")

    nav(d, "Policy", "/ui/policy")
    d.find_element(By.ID, "why-from").send_keys(args.why_from)
    d.find_element(By.ID, "why-to").send_keys(args.why_to)
    d.find_element(By.CSS_SELECTOR, "#why-form button[type=submit]").click()
    WebDriverWait(d, WAIT).until(lambda d: d.find_element(By.ID, "why-result").text != "")
    result = d.find_element(By.ID, "why-result").text
    check("Decision:" in result and args.why_expect in result,
          "why form answers with %s: %r" % (args.why_expect, result))
    text = page_text(d)
    check(args.policy in text, "policy page lists %s" % args.policy)
    shot(d, args.out, "policy")
    take_console(d, "policy")

    # Each page has a stable URL: a reload lands on the same page.
    for path in ("/ui/", "/ui/services", "/ui/agents", "/ui/traffic", "/ui/policy"):
        d.get(args.base + path)
        wait_rendered(d, path)
        take_console(d, "reload " + path)

    # A request without the cookie: 401 with a message.
    try:
        urllib.request.urlopen(args.base + "/ui/api/services", timeout=10)
        check(False, "a request without the cookie is refused")
    except urllib.error.HTTPError as e:
        check(e.code == 401, "a request without the cookie gets 401 (got %d)" % e.code)

    # The same login URL again, in a browser without the session: refused, and said so.
    d.delete_all_cookies()
    d.get(args.url)
    WebDriverWait(d, WAIT).until(
        lambda d: "Login refused" in d.find_element(By.ID, "status").text)
    msg = d.find_element(By.ID, "status").text
    check("already used" in msg, "a second use of the login code is refused: %r" % msg)
    check(d.execute_script("return location.pathname") == "/ui/login", "the refused login stays on the login page")
    shot(d, args.out, "login-refused")
    take_console(d, "replay")
    return {"replay_message": msg}


def traffic(args, d):
    d.get(args.url)
    wait_rendered(d, "/ui/services")
    nav(d, "Traffic", "/ui/traffic")

    def edge_row(d):
        for row in d.find_elements(By.CSS_SELECTOR, "tr.edge"):
            cells = [c.text for c in row.find_elements(By.CSS_SELECTOR, "th, td")]
            if len(cells) >= 9 and cells[0] == args.edge_from and cells[1] == args.edge_to:
                return cells
        return False

    # The page polls /ui/api/traffic: the edge appears without a reload.
    cells = WebDriverWait(d, 60).until(edge_row)
    check(cells[2] == "http", "the edge is HTTP: %s" % cells)
    check(cells[3] not in ("", "-"), "the edge has a request rate: %s" % cells)
    check("%" in cells[4], "the edge has an error rate: %s" % cells)
    check("ms" in cells[5], "the edge has a p99 latency: %s" % cells)
    check("mTLS" in cells[7], "the edge says mTLS as text: %s" % cells)
    check(cells[8] == "destination", "the destination's view is shown: %s" % cells)
    check(cells[6] != "0 B/s", "the request edge carries its connections' bytes: %s" % cells)
    rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "tr.edge")]
    check(len(rows) == 1, "one edge, no separate TCP edge for the HTTP connections: %s" % rows)
    graph = d.find_element(By.ID, "traffic-graph")
    texts = [t.text for t in graph.find_elements(By.CSS_SELECTOR, "text")]
    check(any(args.edge_from in t for t in texts) and any(args.edge_to in t for t in texts),
          "the graph has both nodes: %s" % texts)
    check(any("req/s" in t and "mTLS" in t and "p99" in t for t in texts),
          "the graph labels the edge with rate, p99 and mTLS: %s" % texts)
    shot(d, args.out, "traffic-edges")
    take_console(d, "traffic")
    return {"edge": cells}


def perf(args, d):
    d.get(args.url)
    wait_rendered(d, "/ui/services")
    first = int(d.execute_script("return document.body.dataset.rendered"))
    summary = d.find_element(By.ID, "pager-summary").text
    rows = len(d.find_elements(By.CSS_SELECTOR, "th.service-name"))
    take_console(d, "services (10k)")
    t0 = time.monotonic()
    d.get(args.base + "/ui/services")
    wait_rendered(d, "/ui/services")
    timings["services_reload_wall_ms"] = round((time.monotonic() - t0) * 1000)
    timings["services_first_render_ms"] = first
    timings["services_reload_render_ms"] = int(d.execute_script("return document.body.dataset.rendered"))
    check(str(args.expect_total) in summary, "pager counts %d services: %r" % (args.expect_total, summary))
    check(rows == 50, "one page of 50 rows is rendered (%d)" % rows)
    # The last page, by the pager.
    d.find_element(By.ID, "q").send_keys(args.search + Keys.RETURN)
    WebDriverWait(d, WAIT).until(lambda d: "q=" in d.current_url and "Page 1 of" in d.find_element(By.ID, "pager-summary").text)
    shot(d, args.out, "services-10k")
    take_console(d, "search (10k)")
    return {"summary": summary}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["full", "perf", "traffic"], default="full")
    ap.add_argument("--url", required=True, help="the one-time login URL")
    ap.add_argument("--base", required=True, help="the controller's admin base URL")
    ap.add_argument("--out", required=True, help="folder for screenshots")
    ap.add_argument("--service", action="append", default=[])
    ap.add_argument("--source", action="append", default=[])
    ap.add_argument("--agent", default="")
    ap.add_argument("--search", default="")
    ap.add_argument("--policy", default="")
    ap.add_argument("--why-from", default="")
    ap.add_argument("--why-to", default="")
    ap.add_argument("--why-expect", default="ALLOW")
    ap.add_argument("--expect-total", type=int, default=0)
    ap.add_argument("--live-file", default="", help="file source to add --live-append to")
    ap.add_argument("--live-append", default="")
    ap.add_argument("--live-service", default="")
    ap.add_argument("--edge-from", default="")
    ap.add_argument("--edge-to", default="")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {}
    with tempfile.TemporaryDirectory(prefix="causeway-chromium-") as profile:
        d = driver_for(profile)
        try:
            result = {"full": full, "perf": perf, "traffic": traffic}[args.mode](args, d)
        except Exception as e:  # report, with a screenshot of where it stopped
            errors.append("%s: %s" % (type(e).__name__, e))
            try:
                shot(d, args.out, "failure-" + args.mode)
                errors.append("at %s: %s" % (d.current_url, d.find_element(By.TAG_NAME, "body").text[:2000]))
                take_console(d, "failure")
            except Exception:
                pass
        finally:
            d.quit()
    result.update({"errors": errors, "checks": checks, "console": console, "timings": timings})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
