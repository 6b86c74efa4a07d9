"""The web console in a real browser: Playwright driving Debian's chromium against a real server.

The server is ``upshift-platform serve`` (gunicorn) on a database prepared like the demo: org
acme on the Team plan with an admin, a member, a viewer and a CI service key, each with an API
key, a month of spends by all of them, and 150 audit events (one of which carries
``<img src=x onerror=alert(1)>`` as its resource id). Tests that change data get a scratch
database and a server of their own.

Chromium comes from the system (``apt-get install chromium``; ``.ci/run`` installs it when it is
missing): no browser can be downloaded here. Without it these tests skip, saying so.

Screenshots of every page at 1280 and 375 px go to ``$UPSHIFT_CONSOLE_SCREENSHOTS`` when that is
set (``docs/console`` for the README), else to a temporary folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, Request, sync_playwright
from psycopg.rows import dict_row

from tests import stripe_fakes as sf
from tests.conftest import RUN_ID, TEST_JWT_SECRET, World, _with_db, acting_as, claims_for, serve

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = {"overview": "Overview", "usage": "Usage", "audit": "Audit log", "members": "Members", "keys": "Keys",
         "billing": "Billing"}
XSS = "<img src=x onerror=alert(1)>"
AUDIT_EVENTS = 150
PRICES = {"explain": 1, "fix": 3, "audit": 2}
# The demo's spends: (action, credits), the i-th by the member, the admin and the CI key in turn.
SPENDS = [(action, PRICES[action] + i % 2) for i in range(24) for action in [("explain", "fix", "audit")[i % 3]]]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("UPSHIFT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium found (/usr/bin/chromium, chromium or chromium-browser on PATH, or UPSHIFT_CHROMIUM): "
           "install it with `apt-get install chromium` (.ci/run does); Playwright cannot download browsers here")


# --- data --------------------------------------------------------------------------------------


def clone_database(server_url: str, template: str, label: str) -> str:
    """A new database from the migrated template, dropped with the run's others (conftest's template_db)."""
    name = f"upshift_test_{RUN_ID}_{label}_{os.urandom(3).hex()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        for attempt in range(50):
            try:
                admin.execute(f'create database "{name}" template "{template}"')
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.05 * (attempt + 1))
    return _with_db(server_url, name)


def seed_demo(url: str) -> dict[str, Any]:
    """What ``upshift-platform demo`` makes (acme, Team, 500 credits, admin/member/viewer, a CI key, one key each),
    plus a second org of the admin's (for the org switcher), a month of spends and 150 audit events."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        world = World(conn)
        acme = world.team("acme", balance=500)
        world.org("side-project", plan="team", balance=50, admin=acme["admin"])
        keys = {role: world.key(acme[role], org=acme["org"], name=f"demo {role}")["secret"]
                for role in ("admin", "member", "viewer")}
        ci = world.key(acme["admin"], kind="service", org=acme["org"], name="demo ci")
        keys["ci"] = ci["secret"]
        ci_claims = {"role": "authenticated", "upshift": {"key_id": ci["id"], "kind": "service", "org_id": acme["org"]}}
        spenders = [("member", claims_for(acme["member"])), ("admin", claims_for(acme["admin"])), ("ci", ci_claims)]
        for i, (action, credits) in enumerate(SPENDS):
            _who, claims = spenders[i % 3]
            with acting_as(conn, "authenticated", claims, commit=True) as cur:
                cur.execute("select public.debit_credits(%s, %s, 'acme')", (credits, action))
        # Spread them over the last four weeks (the ledger's times are not hashed; the audit log is untouched).
        conn.execute("update public.credit_transactions t set created_at = now() - make_interval(days => s.n)"
                     " from (select id, (row_number() over (order by created_at, id) - 1)::int as n"
                     "       from public.credit_transactions where amount < 0) s where t.id = s.id")
        events = [{"event_type": "upgrade", "resource_type": "package", "resource_id": f"pkg-{i}",
                   "metadata": {"from_version": "1.0.0", "to_version": f"2.{i}.0", "outcome": "success"}}
                  for i in range(AUDIT_EVENTS - 1)]
        with acting_as(conn, "authenticated", claims_for(acme["member"]), commit=True) as cur:
            cur.execute("select public.record_audit_events(%s, 'acme')", (json.dumps(events),))
        with acting_as(conn, "authenticated", claims_for(acme["admin"]), commit=True) as cur:
            cur.execute("select public.record_audit_events(%s, 'acme')", (json.dumps([{
                "event_type": "deploy", "resource_type": "package", "resource_id": XSS,
                "metadata": {"note": "</pre><script>alert(2)</script>"}}]),))
    return {**acme, "keys": keys, "ci_id": ci["id"]}


@contextmanager
def running_server(url: str, **env: str) -> Iterator[str]:
    """``upshift-platform serve`` on ``url`` (with extra environment), stopped afterwards; yields its base URL."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        proc, port = serve(url, workers=2, jwt_secret=TEST_JWT_SECRET)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def post_json(base: str, path: str, key: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                          **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def demo(pg_server_url: str, template_db: str) -> dict[str, Any]:
    url = clone_database(pg_server_url, template_db, "console")
    return {**seed_demo(url), "url": url}


def stripe_env(standin: sf.StripeStandIn) -> dict[str, str]:
    """Stripe Checkout configured, against the local stand-in for Stripe's API."""
    prices = {f"STRIPE_PRICE_{'PACK_' if k in ('small', 'medium', 'large') else ''}{k.upper()}": v
              for k, v in sf.PRICES.items()}
    return {"STRIPE_SECRET_KEY": sf.SECRET_KEY, "STRIPE_API_BASE": standin.url,
            "UPSHIFT_PUBLIC_BASE_URL": "https://console.example", **prices}


@pytest.fixture(scope="module")
def server(demo: dict[str, Any], standin: sf.StripeStandIn) -> Iterator[str]:
    with running_server(demo["url"], **stripe_env(standin)) as base:
        yield base


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@contextmanager
def browser_context(playwright: Playwright, **options: Any) -> Iterator[BrowserContext]:
    """Debian's chromium with a fresh user-data dir (removed afterwards)."""
    profile = tempfile.mkdtemp(prefix="upshift-console-chromium-")
    assert CHROMIUM is not None
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, accept_downloads=True,
        viewport={"width": 1280, "height": 900}, **options)
    try:
        yield context
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def context(playwright: Playwright) -> Iterator[BrowserContext]:
    with browser_context(playwright) as ctx:
        yield ctx


class Console:
    """One tab of the console, recording what a user would not want to see: errors, dialogs, credentials in URLs."""

    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("dialog", self._dialog)
        page.on("request", self._request)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)

    def wait_ready(self, page_name: str, timeout: float = 10_000) -> None:
        self.page.wait_for_function(
            "name => { const m = document.getElementById('main');"
            " return m.dataset.page === name && m.dataset.ready === 'true'; }", arg=page_name, timeout=timeout)

    def sign_in(self, key: str, *, route: str = "", expect: str = "overview") -> None:
        self.page.goto(f"{self.base}/console{'#/' + route if route else ''}")
        self.wait_ready("signin")
        field = self.page.get_by_label("API key", exact=True)
        field.fill(key)
        field.press("Enter")
        self.wait_ready(expect)

    def open(self, route: str) -> None:
        self.page.get_by_role("navigation", name="Console").get_by_role("link", name=PAGES[route], exact=True).click()
        self.wait_ready(route)

    def main_buttons(self) -> list[str]:
        return self.page.eval_on_selector_all(
            "main button, main summary",
            "els => els.filter(e => e.getClientRects().length).map(e => (e.getAttribute('aria-label') || e.textContent).trim())")


@pytest.fixture
def console(context: BrowserContext, server: str) -> Iterator[Console]:
    page = context.new_page()  # a new tab: its own sessionStorage, so nobody is signed in yet
    c = Console(page, server)
    yield c
    page.close()


# JS: every visible form control and button in the page, and what is wrong with its label.
UNLABELLED = """() => {
  const visible = (e) => e.getClientRects().length > 0;
  const problems = [];
  for (const e of document.querySelectorAll('input, select, textarea')) {
    if (!visible(e) || e.type === 'hidden') continue;
    const named = (e.labels && e.labels.length) || e.getAttribute('aria-label') || e.getAttribute('aria-labelledby');
    if (!named) problems.push(`${e.tagName.toLowerCase()}[name=${e.name}] has no label`);
  }
  for (const e of document.querySelectorAll('button, a[href], summary')) {
    if (!visible(e)) continue;
    if (!((e.getAttribute('aria-label') || e.textContent || '').trim())) problems.push(`${e.outerHTML.slice(0, 80)} has no name`);
  }
  return problems;
}"""


def screenshot_dir(tmp_path: Path) -> Path:
    target = os.environ.get("UPSHIFT_CONSOLE_SCREENSHOTS")
    path = Path(target) if target else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- sign-in -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "label", "badge"), [
    ("admin", "admin@acme.test", "admin"), ("member", "member@acme.test", "member"),
    ("viewer", "viewer@acme.test", "viewer"), ("ci", "Service key of acme", "service"),
])
def test_sign_in_with_each_demo_role(console, demo, role, label, badge):
    key = demo["keys"][role]
    console.sign_in(key)
    account = console.page.locator("#account")
    assert label in account.inner_text()
    assert account.locator(".badge.role").inner_text() == badge
    nav = console.page.get_by_role("navigation", name="Console")
    assert [a.strip() for a in nav.get_by_role("link").all_inner_texts()] == list(PAGES.values())
    # The key stays in this tab's sessionStorage: not in localStorage, a cookie or any URL the page asked for.
    assert console.page.evaluate("() => Object.values(sessionStorage)").count(key) == 1
    assert key not in json.dumps(console.page.evaluate("() => Object.entries(localStorage)"))
    assert not console.page.context.cookies()
    assert console.requests and not [u for u in console.requests if key in u or key[:12] in u]
    console.page.get_by_role("button", name="Sign out").click()
    console.wait_ready("signin")
    assert key not in json.dumps(console.page.evaluate("() => Object.entries(sessionStorage)"))
    assert console.errors == []


def test_a_wrong_key_is_refused_with_the_reason(console):
    console.page.goto(f"{console.base}/console")
    console.wait_ready("signin")
    field = console.page.get_by_label("API key", exact=True)
    field.fill("not-a-key")
    field.press("Enter")
    assert "starts with upk_" in console.page.get_by_role("alert").inner_text()
    field.fill("upk_" + "0" * 64)
    console.page.get_by_role("button", name="Sign in").click()
    console.page.get_by_text("That key was not accepted").wait_for()
    assert console.page.locator("#nav").is_hidden()


# --- every page, every role ----------------------------------------------------------------------


@pytest.mark.parametrize("width", [1280, 375])
@pytest.mark.parametrize("role", ["admin", "member", "viewer", "ci"])
def test_every_page_renders_without_errors(console, demo, tmp_path, role, width):
    """Each page as each role: no console error, no failed request, every control labelled, nothing wider than
    the window at 375 px; the admin's pages are the README's screenshots."""
    console.page.set_viewport_size({"width": width, "height": 900})
    console.sign_in(demo["keys"][role])
    shots = screenshot_dir(tmp_path)
    for route, title in PAGES.items():
        console.open(route)
        assert console.page.get_by_role("heading", level=1).inner_text() == title
        assert console.page.locator("main .error").count() == 0, console.page.locator("main .error").all_inner_texts()
        assert console.page.evaluate(UNLABELLED) == []
        assert console.page.evaluate("document.documentElement.scrollWidth") <= width
        if route == "overview":
            console.page.wait_for_function("() => !document.querySelector('#spend-chart') ||"
                                           " document.querySelector('#spend-chart').width > 0")
        if role == "admin":  # the whole page, down to 1,800 px
            height = min(console.page.evaluate("document.documentElement.scrollHeight"), 1800)
            console.page.screenshot(path=str(shots / f"{route}-{width}.png"), full_page=True,
                                    clip={"x": 0, "y": 0, "width": width, "height": height})
    assert console.errors == []
    assert console.dialogs == []


def test_overview_shows_balance_chart_and_top_spenders(console, demo):
    console.sign_in(demo["keys"]["admin"])
    main = console.page.locator("main")
    assert "Balance" in main.inner_text() and "team" in main.locator(".stats").inner_text()
    balance = int(main.locator(".stat-value").first.inner_text().replace(",", ""))
    assert balance == 500 - sum(credits for _action, credits in SPENDS)
    holds = main.locator("[data-feature=holds]")
    assert "Not available yet" in holds.inner_text()
    # Chart.js drew the stacked bars into the canvas: one dataset per member and key.
    console.page.wait_for_function("() => window.Chart && Chart.getChart('spend-chart')")
    datasets = console.page.evaluate("() => Chart.getChart('spend-chart').data.datasets.map(d => d.label)")
    assert sorted(datasets) == ["admin@acme.test", "demo ci (key)", "member@acme.test"]
    assert console.page.evaluate("() => Chart.getChart('spend-chart').options.scales.y.stacked") is True
    top = main.get_by_role("table", name="Top spenders").locator("tbody tr").all_inner_texts()
    assert len(top) == 3 and top[0].startswith("1")
    # A member sees their own spending only.
    other = Console(console.page.context.new_page(), console.base)
    other.sign_in(demo["keys"]["member"])
    other.page.wait_for_function("() => window.Chart && Chart.getChart('spend-chart')")
    assert other.page.evaluate("() => Chart.getChart('spend-chart').data.datasets.map(d => d.label)") == [
        "member@acme.test"]
    assert "Your own spends" in other.page.locator("main").inner_text()
    other.page.close()


def test_usage_lists_every_member_and_key_against_a_limit_not_available_yet(console, demo):
    console.sign_in(demo["keys"]["admin"], route="usage", expect="usage")
    rows = console.page.get_by_role("table", name="Spend per member and key this period").locator("tbody tr")
    texts = rows.all_inner_texts()
    assert any(t.startswith("member@acme.test") for t in texts) and any(t.startswith("demo ci (key)") for t in texts)
    assert all(t.rstrip().endswith("Not available yet") for t in texts)
    assert "viewer@acme.test" not in " ".join(texts)  # viewers cannot spend
    assert console.page.locator("[data-feature=spend-limits].not-yet").count() == 1


def test_the_org_switcher_appears_for_users_in_several_orgs(console, demo):
    console.sign_in(demo["keys"]["admin"])
    switcher = console.page.get_by_label("Organization")
    assert switcher.locator("option").all_inner_texts() == ["Acme (admin)", "Side-Project (admin)"]
    switcher.select_option("side-project")
    console.wait_ready("overview")
    assert console.page.locator(".stat-value").first.inner_text() == "50"
    assert console.page.locator("main").get_by_text("Nothing was spent in the last 30 days.").is_visible()
    switcher.select_option("acme")
    console.wait_ready("overview")
    member = Console(console.page.context.new_page(), console.base)
    member.sign_in(demo["keys"]["member"])
    assert member.page.get_by_label("Organization").count() == 0
    member.page.close()
    assert console.errors == []


# --- roles: what is not offered -------------------------------------------------------------------


READ_ONLY_BUTTONS = {"Sign out", "Filters", "Apply filters", "Clear", "Verify", "Export CSV", "Export NDJSON",
                     "Load more", "Show the figures as a table"}


def test_a_viewer_sees_no_write_actions(console, demo):
    console.sign_in(demo["keys"]["viewer"])
    for route in PAGES:
        console.open(route)
        buttons = [b for b in console.main_buttons() if not b.startswith("Details of ")]
        assert set(buttons) <= READ_ONLY_BUTTONS, (route, buttons)
        assert console.page.locator("main select[aria-label^='Role of']").count() == 0
        assert console.page.locator("main form button[type=submit]").all_inner_texts() in ([], ["Apply filters"])
    assert console.errors == []


def test_a_member_is_offered_only_what_a_member_may_do(console, demo):
    console.sign_in(demo["keys"]["member"])
    console.open("audit")
    assert "cannot read its audit log" in console.page.locator("main").inner_text()
    console.open("members")
    assert console.main_buttons() == []
    console.open("keys")
    assert "Create key" in console.main_buttons()
    assert console.page.get_by_label("Kind").count() == 0  # personal keys only
    revocable = [b for b in console.main_buttons() if b.startswith("Revoke")]
    assert revocable == ["Revoke demo member"]  # their own key, not the org's service key
    console.open("billing")
    assert not [b for b in console.main_buttons() if b.startswith(("Buy", "Subscribe"))]
    assert console.errors == []


# --- the audit log -----------------------------------------------------------------------------


def test_the_audit_page_shows_its_first_100_rows_within_a_second_of_sign_in(console, demo):
    console.page.goto(f"{console.base}/console#/audit")
    console.wait_ready("signin")
    console.page.get_by_label("API key", exact=True).fill(demo["keys"]["viewer"])
    started = time.perf_counter()
    console.page.get_by_role("button", name="Sign in").click()
    console.page.wait_for_function("() => document.querySelectorAll('main tr.event').length >= 100", timeout=5000)
    elapsed = time.perf_counter() - started
    print(f"first 100 audit rows {elapsed:.3f} s after sign-in")
    assert elapsed < 1.0, f"first 100 rows after {elapsed:.2f} s"
    assert console.page.locator("main tr.event").count() == 100
    assert console.page.get_by_role("button", name="Load more").is_visible()


def test_an_event_is_shown_as_text_never_as_html(console, demo):
    console.sign_in(demo["keys"]["admin"], route="audit", expect="audit")
    cell = console.page.locator("main td.resource", has_text="onerror")
    assert cell.inner_text() == f"package: {XSS}"
    row = console.page.locator("main tr.event").filter(has_text="onerror")
    row.get_by_role("button").click()
    detail = console.page.locator("main tr.detail:not([hidden])")
    assert "</pre><script>alert(2)</script>" in detail.locator("pre").inner_text()
    assert console.page.locator("main img, main script").count() == 0
    time.sleep(0.3)  # an onerror handler would have run by now
    assert console.dialogs == [] and console.errors == []


def test_filters_load_more_details_and_the_live_tail(console, demo):
    post_json(console.base, "/audit-events", demo["keys"]["member"],
              {"event_type": "fix", "resource_type": "package", "resource_id": "left-pad", "org_id": "acme",
               "metadata": {"applied": True, "fix_count": 1, "from_version": "1.0.0", "to_version": "1.0.1"}},
              headers={"User-Agent": "upshift-cli/9.9 (console test)"})
    console.sign_in(demo["keys"]["admin"], route="audit", expect="audit")
    rows = console.page.locator("main tr.event")
    assert rows.count() == 100
    console.page.get_by_role("button", name="Load more").click()
    console.page.wait_for_function("() => document.querySelectorAll('main tr.event').length > 100")
    # Details: metadata, IP and user agent of the event the CLI posted over HTTP.
    fix_row = console.page.locator("main tr.event", has_text="left-pad")
    fix_row.get_by_role("button").click()
    detail = console.page.locator("main tr.detail:not([hidden])")
    assert "upshift-cli/9.9 (console test)" in detail.inner_text()
    assert "127.0.0.1" in detail.inner_text()
    assert '"to_version": "1.0.1"' in detail.locator("pre").inner_text()
    assert fix_row.get_by_role("button").get_attribute("aria-expanded") == "true"
    # Filters: by event type, then by actor.
    console.page.get_by_label("Event type").fill("fix")
    console.page.get_by_role("button", name="Apply filters").click()
    console.page.wait_for_function("() => document.querySelectorAll('main tr.event').length === 1")
    assert "left-pad" in rows.first.inner_text()
    console.page.get_by_role("button", name="Clear").click()
    console.page.get_by_label("Actor").select_option(label="admin@acme.test")
    console.page.get_by_role("button", name="Apply filters").click()
    console.page.wait_for_function("() => [...document.querySelectorAll('main tr.event')].every("
                                   "r => r.textContent.includes('admin@acme.test'))")
    console.page.get_by_label("Resource id").fill(XSS)
    console.page.get_by_role("button", name="Apply filters").click()
    console.page.wait_for_function("() => document.querySelectorAll('main tr.event').length === 1")
    # The live tail shows an event recorded after the page loaded, without reloading.
    console.page.get_by_role("button", name="Clear").click()
    console.page.wait_for_function("() => document.querySelectorAll('main tr.event').length === 100")
    console.page.get_by_label("Live tail").check()
    post_json(console.base, "/audit-events", demo["keys"]["ci"],
              {"event_type": "scan_upload", "resource_type": "repo", "resource_id": "acme/live-tail",
               "metadata": {"outdated_count": 0, "cwd": "/src"}, "org_id": "acme"})
    console.page.locator("main tr.event.new", has_text="acme/live-tail").wait_for(timeout=10_000)
    assert "acme/live-tail" in rows.first.inner_text()
    console.page.get_by_label("Live tail").uncheck()
    assert console.errors == []


def test_exports_download_csv_and_ndjson(console, demo):
    console.sign_in(demo["keys"]["viewer"], route="audit", expect="audit")
    with console.page.expect_download() as info:
        console.page.get_by_role("button", name="Export CSV").click()
    download = info.value
    assert download.suggested_filename == "audit-log-acme.csv"
    table = list(csv.reader(io.StringIO(Path(download.path()).read_text())))
    assert table[0][:3] == ["id", "seq", "org_id"] and len(table) > AUDIT_EVENTS
    assert any(XSS in row for row in table)
    with console.page.expect_download() as info:
        console.page.get_by_role("button", name="Export NDJSON").click()
    download = info.value
    assert download.suggested_filename == "audit-log-acme.ndjson"
    lines = Path(download.path()).read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) > AUDIT_EVENTS and {e["org_id"] for e in events} == {demo["org"]}
    assert not [u for u in console.requests if demo["keys"]["viewer"] in u]
    assert console.errors == []


# --- scratch databases: changes -------------------------------------------------------------------


@pytest.fixture
def scratch(pg_server_url: str, template_db: str, standin: sf.StripeStandIn) -> Iterator[dict[str, Any]]:
    """Demo-like data in a database of its own and a server on it, with Stripe played by the stand-in."""
    url = clone_database(pg_server_url, template_db, "console_scratch")
    data = seed_demo(url)
    with running_server(url, **stripe_env(standin)) as base:
        yield {**data, "url": url, "base": base}


@pytest.fixture
def scratch_console(context: BrowserContext, scratch: dict[str, Any]) -> Iterator[Console]:
    page = context.new_page()
    yield Console(page, scratch["base"])
    page.close()


def test_verify_succeeds_then_fails_after_a_row_is_tampered_with(scratch_console, scratch):
    c = scratch_console
    c.sign_in(scratch["keys"]["admin"], route="audit", expect="audit")
    c.page.get_by_role("button", name="Verify").click()
    ok = c.page.locator("main .verify-ok")
    ok.wait_for()
    assert re.fullmatch(r"Chain verified: \d+ events", ok.inner_text())
    head = c.page.locator("main .verify-result .mono").inner_text()
    assert re.fullmatch(r"Head: seq \d+, hash [0-9a-f]{64}", head)
    # As the superuser: change one row behind the append-only triggers' back, then put them back.
    with psycopg.connect(scratch["url"], autocommit=True) as conn, conn.transaction():
        conn.execute("alter table public.audit_logs disable trigger audit_logs_no_update")
        seq = conn.execute("update public.audit_logs set resource_id = 'tampered' where scope_id = %s and seq = 5"
                           " returning seq", (scratch["org"],)).fetchone()
        conn.execute("alter table public.audit_logs enable always trigger audit_logs_no_update")
    assert seq == (5,)
    c.page.get_by_role("button", name="Verify").click()
    broken = c.page.locator("main .verify-broken")
    broken.wait_for()
    assert broken.inner_text().startswith("Chain broken at seq 5 (content_mismatch)")
    assert broken.get_attribute("role") == "alert"
    assert c.page.locator("main .verify-ok").count() == 0
    color = broken.evaluate("e => getComputedStyle(e).color")
    assert color == "rgb(179, 38, 30)"  # red
    assert c.errors == []


def test_an_admin_invites_changes_roles_and_removes_members(scratch_console, scratch):
    c = scratch_console
    c.sign_in(scratch["keys"]["admin"], route="members", expect="members")
    page = c.page
    page.get_by_label("Email", exact=True).fill("new@acme.test")
    page.get_by_label("Role", exact=True).select_option("viewer")
    page.get_by_role("button", name="Send invite").click()
    token = page.get_by_label("Invite token")
    token.wait_for()
    assert token.input_value().startswith("upi_")
    invites = page.get_by_role("table", name="Pending invites")
    assert "new@acme.test" in invites.inner_text() and "viewer" in invites.inner_text()
    page.get_by_role("button", name="Revoke the invite for new@acme.test").click()
    page.get_by_role("button", name="Revoke invite").click()
    page.get_by_text("No pending invites.").wait_for()
    # Change the member's role, then remove the viewer (asked twice, in place: no browser dialog).
    page.get_by_label("Role of member@acme.test").select_option("viewer")
    page.get_by_text("member@acme.test is now viewer.").wait_for()  # the toast, after the list was read again
    c.wait_ready("members")
    assert page.get_by_label("Role of member@acme.test").input_value() == "viewer"
    page.get_by_role("button", name="Remove viewer@acme.test").click()
    page.get_by_role("button", name="Remove viewer@acme.test").click()  # the confirmation, same name
    page.wait_for_function("() => !document.querySelector('main').textContent.includes('viewer@acme.test')")
    # The last admin cannot demote themselves: the database says why, and the select goes back.
    page.get_by_label("Role of admin@acme.test").select_option("member")
    page.get_by_role("alert").wait_for()
    assert "admin" in page.get_by_role("alert").inner_text()
    assert page.get_by_label("Role of admin@acme.test").input_value() == "admin"
    with psycopg.connect(scratch["url"]) as conn:
        roles = dict(conn.execute("select u.email, m.role from public.org_members m join auth.users u on u.id = m.user_id"
                                  " where m.org_id = %s", (scratch["org"],)).fetchall())
    assert roles == {"admin@acme.test": "admin", "member@acme.test": "viewer"}
    assert [e for e in c.errors if "409" not in e] == []  # the refused demotion is the only failed request


def test_keys_are_created_once_copied_and_revoked(playwright, scratch):
    with browser_context(playwright, permissions=["clipboard-read", "clipboard-write"]) as ctx:
        c = Console(ctx.new_page(), scratch["base"])
        c.sign_in(scratch["keys"]["admin"], route="keys", expect="keys")
        page = c.page
        page.get_by_label("Key name").fill("Deploy bot")
        page.get_by_label("Kind").select_option("service")
        page.get_by_role("button", name="Create key").click()
        secret = page.get_by_label("New key secret")
        secret.wait_for()
        value = secret.input_value()
        assert value.startswith("ups_")
        page.get_by_role("button", name="Copy secret").click()
        page.get_by_role("button", name="Copied").wait_for()
        assert page.evaluate("() => navigator.clipboard.readText()") == value
        page.get_by_role("button", name="Done").click()
        c.wait_ready("keys")
        assert value not in page.locator("main").inner_text()  # shown once
        row = page.locator("main tbody tr", has_text="Deploy bot")
        assert "active" in row.inner_text()
        row.get_by_role("button", name="Revoke Deploy bot").click()
        row.get_by_role("button", name="Revoke Deploy bot").click()
        page.get_by_text("Deploy bot was revoked.").wait_for()  # the toast, then the list is read again
        c.wait_ready("keys")
        assert "revoked" in page.locator("main tbody tr", has_text="Deploy bot").inner_text()
        assert c.errors == []


def test_an_admin_buys_a_pack_through_stripe_checkout(scratch_console, scratch, standin):
    c = scratch_console
    page = c.page
    page.route("https://checkout.stripe.test/**",
               lambda route: route.fulfill(status=200, content_type="text/html", body="<title>Stripe Checkout</title>"))
    c.sign_in(scratch["keys"]["admin"], route="billing", expect="billing")
    assert page.locator("[data-feature=alerts]").inner_text().count("Not available yet") == 1
    assert page.locator("[data-feature=auto-top-up]").count() == 1
    with page.expect_navigation(url=re.compile(r"^https://checkout\.stripe\.test/")):
        page.get_by_role("button", name="Buy small pack (100 credits)").click()
    assert page.title() == "Stripe Checkout"
    sessions = [r for r in standin.requests if r["path"] == "/v1/checkout/sessions"]
    assert sessions[-1]["params"]["line_items"][0]["price"] == sf.PRICES["small"]
    assert sessions[-1]["params"]["metadata"]["account_id"] == scratch["org"]


# --- keyboard -----------------------------------------------------------------------------------


def test_keyboard_only(console, demo):
    page = console.page
    page.goto(f"{console.base}/console")
    console.wait_ready("signin")
    assert page.evaluate("document.activeElement.name") == "api-key"  # the field has the focus
    page.keyboard.type(demo["keys"]["admin"])
    page.keyboard.press("Enter")
    console.wait_ready("overview")
    # Tab to the Members link and follow it: the page's heading takes the focus.
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Members":
            break
    else:
        pytest.fail("Tab never reached the Members link")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # the focus is visible
    page.keyboard.press("Enter")
    console.wait_ready("members")
    assert page.evaluate("document.activeElement.tagName") == "H1"
    # Onwards into the page: the invite form is reachable and usable from the keyboard.
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('type')") == "email":
            break
    else:
        pytest.fail("Tab never reached the invite's Email field")
    # A details toggle on the audit page opens with the keyboard.
    console.open("audit")
    first = page.locator("main tr.event").first.get_by_role("button")
    first.focus()
    page.keyboard.press("Enter")
    assert first.get_attribute("aria-expanded") == "true"
    assert console.errors == []


# --- Supabase Auth -------------------------------------------------------------------------------


def test_supabase_sign_in_is_offered_only_when_configured(console, demo, playwright):
    console.page.goto(f"{console.base}/console")
    console.wait_ready("signin")
    assert console.page.get_by_role("button", name="Sign in with GitHub").count() == 0
    assert console.page.get_by_role("button", name="Email me a sign-in link").count() == 0

    # A Supabase project nobody answers for: the test stops each request at the browser and looks at it.
    supabase = "http://127.0.0.1:9"
    with running_server(demo["url"], SUPABASE_URL=supabase, SUPABASE_ANON_KEY="anon-public-key-for-tests") as base, \
            browser_context(playwright) as ctx:
        page = ctx.new_page()
        c = Console(page, base)
        seen: list[dict[str, Any]] = []

        def fake_supabase(route: Any) -> None:
            request = route.request
            seen.append({"url": request.url, "method": request.method, "headers": request.headers})
            if "/auth/v1/otp" in request.url:
                route.fulfill(status=200, content_type="application/json", body="{}")
            else:
                route.fulfill(status=200, content_type="text/html", body="<title>GitHub sign-in</title>")

        page.route(f"{supabase}/**", fake_supabase)
        page.goto(f"{base}/console")
        c.wait_ready("signin")
        page.get_by_label("Email", exact=True).fill("someone@acme.test")
        page.get_by_role("button", name="Email me a sign-in link").click()
        page.get_by_text("Check someone@acme.test for a sign-in link.").wait_for()
        otp = [s for s in seen if "/auth/v1/otp" in s["url"]]
        assert otp and otp[0]["method"] == "POST" and otp[0]["headers"]["apikey"] == "anon-public-key-for-tests"
        with page.expect_navigation(url=re.compile(r"/auth/v1/authorize\?provider=github")):
            page.get_by_role("button", name="Sign in with GitHub").click()
        assert "code_challenge=" in page.url  # PKCE: only a one-time code comes back in the URL, never a token
        # The API key field is still there, and the page's policy lets it talk to that project only.
        assert c.errors == []
