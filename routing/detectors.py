"""Built-in sensitive-data detectors: regular expressions confirmed by checksums and context.

`detect(text)` returns where each kind of sensitive data lies, as offsets only; no function here returns,
logs or keeps the matched text. Each rule has a cheap pre-filter (a digit count, a substring test) so a
prompt without candidates costs a few microseconds per rule. Patterns are compiled once, at import, into
immutable module constants; there is no other module state. Invariant: detections of one kind never overlap.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from routing import checksums, credentials, national_formats
from routing.credentials import span as _span


class DetectorKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CREDIT_CARD = "credit_card"
    IBAN = "iban"
    NATIONAL_ID = "national_id"
    IP_ADDRESS = "ip_address"
    PRIVATE_KEY = "private_key"
    API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class Detection:
    kind: DetectorKind
    start: int
    end: int  # exclusive, as in slicing


@dataclass(frozen=True, slots=True)
class _Text:
    """A text and the facts the pre-filters share, computed once per scan."""

    text: str
    lower: str
    digits: int


Span = tuple[int, int]
Accept = Callable[[str, re.Match[str]], Span | None]


@dataclass(frozen=True, slots=True)
class _Rule:
    """`pattern` runs over the whole text, or, when `anchors` is set, only where the lower-cased text has one
    of them. Patterns open with a literal or a character class (look-behinds come after the first character)
    so that the regex engine skips ahead in C instead of trying every position."""

    kind: DetectorKind
    pattern: re.Pattern[str]
    worth_scanning: Callable[[_Text], bool]
    accept: Accept
    anchors: tuple[str, ...] = ()


def _c(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII | flags)


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


# --- email -------------------------------------------------------------------------------------------------

# Anchored on the "@" (a fast literal search); the local part is then read backwards from it.
_EMAIL_DOMAIN = _c(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w-]|\.[A-Za-z0-9])"
)
_LOCAL_PART = frozenset(string.ascii_letters + string.digits + "_.%+-")
_FILE_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "pdf"})  # icon@2x.png


def _accept_email(text: str, m: re.Match[str]) -> Span | None:
    at = start = m.start()
    while start > 0 and at - start <= 64 and text[start - 1] in _LOCAL_PART:  # bounded: 64 is the RFC limit
        start -= 1
    while start < at and text[start] in ".%+-":
        start += 1
    if not 0 < at - start <= 64 or text[at - 1] == "." or m.group(1).lower() in _FILE_TLDS:
        return None
    return start, m.end()


# --- phone -------------------------------------------------------------------------------------------------

_PHONE_END = r"(?![\w:/-]|[.,]\d)"
_PHONE_INTL = _c(r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d+(?:[ .-]\d+){0,5}" + _PHONE_END)
_PHONE_NANP = _c(
    r"[(2-9](?<![\w+.-].)(?:(?<=\()[2-9]\d\d\) ?|(?<=\d)\d\d[ .-])[2-9]\d\d[ .-]\d{4}" + _PHONE_END
)
# Digits right after these words are an order, ticket or document number even when shaped like a phone.
_NOT_A_PHONE_BEFORE = _c(
    r"(?:order|invoice|ref|reference|ticket|tracking|case|sku|serial|isbn|confirmation|booking|"
    r"transaction|account|acct|id|po|#)\W{0,3}(?:(?:no|nr|num|number|id)\b\.?\W{0,3})?$",
    re.IGNORECASE,
)


def _phone_accepter(min_digits: int, max_digits: int) -> Accept:
    def accept(text: str, m: re.Match[str]) -> Span | None:
        start = m.start()
        if not min_digits <= len(_digits(m.group())) <= max_digits:
            return None
        before = text[max(0, start - 24) : start]
        if _NOT_A_PHONE_BEFORE.search(before):
            return None
        # "+100 200 300" after a number or an operator is arithmetic, not a dialling prefix.
        tail = before.rstrip()
        if text[start] == "+" and tail and (tail[-1].isdigit() or tail[-1] in ")+-*/"):
            return None
        if _SSN.fullmatch(m.group()):  # 078-05-1120 is an SSN, reported as such
            return None
        return m.span()

    return accept


# --- payment data ------------------------------------------------------------------------------------------

_CARD = _c(  # groups separated by spaces, dashes, dots or slashes, the same throughout
    r"\d(?<![\w.,+-]\d)(?:\d{12,18}|\d{3}([ ./-])\d{4}(?:\1\d{4}){1,2}(?:\1\d{1,4})?"
    r"|\d{3}([ ./-])\d{6}\2\d{4,5})"
    r"(?![\w-]|[.,]\d)"
)
_IBAN = _c(r"[A-Z](?<![\w-].)[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![a-z0-9])")


def _accept_card(_text: str, m: re.Match[str]) -> Span | None:
    return m.span() if checksums.card_number_ok(_digits(m.group())) else None


def _accept_iban(text: str, m: re.Match[str]) -> Span | None:
    """The candidate may run into a following code word; cut it at its country's IBAN length."""
    want = checksums.iban_length(m.group()[:2])
    compact = m.group().replace(" ", "")
    if not want or len(compact) < want or not checksums.iban_ok(compact[:want]):
        return None
    end, kept = m.start(), 0
    while kept < want:
        kept += text[end] != " "
        end += 1
    return (m.start(), end) if end == m.end() or not text[end].isalnum() else None


# --- national identifiers ----------------------------------------------------------------------------------

_SSN = _c(r"\d(?<![\w-]\d)\d\d([- ])\d{2}\1\d{4}(?![\w-])")
_SSN_LABELLED = _c(
    r"(?<![A-Za-z])(?:ssn|social security(?: number)?)\b\W{1,4}(?P<ssn>\d{9})\b",
    re.IGNORECASE,
)
_NINO = _c(
    r"[A-CEGHJ-PR-TW-Z](?<!\w.)[A-CEGHJ-NPR-TW-Z](?<!BG|GB|KN|NK|NT|TN|ZZ) ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)
_DNI = _c(r"\d(?<!\w\d)\d{7}-?[A-Z]\b")
_NIE = _c(r"[XYZ](?<!\w.)-?\d{7}-?[A-Z]\b")
_CODICE_FISCALE = _c(r"[A-Z](?<!\w.)[A-Z]{5}\d{2}[ABCDEHLMPRST]\d{2}[A-Z]\d{3}[A-Z]\b")


def _accept_ssn(_text: str, m: re.Match[str]) -> Span | None:
    ssn = m.group()  # 078-05-1120 or 078 05 1120
    return m.span() if checksums.ssn_ok(ssn[:3], ssn[4:6], ssn[7:]) else None


def _accept_labelled_ssn(_text: str, m: re.Match[str]) -> Span | None:
    ssn = m.group("ssn")  # 078051120, after "SSN:"
    return m.span("ssn") if checksums.ssn_ok(ssn[:3], ssn[3:5], ssn[5:]) else None


def _accept_dni(_text: str, m: re.Match[str]) -> Span | None:
    return m.span() if checksums.dni_ok(m.group()) else None


def _accept_codice_fiscale(_text: str, m: re.Match[str]) -> Span | None:
    return m.span() if checksums.codice_fiscale_ok(m.group()) else None


# --- network addresses -------------------------------------------------------------------------------------

_IPV4 = _c(r"\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
_VERSION_BEFORE = _c(r"(?:\bv|\bversion|\brelease|\bbuild|\bver\.?|\bsection|§)\s*$", re.IGNORECASE)
# Anchored on the first ":" (a fast literal search); the first group is then read backwards from it.
_IPV6_REST = _c(r":[0-9A-Fa-f:.]+")
_HEX = frozenset(string.hexdigits)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _accept_ipv4(text: str, m: re.Match[str]) -> Span | None:
    """Octets 0-255 without leading zeros, and no "version"/"v" right before (v1.2.3.4 is a release).
    Loopback, 0.0.0.0 and the broadcast address name no host, so they are not sensitive."""
    octets = m.group().split(".")
    if any(int(o) > 255 or (o[0] == "0" and len(o) > 1) for o in octets):
        return None
    if octets[0] == "127" or m.group() in ("0.0.0.0", "255.255.255.255"):
        return None
    if text.startswith(":", m.end()) and text[m.end() + 1 : m.end() + 2].isdigit():
        return m.span()  # host:port is an address whatever precedes it
    return None if _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()) else m.span()


def _accept_ipv6(text: str, m: re.Match[str]) -> Span | None:
    """Real addresses have digits and two groups; `abc::def` (C++ scope) and `::1` are left alone."""
    start, end = m.start(), m.end()
    while start > 0 and m.start() - start < 4 and text[start - 1] in _HEX:
        start -= 1
    while text[end - 1] == ".":
        end -= 1
    if (start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:.")) or (
        end < len(text) and (text[end].isalnum() or text[end] == "_")
    ):
        return None
    candidate = text[start:end]
    if "::" not in candidate and candidate.count(":") != 7:
        return None
    if sum(1 for g in candidate.split(":") if g) < 2 or not any(ch.isdigit() for ch in candidate):
        return None
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return None
    return start, end


# --- the rule table ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _HasDigits:
    """The pre-filter of a rule that needs at least `n` ASCII digits (`detect` sorts these rules by it)."""

    n: int

    def __call__(self, t: _Text) -> bool:
        return t.digits >= self.n


def _has_digits(n: int) -> Callable[[_Text], bool]:
    return _HasDigits(n)


def _contains(*needles: str) -> Callable[[_Text], bool]:
    return lambda t: any(n in t.text for n in needles)


def _always(_t: _Text) -> bool:
    return True


_K, _N, _C = DetectorKind, national_formats, credentials
_RULES: tuple[_Rule, ...] = (
    _Rule(_K.EMAIL, _EMAIL_DOMAIN, _contains("@"), _accept_email),
    _Rule(_K.PHONE, _PHONE_INTL, lambda t: t.digits >= 8 and "+" in t.text, _phone_accepter(8, 15)),
    _Rule(_K.PHONE, _PHONE_NANP, _has_digits(10), _phone_accepter(10, 10)),
    _Rule(_K.CREDIT_CARD, _CARD, _has_digits(13), _accept_card),
    _Rule(_K.IBAN, _IBAN, _has_digits(4), _accept_iban),
    _Rule(_K.NATIONAL_ID, _SSN, _has_digits(9), _accept_ssn),
    _Rule(_K.NATIONAL_ID, _SSN_LABELLED, _has_digits(9), _accept_labelled_ssn, ("ssn", "social security")),
    _Rule(_K.NATIONAL_ID, _NINO, _has_digits(6), _span),
    _Rule(_K.NATIONAL_ID, _DNI, _has_digits(8), _accept_dni),
    _Rule(_K.NATIONAL_ID, _NIE, _has_digits(7), _accept_dni),
    _Rule(_K.NATIONAL_ID, _CODICE_FISCALE, _has_digits(7), _accept_codice_fiscale),
    _Rule(_K.IP_ADDRESS, _IPV4, lambda t: t.digits >= 4 and "." in t.text, _accept_ipv4),
    _Rule(_K.IP_ADDRESS, _IPV6_REST, lambda t: "::" in t.text or t.text.count(":") >= 7, _accept_ipv6),
    _Rule(_K.NATIONAL_ID, _N.NIR, _has_digits(13), _N.accept_nir),
    _Rule(_K.NATIONAL_ID, _N.STEUER_ID, _has_digits(11), _N.accept_steuer_id),
    _Rule(_K.NATIONAL_ID, _N.AADHAAR, _has_digits(12), _N.accept_aadhaar),
    _Rule(_K.NATIONAL_ID, _N.PAN, _has_digits(4), _N.accept_pan),
    _Rule(_K.NATIONAL_ID, _N.BSN_DOTTED, _has_digits(9), _N.accept_bsn),
    _Rule(_K.NATIONAL_ID, _N.LABELLED_ID, _has_digits(8), _N.accept_labelled_id, _N.ID_LABELS),
    _Rule(_K.PHONE, _N.PHONE_TRUNK, _has_digits(9), _N.accept_trunk_phone),
    _Rule(_K.PHONE, _N.PHONE_MOBILE, _has_digits(9), _N.accept_mobile_phone),
    _Rule(_K.PRIVATE_KEY, _C.PEM_PRIVATE_KEY, _contains("-----BEGIN "), _span),
    _Rule(_K.PRIVATE_KEY, _C.PUTTY_PRIVATE_KEY, _contains("PuTTY-"), _span),
    _Rule(_K.PRIVATE_KEY, _C.BASE64_PEM, _contains("LS0tLS1CRUdJTi"), _C.accept_base64_pem),
    _Rule(_K.API_KEY, _C.OPENAI_ANTHROPIC_KEY, _always, _C.accept_known_key),
    _Rule(_K.API_KEY, _C.STRIPE_KEY, _contains("k_live_", "k_test_"), _C.accept_known_key),
    _Rule(_K.API_KEY, _C.AWS_OR_GOOGLE_KEY, _always, _C.accept_known_key),
    _Rule(_K.API_KEY, _C.GITHUB_TOKEN, _always, _C.accept_known_key),
    _Rule(_K.API_KEY, _C.SLACK_TOKEN, _always, _C.accept_known_key),
    _Rule(_K.API_KEY, _C.SLACK_WEBHOOK, _contains("hooks.slack.com/"), _C.accept_slack_webhook),
    _Rule(_K.API_KEY, _C.JWT, _always, _C.accept_jwt),
    _Rule(_K.API_KEY, _C.SECRET_ASSIGNMENT, _always, _C.accept_secret_assignment, _C.SECRET_WORDS),
    _Rule(_K.API_KEY, _C.URL_PASSWORD, _contains("://"), _C.accept_url_password),
)  # fmt: skip


# The rules `detect` runs, split by pre-filter: those that need only a digit count, fewest first (a text with
# d digits runs the first bisect_right(_DIGITS_NEEDED, d) of them), and the others. The order rules run in
# does not change what `detect` returns: detections are collected in a set, then merged and sorted.
_DIGIT_RULES = tuple(
    sorted(
        (r for r in _RULES if isinstance(r.worth_scanning, _HasDigits)),
        key=lambda r: r.worth_scanning.n,  # type: ignore[attr-defined]
    )
)
_DIGITS_NEEDED = tuple(r.worth_scanning.n for r in _DIGIT_RULES)  # type: ignore[attr-defined]
_OTHER_RULES = tuple(r for r in _RULES if not isinstance(r.worth_scanning, _HasDigits))


def _merge(found: set[Detection]) -> tuple[Detection, ...]:
    """Join overlapping detections of one kind (an IPv4 inside an IPv6, a key found by two rules), and drop
    phone numbers that overlap anything else: digit groups inside an IBAN, card or SSN are not phones."""
    others = [d for d in found if d.kind is not DetectorKind.PHONE]
    found = {
        d
        for d in found
        if d.kind is not DetectorKind.PHONE or not any(o.start < d.end and d.start < o.end for o in others)
    }
    merged: list[Detection] = []
    for d in sorted(found, key=lambda d: (d.kind, d.start, -d.end)):
        last = merged[-1] if merged else None
        if last is not None and last.kind == d.kind and d.start < last.end:
            merged[-1] = Detection(d.kind, last.start, max(last.end, d.end))
        else:
            merged.append(d)
    return tuple(sorted(merged, key=lambda d: (d.start, d.end, d.kind)))


def _matches(rule: _Rule, facts: _Text) -> Iterator[re.Match[str]]:
    if not rule.anchors:
        return rule.pattern.finditer(facts.text)
    return _anchored_matches(rule, facts)


def _anchored_matches(rule: _Rule, facts: _Text) -> Iterator[re.Match[str]]:
    for anchor in rule.anchors:
        at = facts.lower.find(anchor)
        while at >= 0:
            m = rule.pattern.match(facts.text, at)
            if m is not None:
                yield m
            at = facts.lower.find(anchor, at + 1)


def detect(text: str, kinds: frozenset[DetectorKind] | None = None) -> tuple[Detection, ...]:
    """Every sensitive span in `text`, ordered by position; `kinds` limits the scan to those detectors."""
    if not text:
        return ()
    lower = text.lower()
    if len(lower) != len(text):  # "İ" lower-cases to two characters: keep offsets aligned
        lower = text.translate(_ASCII_LOWER)
    # ASCII digits are single bytes in UTF-8 and bytes.translate counts them fastest; surrogatepass because
    # JSON may carry lone surrogates ("\ud800"), which plain UTF-8 refuses to encode.
    encoded = text.encode("utf-8", "surrogatepass")
    facts = _Text(text, lower, len(encoded) - len(encoded.translate(None, b"0123456789")))
    found: set[Detection] = set()
    worth = _DIGIT_RULES[: bisect.bisect_right(_DIGITS_NEEDED, facts.digits)]
    for rule in (*worth, *(r for r in _OTHER_RULES if r.worth_scanning(facts))):
        if kinds is not None and rule.kind not in kinds:
            continue
        for m in _matches(rule, facts):
            span = rule.accept(text, m)
            if span is not None:
                found.add(Detection(rule.kind, *span))
    return _merge(found) if found else ()
