"""Check digits and plausibility tests behind the sensitive-data detectors: Luhn, IBAN mod-97, card IINs,
US SSN ranges, Spanish DNI/NIE letters, Italian codice fiscale, French NIR, German Steuer-IdNr, Indian
Aadhaar (Verhoeff), Dutch BSN (11-test), and a token-entropy test.

Every function is pure and takes the candidate as matched (separators included where noted); none of them
searches text. A False here means "not the thing", never "malformed input": they do not raise.
"""

from __future__ import annotations

import math
from collections import Counter

# (lowest prefix, highest prefix, card lengths) per card network; prefixes compared on as many leading
# digits as the bound has. Maestro's 6x ranges overlap Discover and UnionPay: the union is what matters.
_IIN_RANGES: tuple[tuple[int, int, range], ...] = (
    (4, 4, range(13, 20, 3)),  # Visa: 13, 16, 19
    (51, 55, range(16, 17)),  # Mastercard
    (2221, 2720, range(16, 17)),  # Mastercard 2-series
    (2200, 2204, range(16, 20)),  # Mir
    (34, 34, range(15, 16)),  # American Express
    (37, 37, range(15, 16)),
    (300, 305, range(14, 20)),  # Diners Club
    (36, 36, range(14, 20)),
    (38, 39, range(14, 20)),
    (3528, 3589, range(16, 20)),  # JCB
    (6011, 6011, range(16, 20)),  # Discover
    (644, 649, range(16, 20)),
    (65, 65, range(16, 20)),
    (62, 62, range(16, 20)),  # UnionPay
    (50, 50, range(13, 20)),  # Maestro
    (56, 58, range(13, 20)),
    (63, 63, range(13, 20)),
    (67, 67, range(13, 20)),
)

# IBAN length per country (SWIFT IBAN registry); a code absent here is not an IBAN country.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip

_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
# Codice fiscale: value of a character in an odd (1st, 3rd, ...) position; digits share their letter's value.
_CF_ODD = (1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23)


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check over a string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_number_ok(digits: str) -> bool:
    """13-19 digits whose prefix belongs to a card network issuing that length, and a valid Luhn digit."""
    n = len(digits)
    if not 13 <= n <= 19:
        return False
    for low, high, lengths in _IIN_RANGES:
        width = len(str(low))
        if low <= int(digits[:width]) <= high and n in lengths:
            return luhn_ok(digits)
    return False


def iban_length(country: str) -> int:
    """The IBAN length of `country` (two capital letters), or 0 where the country issues none."""
    return _IBAN_LENGTHS.get(country, 0)


def iban_ok(compact: str) -> bool:
    """An IBAN without spaces, upper case: right length for its country and the ISO 7064 mod-97 check."""
    if len(compact) != iban_length(compact[:2]) or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    if not rearranged.isalnum() or not rearranged.isascii():
        return False
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """A US SSN's parts fall in issuable ranges: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def dni_ok(candidate: str) -> bool:
    """A Spanish DNI (8 digits + letter) or NIE (X/Y/Z + 7 digits + letter), optionally with dashes."""
    compact = candidate.replace("-", "")
    number, letter = compact[:-1], compact[-1]
    if number[0] in "XYZ":
        number = str("XYZ".index(number[0])) + number[1:]
    return number.isdigit() and _DNI_LETTERS[int(number) % 23] == letter


def codice_fiscale_ok(code: str) -> bool:
    """An Italian codice fiscale (16 characters, upper case) whose last letter is its check character."""
    total = 0
    for i, ch in enumerate(code[:15]):
        value = int(ch) if ch.isdigit() else ord(ch) - 65
        total += _CF_ODD[value] if i % 2 == 0 else value
    return chr(65 + total % 26) == code[15]


def nir_ok(compact: str) -> bool:
    """A French NIR (INSEE number): 13 characters (Corsica writes 2A/2B for its department), then a two-digit
    key equal to 97 minus the number modulo 97. Sex 1 or 2; month 01-12, or 20-42 and 50-99 (unknown)."""
    if len(compact) != 15 or compact[0] not in "12" or not compact[13:].isdigit():
        return False
    month = compact[3:5]
    if not month.isdigit() or not (1 <= int(month) <= 12 or 20 <= int(month) <= 42 or int(month) >= 50):
        return False
    body = compact[:13].replace("2A", "19", 1) if compact[5:7] == "2A" else compact[:13]
    body = body.replace("2B", "18", 1) if compact[5:7] == "2B" else body
    return body.isdigit() and 97 - int(body) % 97 == int(compact[13:])


def steuer_id_ok(digits: str) -> bool:
    """A German tax id (Steuer-IdNr): 11 digits, no leading 0, one digit of the first ten used two or three
    times and every other at most once, and an ISO 7064 MOD 11,10 check digit."""
    if len(digits) != 11 or not digits.isdigit() or digits[0] == "0":
        return False
    counts = sorted(Counter(digits[:10]).values(), reverse=True)
    if counts[0] not in (2, 3) or (len(counts) > 1 and counts[1] != 1):
        return False
    product = 10
    for ch in digits[:10]:
        total = (int(ch) + product) % 10 or 10
        product = total * 2 % 11
    return (11 - product) % 10 == int(digits[10])


# Verhoeff's dihedral-group tables: multiplication, position permutation.
_VERHOEFF_D = (
    "0123456789", "1234067895", "2340178956", "3401289567", "4012395678",
    "5987604321", "6598710432", "7659821043", "8765932104", "9876543210",
)  # fmt: skip
_VERHOEFF_P = (
    "0123456789", "1576283094", "5803796142", "8916043527",
    "9453126870", "4286573901", "2793806415", "7046913258",
)  # fmt: skip


def verhoeff_ok(digits: str) -> bool:
    """The Verhoeff check over a string of ASCII digits, the check digit last."""
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = int(_VERHOEFF_D[check][int(_VERHOEFF_P[i % 8][int(ch)])])
    return check == 0


def aadhaar_ok(digits: str) -> bool:
    """An Indian Aadhaar number: 12 digits, the first 2-9, and a valid Verhoeff check digit."""
    return len(digits) == 12 and digits.isdigit() and digits[0] not in "01" and verhoeff_ok(digits)


def bsn_ok(digits: str) -> bool:
    """A Dutch BSN: 9 digits passing the 11-test (weights 9..2, and -1 for the last digit), not all zero."""
    if len(digits) != 9 or not digits.isdigit() or digits == "000000000":
        return False
    total = sum(int(ch) * w for ch, w in zip(digits[:8], range(9, 1, -1), strict=True)) - int(digits[8])
    return total % 11 == 0


def looks_random(token: str, *, min_length: int = 12, min_bits_per_char: float = 3.0) -> bool:
    """A token long and varied enough to be a generated secret rather than a word, number or placeholder.

    It needs letters and digits, or three of lower/upper/digit/symbol, and a Shannon entropy of at least
    `min_bits_per_char` over its characters.
    """
    if len(token) < min_length:
        return False
    classes = (
        any(c.islower() for c in token),
        any(c.isupper() for c in token),
        any(c.isdigit() for c in token),
        any(not c.isalnum() for c in token),
    )
    has_letters = classes[0] or classes[1]
    if not ((has_letters and classes[2]) or sum(classes) >= 3):
        return False
    n = len(token)
    bits = -sum(k / n * math.log2(k / n) for k in Counter(token).values())
    return bits >= min_bits_per_char
