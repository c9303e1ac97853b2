"""The request and response models of the API, and the OpenAPI 3.1 document made from them.

The handlers in ``app.py`` validate every JSON body, query string and path parameter
with the models below, and ``/api/v1/openapi.json`` is generated from the same models,
so the document cannot drift from what the server accepts. The limits fit every
database the server runs on: ``INTEGER`` columns are 32-bit on PostgreSQL and MySQL,
steps are ``BIGINT``, PostgreSQL refuses NUL in text, ``runs.name`` is ``VARCHAR(256)``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from gradexp._version import __version__
from gradexp.core.layout import NAME_PATTERN
from gradexp.core.limits import EXIT_CODE_MAX as INT32_MAX
from gradexp.core.limits import INT_MAX as INT64_MAX
from gradexp.core.limits import INT_MIN as INT64_MIN

RUNS_PAGE_MAX = 1000
"""Most runs one ``GET /runs`` answers; clients follow ``next`` for the rest."""

RUN_NAME_MAX = 256
ROWS_STEPS_MAX = 1000
"""Steps one request for the rows of a tensor may name: its request line stays within what
servers and proxies accept (nginx: 8 KiB by default; clients ask for fewer steps at a time)."""

Text = Annotated[str, Field(pattern=r"^[^\x00]*$")]
"""A string stored in a column: any Unicode but NUL (PostgreSQL refuses it in text)."""
RunName = Annotated[str, Field(max_length=RUN_NAME_MAX, pattern=r"^[^\x00]*$")]
Id = Annotated[str, Field(pattern=NAME_PATTERN)]


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: a number with no fractional part, so ``3.0`` too (strict mode
    still refuses bools and strings)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int32 = Annotated[int, Field(ge=-(2**31), le=INT32_MAX), BeforeValidator(_json_integer)]
Seq = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX), BeforeValidator(_json_integer)]
Step = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Stream = Literal["history", "tensors", "console", "system"]
SideStream = Literal["console", "system"]
Status = Literal["running", "finished", "failed", "crashed"]
FiniteNumber = Annotated[float, Field(allow_inf_nan=False)]


def _encodable(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse a string that cannot be written as UTF-8 (an unpaired surrogate, sent as
    ``"\\ud800"``): every answer holding it would fail to encode."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError("holds a string that is not valid Unicode (an unpaired surrogate)") from None
    return value


JSONObject = Annotated[dict[str, Any], AfterValidator(_encodable)]
"""Any JSON object, nested, with NaN/Infinity/-Infinity allowed (config and summary)."""


class _Model(BaseModel):
    location: ClassVar[str] = "body field"
    """Where the values come from, for error messages: body field, query parameter, ..."""


class _Body(_Model):
    """A JSON body: exact types (no "1" for 1), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Params(_Model):
    """Query or path parameters: strings converted to their types, other parameters ignored."""

    model_config = ConfigDict(extra="ignore")


class RunPatch(_Body):
    """``PATCH`` a run: the fields given replace the stored ones."""

    name: RunName | None = None
    tags: list[Text] = Field(default_factory=list)
    notes: Text | None = None
    group: RunName | None = Field(default=None, description="runs of one experiment (wandb's group)")
    job_type: RunName | None = None
    config: JSONObject = Field(default_factory=dict)
    summary: JSONObject = Field(default_factory=dict)


class RunPut(RunPatch):
    """``PUT`` a run: create it, or replace the fields given."""

    created_at: FiniteNumber | None = Field(default=None, description="Unix seconds; now if not given")
    status: Literal["running"] | None = Field(
        default=None, description="running: reopen a finished run (a resumed run appends parts to it)")


class FinishBody(_Body):
    exit_code: Int32 | None = 0
    status: Literal["finished", "failed", "crashed"] | None = Field(
        default=None, description="finished if exit_code is 0, else failed, when not given")
    parts: dict[Stream, Count] = Field(default_factory=dict, description="parts uploaded, per stream")


class RecordBody(_Body):
    """``PUT`` a run's record: its ``run.json`` (host, argv, program, exit code, the exception
    and traceback of an uncaught error, the signal that killed it) and its code's provenance
    (git state and patch, installed distributions). Replaces what was stored."""

    meta: JSONObject = Field(default_factory=dict)
    provenance: JSONObject = Field(default_factory=dict)


class RunPath(_Params):
    location = "path parameter"
    entity: Id
    project: Id
    run_id: Id


class PartPath(_Params):
    location = "path parameter"
    stream: Stream
    seq: Seq


class TensorPath(_Params):
    location = "path parameter"
    key: Annotated[str, Field(min_length=1, pattern=r"^[^\x00]*$")]


class RunsQuery(_Params):
    location = "query parameter"
    project: Id | None = None
    status: Status | None = None
    tag: list[Text] = Field(default_factory=list, description="runs with all of these tags")
    limit: int = Field(default=RUNS_PAGE_MAX, ge=1, le=RUNS_PAGE_MAX, description="runs per page")
    cursor: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?_[0-9]+$")] | None = Field(
        default=None, description="the `next` of the previous page")


class HistoryQuery(_Params):
    location = "query parameter"
    format: Literal["arrow", "json", "parquet"] = "arrow"
    keys: Text | None = Field(default=None, description="comma-separated keys")


class StepQuery(_Params):
    location = "query parameter"
    step: Step


class RowsQuery(_Params):
    location = "query parameter"
    steps: list[Step] = Field(default_factory=list, max_length=ROWS_STEPS_MAX,
                              description="steps to read (repeat the parameter); every logged step if absent")


class SidePath(_Params):
    location = "path parameter"
    stream: SideStream


class SideQuery(_Params):
    location = "query parameter"
    since: Annotated[int, Field(ge=0, le=INT64_MAX)] = Field(
        default=0, description="rows from this step on (console: line number) only")
    format: Literal["arrow", "json"] = "arrow"


MODELS: tuple[type[_Model], ...] = (RunPatch, RunPut, FinishBody, RecordBody, RunPath, PartPath, TensorPath,
                                    RunsQuery, HistoryQuery, StepQuery, RowsQuery, SidePath, SideQuery)


# -- responses (documented, not validated at run time) ------------------------------------------

class Error(BaseModel):
    error: str


class Health(BaseModel):
    ok: bool
    version: str


class ViewerOut(BaseModel):
    user: str
    entity: str


class Project(BaseModel):
    name: str
    created_at: float
    runs: int


class Projects(BaseModel):
    projects: list[Project]


class Run(BaseModel):
    entity: str
    project: str
    id: str
    name: str | None
    status: Status
    tags: list[str]
    notes: str | None
    config: dict[str, Any]
    summary: dict[str, Any]
    created_at: float
    updated_at: float
    finished_at: float | None
    exit_code: int | None
    heartbeat_at: float | None


class RunWithParts(Run):
    parts: dict[str, int] = Field(description="parts stored, per stream")


class Runs(BaseModel):
    runs: list[Run]
    next: str | None = Field(description="cursor of the next page (pass as `cursor`); null on the last page")


class PartStored(BaseModel):
    stored: bool = Field(description="false: an identical part was already there")
    sha256: str


class HistoryJSON(BaseModel):
    columns: dict[str, list[Any]]


class RecordOut(BaseModel):
    meta: dict[str, Any]
    provenance: dict[str, Any]


class TensorKeys(BaseModel):
    keys: list[str]


class TensorSteps(BaseModel):
    steps: list[int]


_RESPONSES: tuple[type[BaseModel], ...] = (Error, Health, ViewerOut, Projects, Run, RunWithParts, Runs, PartStored,
                                           HistoryJSON, RecordOut, TensorKeys, TensorSteps)
_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=model.__name__)}


def _params(model: type[_Params], where: str) -> list[dict[str, Any]]:
    """OpenAPI parameters from the fields of ``model`` (``null`` dropped: a parameter is
    either absent or a string)."""
    props = model.model_json_schema(ref_template=_REF)["properties"]
    out = []
    for name, field in model.model_fields.items():
        schema = {k: v for k, v in props[name].items() if k not in ("title", "description")}
        if "anyOf" in schema:
            schema.update(next(s for s in schema.pop("anyOf") if s != {"type": "null"}))
        if "default" in schema and schema["default"] is None:
            del schema["default"]
        param = {"name": name, "in": where, "required": field.is_required(), "schema": schema}
        if field.description:
            param["description"] = field.description
        out.append(param)
    return out


def _json(model: type[BaseModel], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


_ERRORS = {400: "invalid request (the message names the field)", 401: "missing, invalid or revoked API key",
           404: "no such run (or another entity's)", 409: "conflict", 413: "request body over the limit",
           503: "database unavailable: retry (Retry-After)"}


def _op(summary: str, *, params: list[dict[str, Any]] | None = None, body: type[BaseModel] | None = None,
        ok: dict[str, Any], codes: tuple[int, ...] = (400, 401, 404)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": params or [], "responses": {"200": ok}}
    for code in (*codes, 503):
        op["responses"][str(code)] = _json(Error, _ERRORS[code])
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": _ref(body)}}}
    return op


def openapi() -> dict[str, Any]:
    run = "/api/v1/runs/{entity}/{project}/{run_id}"
    at_run = _params(RunPath, "path")
    _, defs = models_json_schema([(m, "validation") for m in MODELS if issubclass(m, _Body)]
                                 + [(m, "serialization") for m in _RESPONSES], ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "gradexp", "version": __version__,
                 "description": "Runs, history and tensors of gradexp. Authenticate with "
                                "'Authorization: Bearer <API key>'. Config and summary may hold the "
                                "JSON extensions NaN, Infinity and -Infinity, as Python's json does."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": defs["$defs"],
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", "security": [], "parameters": [],
                                 "responses": {"200": _json(Health)}}},
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
            "/api/v1/viewer": {"get": _op("The authenticated user and entity", ok=_json(ViewerOut), codes=(401,))},
            "/api/v1/projects": {"get": _op("Projects of the viewer's entity", ok=_json(Projects), codes=(401,))},
            "/api/v1/runs": {"get": _op("Runs, newest first", params=_params(RunsQuery, "query"), ok=_json(Runs),
                                        codes=(400, 401))},
            run: {
                "put": _op("Create or update a run (idempotent)", params=at_run, body=RunPut, ok=_json(Run),
                           codes=(400, 401, 404, 413)),
                "get": _op("Run metadata, config, summary and part counts", params=at_run,
                           ok=_json(RunWithParts)),
                "patch": _op("Update config, summary, name, tags or notes", params=at_run, body=RunPatch,
                             ok=_json(Run), codes=(400, 401, 404, 413)),
            },
            run + "/parts/{stream}/{seq}": {"put": {**_op(
                "Upload a sealed part. Same content again: no-op 200; other content: 409",
                params=at_run + _params(PartPath, "path") + [
                    {"name": "X-Gradexp-SHA256", "in": "header", "required": False, "schema": {"type": "string"}}],
                ok=_json(PartStored, "already stored (identical)"), codes=(400, 401, 404, 409, 413)),
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}},
            run + "/finish": {"post": _op(
                "Finish: checks the declared parts are present, compacts history to Parquet",
                params=at_run, body=FinishBody, ok=_json(Run), codes=(400, 401, 404, 409, 413))},
            run + "/history": {"get": _op("History", params=at_run + _params(HistoryQuery, "query"), ok={
                "description": "history", "content": {
                    "application/vnd.apache.arrow.stream": {}, "application/vnd.apache.parquet": {},
                    "application/json": {"schema": _ref(HistoryJSON)}}})},
            run + "/record": {
                "put": _op("Store the run's record (run.json) and its code's provenance", params=at_run,
                           body=RecordBody, ok=_json(RecordOut), codes=(400, 401, 404, 413)),
                "get": _op("The run's record and its code's provenance (empty objects if none was sent)",
                           params=at_run, ok=_json(RecordOut)),
            },
            run + "/streams/{stream}": {"get": _op(
                "A side stream: console lines (step = line number; stream, text) or system metrics "
                "(system/... columns), from step `since` on",
                params=at_run + _params(SidePath, "path") + _params(SideQuery, "query"), ok={
                    "description": "the stream's rows", "content": {
                        "application/vnd.apache.arrow.stream": {},
                        "application/json": {"schema": _ref(HistoryJSON)}}})},
            run + "/tensors": {"get": _op("Tensor keys", params=at_run, ok=_json(TensorKeys))},
            run + "/tensors/{key}/steps": {"get": _op("Steps at which a tensor was logged",
                                                      params=at_run + _params(TensorPath, "path"),
                                                      ok=_json(TensorSteps))},
            run + "/tensors/{key}/rows": {"get": _op(
                "Many steps of a tensor in one answer, in step order: an Arrow IPC stream with one row "
                "per stored frame, columns 'steps' (list<int64>: the steps asked for that the frame holds) "
                "and 'frame' (large_binary: the frame as in the part, docs/format.md); a frame of 256 KiB "
                "or more is a record batch of its own, smaller ones share batches of up to 8 MiB. "
                "404 naming the first step asked for that was not logged",
                params=at_run + _params(TensorPath, "path") + _params(RowsQuery, "query"),
                ok={"description": "frames", "content": {"application/vnd.apache.arrow.stream": {}}})},
            run + "/tensors/{key}": {"get": _op(
                "The frame (docs/format.md) holding a tensor at a step: one range read of its part",
                params=at_run + _params(TensorPath, "path") + _params(StepQuery, "query"),
                ok={"description": "frame", "content": {"application/x-gradexp-frame": {}}})},
        },
    }
