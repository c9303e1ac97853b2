"""Malformed authenticated requests get a 400 naming the field and store nothing; the API
holds up to schemathesis over every operation of its OpenAPI document.

A real server (``python -m gradexp server``) per backend, SQLite, PostgreSQL and
MariaDB, on loopback. Bodies are sent as raw JSON text, so the NaN/Infinity tokens, huge integers,
NUL and unpaired-surrogate escapes reach the server exactly as written here.
"""

from __future__ import annotations

import collections
import json
import math
import re
import time
from typing import Any

import pytest
import requests
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

import gradexp
from gradexp.server import db
from services import GradexpServer, values

BACKENDS = ["sqlite", "postgresql", "mariadb"]
RUN = "/runs/alice/p/good"
ORIGINAL = {"name": "good run", "tags": ["a", "b"], "notes": "kept", "config": {"lr": 0.1, "net": {"layers": [3, 4]}},
            "summary": {"loss": 0.5}, "created_at": 1_700_000_000.5}
KEPT = ("name", "tags", "notes", "config", "summary", "created_at", "status", "exit_code", "finished_at", "parts")


@pytest.fixture(scope="module", params=BACKENDS)
def srv(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"validation-{request.param}")
    if request.param == "sqlite":
        db_url = f"sqlite:///{work / 'gradexp.db'}"
    else:
        db_url = request.getfixturevalue({"postgresql": "postgres", "mariadb": "mariadb"}[request.param]).new_database()
    server = GradexpServer(work, db_url=db_url, store_url=str(work / "objects"))
    engine = db.connect(db_url)  # users made in this process: four CLI runs cost ~30 s here
    try:
        db.migrate(engine)
        for name in ("alice", "carol", "dave", "fuzz"):
            db.create_user(engine, name)
        server.keys = {name: db.create_key(engine, name) for name in ("alice", "carol", "dave", "fuzz")}
    finally:
        engine.dispose()
    server.start()
    r = call(server, "PUT", RUN, json=ORIGINAL)
    assert r.status_code == 200, r.text
    server.original = call(server, "GET", RUN).json()
    yield server
    server.stop()


def call(srv: GradexpServer, method: str, path: str, *, user: str = "alice", raw: str | None = None,
         **kw: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {srv.keys[user]}"}
    if raw is not None:
        kw["data"], headers["Content-Type"] = raw.encode(), "application/json"
    return requests.request(method, srv.url + "/api/v1" + path, headers=headers, timeout=60, **kw)


def refused(r: requests.Response, field: str) -> None:
    """A 400 whose message names ``field``."""
    assert r.status_code == 400, (r.status_code, r.text)
    assert field in r.json()["error"], r.json()


def assert_nothing_stored(srv: GradexpServer) -> None:
    """The run keeps its values, and listing the user's runs still works and shows only it."""
    r = call(srv, "GET", RUN)
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in KEPT} == {k: srv.original[k] for k in KEPT}
    assert srv.original["status"] == "running" and srv.original["parts"] == {}
    r = call(srv, "GET", "/runs")
    assert r.status_code == 200, r.text
    assert [x["id"] for x in r.json()["runs"]] == ["good"]


# -- run metadata: PUT and PATCH -----------------------------------------------------------------

BAD_FIELDS = [  # (raw JSON body, the field the message must name)
    ('{"name": {"a": 1}}', "name"),
    ('{"name": ["x"]}', "name"),
    ('{"name": 5}', "name"),
    ('{"name": NaN}', "name"),
    ('{"name": "a\\u0000b"}', "name"),
    ('{"name": "%s"}' % ("x" * 257), "name"),
    ('{"name": "a\\ud800"}', "name"),
    ('{"notes": {"a": 1}}', "notes"),
    ('{"notes": Infinity}', "notes"),
    ('{"notes": "a\\u0000"}', "notes"),
    ('{"tags": "x"}', "tags"),
    ('{"tags": null}', "tags"),
    ('{"tags": {"a": 1}}', "tags"),
    ('{"tags": [1]}', "tags"),
    ('{"tags": [["x"]]}', "tags"),
    ('{"tags": ["a\\u0000"]}', "tags"),
    ('{"config": null}', "config"),
    ('{"config": [1, 2]}', "config"),
    ('{"config": {"k": "\\udc00"}}', "config"),
    ('{"summary": "x"}', "summary"),
    ('{"summary": {"k": ["\\ud800"]}}', "summary"),
    ('{"bogus": 1}', "bogus"),
]
BAD_CREATED_AT = [(f'{{"created_at": {v}}}', "created_at") for v in (
    '"abc"', '"1.5"', "NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400, "true", "[1]", '{"a": 1}')]
BAD_BODIES = [("not json", "JSON"), ("[1, 2]", "object"), ('"x"', "object"), ("[" * 100_000, "nested")]


@pytest.mark.parametrize("raw, field", BAD_FIELDS + BAD_CREATED_AT + BAD_BODIES)
def test_put_run_refuses_malformed_fields_and_stores_nothing(srv, raw, field):
    refused(call(srv, "PUT", RUN, raw=raw), field)
    refused(call(srv, "PUT", "/runs/alice/p/fresh", raw=raw), field)
    assert call(srv, "GET", "/runs/alice/p/fresh").status_code == 404
    assert_nothing_stored(srv)


@pytest.mark.parametrize("raw, field", BAD_FIELDS + BAD_BODIES + [('{"created_at": 5}', "created_at")])
def test_patch_run_refuses_malformed_fields_and_stores_nothing(srv, raw, field):
    refused(call(srv, "PATCH", RUN, raw=raw), field)
    assert_nothing_stored(srv)


def test_the_limits_themselves_are_accepted(srv):
    """A name of exactly 256 characters, any Unicode but NUL, and created_at as an int."""
    name = "é" * 255 + "\U0001f600"
    r = call(srv, "PUT", "/runs/carol/p/limits", user="carol",
             json={"name": name, "notes": "ü\t\n", "tags": ["∑", ""], "created_at": 1_700_000_000})
    assert r.status_code == 200, r.text
    got = call(srv, "GET", "/runs/carol/p/limits", user="carol").json()
    assert (got["name"], got["notes"], got["tags"], got["created_at"]) == (name, "ü\t\n", ["∑", ""], 1_700_000_000)


def test_metadata_over_64_kib_is_stored_on_every_database(srv):
    """A summary of 5,000 metrics (~130 KB of JSON), notes of 70,000 characters, 700 tags:
    each over the 64 KiB that MySQL/MariaDB's TEXT holds."""
    fields = {"summary": {f"metric/{i}": i / 7 for i in range(5000)}, "notes": "n" * 70_000,
              "tags": [f"{i:03d}" + "t" * 100 for i in range(700)], "config": {"blob": "c" * 70_000}}
    r = call(srv, "PUT", "/runs/carol/p/big", user="carol", json=fields)
    assert r.status_code == 200, r.text
    got = call(srv, "GET", "/runs/carol/p/big", user="carol").json()
    assert {k: got[k] for k in fields} == fields


def test_json_bodies_over_the_limit_get_413(srv):
    raw = '{"notes": "' + "x" * (8 << 20) + '"}'
    r = call(srv, "PUT", RUN, raw=raw)
    assert r.status_code == 413 and "limit" in r.json()["error"], r.text
    assert_nothing_stored(srv)


NON_FINITE = '{"lr": NaN, "inf": Infinity, "ninf": -Infinity, "deep": {"x": [NaN, 1.5, {"y": -Infinity}]}}'


def test_non_finite_config_and_summary_are_accepted_and_stored_exactly(srv):
    """NaN/Infinity/-Infinity (the tokens Python's json writes) in config and summary, at any
    depth, are stored as sent, and the answer carries them back as the same tokens."""
    for method in ("PUT", "PATCH"):
        r = call(srv, method, "/runs/carol/p/nonfinite", user="carol",
                 raw=f'{{"config": {NON_FINITE}, "summary": {NON_FINITE}}}')
        assert r.status_code == 200, r.text
        answered = json.loads(r.text)
        assert math.isnan(answered["config"]["lr"]) and answered["summary"]["ninf"] == -math.inf
        engine = db.connect(srv.db_url)
        try:
            with engine.connect() as conn:
                row = conn.execute(sa.select(db.runs.c.config, db.runs.c.summary)
                                   .where(db.runs.c.run_id == "nonfinite")).one()
        finally:
            engine.dispose()
        for stored in row:
            got = json.loads(stored)
            assert math.isnan(got["lr"]) and got["inf"] == math.inf and got["ninf"] == -math.inf
            assert math.isnan(got["deep"]["x"][0]) and got["deep"]["x"][1:] == [1.5, {"y": -math.inf}]


def test_runs_damaged_by_older_servers_do_not_fail_every_listing(srv):
    """Before validation, ``"tags": null`` or an object was stored as sent: listing runs,
    with or without a tag filter, must still answer."""
    assert call(srv, "PUT", "/runs/dave/p/legacy", user="dave", json={"tags": ["x"]}).status_code == 200
    engine = db.connect(srv.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(db.runs).where(db.runs.c.run_id == "legacy").values(tags="null"))
    finally:
        engine.dispose()
    for query in ("", "?tag=x"):
        r = call(srv, "GET", "/runs" + query, user="dave")
        assert r.status_code == 200, r.text
        assert "legacy" not in [x["id"] for x in r.json()["runs"]] if query else "legacy" in r.text


# -- finish ----------------------------------------------------------------------------------------

BAD_FINISH = [(f'{{"exit_code": {v}}}', "exit_code") for v in (
    "1" + "0" * 30, "2147483648", "-2147483649", '"1"', "1.5", "true", "NaN", "[0]")] + [
    ('{"parts": {"history": "x"}}', "parts"),
    ('{"parts": null}', "parts"),
    ('{"parts": [1]}', "parts"),
    ('{"parts": {"history": -1}}', "parts"),
    ('{"parts": {"history": 2147483648}}', "parts"),
    ('{"parts": {"nope": 1}}', "parts"),
    ('{"status": "running"}', "status"),
    ('{"status": 5}', "status"),
    ('{"bogus": 1}', "bogus"),
] + BAD_BODIES


@pytest.mark.parametrize("raw, field", BAD_FINISH)
def test_finish_refuses_malformed_fields_and_stores_nothing(srv, raw, field):
    refused(call(srv, "POST", RUN + "/finish", raw=raw), field)
    assert_nothing_stored(srv)


# -- path and query parameters ------------------------------------------------------------------------

@pytest.mark.parametrize("stream, seq", [("history", 2**31), ("tensors", 2**63), ("history", 2**64 + 5),
                                         ("history", 10**30), ("nope", 0)])
def test_part_paths_out_of_range_are_refused_before_the_body(srv, stream, seq):
    r = requests.put(f"{srv.url}/api/v1{RUN}/parts/{stream}/{seq}", data=b"GXP-not-a-part", timeout=60,
                     headers={"Authorization": f"Bearer {srv.keys['alice']}",
                              "Content-Type": "application/octet-stream"})
    refused(r, "stream" if stream == "nope" else "seq")
    assert_nothing_stored(srv)


STEPS = ["step=1e20", "step=100000000000000000000", "step=9223372036854775808", "step=-9223372036854775809",
         "step=abc", "step=1.5", "step="]


@pytest.mark.parametrize("endpoint, query", [("/tensors/w", q) for q in STEPS + [""]]
                         + [("/tensors/w/steps", q) for q in STEPS])
def test_steps_beyond_int64_or_not_integers_get_400(srv, endpoint, query):
    refused(call(srv, "GET", f"{RUN}{endpoint}?{query}"), "step")


@pytest.mark.parametrize("step", [2**63 - 1, -(2**63), 0])
def test_steps_at_the_int64_limits_are_looked_up(srv, step):
    r = call(srv, "GET", f"{RUN}/tensors/w?step={step}")
    assert r.status_code == 404 and "no step" in r.json()["error"], r.text


@pytest.mark.parametrize("path, field", [
    ("/runs?project=a%00b", "project"), ("/runs?project=a%2Fb", "project"), ("/runs?status=bogus", "status"),
    ("/runs?tag=a%00", "tag"), (RUN + "/tensors/a%00b", "key"), (RUN + "/tensors/a%00b/steps", "key"),
    (RUN + "/history?format=xml", "format"), ("/runs/alice/p/a%00b", "run_id"),
])
def test_query_and_path_parameters_are_checked(srv, path, field):
    refused(call(srv, "GET", path), field)
    assert_nothing_stored(srv)


def test_unrouted_api_paths_answer_json(srv):
    r = call(srv, "GET", RUN + "/tensors/a%0Ab")  # the path convertor does not match a newline
    assert r.status_code == 404 and r.json()["error"]
    r = call(srv, "DELETE", RUN)
    assert r.status_code == 405 and r.json()["error"]
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "PATCH", "PUT"}


# -- the OpenAPI document and schemathesis -----------------------------------------------------------

def test_openapi_request_bodies_are_schemas_not_nested_content(srv):
    doc = requests.get(srv.url + "/api/v1/openapi.json", timeout=30).json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for media in op.get("requestBody", {}).get("content", {}).values():
                assert "content" not in media and "schema" in media, (method, path)
            for response in op["responses"].values():
                for media in response.get("content", {}).values():
                    assert "content" not in media, (method, path)
    schemas = doc["components"]["schemas"]
    assert schemas["RunPut"]["properties"]["name"]["anyOf"][0]["maxLength"] == 256
    assert schemas["FinishBody"]["properties"]["exit_code"]["anyOf"][0]["maximum"] == 2**31 - 1


FIXED_EXAMPLES, FREE_EXAMPLES = 8, 3
"""Examples per operation and generation mode (positive, negative): with the path of a
real run of the fuzzing user, and with generated paths (mostly 404s)."""


def test_schemathesis_over_every_operation(srv, tmp_path):
    # A run with real parts, so reads of history and tensors reach real data.
    run = gradexp.init("src", id="src", dir=tmp_path, part_max_bytes=2048, part_max_age=600)
    for step in range(20):
        run.log(values(step))
    run.finish()
    fz = "/runs/fuzz/p/fz"
    assert call(srv, "PUT", fz, user="fuzz", json={"config": {"lr": 0.1}}).status_code == 200
    for part in sorted((run.dir / "parts").glob("*.gxp")):
        stream, _, seq = part.stem.rpartition("-")
        r = requests.put(f"{srv.url}/api/v1{fz}/parts/{stream}/{int(seq)}", data=part.read_bytes(), timeout=60,
                         headers={"Authorization": f"Bearer {srv.keys['fuzz']}"})
        assert r.status_code == 201, r.text

    config = schemathesis.Config.from_dict({"headers": {"Authorization": f"Bearer {srv.keys['fuzz']}"}})
    schema = schemathesis.openapi.from_url(srv.url + "/api/v1/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {(m.upper(), p) for p, ops in requests.get(srv.url + "/api/v1/openapi.json").json()["paths"].items()
                  for m in ops}
    assert {(op.method.upper(), op.path) for op in operations} == documented  # none skipped

    cases: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    failures: dict[tuple[str, str], str] = {}
    started = time.monotonic()
    for op in operations:
        own = {"entity": "fuzz", "project": "p", "run_id": "fz"}
        fixed = {k: v for k, v in own.items() if k in {p.name for p in op.path_parameters}}
        # Data that fits the schema is still refused when it is not a sealed part or a live login
        # code: JSON Schema cannot say either, so "valid data is accepted" does not apply there.
        excluded = ([schemathesis.checks.positive_data_acceptance]
                    if op.path.endswith(("/parts/{stream}/{seq}", "/oauth/token")) else [])
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for path_params, n in ((fixed, FIXED_EXAMPLES), ({}, FREE_EXAMPLES if fixed else 0)):
                if not n:
                    continue

                @given(op.as_strategy(mode, path_parameters=path_params or None))
                @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
                def check(case: Any) -> None:
                    cases[op.label] += 1
                    try:
                        response = case.call_and_validate(excluded_checks=excluded)
                        statuses[response.status_code] += 1
                    except BaseException as e:  # schemathesis raises a group of failed checks
                        for name in set(re.findall(r"- (ST\d+ [^\n]*)", str(e))) or {type(e).__name__}:
                            failures.setdefault((op.label, name), str(e)[:2000])
                try:
                    check()
                except Unsatisfiable:  # nothing to make invalid: every parameter is fixed, no body
                    assert mode == GenerationMode.NEGATIVE, op.label
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {len(operations)} operations, {sum(cases.values())} cases in {elapsed:.0f} s, "
          f"statuses {dict(sorted(statuses.items()))}, {len(failures)} failures")
    assert not failures, "\n\n".join(f"{op}: {name}\n{text}" for (op, name), text in failures.items())
    assert set(cases) == {op.label for op in operations}
    assert not any(s >= 500 for s in statuses)
