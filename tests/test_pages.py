"""The server's pages as a hostile value meets them, and its errors as a browser or a client
meets them.

A user name, a key label, a client name or a query parameter that holds markup reaches every
page as text: the browser shows the characters, and no element or attribute of the page
comes from it. Errors answer the API with ``{"error": ...}`` and a browser with a page that
carries the pages' headers (no framing, no caching).
"""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urlencode

import pytest
import requests

from gradexp.server import accounts, db
from services import GradexpServer, WebSession

HOSTILE = "<script>alert('x')</script>\"&<b>"
"""Markup in a value: a script, a quote that would end an attribute, an ampersand, a tag."""
PASSWORD = "correct horse battery"
PAGE_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "cache-control": "no-store"}


class Page(HTMLParser):
    """The elements, attribute values and text of a page, as a browser parses them."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.values: list[str] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.values += [v for _, v in attrs if v is not None]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def shows_as_text(html: str, *, in_attribute: bool = False) -> None:
    """``HOSTILE`` is on the page, verbatim, as text (or an attribute's value), and made no element."""
    page = Page(html)
    assert HOSTILE not in html and "script" not in page.tags, html
    where = page.values if in_attribute else ["".join(page.text)]
    assert any(HOSTILE in v for v in where), html


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = GradexpServer(tmp_path_factory.mktemp("pages")).start()
    assert server.data_dir is not None
    engine = db.connect(f"sqlite:///{server.data_dir / 'gradexp.db'}")
    try:  # `gradexp server create-user` refuses such a name; a database may hold one all the same
        db.create_user(engine, HOSTILE)
        accounts.set_password(engine, HOSTILE, PASSWORD)
    finally:
        engine.dispose()
    yield server
    server.stop()


@pytest.fixture
def hostile(srv) -> WebSession:
    web = WebSession(srv.url)
    assert web.sign_in(HOSTILE, PASSWORD).status_code == 303
    return web


def test_a_hostile_user_name_is_text_on_every_page_that_shows_it(hostile):
    for path in ("/keys", "/account", "/account?welcome=1"):
        page = hostile.get(path)
        assert page.status_code == 200, page.text
        shows_as_text(page.text)  # "Sign out <name>", "Signed in as <name>"
    params = {"response_type": "code", "client_id": "gradexp-cli", "redirect_uri": "", "state": "s" * 24}
    shows_as_text(hostile.get("/authorize?" + urlencode(params)).text)


def test_a_hostile_key_label_is_text_where_it_is_created_and_listed(hostile):
    created = hostile.form_post("/keys", "/keys", {"name": HOSTILE})
    assert created.status_code == 200 and "will not be shown again" in created.text
    shows_as_text(created.text)
    listed = hostile.get("/keys").text
    shows_as_text(listed)
    shows_as_text(listed, in_attribute=True)  # the Revoke button's aria-label


def test_hostile_query_and_form_values_are_text(srv, hostile):
    params = {"response_type": "code", "client_id": "gradexp-cli", "client_name": HOSTILE, "state": "s" * 24}
    page = hostile.get("/authorize?" + urlencode(params))
    assert page.status_code == 200
    shows_as_text(page.text)  # who asks for access
    shows_as_text(page.text, in_attribute=True)  # the grant's hidden fields
    refused = hostile.get("/authorize?" + urlencode({**params, "client_id": HOSTILE}))
    assert refused.status_code == 400
    assert "script" not in Page(refused.text).tags and "Unknown client" in refused.text

    web = WebSession(srv.url)
    shows_as_text(web.get("/login?" + urlencode({"next": "/" + HOSTILE})).text, in_attribute=True)
    shows_as_text(web.get("/login/link?" + urlencode({"token": HOSTILE})).text, in_attribute=True)
    failed = web.post("/login", {"csrf": web.csrf(web.get("/login").text), "username": HOSTILE, "password": "wrong"})
    assert failed.status_code == 401
    shows_as_text(failed.text, in_attribute=True)  # the user name field keeps what was typed


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/no-such-page", 404), ("GET", "/logout", 405), ("POST", "/login", 403),
])
def test_a_browser_gets_an_error_page_with_the_pages_headers(srv, method, path, status):
    r = requests.request(method, srv.url + path, timeout=30, allow_redirects=False)
    assert r.status_code == status and r.headers["content-type"].startswith("text/html")
    assert {k: r.headers.get(k) for k in PAGE_HEADERS} == PAGE_HEADERS
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert '<p class="error" role="alert">' in r.text


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/v1/no-such-thing", 404), ("DELETE", "/api/v1/runs", 405), ("GET", "/api/v1/viewer", 401),
])
def test_the_api_answers_errors_as_json(srv, method, path, status):
    r = requests.request(method, srv.url + path, timeout=30)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and r.json()["error"]
