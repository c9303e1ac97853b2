"""Account promises that mutation testing found untested (issue #9, item 17): session
expiry, tokens stored only as hashes, the one-live-sign-in-link rule, and each of the
three sign-in rate limits on its own.

The numbers are the documented ones (docs/deploy.md), written out rather than read from
``accounts``: a test that reads the limit from the code cannot notice the limit changing.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from test_accounts import authorize, grant_params, pkce, use_link

from gradexp.server import accounts, db
from services import GradexpServer, WebSession

PASSWORD = "correct horse battery"
WINDOW = 300  # seconds a failed sign-in counts
PER_NAME_AND_ADDRESS = 5
PER_NAME = 50
PER_ADDRESS = 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = GradexpServer(tmp_path_factory.mktemp("blindspots-accounts")).start()
    server.engine = db.connect(f"sqlite:///{server.data_dir / 'gradexp.db'}")
    yield server
    server.stop()
    server.engine.dispose()


def user(srv, name: str, password: str | None = PASSWORD) -> str:
    db.create_user(srv.engine, name)
    if password is not None:
        accounts.set_password(srv.engine, name, password)
    return name


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def signed_in(srv, name: str) -> WebSession:
    web = WebSession(srv.url)
    assert web.sign_in(name, PASSWORD).status_code == 303
    return web


def session_cookie(web: WebSession) -> str:
    return web.http.cookies["gx_session"]


# -- sessions -------------------------------------------------------------------------------------

def test_an_expired_session_is_refused(srv):
    web = signed_in(srv, user(srv, "erin"))
    assert web.get("/keys", allow_redirects=False).status_code == 200
    with srv.engine.begin() as conn:  # the clock moves on past the session's end
        n = conn.execute(sa.update(db.sessions).where(db.sessions.c.token_hash == sha(session_cookie(web)))
                         .values(expires_at=time.time() - 1)).rowcount
    assert n == 1
    r = web.get("/keys", allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    r = web.form_post("/login", "/keys", {"name": "after expiry"})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_a_session_lasts_fourteen_days(srv):
    web = WebSession(srv.url)
    r = web.sign_in(user(srv, "ezra"), PASSWORD)
    cookie = next(c for c in r.raw.headers.getlist("set-cookie") if c.startswith("gx_session="))
    assert "Max-Age=1209600" in cookie
    with srv.engine.connect() as conn:
        created, expires = conn.execute(sa.select(db.sessions.c.created_at, db.sessions.c.expires_at)
                                        .where(db.sessions.c.token_hash == sha(session_cookie(web)))).one()
    assert expires - created == pytest.approx(14 * 24 * 3600)


def all_cells(engine) -> str:
    """Every value of every table, as one string to search."""
    out = []
    with engine.connect() as conn:
        for table in db.meta.sorted_tables:
            for row in conn.execute(sa.select(table)):
                out.extend(str(v) for v in row)
    return "\n".join(out)


def test_tokens_are_stored_only_as_their_sha256(srv):
    web = signed_in(srv, user(srv, "hana"))
    session = session_cookie(web)
    r = web.form_post("/keys", "/keys", {"name": "hashed"})
    key = r.text.split('id="new-key">')[1].split("<")[0]
    verifier, challenge = pkce()
    code = authorize(web, grant_params(challenge))["code"]
    link = accounts.new_signin_link(srv.engine, "hana")
    tokens = {"session": session, "key": key, "code": code, "link": link}
    assert all(len(t) >= 43 for t in tokens.values()), tokens
    cells = all_cells(srv.engine)
    for what, token in tokens.items():
        assert token not in cells, f"the raw {what} token is stored"
    with srv.engine.connect() as conn:
        def count(column: Any, token: str) -> int:
            return conn.execute(sa.select(sa.func.count()).where(column == sha(token))).scalar()
        assert count(db.sessions.c.token_hash, session) == 1
        assert count(db.api_keys.c.hash, key) == 1
        assert count(db.auth_codes.c.code_hash, code) == 1
        assert count(db.signin_links.c.token_hash, link) == 1
    # and each still works, checked by its hash
    assert web.get("/keys", allow_redirects=False).status_code == 200
    assert requests.get(f"{srv.url}/api/v1/viewer", headers={"Authorization": f"Bearer {key}"},
                        timeout=30).json()["user"] == "hana"
    r = requests.post(f"{srv.url}/api/v1/oauth/token", timeout=30, data={
        "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
        "redirect_uri": grant_params(challenge)["redirect_uri"], "client_id": "gradexp-cli"})
    assert r.status_code == 200 and r.json()["user"] == "hana"
    assert use_link(WebSession(srv.url), f"{srv.url}/login/link?token={link}").status_code == 303


# -- one-time sign-in links -------------------------------------------------------------------------

def link_url(srv, token: str) -> str:
    return f"{srv.url}/login/link?token={token}"


def signs_in_as(srv, token: str) -> str | None:
    """The user a link signs in, or None if it is refused."""
    web = WebSession(srv.url)
    r = use_link(web, link_url(srv, token))
    if r.status_code != 303:
        assert r.status_code == 400 and "unknown, used or expired" in r.text
        return None
    page = web.get("/account")
    return page.text.split("Signed in as <b>")[1].split("<")[0]


def test_a_newer_link_kills_the_older_ones_of_that_user_only(srv):
    user(srv, "lena", None)
    user(srv, "lars", None)
    old = accounts.new_signin_link(srv.engine, "lena")
    other = accounts.new_signin_link(srv.engine, "lars")
    new = accounts.new_signin_link(srv.engine, "lena")
    assert signs_in_as(srv, old) is None
    assert signs_in_as(srv, new) == "lena"
    assert signs_in_as(srv, new) is None  # once
    assert signs_in_as(srv, other) == "lars"  # another user's link lives on


def test_a_link_dies_after_a_day(srv):
    user(srv, "lola", None)
    token = accounts.new_signin_link(srv.engine, "lola")
    with srv.engine.begin() as conn:
        expires = conn.execute(sa.select(db.signin_links.c.expires_at)
                               .where(db.signin_links.c.token_hash == sha(token))).scalar()
        assert expires - time.time() == pytest.approx(24 * 3600, abs=60)
        conn.execute(sa.update(db.signin_links).where(db.signin_links.c.token_hash == sha(token))
                     .values(expires_at=time.time() - 1))
    assert signs_in_as(srv, token) is None


def test_setting_a_password_kills_unused_links(srv):
    """A link is for getting in without a password: once one is set (say the admin ran
    set-password instead of opening the link printed to a log), the link must not work."""
    user(srv, "lisa", None)
    token = accounts.new_signin_link(srv.engine, "lisa")
    srv.cli("set-password", "lisa", "--password-stdin", input=PASSWORD + "\n")
    assert signs_in_as(srv, token) is None
    assert WebSession(srv.url).sign_in("lisa", PASSWORD).status_code == 303


# -- sign-in rate limits, one at a time -------------------------------------------------------------
# Each test signs in from addresses of its own (X-Forwarded-For, trusted from loopback), so the
# limits of one test do not reach into another's.

_forms: dict[tuple[str, str], tuple[WebSession, str]] = {}


def attempt(srv, name: str, password: str, address: str) -> requests.Response:
    """One sign-in from ``address``; the page of a refusal is the form of the next attempt."""
    web, csrf = _forms.pop((srv.url, address), (None, ""))
    if web is None:
        web = WebSession(srv.url)
        csrf = web.csrf(web.get("/login").text)
    r = web.post("/login", {"csrf": csrf, "username": name, "password": password, "next": "/keys"},
                 headers={"X-Forwarded-For": address})
    if r.status_code in (401, 429):
        _forms[srv.url, address] = (web, web.csrf(r.text))
    return r


def assert_limited(r: requests.Response) -> None:
    assert r.status_code == 429, r.text
    assert "too many failed sign-ins" in r.text and "gx_session" not in r.headers.get("set-cookie", "")
    # the oldest counted failure is seconds old: it ages out in a little under WINDOW
    assert WINDOW - 60 <= int(r.headers["retry-after"]) <= WINDOW


def test_five_failures_for_one_name_from_one_address(srv):
    name, bystander = user(srv, "nina"), user(srv, "nils")
    for i in range(PER_NAME_AND_ADDRESS):
        assert attempt(srv, name, "wrong password", "10.1.0.1").status_code == 401, i
    assert_limited(attempt(srv, name, PASSWORD, "10.1.0.1"))  # right, but held back
    assert attempt(srv, name, PASSWORD, "10.1.0.2").status_code == 303  # the name from elsewhere
    assert attempt(srv, bystander, PASSWORD, "10.1.0.1").status_code == 303  # the address, another name
    with srv.engine.begin() as conn:  # the failures age out of the window
        conn.execute(sa.update(db.login_failures).where(db.login_failures.c.name == name)
                     .values(at=db.login_failures.c.at - (WINDOW + 1)))
    assert attempt(srv, name, PASSWORD, "10.1.0.1").status_code == 303


def test_fifty_failures_for_one_name_from_anywhere(srv):
    name, bystander = user(srv, "nora"), user(srv, "noah")
    addresses = [f"10.2.0.{i}" for i in range(13)]  # at most 4 from each: no other limit is reached
    for i in range(PER_NAME):
        assert attempt(srv, name, "wrong password", addresses[i % 13]).status_code == 401, i
    assert_limited(attempt(srv, name, PASSWORD, "10.2.1.1"))  # a fresh address: held back all the same
    assert attempt(srv, bystander, PASSWORD, "10.2.1.1").status_code == 303


def test_twenty_failures_from_one_address_whatever_the_name(srv):
    name = user(srv, "pat")
    for i in range(PER_ADDRESS):  # 4 guesses at each of 5 names: no other limit is reached
        assert attempt(srv, f"guess-{i % 5}", "wrong password", "10.3.0.1").status_code == 401, i
    assert_limited(attempt(srv, name, PASSWORD, "10.3.0.1"))  # a name never tried from there
    assert attempt(srv, name, PASSWORD, "10.3.0.2").status_code == 303
