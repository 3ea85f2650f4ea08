"""Rendering: the Jinja2 environment over the packaged templates, HTML responses with the console's
security headers, and the small formatting filters the templates share."""

from __future__ import annotations

import datetime as dt
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from starlette.responses import HTMLResponse, Response

from gateway.store.spend import micro_to_usd_text

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"
# Everything comes from this origin; inline SVG needs no script. No framing (clickjacking).
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make browsers send `Origin: null` on posts
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def _usd(micro: object) -> str:
    return "$" + micro_to_usd_text(int(micro)) if isinstance(micro, int) else "-"


def _ms(value: object) -> str:
    return f"{value:,.0f} ms" if isinstance(value, int | float) else "-"


def _when(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "-" if value is None else str(value)


def _pct(value: object) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, int | float) else "-"


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(usd=_usd, ms=_ms, when=_when, pct=_pct)
    return env


def html(template: str, status_code: int = 200, *, part: bool = False, **context: Any) -> Response:
    """A page; with `part`, only its `live` block (what the page's script swaps in when it refreshes)."""
    page = environment().get_template(template)
    body = "".join(page.blocks["live"](page.new_context(context))) if part else page.render(**context)
    return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)


def with_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
