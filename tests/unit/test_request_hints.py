"""`Hints.from_asgi` (one pass over the ASGI header list, on the request path) reads what
`Hints.from_headers` reads through Starlette's `Headers`, header for header."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from gateway.pipeline.request import NO_HINTS, Hints

BASE = [(b"host", b"gw"), (b"content-type", b"application/json"), (b"authorization", b"Bearer sk-sb-x")]
EVERY = [
    (b"x-switchboard-privacy", b"internal"),
    (b"x-switchboard-preferences", b'{"order": ["a"]}'),
    (b"x-switchboard-site", b"plant-7"),
    (b"x-switchboard-labels", b"region=eu"),
    (b"cache-control", b"no-store"),
    (b"x-switchboard-cache", b"off"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


@pytest.mark.parametrize(
    "raw",
    [
        BASE,
        BASE + EVERY,
        EVERY[::-1] + BASE,
        BASE + [EVERY[0], (b"x-switchboard-privacy", b"public"), EVERY[6]],  # the first of repeats wins
        [(b"cache-control", b""), *BASE],  # an empty value is a value, not an absent header
        [(b"x-switchboard-site", "caf\xe9".encode("latin-1"))],  # decoded as latin-1, like Starlette
    ],
    ids=["none", "every", "every-first", "repeated", "empty-value", "latin-1"],
)
def test_from_asgi_reads_what_from_headers_reads(raw: list[tuple[bytes, bytes]]) -> None:
    assert Hints.from_asgi(raw) == Hints.from_headers(Headers(raw=raw))


def test_a_request_without_hint_headers_gets_no_hints() -> None:
    assert Hints.from_asgi(BASE) is NO_HINTS
    assert Hints.from_asgi(BASE + EVERY[:1]).privacy == "internal"
