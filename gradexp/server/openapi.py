"""The OpenAPI 3.1 document of the API, served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from .._version import __version__

_RUN_PARAMS = [{"name": n, "in": "path", "required": True, "schema": {"type": "string",
                "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}} for n in ("entity", "project", "run_id")]
_ERR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON = {"content": {"application/json": {"schema": {"type": "object"}}}}


def _op(summary: str, *, params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
        ok: dict[str, Any] | None = None, codes: tuple[int, ...] = (401, 404)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": params or [],
                          "responses": {"200": ok or {"description": "OK", **_JSON}}}
    for code in codes:
        op["responses"][str(code)] = _ERR
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    return op


def openapi() -> dict[str, Any]:
    run = "/api/v1/runs/{entity}/{project}/{run_id}"
    key = {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "gradexp", "version": __version__,
                 "description": "Runs, history and tensors of gradexp. Authenticate with "
                                "'Authorization: Bearer <API key>'."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}}}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {**_op("Liveness", codes=()), "security": []}},
            "/api/v1/oauth/token": {"post": {
                "summary": "gradexp login: trade a single-use authorization code and its PKCE verifier "
                           "(RFC 7636, S256) for a new API key",
                "security": [], "parameters": [],
                "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                    "type": "object", "required": ["grant_type", "code", "code_verifier", "redirect_uri",
                                                   "client_id"],
                    "properties": {"grant_type": {"const": "authorization_code"}, "code": {"type": "string"},
                                   "code_verifier": {"type": "string"}, "redirect_uri": {"type": "string"},
                                   "client_id": {"const": "gradexp-cli"}}}}}},
                "responses": {
                    "200": {"description": "the key", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"api_key": {"type": "string"},
                                                         "token_type": {"const": "bearer"},
                                                         "user": {"type": "string"},
                                                         "entity": {"type": "string"}}}}}},
                    "400": {"description": "RFC 6749 error: invalid_grant (unknown, used or expired code, "
                                           "wrong verifier or redirect_uri), invalid_request, ...",
                            "content": {"application/json": {"schema": {"type": "object", "properties": {
                                "error": {"type": "string"}, "error_description": {"type": "string"}}}}}},
                }}},
            "/api/v1/viewer": {"get": _op("The authenticated user and entity", codes=(401,))},
            "/api/v1/projects": {"get": _op("Projects of the viewer's entity", codes=(401,))},
            "/api/v1/runs": {"get": _op("Runs, newest first", params=[
                {"name": "project", "in": "query", "schema": {"type": "string"}},
                {"name": "status", "in": "query", "schema": {"type": "string",
                 "enum": ["running", "finished", "failed", "crashed"]}},
                {"name": "tag", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}},
            ], codes=(401,))},
            run: {
                "put": _op("Create or update a run (idempotent)", params=_RUN_PARAMS, body=_JSON,
                           codes=(400, 401, 404)),
                "get": _op("Run metadata, config, summary and part counts", params=_RUN_PARAMS),
                "patch": _op("Update config, summary, name, tags or notes", params=_RUN_PARAMS, body=_JSON,
                             codes=(400, 401, 404)),
            },
            run + "/parts/{stream}/{seq}": {"put": _op(
                "Upload a sealed part. Same content again: no-op 200; other content: 409",
                params=_RUN_PARAMS + [
                    {"name": "stream", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["history", "tensors"]}},
                    {"name": "seq", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
                    {"name": "X-Gradexp-SHA256", "in": "header", "schema": {"type": "string"}}],
                body={"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                ok={"description": "already stored (identical)", **_JSON}, codes=(201, 400, 401, 404, 409, 413))},
            run + "/finish": {"post": _op(
                "Finish: checks the declared parts are present, compacts history to Parquet",
                params=_RUN_PARAMS, body=_JSON, codes=(400, 401, 404, 409))},
            run + "/history": {"get": _op("History", params=_RUN_PARAMS + [
                {"name": "format", "in": "query", "schema": {"type": "string",
                 "enum": ["arrow", "json", "parquet"], "default": "arrow"}},
                {"name": "keys", "in": "query", "schema": {"type": "string"},
                 "description": "comma-separated keys"}],
                ok={"description": "history", "content": {
                    "application/vnd.apache.arrow.stream": {}, "application/vnd.apache.parquet": {},
                    "application/json": {}}})},
            run + "/tensors": {"get": _op("Tensor keys", params=_RUN_PARAMS)},
            run + "/tensors/{key}/steps": {"get": _op("Steps at which a tensor was logged",
                                                      params=_RUN_PARAMS + [key])},
            run + "/tensors/{key}": {"get": _op(
                "The frame (docs/format.md) holding a tensor at a step: one range read of its part",
                params=_RUN_PARAMS + [key, {"name": "step", "in": "query", "required": True,
                                            "schema": {"type": "integer"}}],
                ok={"description": "frame", "content": {"application/x-gradexp-frame": {}}},
                codes=(400, 401, 404))},
        },
    }
