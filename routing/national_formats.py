"""National-format detectors: French NIR, German Steuer-IdNr, Indian Aadhaar and PAN, Dutch BSN, and phone
numbers written without `+` (UK `07…`, FR `05…`, DE `0151/…`, IN `92793 71425`).

Patterns find candidates; each is confirmed by its check digit (`routing.checksums`) or, for phones, by
libphonenumber's numbering plans (`phonenumbers.is_valid_number`) for the regions in `PHONE_REGIONS`.
Numbers whose check digit is weak (1 in 11 for a BSN, 1 in 10 for an unspaced Aadhaar) need their label
nearby. Pure; each `accept_*` takes the text and a match and returns the span to report, or None.
"""

from __future__ import annotations

import re

import phonenumbers

from routing import checksums

Span = tuple[int, int]


def _c(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII | flags)


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


# After the first digit: no word, sign or separator glued before it, and no digit group just before it.
_START = r"(?<![\w.,+/-]\d)(?<!\d[ -]\d)"
_STOP = r"(?![\w-]|[.,/]\d| \d)"
# Digits right after these words are an order, ticket or document number, whatever their shape.
_NOT_PERSONAL_BEFORE = _c(
    r"(?:order|invoice|ref|reference|ticket|tracking|case|sku|serial|isbn(?:-1[03])?|confirmation|booking|"
    r"build|part|item|model|lot|"
    r"transaction|account|acct|po|#|version|release|issue|pr|job|batch|run)\W{0,3}"
    r"(?:(?:no|nr|num|number|id)\b\.?\W{0,3})?$",
    re.IGNORECASE,
)


_IBAN_BEFORE = _c(r"\b[A-Z]{2}\d{2}(?: [A-Z0-9]{4})+ $")  # the tail of an IBAN written in groups


def _personal_context(text: str, start: int) -> bool:
    before = max(0, start - 40)
    return not (_NOT_PERSONAL_BEFORE.search(text, before, start) or _IBAN_BEFORE.search(text, before, start))


# --- national identifiers ----------------------------------------------------------------------------------

NIR = _c(r"[12]" + _START + r"[ .]?\d\d[ .]?\d\d[ .]?(?:\d\d|2[AB])[ .]?\d{3}[ .]?\d{3}[ .]?\d\d" + _STOP)
STEUER_ID = _c(r"[1-9]" + _START + r"\d(?:\d{9}|(?: \d{3}){3})" + _STOP)
AADHAAR = _c(r"[2-9]" + _START + r"\d{3}([ -])\d{4}\1\d{4}" + _STOP)
PAN = _c(r"[A-Z](?<![\w-].)[A-Z]{2}[ABCFGHJLPT][A-Z]\d{4}[A-Z](?![\w-])")
BSN_DOTTED = _c(r"\d" + _START + r"\d{3}\.\d{2}\.\d{3}" + _STOP)
# Matched only where a label starts (found on the lower-cased text): the number that follows it.
LABELLED_ID = _c(
    r"(?:bsn|burgerservicenummer|sofi-?nummer|citizen service number|aadhaar|aadhar|uidai)"
    r"(?:\W{0,4}(?:no|nr|number|nummer|card|is)\b\.?)?\W{1,4}(?P<id>\d[\d .]{7,14}\d)(?![\w-]|[.,]\d)",
    re.IGNORECASE,
)
ID_LABELS = ("bsn", "burgerservicenummer", "sofi", "citizen service number", "aadhaar", "aadhar", "uidai")


def accept_nir(_text: str, m: re.Match[str]) -> Span | None:
    return m.span() if checksums.nir_ok(m.group().replace(" ", "").replace(".", "")) else None


def accept_steuer_id(text: str, m: re.Match[str]) -> Span | None:
    ok = checksums.steuer_id_ok(_digits(m.group())) and _personal_context(text, m.start())
    return m.span() if ok else None


def accept_aadhaar(text: str, m: re.Match[str]) -> Span | None:
    ok = checksums.aadhaar_ok(_digits(m.group())) and _personal_context(text, m.start())
    return m.span() if ok else None


def accept_pan(_text: str, m: re.Match[str]) -> Span | None:
    """Not the format's own placeholder (AAAAA9999A, ABCDE1234F is a real shape but a common example)."""
    pan = m.group()
    return None if len(set(pan[:5])) == 1 or len(set(pan[5:9])) == 1 else m.span()


def accept_bsn(_text: str, m: re.Match[str]) -> Span | None:
    return m.span() if checksums.bsn_ok(_digits(m.group())) else None


def accept_labelled_id(_text: str, m: re.Match[str]) -> Span | None:
    """A BSN (8 or 9 digits, 11-test) or an Aadhaar (12 digits, Verhoeff) after its label."""
    digits = _digits(m.group("id"))
    if checksums.bsn_ok(digits.zfill(9)) or checksums.aadhaar_ok(digits):
        return m.span("id")
    return None


# --- phone numbers in national format ----------------------------------------------------------------------

# Regions whose national numbers start with a trunk 0 (Italy's landlines keep theirs); tried in order.
PHONE_REGIONS = ("GB", "FR", "DE", "NL", "IN", "IT", "BE", "AT", "CH", "IE", "AU", "ES", "US")
_PHONE_STOP = r"(?![\w:/-]|[.,]\d)"  # 12:00 is a time, 10/2024 a date
PHONE_TRUNK = _c(r"[(0](?<![\w+./-][(0])(?<!\d[ -][(0])0?[\d ()./-]{6,17}\d" + _PHONE_STOP)
# Indian mobiles (6-9, ten digits, often 5+5), Spanish (6/7/9, 3+3+3) and Italian (3, 3+3+4) mobiles.
PHONE_MOBILE = _c(r"[36789]" + _START + r"\d{2}(?:\d\d[ -]?\d{5}|\d{7}| \d{3} \d{3,4})" + _PHONE_STOP)
_DAY, _MONTH = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])"
_DATE = _c(rf"\(?(?:{_DAY}[./-]{_MONTH}[./-](?:19|20)?\d\d|(?:19|20)\d\d[./-]{_MONTH}[./-]{_DAY})(?!\d)")
_MOBILE_REGIONS = {"6": ("IN", "ES"), "7": ("IN", "ES"), "8": ("IN",), "9": ("IN", "ES"), "3": ("IT",)}


def _valid_phone(candidate: str, regions: tuple[str, ...]) -> bool:
    for region in regions:
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


def _phone_shape_ok(text: str, m: re.Match[str]) -> bool:
    group = m.group()
    if group.count("(") != group.count(")") or group.count("/") > 1 or _DATE.match(group):
        return False
    return _personal_context(text, m.start())


def accept_trunk_phone(text: str, m: re.Match[str]) -> Span | None:
    digits = _digits(m.group())
    if not 9 <= len(digits) <= (15 if digits.startswith("00") else 13) or not _phone_shape_ok(text, m):
        return None
    return m.span() if _valid_phone(m.group(), PHONE_REGIONS) else None


def accept_mobile_phone(text: str, m: re.Match[str]) -> Span | None:
    digits = _digits(m.group())
    if not _phone_shape_ok(text, m):
        return None
    return m.span() if _valid_phone(digits, _MOBILE_REGIONS.get(digits[0], ())) else None
