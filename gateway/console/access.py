"""Console access: login with the admin key or a team key, a server-side session behind an HttpOnly,
SameSite=Strict cookie (Secure over TLS), a CSRF token checked on every write, the audit row of a write, and
login rate limits per client address and per account.

Invariants: the key a user typed is never echoed, logged or stored (only the session cookie's hash is); a
team session is bound to its key (revoking the key ends the session); `require_admin` refuses a team session
before any data is read; `checked_form` refuses a write whose CSRF token is missing or wrong, or that comes
from another origin.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import Request
from starlette.responses import RedirectResponse, Response

from gateway.errors import AdminOnly, AuthenticationFailed
from gateway.http.admin import client_address
from gateway.http.deps import RouterDeps, router_deps
from gateway.limits.base import Admission, LimitKind, LimitRule
from gateway.store import audit, sessions
from gateway.store.keys import DISPLAY_PREFIX_CHARS, KEY_PREFIX, hash_key

COOKIE = "sb_console"
PATH = "/console"
MAX_FORM_BYTES = 64 * 1024
LOGIN_REFUSED = "That key was not accepted. Use the admin key or an active team key (sk-sb-...)."


class LoginRequired(Exception):
    """No live session: the page answers with a redirect to the login form."""


class Refused(Exception):
    """A console request refused with an HTML page: `status` and a message that says what to do."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return (
            {} if self.retry_after_s is None else {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}
        )


@dataclass(frozen=True, slots=True)
class User:
    """Whoever holds the session: the admin, or a team key's holder (sees `team` only)."""

    session: sessions.Session
    deps: RouterDeps
    address: str

    @property
    def is_admin(self) -> bool:
        return self.session.is_admin

    @property
    def team(self) -> str | None:
        """The only team a team session may see; None for the admin (every team)."""
        return None if self.is_admin else self.session.team

    @property
    def csrf(self) -> str:
        return self.session.csrf_token

    def audited(
        self,
        action: str,
        target: Callable[[Any], str],
        detail: Callable[[Any], Mapping[str, Any] | None] | None = None,
    ) -> audit.Audited[Any]:
        """The audit row of this user's write, for the store function to write in the write's transaction."""
        actor = audit.Actor(self.session.actor, audit.AuditSource.CONSOLE, self.address)
        return audit.writer(actor, action, target, detail)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def current_user(request: Request) -> User:
    """The session's user; `LoginRequired` without a live session."""
    deps = router_deps(request)
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 128:
        raise LoginRequired
    session = await asyncio.to_thread(sessions.lookup, deps.admin.db, token, now=_now())
    if session is None:
        raise LoginRequired
    return User(session, deps, client_address(request))


async def require_admin(request: Request) -> User:
    user = await current_user(request)
    if not user.is_admin:
        raise Refused(
            403, "This page is for admins. You are logged in with a team key: see your team's pages."
        )
    return user


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form body (the console's forms post nothing else), at most MAX_FORM_BYTES."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/x-www-form-urlencoded", ""):
        raise Refused(415, "The console takes form posts (application/x-www-form-urlencoded) only.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, f"The form is larger than {MAX_FORM_BYTES // 1024} KiB.")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _same_origin(request: Request) -> bool:
    """False only for a post that names another origin; the CSRF token is the defence, this a second one."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def checked_form(request: Request, user: User) -> dict[str, str]:
    """The form of a write, once its CSRF token (form field `csrf` or header `x-csrf-token`) matches the
    session's and it comes from this origin."""
    form = await read_form(request)
    presented = form.get("csrf") or request.headers.get("x-csrf-token") or ""
    if not _same_origin(request) or not hmac.compare_digest(presented.encode(), user.csrf.encode()):
        raise Refused(403, "The form's security token is missing or out of date. Reload the page and retry.")
    return form


async def log_in(request: Request, key: str) -> Response:
    """Check `key`, open a session, set its cookie and go to the overview; a refused key re-renders the
    form (401) without echoing it. Attempts past the login rate limits are refused (429) before the key is
    checked; a successful login gives its attempt back, so the limits count failed and pending ones."""
    deps = router_deps(request)
    access, db = deps.admin.access, deps.admin.db
    now = _now()
    team = key_id = None
    attempt = await _admit_attempt(request, deps, key)
    try:
        if key.startswith(KEY_PREFIX):
            identity = await access.authenticate(key, now=now)
            role, team, key_id = sessions.TEAM_ROLE, identity.team, identity.key_id
        else:
            access.authenticate_admin(key)
            role = sessions.ADMIN_ROLE
    except (AuthenticationFailed, AdminOnly):
        raise Refused(401, LOGIN_REFUSED) from None
    await deps.reports.limiter.settle(attempt, 0, count_request=False)
    ttl_s = deps.admin.config.console.session_ttl_s
    actor = audit.Actor(
        "admin" if team is None else f"key:{key_id}", audit.AuditSource.CONSOLE, client_address(request)
    )
    audited = audit.writer(actor, "console.login", lambda _session: team or "admin")
    token, _session = await asyncio.to_thread(
        sessions.create, db, role=role, team=team, key_id=key_id, ttl_s=ttl_s, now=now, audited=audited
    )
    response = RedirectResponse(f"{PATH}/overview", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(ttl_s),
        path=PATH,
        httponly=True,
        secure=request.url.scheme == "https",
        samesite="strict",
    )
    return response


async def _admit_attempt(request: Request, deps: RouterDeps, key: str) -> Admission:
    """One login attempt against the per-address and per-account limits (config: console.*), or a 429. The
    account is the admin, or a team key by its display prefix (what the keys page shows), hashed: nothing
    typed is stored."""
    cfg = deps.admin.config.console
    address = client_address(request)
    prefix = key[:DISPLAY_PREFIX_CHARS]
    account = f"key:{hash_key(prefix)[:16]}" if key.startswith(KEY_PREFIX) else "admin"
    by_address = LimitRule(
        f"console_login:address:{address}", LimitKind.REQUESTS, cfg.login_attempts_per_address_per_minute
    )
    by_account = LimitRule(
        f"console_login:account:{account}", LimitKind.REQUESTS, cfg.login_attempts_per_account_per_minute
    )
    admission = await deps.reports.limiter.admit([by_address, by_account], cost_tokens=0)
    if admission.allowed:
        return admission
    if by_address in admission.blocked_by:
        what = f"from your address (at most {by_address.limit} a minute; config: "
        what += "console.login_attempts_per_address_per_minute)"
    else:
        what = f"for this account (at most {by_account.limit} a minute; config: "
        what += "console.login_attempts_per_account_per_minute)"
    retry_s = admission.retry_after_s or 60.0
    message = f"Too many login attempts {what}. Try again in {math.ceil(retry_s)} s."
    raise Refused(429, message, retry_after_s=retry_s)


async def log_out(request: Request, user: User) -> Response:
    token = request.cookies.get(COOKIE, "")
    audited = user.audited("console.logout", lambda _token_hash: user.team or "admin")
    await asyncio.to_thread(sessions.end, user.deps.admin.db, token, audited)
    response = RedirectResponse(f"{PATH}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")
    return response
