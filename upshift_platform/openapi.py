"""The OpenAPI 3.1 document, generated from the routes and the pydantic models that validate them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from . import __version__
from .models import Error
from .routing import Route, Router

_REASONS = {
    400: "Invalid input: the field is named in `field`",
    401: "Missing, malformed, unknown, revoked or expired token",
    402: "Not enough credits",
    403: "Authenticated, but this caller may not do this",
    404: "Not found (or not visible to this caller)",
    405: "Method not allowed on this path",
    409: "Conflict with the current state",
    413: "Payload too large",
    500: "Stripe should retry this event",
    502: "Stripe did not accept the request",
    503: "Not configured, or the database is unreachable",
}


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        name = model.__name__
        if name not in self.schemas:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, definition in schema.pop("$defs", {}).items():
                self.schemas.setdefault(def_name, definition)
            self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def parameters(self, route: Route) -> list[dict[str, Any]]:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in re.findall(r"\{(\w+)\}", route.pattern)
        ]
        if route.query is not None:
            schema = route.query.model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, definition in schema.pop("$defs", {}).items():
                self.schemas.setdefault(def_name, definition)
            required = set(schema.get("required", []))
            for name, prop in schema.get("properties", {}).items():
                param = {"name": name, "in": "query", "required": name in required, "schema": prop}
                if "array" in str(prop):
                    param.update(style="form", explode=True)
                params.append(param)
        if route.auth:
            params.append({"name": "X-Upshift-Org", "in": "header", "required": False,
                           "schema": {"type": "string", "maxLength": 64},
                           "description": "Org context (id or slug); same as org_id"})
        return params

    def operation(self, router: Router, route: Route) -> dict[str, Any]:
        op: dict[str, Any] = {
            "operationId": f"{router.name}_{route.name}",
            "summary": route.summary or route.name,
            "tags": [router.name],
            "parameters": self.parameters(route),
            "responses": {},
        }
        if route.auth:
            op["security"] = [{"bearer": []}]
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": self.ref(route.body)}}}
        ok: dict[str, Any] = {"description": "OK"}
        if route.media_types:
            ok["content"] = {media_type: {"schema": {"type": "string"}} for media_type in route.media_types}
        else:
            schema = self.ref(route.response) if route.response else {"type": "object"}
            ok["content"] = {"application/json": {"schema": schema}}
        op["responses"][str(route.status)] = ok
        codes = set(route.errors)
        if route.auth:
            codes.add(401)
        if route.body is not None or route.query is not None or "{" in route.pattern:
            codes.add(400)
        if route.body is not None:
            codes.add(413)
        codes.add(503)  # the database can always be unreachable
        for code in sorted(codes):
            model = route.error_models.get(code, Error)
            op["responses"][str(code)] = {"description": _REASONS.get(code, "Error"),
                                          "content": {"application/json": {"schema": self.ref(model)}}}
        return op


def document(routers: Mapping[str, Router], server_url: str | None = None) -> dict[str, Any]:
    builder = _Builder()
    paths: dict[str, Any] = {}
    seen: set[tuple[str, str]] = set()
    for router in routers.values():
        for route in router.routes:
            key = (route.method, route.pattern)
            if key in seen:
                continue
            seen.add(key)
            owner = router if route.pattern not in ("/health", "/openapi.json") else Router("common")
            paths.setdefault(route.pattern, {})[route.method.lower()] = builder.operation(owner, route)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "upshift platform", "version": __version__,
                 "description": "Org credit pools, immutable audit logs and Stripe billing behind the upshift CLI. "
                                "Errors are JSON: {\"error\": <stable code>, \"message\": <sentence>, ...}."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(builder.schemas.items())),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "A Supabase access token or an upshift API key"}}},
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
