"""Fuzzing with schemathesis against /openapi.json, in-process over WSGI, with a real database.

Checks: no 5xx, every status and content type is documented, every JSON body matches its
documented schema, and every error is JSON with an `error` code. (Driven through
``operation.as_strategy()`` with hypothesis directly: schemathesis' pytest plugin does not run
under pytest 9.)
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.conftest import stripe_settings
from upshift_platform.app import Platform, create_wsgi_app
from upshift_platform.signing import AuditSigningKey

MAX_EXAMPLES = int(os.environ.get("UPSHIFT_FUZZ_EXAMPLES", "25"))
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]


def errors_are_json_with_code(response) -> None:
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict), f"error body is not an object: {body!r}"
        assert isinstance(body.get("error"), str) and body["error"], f"no error code: {body!r}"
        assert isinstance(body.get("message"), str), f"no message: {body!r}"


@pytest.fixture
def api(db_url, world, standin):
    admin = world.user("fuzz-admin@acme.test")
    org = world.org("acme", plan="team", balance=1000, admin=admin)
    key = world.key(admin, org=org)["secret"]
    plat = Platform(stripe_settings(db_url, standin, audit_signing_key=AuditSigningKey.from_seed(b"\x05" * 32),
                                    jobs_token="fuzz-jobs-token"))
    app = create_wsgi_app(plat)
    yield schemathesis.openapi.from_wsgi("/openapi.json", app), {"Authorization": f"Bearer {key}"}
    plat.close()


def operations():
    from upshift_platform.app import build_routers

    seen = set()
    for router in build_routers().values():
        for route in router.routes:
            if (route.method, route.pattern) not in seen:
                seen.add((route.method, route.pattern))
                yield pytest.param(route.method, route.pattern, id=f"{route.method} {route.pattern}")


@pytest.mark.parametrize(("method", "path"), list(operations()))
def test_fuzz(api, method, path):
    schema, headers = api
    operation = schema[path][method]
    calls = []

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        errors_are_json_with_code(response)
        calls.append(response.status_code)

    run()
    assert calls
