"""Text normalisation and decoding before sensitive-data detection, so that disguised values are found.

`normalize(text)` folds what a reader would not notice: NFKC (full-width `＠`, `４`, NBSP), invisible format
characters (zero-width spaces, soft hyphens, BOM, word joiners, bidi marks) removed, every Unicode decimal
digit mapped to ASCII, every Unicode space to a plain space, and IDN email domains written in punycode.
`decoded_views(text)` returns the other readings of a text: percent-, `\\uXXXX`- and HTML-entity-decoded,
and each base64 run of plausible length that decodes to text (a `data:` URL's payload included). Pure; a
text with nothing to fold is returned as is, so ASCII prose costs one `isascii` and a few substring tests.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import unicodedata
from urllib.parse import unquote

# Invisible format characters (Unicode Cf and friends) that split a value without showing: soft hyphen,
# combining grapheme joiner, Arabic letter mark, Hangul fillers, Mongolian selectors, zero-width space and
# joiners, bidi marks and embeddings, word joiner and invisible operators, variation selectors, BOM, tags.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f]"
)
_NON_ASCII_DIGITS = re.compile(r"(?:(?![0-9])\d)+")  # Arabic-Indic, Devanagari, ... (NFKC keeps them)
_NON_ASCII_SPACE = re.compile(r"[^\S\n\r\t\f\v ]")  # what NFKC leaves: U+1680, U+2028, U+2029, ...
_UNICODE_EMAIL = re.compile(r"[\w.%+-]*@[\w-]+(?:\.[\w-]+)+")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_JSON_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})")  # anna\u0040example.org, pasted from JSON
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z]{2,10});")
# 16 characters encode 12 bytes: as short as an email or a card number gets. Both alphabets, padding optional.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-](?<![A-Za-z0-9+/_-].)[A-Za-z0-9+/_-]{15,}={0,2}")  # starts a run
_MAX_DECODED = 1 << 20  # a larger run is a file, not a disguised value
_MAX_DEPTH = 2  # base64 inside percent-encoding inside base64 is far enough


def _digit_to_ascii(m: re.Match[str]) -> str:
    return "".join(str(unicodedata.decimal(ch, 0)) for ch in m.group())


def _ascii_email(m: re.Match[str]) -> str:
    """`josé@bücher.example` -> `josx@xn--bcher-kva.example`: the shape the email rule knows."""
    email = m.group()
    if email.isascii():
        return email
    local, domain = email.split("@", 1)
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        domain = "".join(ch if ch.isascii() else "x" for ch in domain)
    return "".join(ch if ch.isascii() else "x" for ch in local) + "@" + domain


def normalize(text: str) -> str:
    """`text` as a reader sees it: see the module docstring. ASCII text is returned unchanged."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", _INVISIBLE.sub("", text))
    text = _NON_ASCII_DIGITS.sub(_digit_to_ascii, text)
    text = _NON_ASCII_SPACE.sub(" ", text)
    if "@" in text and not text.isascii():
        text = _UNICODE_EMAIL.sub(_ascii_email, text)
    return text


def _printable_text(raw: bytes) -> str | None:
    """The bytes as text when they are UTF-8 with no control characters but line breaks and tabs."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ch < " " and ch not in "\n\r\t" for ch in text) or "\x7f" in text:
        return None
    return text


def _decode_base64(run: str) -> str | None:
    core = run.rstrip("=")
    core = core[: len(core) - len(core) % 4] if len(core) % 4 == 1 else core  # a cut-off run: drop the tail
    alphabet = "-_" if ("-" in core or "_" in core) else "+/"
    if alphabet == "-_" and ("+" in core or "/" in core):
        return None
    try:
        raw = base64.b64decode(core + "=" * (-len(core) % 4), altchars=alphabet.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable_text(raw)


def _base64_texts(text: str) -> list[str]:
    found = []
    # str.split runs in C; only tokens long enough to hold a run are searched.
    long_tokens = [token for token in text.split() if len(token) >= 16]
    for m in (m for token in long_tokens for m in _BASE64_RUN.finditer(token)):
        run = m.group()
        if len(run) > _MAX_DECODED or run.isdigit() or run.isalpha():  # words and numbers are not base64
            continue
        decoded = _decode_base64(run)
        if decoded is not None:
            found.append(decoded)
    return found


def decoded_views(text: str, depth: int = 0) -> list[str]:
    """The normalised decodings of `text` (percent, HTML entities, base64 runs), each decoded again up to
    `_MAX_DEPTH` levels; empty when `text` holds nothing encoded."""
    views: list[str] = []
    if "%" in text and _PERCENT.search(text):
        views.append(normalize(unquote(text, errors="replace")))
    if "\\u" in text and _JSON_ESCAPE.search(text):
        views.append(normalize(_JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)))
    if "&" in text and _ENTITY.search(text):
        views.append(normalize(html.unescape(text)))
    views += [normalize(t) for t in _base64_texts(text)]
    if depth + 1 < _MAX_DEPTH:
        views += [deeper for view in list(views) for deeper in decoded_views(view, depth + 1)]
    return views
