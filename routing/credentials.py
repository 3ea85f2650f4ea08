"""Credential detectors: private keys (PEM, PuTTY, base64-wrapped PEM), vendor API tokens, Slack webhooks,
JWTs, `key = <random>` assignments and passwords inside connection URLs.

Each pattern opens with its literal prefix so the regex engine searches for it in C; each `accept_*` takes
the text and a match and returns the span to report, or None. Pure; patterns are module constants.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from routing import checksums

Span = tuple[int, int]


def _c(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII | flags)


def span(_text: str, m: re.Match[str]) -> Span | None:
    return m.span()


PEM_PRIVATE_KEY = _c(
    r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----"
    r"(?:(?:(?!-----BEGIN ).){0,16384}?-----END \1-----)?",  # the body, when its END line is there
    re.DOTALL,
)
PUTTY_PRIVATE_KEY = _c(r"PuTTY-User-Key-File-\d+: [\w-]+")
# One pattern per vendor family, each opening with its literal prefix so the engine can search for it fast.
_END = r"(?![\w-])"
OPENAI_ANTHROPIC_KEY = _c(r"sk-(?<![\w-]sk-)[\w-]{20,}" + _END)  # sk-..., sk-proj-..., sk-ant-api03-...
STRIPE_KEY = _c(r"[rs]k_(?<![\w-].k_)(?:live|test)_[A-Za-z0-9]{16,}" + _END)
AWS_OR_GOOGLE_KEY = _c(r"A(?<![\w-]A)(?:(?:KIA|SIA|BIA|CCA)[A-Z2-7]{16}|Iza[\w-]{35})" + _END)
GITHUB_TOKEN = _c(r"g(?<![\w-]g)(?:h[pousr]_[A-Za-z0-9]{36,}|ithub_pat_\w{50,})" + _END)
SLACK_TOKEN = _c(r"x(?<![\w-]x)(?:ox[abeoprs]|app)-[A-Za-z0-9-]{10,}" + _END)  # xoxb-, xoxp-, xapp-
SLACK_WEBHOOK = _c(r"hooks\.slack\.com/(?:services|workflows|triggers)/(?P<path>[A-Za-z0-9_/-]{20,})")
# "base64(-----BEGIN " then the start of a key label: a PEM key inside a Kubernetes Secret or a .env file.
BASE64_PEM = _c(r"LS0tLS1CRUdJTi[A-Za-z0-9+/]{8,}={0,2}")
# scheme://user:password@host; found where "://" is, so the scheme is read backwards by the pattern's start.
URL_PASSWORD = _c(r"://[^\s:/@'\"<>]{0,64}:(?P<pw>[^\s/@'\"<>]{1,128})@[A-Za-z0-9\[]")
_PLACEHOLDER_PASSWORDS = frozenset(
    {"password", "passwd", "pass", "pwd", "secret", "changeme", "mypassword", "yourpassword", "pw", "p"}
)
JWT = _c(r"eyJ(?<![\w-]eyJ)[\w-]{5,}\.[\w-]{5,}\.[\w-]*(?![\w-])")
# Matched only where a keyword starts (found with str.find on the lower-cased text), never scanned.
SECRET_ASSIGNMENT = _c(
    r"(?:key|secret|token|passw(?:or)?d|passphrase|pwd|credentials?)s?(?![A-Za-z])"
    r"[\"']?(?:\s*(?:[:=]|=>|\bis\b)\s*|\s+)[\"']?"
    r"(?P<value>[^\s\"'`<>{}()\[\],;&$]{12,256})",
    re.IGNORECASE,
)
_NOT_SECRET_STARTS = ("/", "~/", "./", "../", "http://", "https://")  # paths and URLs, not secrets
SECRET_WORDS = ("key", "secret", "token", "passw", "passphrase", "pwd", "credential")


def accept_known_key(_text: str, m: re.Match[str]) -> Span | None:
    """Vendor prefixes are followed by generated text, with digits and never a repeated placeholder."""
    token = m.group()
    body = token.split("-", 1)[1] if token.startswith(("sk-", "xox", "xapp-")) else token
    if not any(ch.isdigit() for ch in body):
        return None
    # `sk-` also starts prose ("sk-learn-style-pipelines-2024"): insist on generated-looking text.
    if token.startswith("sk-") and not (
        any(ch.isupper() for ch in body) and checksums.looks_random(body, min_bits_per_char=3.5)
    ):
        return None
    return m.span()


def accept_jwt(_text: str, m: re.Match[str]) -> Span | None:
    header = m.group().split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return m.span() if isinstance(decoded, dict) and "alg" in decoded else None


def accept_secret_assignment(_text: str, m: re.Match[str]) -> Span | None:
    value = m.group("value").rstrip(".")
    if value.startswith(_NOT_SECRET_STARTS) or not checksums.looks_random(value):
        return None
    return m.start("value"), m.start("value") + len(value)


def accept_slack_webhook(_text: str, m: re.Match[str]) -> Span | None:
    """The documentation's `T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX` is not a webhook."""
    secret = m.group("path").rstrip("/").rsplit("/", 1)[-1]
    return m.span() if checksums.looks_random(secret, min_length=8, min_bits_per_char=2.5) else None


def accept_base64_pem(_text: str, m: re.Match[str]) -> Span | None:
    run = m.group().rstrip("=")
    head = run[: min(len(run), 96) // 4 * 4]
    try:
        decoded = base64.b64decode(head).decode("ascii", "replace")
    except (binascii.Error, ValueError):
        return None
    return m.span() if PEM_PRIVATE_KEY.match(decoded) or "PRIVATE KEY" in decoded else None


def accept_url_password(_text: str, m: re.Match[str]) -> Span | None:
    """A real password, not `${DB_PASSWORD}`, `<password>`, `%(pw)s`, `****` or the word "password"."""
    password = m.group("pw")
    if password[0] in "$<{%*[" or password.lower().strip("_-") in _PLACEHOLDER_PASSWORDS:
        return None
    if len(set(password)) == 1:  # xxxx, ****
        return None
    return m.span("pw")
