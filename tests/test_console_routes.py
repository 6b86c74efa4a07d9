"""The console's files as the server answers them: where, with which type, under which policy.

No browser here (tests/test_console_browser.py drives one): the redirect, the content types,
the Content-Security-Policy and the other security headers, the config (which says whether
Supabase Auth and Stripe Checkout are configured, and holds nothing secret), and paths that try
to leave the console's folder.
"""

from __future__ import annotations

import re

import pytest

from upshift_platform import console_routes
from upshift_platform.settings import Settings, StripeSettings


def test_root_redirects_to_the_console(client):
    resp = client.get("/")
    assert resp.status_code == 302 and resp.headers["Location"] == "/console"


@pytest.mark.parametrize(("path", "content_type"), [
    ("/console", "text/html; charset=utf-8"),
    ("/console/", "text/html; charset=utf-8"),
    ("/console/js/main.js", "text/javascript; charset=utf-8"),
    ("/console/js/pages/audit.js", "text/javascript; charset=utf-8"),
    ("/console/style.css", "text/css; charset=utf-8"),
    ("/console/favicon.svg", "image/svg+xml"),
    ("/console/vendor/chart.js-4.6.1/chart.umd.min.js", "text/javascript; charset=utf-8"),
    ("/console/vendor/chart.js-4.6.1/LICENSE.md", "text/plain; charset=utf-8"),
    ("/console/vendor/supabase-js-2.119.1/supabase.js", "text/javascript; charset=utf-8"),
    ("/console/vendor/supabase-js-2.119.1/LICENSE", "text/plain; charset=utf-8"),
    ("/console/config.json", "application/json"),
])
def test_files_are_served_with_their_type_and_the_policy(client, path, content_type):
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == content_type
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "require-trusted-types-for 'script'" in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert client.head(path).headers["Content-Type"] == content_type


def test_the_page_has_no_inline_script_or_style(client):
    html = client.get("/console").get_data(as_text=True)
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)


@pytest.mark.parametrize("path", [
    "/console/nope.js", "/console/js/../../console_routes.py", "/console/%2e%2e/console_routes.py",
    "/console/..%2fconsole_routes.py", "/console/.hidden", "/console/js", "/console/vendor/README",
])
def test_paths_outside_the_console_files_are_404(client, path):
    resp = client.get(path)
    assert resp.status_code == 404
    assert b"console_routes" not in resp.data and b"import" not in resp.data


def test_the_api_still_answers_everything_else(client):
    assert client.get("/health").get_json()["status"] == "ok"
    assert client.get("/api/me").status_code == 401
    assert client.post("/console").status_code in (404, 405)  # the console is read-only: the API router answers


def test_config_without_supabase_or_stripe(client):
    assert client.get("/console/config.json").get_json() == {
        "supabase": None, "checkout": False, "packs": {"small": 100, "medium": 300, "large": 1000}}


def test_config_and_policy_with_supabase_and_stripe(db_url):
    settings = Settings(database_url=db_url, jwt_secret="x" * 40, supabase_url="https://abc.supabase.co/",
                        supabase_anon_key="anon-public-key", stripe=StripeSettings(secret_key="sk_test_x"))
    config = console_routes.config(settings)
    assert config["supabase"] == {"url": "https://abc.supabase.co/", "anon_key": "anon-public-key"}
    assert config["checkout"] is True
    assert "sk_test_x" not in str(config) and "x" * 40 not in str(config)  # nothing secret
    assert "connect-src 'self' https://abc.supabase.co;" in console_routes.content_security_policy(settings)
    # The URL alone, or the key alone, is not Supabase Auth.
    for partial in (Settings(database_url=db_url, supabase_url="https://abc.supabase.co"),
                    Settings(database_url=db_url, supabase_anon_key="anon-public-key"),
                    Settings(database_url=db_url, supabase_url="javascript:alert(1)", supabase_anon_key="k")):
        assert console_routes.config(partial)["supabase"] is None
        assert "connect-src 'self';" in console_routes.content_security_policy(partial)


def test_settings_read_the_anon_key():
    env = {"DATABASE_URL": "postgresql://x", "SUPABASE_JWT_SECRET": "s" * 40, "SUPABASE_URL": "https://a.supabase.co",
           "SUPABASE_ANON_KEY": "anon"}
    assert Settings.from_env(env).supabase_anon_key == "anon"
    assert Settings.from_env({**env, "SUPABASE_ANON_KEY": ""}).supabase_anon_key is None


def test_vendored_libraries_keep_their_licence_and_version():
    vendor = console_routes.CONSOLE_DIR / "vendor"
    readme = (vendor / "README.md").read_text()
    for folder, licence, version in (("chart.js-4.6.1", "LICENSE.md", "4.6.1"),
                                     ("supabase-js-2.119.1", "LICENSE", "2.119.1")):
        assert (vendor / folder / licence).read_text().startswith(("MIT License", "The MIT License"))
        assert folder in readme and version in readme
    assert "Chart.js v4.6.1" in (vendor / "chart.js-4.6.1" / "chart.umd.min.js").read_text()[:200]
    loader = (console_routes.CONSOLE_DIR / "js" / "vendor.js").read_text()
    assert "/console/vendor/chart.js-4.6.1/chart.umd.min.js" in loader
    assert "/console/vendor/supabase-js-2.119.1/supabase.js" in loader
