"""Server accounts (gradexp/server/accounts.py, web.py): passwords, sessions, CSRF, rate
limits, API keys, the authorization-code + PKCE exchange, admin commands.

Against a real embedded server on loopback, over plain HTTP; tests/test_login.py
drives the same pages with Chromium and the real `gradexp login`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
import sqlalchemy as sa

from gradexp.server import accounts
from services import GradexpServer, WebSession

PASSWORD = "correct horse battery"
REDIRECT = "http://127.0.0.1:45678/gradexp/callback"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = GradexpServer(tmp_path_factory.mktemp("accounts")).start()
    for name in ("alice", "bob"):
        server.user_with_password(name, PASSWORD)
    yield server
    server.stop()


@pytest.fixture()
def alice(srv):
    web = WebSession(srv.url)
    r = web.sign_in("alice", PASSWORD)
    assert r.status_code == 303, r.text
    return web


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def grant_params(challenge: str, *, state: str = "s" * 24, redirect_uri: str = REDIRECT) -> dict[str, str]:
    return {"response_type": "code", "client_id": "gradexp-cli", "client_name": "gradexp CLI on testbox",
            "redirect_uri": redirect_uri, "state": state, "code_challenge": challenge,
            "code_challenge_method": "S256"}


def authorize(web: WebSession, params: dict[str, str], decision: str = "allow") -> dict[str, str]:
    """Click through the authorize page; the query the browser is redirected to."""
    page = web.get("/authorize?" + urlencode(params))
    assert page.status_code == 200, page.text
    r = web.post("/authorize", {"csrf": web.csrf(page.text), **params, "decision": decision})
    assert r.status_code == 303, r.text
    target = urlsplit(r.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == params["redirect_uri"]
    return {k: v[0] for k, v in parse_qs(target.query).items()}


def exchange(srv, code: str, verifier: str, redirect_uri: str = REDIRECT) -> requests.Response:
    return requests.post(f"{srv.url}/api/v1/oauth/token", timeout=30, data={
        "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
        "redirect_uri": redirect_uri, "client_id": "gradexp-cli"})


def use_link(web: WebSession, link: str) -> requests.Response:
    """Open a one-time sign-in link and press its button (opening alone must not use it up)."""
    page = web.http.get(link, timeout=30)
    assert page.status_code == 200 and "one-time link" in page.text
    token = parse_qs(urlsplit(link).query)["token"][0]
    return web.post("/login/link", {"csrf": web.csrf(page.text), "token": token})


def viewer(srv, key: str) -> requests.Response:
    return requests.get(f"{srv.url}/api/v1/viewer", headers={"Authorization": f"Bearer {key}"}, timeout=30)


# -- passwords ------------------------------------------------------------------------------------

def test_password_hash_is_scrypt_salted_and_checks():
    a, b = accounts.hash_password("hunter22"), accounts.hash_password("hunter22")
    assert a.startswith("scrypt$32768$8$1$") and a != b  # salted
    assert accounts.check_password("hunter22", a) and accounts.check_password("hunter22", b)
    assert not accounts.check_password("hunter23", a)
    assert not accounts.check_password("hunter22", None)  # unknown user
    with pytest.raises(ValueError, match="at least 8"):
        accounts.check_new_password("short")


# -- sign-in, sessions, CSRF ----------------------------------------------------------------------

def test_sign_in_sets_a_session_cookie_that_scripts_cannot_read(srv):
    web = WebSession(srv.url)
    r = web.sign_in("alice", PASSWORD, next="/keys")
    assert r.status_code == 303 and r.headers["location"] == "/keys"
    cookie = next(c for c in r.raw.headers.getlist("set-cookie") if c.startswith("gx_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    page = web.get("/keys")
    assert page.status_code == 200 and "Sign out alice" in page.text
    assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers[
        "content-security-policy"]


def test_session_cookie_is_secure_behind_https(srv):
    """Behind a TLS proxy (X-Forwarded-Proto from a trusted address) the cookie is Secure."""
    web = WebSession(srv.url)
    page = web.get("/login")  # (a Secure login cookie would not come back over plain http)
    r = web.post("/login", {"csrf": web.csrf(page.text), "username": "alice", "password": PASSWORD},
                 headers={"X-Forwarded-Proto": "https"})
    cookie = next(c for c in r.raw.headers.getlist("set-cookie") if c.startswith("gx_session="))
    assert "Secure" in cookie


def test_sign_in_never_redirects_off_site(srv):
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        r = WebSession(srv.url).sign_in("alice", PASSWORD, next=target)
        assert r.status_code == 303 and r.headers["location"] == "/keys", target


def test_sign_out_ends_the_session(alice):
    assert alice.get("/keys", allow_redirects=False).status_code == 200
    r = alice.form_post("/keys", "/logout", {})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert alice.get("/keys", allow_redirects=False).headers["location"].startswith("/login")


def test_forms_without_csrf_token_are_refused(srv, alice):
    fresh = WebSession(srv.url)
    fresh.get("/login")  # has the login CSRF cookie, but sends no token
    r = fresh.post("/login", {"username": "alice", "password": PASSWORD})
    assert r.status_code == 403 and "CSRF" in r.text and "gx_session" not in r.headers.get("set-cookie", "")
    before = alice.get("/keys").text.count("data-key-id")
    for action, data in (("/keys", {"name": "sneaky"}), ("/logout", {}),
                         ("/authorize", {**grant_params(pkce()[1]), "decision": "allow"}),
                         ("/account/password", {"new": "x" * 12, "confirm": "x" * 12})):
        r = alice.post(action, data)
        assert r.status_code == 403 and "CSRF" in r.text, action
        r = alice.post(action, {**data, "csrf": "forged-" + secrets.token_urlsafe(16)})
        assert r.status_code == 403, action
    assert alice.get("/keys").text.count("data-key-id") == before  # no key was made
    assert alice.get("/keys", allow_redirects=False).status_code == 200  # still signed in


def test_wrong_password_is_refused_then_rate_limited(srv):
    srv.user_with_password("carol", PASSWORD)
    web = WebSession(srv.url)
    for _ in range(accounts.MAX_FAILURES):
        r = web.sign_in("carol", "wrong password")
        assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = web.sign_in("carol", PASSWORD)  # right, but too late
    assert r.status_code == 429 and "too many failed sign-ins" in r.text
    assert 1 <= int(r.headers["retry-after"]) <= accounts.FAILURE_WINDOW
    assert "gx_session" not in r.headers.get("set-cookie", "")
    assert WebSession(srv.url).sign_in("alice", PASSWORD).status_code == 303  # only carol is held back


def test_parallel_wrong_passwords_count_against_each_other(srv):
    """Attempts sent at once must not all pass the limit before any failure is recorded."""
    srv.user_with_password("frank", PASSWORD)
    webs = [WebSession(srv.url) for _ in range(12)]
    pages = [w.get("/login") for w in webs]
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda wp: wp[0].post("/login", {"csrf": wp[0].csrf(wp[1].text), "username": "frank",
                                                                "password": "guess", "next": "/keys"}).status_code,
                              zip(webs, pages)))
    assert sorted(codes) == [401] * accounts.MAX_FAILURES + [429] * (12 - accounts.MAX_FAILURES)


def test_unknown_user_reads_like_a_wrong_password(srv):
    r = WebSession(srv.url).sign_in("nobody-here", PASSWORD)
    assert r.status_code == 401 and "Wrong user name or password" in r.text


def test_change_password_signs_out_other_sessions(srv):
    srv.user_with_password("dave", PASSWORD)
    laptop, phone = WebSession(srv.url), WebSession(srv.url)
    assert laptop.sign_in("dave", PASSWORD).status_code == 303
    assert phone.sign_in("dave", PASSWORD).status_code == 303
    r = laptop.form_post("/account", "/account/password", {"current": "wrong one", "new": "n" * 10,
                                                           "confirm": "n" * 10})
    assert r.status_code == 400 and "current password is wrong" in r.text
    r = laptop.form_post("/account", "/account/password", {"current": PASSWORD, "new": "new password 1",
                                                           "confirm": "new password 1"})
    assert r.status_code == 303
    assert laptop.get("/account").status_code == 200 and "Password saved" in laptop.get("/account?saved=1").text
    assert phone.get("/keys", allow_redirects=False).status_code == 303  # signed out
    assert WebSession(srv.url).sign_in("dave", PASSWORD).status_code == 401
    assert WebSession(srv.url).sign_in("dave", "new password 1").status_code == 303


# -- the embedded server's first start ---------------------------------------------------------------

def test_first_start_prints_a_one_time_signin_link(tmp_path):
    server = GradexpServer(tmp_path).start()
    try:
        log = server.log.read_text()
        m = re.search(r"(http://127\.0\.0\.1:\d+/login/link\?token=\S+)", log)
        assert m, log
        web = WebSession(server.url)
        assert use_link(web, m.group(1)).headers["location"] == "/account?welcome=1"
        page = web.get("/account?welcome=1").text
        assert "one-time link" in page and "Current password" not in page
        again = use_link(WebSession(server.url), m.group(1))
        assert again.status_code == 400 and "unknown, used or expired" in again.text
        r = web.form_post("/account", "/account/password", {"new": "laptop password", "confirm": "laptop password"})
        assert r.status_code == 303
        server.stop()
        server.start()  # with a password set, no new link
        assert server.log.read_text().count("/login/link?token=") == 1
        assert WebSession(server.url).sign_in("local", "laptop password").status_code == 303
    finally:
        server.stop()


# -- API keys ---------------------------------------------------------------------------------------

def test_keys_page_creates_lists_and_revokes(srv, alice):
    r = alice.form_post("/keys", "/keys", {"name": "cluster-a"})
    assert r.status_code == 200
    key = re.search(r'id="new-key">([^<]+)<', r.text).group(1)
    assert key.startswith("gx_") and "will not be shown again" in r.text
    assert viewer(srv, key).json()["user"] == "alice"
    page = alice.get("/keys").text
    assert key not in page and "cluster-a" in page and key[:8] in page  # only its first characters
    key_id = re.search(r'<tr data-key-id="(\d+)"><td>cluster-a</td>', page).group(1)
    assert "never" not in page.split(f'data-key-id="{key_id}"')[1].split("</tr>")[0].split("</td>")[3]  # last used
    r = alice.form_post("/keys", f"/keys/{key_id}/revoke", {})
    assert r.status_code == 303
    r = viewer(srv, key)
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    assert "revoked" in alice.get("/keys").text.split(f'data-key-id="{key_id}"')[1].split("</tr>")[0]


def test_a_user_cannot_revoke_another_users_key(srv, alice):
    bob = WebSession(srv.url)
    bob.sign_in("bob", PASSWORD)
    r = bob.form_post("/keys", "/keys", {"name": "bobs"})
    bob_key = re.search(r'id="new-key">([^<]+)<', r.text).group(1)
    key_id = re.search(r'<tr data-key-id="(\d+)"><td>bobs</td>', bob.get("/keys").text).group(1)
    r = alice.form_post("/keys", f"/keys/{key_id}/revoke", {})
    assert r.status_code == 404
    assert viewer(srv, bob_key).status_code == 200


def test_another_users_key_does_not_reach_your_runs(srv, alice):
    keys = {}
    for name, web in (("alice", alice), ("bob", WebSession(srv.url))):
        if name == "bob":
            web.sign_in("bob", PASSWORD)
        r = web.form_post("/keys", "/keys", {"name": "runs"})
        keys[name] = re.search(r'id="new-key">([^<]+)<', r.text).group(1)
    run = f"{srv.url}/api/v1/runs/alice/p/r1"
    assert requests.put(run, json={}, headers={"Authorization": f"Bearer {keys['alice']}"}, timeout=30).ok
    r = requests.get(run, headers={"Authorization": f"Bearer {keys['bob']}"}, timeout=30)
    assert r.status_code == 404
    r = requests.put(run + "/parts/history/0", data=b"x", headers={"Authorization": f"Bearer {keys['bob']}"},
                     timeout=30)
    assert r.status_code == 404


def test_admin_commands(srv):
    srv.create_user("erin")
    key = srv.create_key("erin")
    users = srv.cli("list-users")
    assert re.search(r"^erin\s+no\s+none\s+1", users, re.M) and re.search(r"^alice\s+no\s+set", users, re.M)
    viewer(srv, key)
    listing = srv.cli("list-keys", "erin")
    key_id = re.search(r"^\s*(\d+)\s+erin\s+" + re.escape(key[:8]), listing, re.M).group(1)
    assert key not in listing
    srv.cli("revoke-key", key_id)
    assert viewer(srv, key).status_code == 401
    assert key_id not in srv.cli("list-keys", "erin").split("\n", 1)[1]
    assert "revoked" in srv.cli("list-keys", "erin", "--revoked")
    with pytest.raises(RuntimeError, match="no active key"):
        srv.cli("revoke-key", key_id)
    with pytest.raises(RuntimeError, match="at least 8"):
        srv.cli("set-password", "erin", "--password-stdin", input="short\n")
    srv.cli("set-password", "erin", "--password-stdin", input="erins password\n")
    assert WebSession(srv.url).sign_in("erin", "erins password").status_code == 303
    link = srv.cli("signin-link", "erin", "--base-url", srv.url).strip()
    web = WebSession(srv.url)
    assert use_link(web, link).status_code == 303
    assert web.get("/keys", allow_redirects=False).status_code == 200


# -- authorization codes with PKCE -----------------------------------------------------------------------

def test_code_exchange_gives_a_working_key_named_after_the_client(srv, alice):
    verifier, challenge = pkce()
    back = authorize(alice, grant_params(challenge, state="state-" + "x" * 20))
    assert back["state"] == "state-" + "x" * 20 and "api_key" not in back
    r = exchange(srv, back["code"], verifier)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store", r.text
    body = r.json()
    assert body["user"] == "alice" and body["entity"] == "alice" and body["token_type"] == "bearer"
    assert viewer(srv, body["api_key"]).json() == {"user": "alice", "entity": "alice"}
    assert "gradexp CLI on testbox" in alice.get("/keys").text


def test_authorize_page_needs_sign_in_and_comes_back(srv):
    params = grant_params(pkce()[1])
    web = WebSession(srv.url)
    r = web.get("/authorize?" + urlencode(params), allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2Fauthorize")
    r = web.sign_in("alice", PASSWORD, next="/authorize?" + urlencode(params))
    assert r.headers["location"] == "/authorize?" + urlencode(params)
    assert "gradexp CLI on testbox" in web.get(r.headers["location"]).text


def test_replayed_code_is_refused(srv, alice):
    verifier, challenge = pkce()
    code = authorize(alice, grant_params(challenge))["code"]
    first = exchange(srv, code, verifier)
    assert first.status_code == 200 and viewer(srv, first.json()["api_key"]).status_code == 200
    r = exchange(srv, code, verifier)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert r.json()["error_description"].startswith("authorization code already used")
    # RFC 6749 4.1.2: the code may have been stolen, so the key it gave is revoked too.
    assert viewer(srv, first.json()["api_key"]).status_code == 401


def test_wrong_verifier_is_refused_and_kills_the_code(srv, alice):
    verifier, challenge = pkce()
    code = authorize(alice, grant_params(challenge))["code"]
    r = exchange(srv, code, pkce()[0])
    assert r.status_code == 400 and "code_verifier does not match" in r.json()["error_description"]
    assert "already used" in exchange(srv, code, verifier).json()["error_description"]


def test_expired_code_is_refused(srv, alice):
    verifier, challenge = pkce()
    code = authorize(alice, grant_params(challenge))["code"]
    engine = sa.create_engine(f"sqlite:///{srv.data_dir / 'gradexp.db'}")
    with engine.begin() as conn:  # the clock moves on past CODE_SECONDS
        conn.execute(sa.text("UPDATE auth_codes SET expires_at = :t WHERE code_hash = :h"),
                     {"t": time.time() - 1, "h": hashlib.sha256(code.encode()).hexdigest()})
    engine.dispose()
    r = exchange(srv, code, verifier)
    assert r.status_code == 400 and r.json()["error_description"] == "authorization code expired"
    assert accounts.CODE_SECONDS <= 60


def test_code_is_bound_to_its_redirect_uri(srv, alice):
    verifier, challenge = pkce()
    code = authorize(alice, grant_params(challenge))["code"]
    r = exchange(srv, code, verifier, redirect_uri="http://127.0.0.1:1/gradexp/callback")
    assert r.status_code == 400 and "redirect_uri does not match" in r.json()["error_description"]


def test_unknown_code_and_malformed_requests(srv):
    verifier, _ = pkce()
    assert exchange(srv, "made-up", verifier).json()["error"] == "invalid_grant"
    r = requests.post(f"{srv.url}/api/v1/oauth/token", timeout=30, data={"grant_type": "password"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    r = exchange(srv, "made-up", "short")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = requests.post(f"{srv.url}/api/v1/oauth/token", timeout=30, data=b"{" + b" " * (100 << 10) + b"}",
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "64 KiB" in r.json()["error_description"]


@pytest.mark.parametrize("redirect_uri", [
    "http://evil.example/cb", "https://127.0.0.1:5000/cb", "http://127.0.0.1/cb", "http://localhost:5000/cb",
    "http://user@127.0.0.1:5000/cb", "http://127.0.0.1:5000/cb?x=1", "javascript:alert(1)",
])
def test_authorize_refuses_non_loopback_redirects_without_redirecting(alice, redirect_uri):
    params = grant_params(pkce()[1], redirect_uri=redirect_uri)
    r = alice.get("/authorize?" + urlencode(params), allow_redirects=False)
    assert r.status_code == 400 and "loopback" in r.text and "location" not in r.headers
    r = alice.form_post("/keys", "/authorize", {**params, "decision": "allow"})
    assert r.status_code == 400 and "location" not in r.headers


@pytest.mark.parametrize("change, message", [
    ({"code_challenge_method": "plain"}, "S256"), ({"code_challenge": "too-short"}, "S256"),
    ({"state": ""}, "state"), ({"client_id": "someone-else"}, "Unknown client"), ({"response_type": "token"}, "code"),
])
def test_authorize_checks_pkce_state_and_client(alice, change, message):
    r = alice.get("/authorize?" + urlencode({**grant_params(pkce()[1]), **change}), allow_redirects=False)
    assert r.status_code == 400 and message in r.text


def test_deny_redirects_with_access_denied_and_no_code(alice):
    back = authorize(alice, grant_params(pkce()[1]), decision="deny")
    assert back == {"error": "access_denied", "state": "s" * 24}


def test_manual_authorize_shows_a_key_once(srv, alice):
    page = alice.get("/authorize?" + urlencode({"client_id": "gradexp-cli", "client_name": "gradexp CLI on headless"}))
    assert "headless" in page.text and "paste" in page.text
    r = alice.post("/authorize", {"csrf": alice.csrf(page.text), "client_id": "gradexp-cli",
                                  "client_name": "gradexp CLI on headless", "decision": "allow"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    key = re.search(r'id="api-key">([^<]+)<', r.text).group(1)
    assert viewer(srv, key).json()["user"] == "alice"
