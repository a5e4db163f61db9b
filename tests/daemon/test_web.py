"""daemon/web.py + webviews.py: `horse-ledger serve` on SQLite and PostgreSQL, in-process and in a real Chromium.

The in-process tests call `WebApp.handle` (every page, filters, pagination, errors, JSON = what the page
shows). The browser tests start the real server on a free loopback port and drive Debian's headless
Chromium through selenium + chromedriver (`apt-get install chromium chromium-driver`; .ci/run installs them):
the pages render the test ledger, a chart is drawn, hostile text (`<script>`, bidi controls) shows as text.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.web import WebApp, make_server, show
from ledger.config import load_settings
from tests.daemon.ledger_nights import HOSTILE, MODEL, REJECT_REASON, populate

REPO_ROOT = Path(__file__).resolve().parents[2]  # `python -m ledger` from here runs this checkout


@pytest.fixture
def ledger(store) -> tuple[Any, dict[str, Any]]:
    return store, populate(store)


@pytest.fixture
def app(ledger) -> WebApp:
    store, _ = ledger
    return WebApp(load_settings(environ={}, model=MODEL), store)


def get(app: WebApp, target: str, status: int = 200) -> str:
    resp = app.handle("GET", target)
    assert resp.status == status, resp.body[:500]
    return resp.body.decode()


def api(app: WebApp, target: str, status: int = 200) -> Any:
    resp = app.handle("GET", "/api" + target)
    assert resp.status == status and resp.content_type == "application/json"
    return json.loads(resp.body)


def test_every_page_renders_and_its_json_carries_the_same_data(app, ledger) -> None:
    _, ids = ledger
    for path in ("/", "/edits", f"/edits/{ids['hostile']}", "/snapshots", "/nights/2", "/protected", "/charts",
                 "/charts?x=edits"):
        assert "<html" in get(app, path)
        api(app, path if path != "/" else "")
    assert "token" not in json.dumps([api(app, "/snapshots"), api(app, "/edits"), api(app, "/nights/2")])
    overview = api(app, "")
    assert overview["counts"]["applied"] == 5 and overview["counts"]["pending"] == 1
    assert overview["heads"] == [{"base_model": MODEL, "snapshot_id": ids["snapshots"][2], "chain_length": 1}]


def test_edit_list_filters_paginates_and_searches(app, ledger) -> None:
    _, ids = ledger
    assert api(app, "/edits")["total"] == 7
    assert [e["id"] for e in api(app, "/edits?status=rejected")["edits"]] == [ids["rejected"]]
    assert api(app, "/edits?status=applied&status=pending")["total"] == 6
    assert {e["author"] for e in api(app, "/edits?author=BOB")["edits"]} == {"bob"}
    assert api(app, "/edits?source=example.org")["total"] == 3
    assert [e["id"] for e in api(app, "/edits?q=pwned")["edits"]] == [ids["hostile"]]
    assert api(app, "/edits?q=teal")["total"] == 1  # the target is searched too
    assert api(app, "/edits?since=2000-01-01&until=2999-12-31")["total"] == 7
    assert api(app, "/edits?until=2000-01-01")["total"] == 0
    pages = [api(app, f"/edits?per_page=3&page={p}") for p in (1, 2, 3)]
    assert [p["pages"] for p in pages] == [3, 3, 3]
    seen = [e["id"] for p in pages for e in p["edits"]]
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == 7
    html = get(app, "/edits?author=bob&per_page=1")
    assert 'href="?author=bob&amp;per_page=1&amp;page=2"' in html  # the pager keeps the filters


def test_edit_page_shows_its_whole_history(app, ledger) -> None:
    _, ids = ledger
    data = api(app, f"/edits/{ids['rejected']}")
    assert [e["kind"] for e in data["events"]] == ["edit.created", "edit.claimed", "edit.rejected"]
    assert REJECT_REASON in get(app, f"/edits/{ids['rejected']}").replace("&lt;", "<")


def test_snapshots_page_has_the_chain_gate_numbers_and_refused_edits(app, ledger) -> None:
    _, ids = ledger
    data = api(app, "/snapshots")
    s1, s2, s3 = ids["snapshots"]
    assert data["head"] == s3 and data["chain"] == [s3]  # the fold starts a new chain
    assert [r["accumulated_edits"] for r in data["snapshots"]] == [3, 5, 5]
    assert [r["canary_agreement"] for r in data["snapshots"]] == [1.0, 0.97, 0.99]
    night2 = next(n for n in data["nights"] if n["snapshot_id"] == s2)
    assert night2["rejected"] == [{"edit_id": ids["rejected"], "status": "rejected", "reason": REJECT_REASON,
                                   "subject": "Subject 5"}]
    assert api(app, f"/nights/{night2['id']}")["night"]["rejected"] == night2["rejected"]


def test_charts_skip_ns_and_perplexity_only_when_never_measured(app) -> None:
    keys = [c["key"] for c in api(app, "/charts")["charts"]]
    assert keys == ["canary_agreement", "retention", "ns", "delta_norm_max"]  # NS measured, perplexity never
    html = get(app, "/charts?x=edits")
    assert html.count("<svg") == 4 and 'class="series"' in html and "edits carried" in html


def test_hostile_text_is_escaped_and_bidi_controls_are_shown(app, ledger) -> None:
    _, ids = ledger
    for path in (f"/edits/{ids['hostile']}", "/edits", "/edits?q=pwned"):
        html = get(app, path)
        assert "<script" not in html.lower() and "\u202e" not in html and "\u2067" not in html
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html and "U+202E" in html
    raw = app.handle("GET", f"/api/edits/{ids['hostile']}").body
    assert b"\\u202e" in raw and "\u202e".encode() not in raw
    assert json.loads(raw)["edit"]["subject"] == HOSTILE
    assert str(show("a\u202eb")) == '<bdi>a<span class="ctl" title="RIGHT-TO-LEFT OVERRIDE">U+202E</span>b</bdi>'


@pytest.mark.parametrize("target,status,says", [
    ("/edits?page=x", 400, "is not a whole number"), ("/edits?status=done", 400, "is not an edit status"),
    ("/edits?since=yesterday", 400, "YYYY-MM-DD"), ("/charts?x=time", 400, "x=snapshot or x=edits"),
    ("/edits/9999", 404, "no edit has id 9999"), ("/nights/9999", 404, "no batch has id 9999"),
    ("/nothing/here", 404, "no page at"),
])
def test_bad_requests_say_what_to_give(app, target, status, says) -> None:
    assert says in get(app, target, status).replace("&#39;", "'")
    assert says in api(app, target, status)["error"]


def test_only_reads(app) -> None:
    resp = app.handle("POST", "/edits")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"


def test_metrics_endpoint_serves_the_ledger(app) -> None:
    resp = app.handle("GET", "/metrics")
    text = resp.body.decode()
    assert resp.status == 200 and resp.content_type.startswith("text/plain")
    assert 'horse_ledger_edits{status="applied"} 5.0' in text and "horse_ledger_chain_length" in text


# ----------------------------------------------------------------------------------- a real browser

@pytest.fixture
def server_url(app: WebApp) -> Iterator[str]:
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver_path, chrome = shutil.which("chromedriver"), shutil.which("chromium")
    if driver_path is None or chrome is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium / chromedriver missing: .ci/run installs chromium and chromium-driver")
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_chromium_renders_the_ledger_charts_and_hostile_text(browser, server_url, ledger) -> None:
    from selenium.webdriver.common.by import By

    _, ids = ledger
    browser.get(f"{server_url}/edits")
    rows = browser.find_elements(By.CSS_SELECTOR, "#edits tr")
    assert len(rows) == 1 + 7 and "7 edits match" in browser.find_element(By.ID, "total").text
    subjects = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#edits td.subject")]
    assert "<script>window.pwned=1</script>EvilU+202ECorp" in subjects  # text, not markup; bidi shown
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.find_elements(By.TAG_NAME, "script") == []

    browser.get(f"{server_url}/edits/{ids['rejected']}")
    assert "edit.rejected" in browser.find_element(By.ID, "history").text

    browser.get(f"{server_url}/snapshots")
    assert REJECT_REASON in browser.find_element(By.CSS_SELECTOR, "table.nights").text

    browser.get(f"{server_url}/charts")
    chart = browser.find_element(By.CSS_SELECTOR, "#chart-canary_agreement svg")
    assert chart.size["width"] > 100 and chart.size["height"] > 100  # laid out, not just in the markup
    line = browser.find_element(By.CSS_SELECTOR, "#chart-canary_agreement path.series")
    assert browser.execute_script("return arguments[0].getTotalLength()", line) > 50  # a line was drawn
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-canary_agreement circle")) == 3


def test_serve_command_listens_on_loopback_and_refuses_a_busy_port(db_url, ledger) -> None:
    import socket
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "ledger", "--db", db_url, "serve", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        line = proc.stderr.readline()
        assert "serving the ledger read-only on http://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split("/ ", 1)[0]
        with urllib.request.urlopen(f"{url}/api/edits?per_page=2", timeout=30) as resp:
            assert json.loads(resp.read())["total"] == 7
            assert "script-src" not in resp.headers["Content-Security-Policy"]  # default-src 'none' covers it
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "ledger", "--db", db_url, "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
