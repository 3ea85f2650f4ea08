"""Helpers for the console tests: log in over HTTP (httpx keeps the session cookie) and read a page's
CSRF token, the way the browser does."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextmanager
def login(base_url: str, key: str) -> Iterator[httpx.Client]:
    """A client holding a console session opened with `key` (admin or team key); fails if refused."""
    with httpx.Client(base_url=base_url, follow_redirects=False) as client:
        resp = client.post("/console/login", data={"key": key})
        assert resp.status_code == 303, resp.text
        assert resp.headers["location"] == "/console/overview"
        yield client


def csrf_of(client: httpx.Client, page: str = "/console/teams") -> str:
    resp = client.get(page)
    assert resp.status_code == 200, resp.text
    found = _CSRF.search(resp.text)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)
