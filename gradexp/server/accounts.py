"""Accounts: passwords, browser sessions, sign-in rate limits, one-time codes and links.

Passwords are hashed with scrypt (memory-hard; n=2**15, r=8, p=1: 32 MiB and ~75 ms
a check here). Session tokens, authorization codes, sign-in links and API keys are
random 256-bit tokens stored only as SHA-256 hashes. Everything lives in SQL, so any
server process behind a load balancer can check what another one issued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gradexp.server import db

SESSION_SECONDS = 14 * 24 * 3600
CODE_SECONDS = 60
LINK_SECONDS = 24 * 3600
FAILURE_WINDOW = 300.0
MAX_FAILURES = 5
"""Failed sign-ins allowed per user name from one address within ``FAILURE_WINDOW`` seconds."""
MAX_NAME_FAILURES = 50
"""... per user name from anywhere (higher, so that others cannot easily lock a user out)."""
MAX_ADDRESS_FAILURES = 20
"""... and per client address, whatever the name."""
MIN_PASSWORD = 8
_SCRYPT = {"n": 2 ** 15, "r": 8, "p": 1}
_KDF_SLOTS = threading.BoundedSemaphore(4)
"""scrypt runs at most 4 at once per process: each takes 32 MiB, and a burst of sign-ins
must not take the server's memory."""


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    with _KDF_SLOTS:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=64 << 20, dklen=32)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash``: the parameters travel with the hash, so they can grow later."""
    salt = secrets.token_bytes(16)
    h = _scrypt(password.encode(), salt, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${_b64(salt)}${_b64(h)}"


def check_password(password: str, stored: str | None) -> bool:
    """True if ``password`` matches ``stored``; as slow for an unknown user as for a known one."""
    if not stored:
        _scrypt(b"x", b"0" * 16, **_SCRYPT)  # as slow as a real check: timing tells no user names
        return False
    scheme, n, r, p, salt, want = stored.split("$")
    if scheme != "scrypt":
        return False
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    got = _scrypt(password.encode(), base64.urlsafe_b64decode(pad(salt)), int(n), int(r), int(p))
    return hmac.compare_digest(_b64(got), want)


def check_new_password(password: str) -> None:
    """ValueError saying what is wrong with ``password`` as a new password."""
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise ValueError("a password may have at most 1024 characters")


def set_password(engine: Engine, user: str, password: str, *, end_sessions: bool = True) -> None:
    """Set ``user``'s password; by default this also signs out their browser sessions.

    Unused sign-in links of the user die too: a link is a way in without a password, and
    one printed to a log must not outlive the password set instead of opening it."""
    check_new_password(password)
    hashed = hash_password(password)
    with engine.begin() as conn:
        uid = conn.execute(sa.select(db.users.c.id).where(db.users.c.name == user)).scalar()
        if uid is None:
            raise LookupError(f"no user {user!r}")
        conn.execute(sa.update(db.users).where(db.users.c.id == uid).values(password_hash=hashed))
        conn.execute(sa.delete(db.signin_links).where(db.signin_links.c.user_id == uid))
        if end_sessions:
            conn.execute(sa.delete(db.sessions).where(db.sessions.c.user_id == uid))


def has_password(engine: Engine, user: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.select(db.users.c.password_hash).where(db.users.c.name == user)).scalar() is not None


# -- sign-in and its rate limit -----------------------------------------------------------------

class RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed sign-ins; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


def sign_in(engine: Engine, name: str, password: str, address: str) -> int | None:
    """The user id if ``password`` is right, else None (and the failure counts).

    Raises RateLimited, without checking the password, once ``MAX_FAILURES`` sign-ins for
    ``name`` from ``address`` (or ``MAX_NAME_FAILURES`` for ``name``, or
    ``MAX_ADDRESS_FAILURES`` from ``address``) failed within ``FAILURE_WINDOW``; it lifts
    as the oldest of those failures ages out. The attempt is recorded as a failure
    *before* the password is checked (and dropped if it was right), so attempts sent in
    parallel count against each other too.
    """
    now = time.time()
    name, address = name[:64], address[:64]
    f = db.login_failures
    with engine.begin() as conn:
        attempt = db.inserted_id(conn.execute(sa.insert(f).values(name=name, address=address, at=now)))
        conn.execute(sa.delete(f).where(f.c.at < now - 24 * 3600))
    with engine.connect() as conn:
        for where, limit in (((f.c.name == name) & (f.c.address == address), MAX_FAILURES),
                             (f.c.name == name, MAX_NAME_FAILURES), (f.c.address == address, MAX_ADDRESS_FAILURES)):
            times = conn.execute(sa.select(f.c.at).where(where, f.c.at > now - FAILURE_WINDOW, f.c.id < attempt)
                                 .order_by(f.c.at.desc()).limit(limit)).scalars().all()
            if len(times) >= limit:
                _forget_attempt(engine, attempt)  # held back, not a guess: it does not extend the wait
                raise RateLimited(max(1.0, times[-1] + FAILURE_WINDOW - now))
    with engine.connect() as conn:
        row = conn.execute(sa.select(db.users.c.id, db.users.c.password_hash)
                           .where(db.users.c.name == name)).first()
    if check_password(password, row[1] if row else None) and row is not None:
        _forget_attempt(engine, attempt)
        return row[0]
    return None


def _forget_attempt(engine: Engine, attempt: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(db.login_failures).where(db.login_failures.c.id == attempt))


# -- sessions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    id: int
    user_id: int
    user: str
    entity: str
    csrf: str


def new_session(engine: Engine, user_id: int) -> str:
    """A new session token for ``user_id`` (the cookie value; only its hash is kept)."""
    token = secrets.token_urlsafe(32)
    now = time.time()
    with engine.begin() as conn:
        conn.execute(sa.insert(db.sessions).values(
            token_hash=db.hash_key(token), user_id=user_id, csrf=secrets.token_urlsafe(24), created_at=now,
            expires_at=now + SESSION_SECONDS))
        conn.execute(sa.delete(db.sessions).where(db.sessions.c.expires_at < now))
    return token


def session(engine: Engine, token: str | None) -> Session | None:
    """The live session of a cookie value, or None."""
    if not token:
        return None
    s, u, e = db.sessions, db.users, db.entities
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(s.c.id, u.c.id, u.c.name, e.c.name, s.c.csrf)
            .join(u, u.c.id == s.c.user_id).join(e, e.c.user_id == u.c.id)
            .where(s.c.token_hash == db.hash_key(token), s.c.expires_at > time.time())).first()
    return Session(*row) if row else None


def end_session(engine: Engine, session_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(db.sessions).where(db.sessions.c.id == session_id))


# -- one-time authorization codes (RFC 7636 PKCE, S256 only) ---------------------------------------

def new_code(engine: Engine, user_id: int, *, client: str, redirect_uri: str, challenge: str) -> str:
    """A single-use code, valid ``CODE_SECONDS``, that ``redeem_code`` trades for a key."""
    code = secrets.token_urlsafe(32)
    now = time.time()
    with engine.begin() as conn:
        conn.execute(sa.delete(db.auth_codes).where(db.auth_codes.c.expires_at < now - 3600))
        conn.execute(sa.insert(db.auth_codes).values(
            code_hash=db.hash_key(code), user_id=user_id, client=client[:64], redirect_uri=redirect_uri,
            challenge=challenge, expires_at=now + CODE_SECONDS))
    return code


class BadGrant(Exception):
    """The code, verifier or redirect URI does not check out (says which)."""


def redeem_code(engine: Engine, code: str, verifier: str, redirect_uri: str) -> tuple[int, str, int]:
    """(user id, client name, code id) of a good code; the code dies here, whatever the
    outcome (so a guessed verifier gets one try). BadGrant says what did not check out."""
    c = db.auth_codes
    now = time.time()
    with engine.begin() as conn:
        row = conn.execute(sa.select(c.c.id, c.c.user_id, c.c.redirect_uri, c.c.challenge, c.c.expires_at,
                                     c.c.used_at, c.c.client, c.c.key_id)
                           .where(c.c.code_hash == db.hash_key(code))).first()
        if row is None:
            raise BadGrant("unknown authorization code")
        # Mark it used first, atomically: of two concurrent redemptions only one wins.
        won = conn.execute(sa.update(c).where(c.c.id == row[0], c.c.used_at.is_(None))
                           .values(used_at=now)).rowcount
    if not won or row[5] is not None:
        if row[7] is not None:  # RFC 6749 4.1.2: a replayed code may be stolen; so may its key be
            db.revoke_key(engine, row[7])
        raise BadGrant("authorization code already used (the key it gave, if any, is revoked)")
    if row[4] < now:
        raise BadGrant("authorization code expired")
    if not hmac.compare_digest(row[2].encode(), redirect_uri.encode()):
        raise BadGrant("redirect_uri does not match the one the code was issued for")
    if not hmac.compare_digest(_b64(hashlib.sha256(verifier.encode()).digest()).encode(), row[3].encode()):
        raise BadGrant("code_verifier does not match the code challenge")
    return row[1], row[6], row[0]


def password_hash(engine: Engine, user_id: int) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(db.users.c.password_hash).where(db.users.c.id == user_id)).scalar()


def key_for_user(engine: Engine, user_id: int, *, name: str, code_id: int | None = None) -> tuple[str, str, str]:
    """A new API key for a user id: (key, user, entity). With ``code_id``, the key is noted on
    that code, so that a replay of the code revokes it."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(db.users.c.name, db.entities.c.name)
                           .join(db.entities, db.entities.c.user_id == db.users.c.id)
                           .where(db.users.c.id == user_id)).one()
    key, key_id = db.create_key_with_id(engine, row[0], name=name)
    if code_id is not None:
        with engine.begin() as conn:
            conn.execute(sa.update(db.auth_codes).where(db.auth_codes.c.id == code_id).values(key_id=key_id))
    return key, row[0], row[1]


# -- one-time sign-in links (the embedded server's first start) ---------------------------------

def new_signin_link(engine: Engine, user: str) -> str:
    """A token for a single sign-in without a password, valid ``LINK_SECONDS``; earlier
    unused ones of the same user die (only the newest printed link works)."""
    token = secrets.token_urlsafe(32)
    now = time.time()
    with engine.begin() as conn:
        uid = conn.execute(sa.select(db.users.c.id).where(db.users.c.name == user)).scalar()
        if uid is None:
            raise LookupError(f"no user {user!r}")
        conn.execute(sa.delete(db.signin_links).where(db.signin_links.c.user_id == uid))
        conn.execute(sa.insert(db.signin_links).values(token_hash=db.hash_key(token), user_id=uid,
                                                       expires_at=now + LINK_SECONDS))
    return token


def use_signin_link(engine: Engine, token: str) -> int | None:
    """The user id of a live link, which dies here; None if unknown, used or expired."""
    sl = db.signin_links
    now = time.time()
    with engine.begin() as conn:
        row = conn.execute(sa.select(sl.c.id, sl.c.user_id).where(
            sl.c.token_hash == db.hash_key(token), sl.c.used_at.is_(None), sl.c.expires_at > now)).first()
        if row is None:
            return None
        won = conn.execute(sa.update(sl).where(sl.c.id == row[0], sl.c.used_at.is_(None))
                           .values(used_at=now)).rowcount
    return row[1] if won else None
