"""Anthropic's request headers: `anthropic-version` must be a date when sent (missing is accepted), and
`anthropic-beta` a list of beta names. Both are forwarded unchanged to Anthropic backends, so they are checked
to hold nothing but those shapes: no free text rides along outside the privacy scan's reach."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from gateway.errors import InvalidRequest

VERSION_HEADER = "anthropic-version"
BETA_HEADER = "anthropic-beta"
FORWARDED = (VERSION_HEADER, BETA_HEADER)
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BETA = re.compile(r"^[A-Za-z0-9_.-]{1,128}(\s*,\s*[A-Za-z0-9_.-]{1,128}){0,31}$")


def checked_version(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not _VERSION.match(value):
        raise InvalidRequest(f"header {VERSION_HEADER} must be a date like 2023-06-01", param=VERSION_HEADER)
    return value


def checked_beta(value: str) -> str:
    value = value.strip()
    if not _BETA.match(value):
        raise InvalidRequest(
            f"header {BETA_HEADER} must be comma-separated beta names like prompt-caching-2024-07-31",
            param=BETA_HEADER,
        )
    return value


def passthrough(headers: Iterable[tuple[str, str]] | Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The Anthropic headers among `headers` (name, value), checked, in a stable order."""
    pairs = dict(headers.items() if isinstance(headers, Mapping) else headers)
    out = []
    version = checked_version(pairs.get(VERSION_HEADER))
    if version is not None:
        out.append((VERSION_HEADER, version))
    beta = pairs.get(BETA_HEADER)
    if beta is not None:
        out.append((BETA_HEADER, checked_beta(beta)))
    return tuple(out)
