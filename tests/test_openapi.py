"""The OpenAPI document: valid 3.1, every route described, generated from the validating models."""

from __future__ import annotations

import json
import logging

from openapi_spec_validator import validate

from tests.conftest import bearer, make_token


def test_openapi_is_valid_and_complete(client, platform):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.get_json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    for router in platform.routers.values():
        for route in router.routes:
            op = doc["paths"][route.pattern][route.method.lower()]
            assert op["summary"]
            if route.body is not None:
                assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(route.body.__name__)
            if route.auth:
                assert "401" in op["responses"]
    consume = doc["paths"]["/credits/consume"]["post"]
    assert consume["responses"]["402"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "InsufficientCredits")
    schema = doc["components"]["schemas"]["Consume"]
    assert schema["properties"]["count"]["minimum"] == 1  # described: debit_credits enforces it
    params = {p["name"] for p in doc["paths"]["/api/audit-logs"]["get"]["parameters"]}
    assert {"org_id", "since", "until", "event_type", "actor", "limit", "cursor"} <= params


def test_request_log_line(client, world, caplog):
    u = world.user()
    token = make_token(u)
    with caplog.at_level(logging.INFO, logger="upshift.request"):
        client.get("/billing/status", headers={**bearer(token), "X-Request-Id": "req-123"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "upshift.request"]
    assert lines[-1]["request_id"] == "req-123" and lines[-1]["actor_id"] == u and lines[-1]["status"] == 200
    assert set(lines[-1]) == {"function", "method", "path", "status", "duration_ms", "request_id", "actor_id", "org_id"}
    assert token not in caplog.text
