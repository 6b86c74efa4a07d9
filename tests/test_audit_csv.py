"""CSV exports cannot smuggle spreadsheet formulas (OWASP CSV injection); NDJSON stays verbatim."""

from __future__ import annotations

import csv
import io
import json

import pytest

from tests.conftest import bearer, make_token
from upshift_platform import cli, csvsafe

PAYLOADS = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(1)", "\tx", "\rx"]
HARMLESS = ["a=b", "x-1", "plain", ""]
AGENT = "=cmd|' /C calc'!A0"


@pytest.fixture
def acme(world, client):
    admin = world.user("admin@acme.test")
    org = world.org("acme", plan="team", admin=admin)
    ci = world.key(admin, kind="service", org=org)["secret"]
    events = [{"event_type": "deploy", "resource_type": "app", "resource_id": v, "org_id": "acme"}
              for v in PAYLOADS + HARMLESS]
    resp = client.post("/audit-events", json={"events": events},
                       headers={"Content-Type": "application/json", "User-Agent": AGENT, **bearer(ci)})
    assert resp.status_code == 201, resp.get_json()
    return {"org": org, "admin": admin}


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def check_escaped(rows: list[dict[str, str]]) -> None:
    deploys = [r for r in rows if r["event_type"] == "deploy"]
    assert [r["resource_id"] for r in deploys] == ["'" + v for v in PAYLOADS] + HARMLESS
    assert {r["user_agent"] for r in deploys} == {"'" + AGENT}
    for row in rows:
        for value in row.values():
            assert not value.startswith(csvsafe.FORMULA_PREFIXES), value


def test_http_csv_export_escapes_formula_cells(client, acme):
    resp = client.get("/api/audit-logs/export?org_id=acme&format=csv", headers=bearer(make_token(acme["admin"])))
    assert resp.status_code == 200
    check_escaped(csv_rows(resp.get_data(as_text=True)))


def test_http_ndjson_export_is_verbatim(client, acme):
    resp = client.get("/api/audit-logs/export?org_id=acme&format=ndjson", headers=bearer(make_token(acme["admin"])))
    rows = [json.loads(line) for line in resp.get_data(as_text=True).splitlines()]
    deploys = [r for r in rows if r["event_type"] == "deploy"]
    assert [r["resource_id"] for r in deploys] == PAYLOADS + HARMLESS
    assert {r["user_agent"] for r in deploys} == {AGENT}


def test_cli_csv_export_escapes_formula_cells(acme, db_url, monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", db_url)
    out = tmp_path / "audit.csv"
    assert cli.main(["audit", "export", "--org", "acme", "--format", "csv", "--output", str(out)]) == 0
    check_escaped(csv_rows(out.read_bytes().decode()))
    assert cli.main(["audit", "export", "--org", "acme", "--output", str(tmp_path / "a.ndjson")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.ndjson").read_text().splitlines()]
    assert [r["resource_id"] for r in rows if r["event_type"] == "deploy"] == PAYLOADS + HARMLESS


@pytest.mark.parametrize(("value", "cell"), [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-2", "'-2"), ("@x", "'@x"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    (-5, "'-5"), (None, ""), ("", ""), ("a=b", "a=b"), ({"a": "=b"}, '{"a":"=b"}'), (["=x"], '["=x"]'), (7, "7"),
])
def test_cell(value, cell):
    assert csvsafe.cell(value) == cell


def test_line_quotes_what_needs_quoting():
    assert csvsafe.line(["=a,b", "\rx", 'say "hi"']) == '"\'=a,b","\'\rx","say ""hi"""\r\n'
