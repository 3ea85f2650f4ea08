"""Console access: login with the admin key or a team key, a server-side session behind an HttpOnly,
SameSite=Strict cookie (Secure over TLS), a CSRF token checked on every write, and the audit row of a write.

Invariants: the key a user typed is never echoed, logged or stored (only the session cookie's hash is); a
team session is bound to its key (revoking the key ends the session); `require_admin` refuses a team session
before any data is read; `checked_form` refuses a write whose CSRF token is missing or wrong, or that comes
from another origin.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import Request
from starlette.responses import RedirectResponse, Response

from gateway.errors import AdminOnly, AuthenticationFailed
from gateway.http.admin import client_address
from gateway.http.deps import RouterDeps, router_deps
from gateway.store import audit, sessions
from gateway.store.keys import KEY_PREFIX

COOKIE = "sb_console"
PATH = "/console"
MAX_FORM_BYTES = 64 * 1024
LOGIN_REFUSED = "That key was not accepted. Use the admin key or an active team key (sk-sb-...)."


class LoginRequired(Exception):
    """No live session: the page answers with a redirect to the login form."""


class Refused(Exception):
    """A console request refused with an HTML page: `status` and a message that says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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

    async def audit(self, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        actor = audit.Actor(self.session.actor, audit.AuditSource.CONSOLE, self.address)
        await asyncio.to_thread(audit.record, self.deps.admin.db, actor, action, target, detail)


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
    form (401) without echoing it."""
    deps = router_deps(request)
    access, db = deps.admin.access, deps.admin.db
    now = _now()
    team = key_id = None
    try:
        if key.startswith(KEY_PREFIX):
            identity = await access.authenticate(key, now=now)
            role, team, key_id = sessions.TEAM_ROLE, identity.team, identity.key_id
        else:
            access.authenticate_admin(key)
            role = sessions.ADMIN_ROLE
    except (AuthenticationFailed, AdminOnly):
        raise Refused(401, LOGIN_REFUSED) from None
    ttl_s = deps.admin.config.console.session_ttl_s
    token, session = await asyncio.to_thread(
        sessions.create, db, role=role, team=team, key_id=key_id, ttl_s=ttl_s, now=now
    )
    user = User(session, deps, client_address(request))
    await user.audit("console.login", team or "admin")
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


async def log_out(request: Request, user: User) -> Response:
    token = request.cookies.get(COOKIE, "")
    await asyncio.to_thread(sessions.end, user.deps.admin.db, token)
    await user.audit("console.logout", user.team or "admin")
    response = RedirectResponse(f"{PATH}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")
    return response
