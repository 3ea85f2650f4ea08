"""Normalisation, decoding and the national-format check digits, against published examples."""

from __future__ import annotations

import base64

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from routing import checksums
from routing.normalize import decoded_views, normalize
from routing.privacy import DetectorKind as K
from routing.request_scan import detect_kinds


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain ascii stays", "plain ascii stays"),
        ("jane＠example.com", "jane@example.com"),
        ("ja\u200bne@exa\u00admple.com\ufeff", "jane@example.com"),
        ("４１１１\u00a0１１１１", "4111 1111"),
        ("٤١١١ ١١١١", "4111 1111"),
        ("०१२३", "0123"),
        ("a\u2060b\u202fc\u3000d", "ab c d"),
        ("josé@bücher.example", "josx@xn--bcher-kva.example"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@given(st.text())
def test_normalize_leaves_only_ascii_digits_and_no_invisible_characters(text: str) -> None:
    out = normalize(text)
    event("non-ascii input" if not text.isascii() else "ascii input")
    assert all(ch in "0123456789" for ch in out if ch.isdecimal())
    assert not any(ch in out for ch in "\u200b\u00ad\ufeff\u2060")
    assert normalize(out) == out or not out.isascii()  # ASCII output is a fixed point


def test_decoded_views() -> None:
    assert decoded_views("plain text, nothing encoded") == []
    assert "jane@example.com" in decoded_views("jane%40example.com")
    assert "jane@example.com" in decoded_views("jane&#64;example.com")
    assert "jane@example.com" in decoded_views("jane\\u0040example.com")
    encoded = base64.b64encode(b"card 4111 1111 1111 1111").decode()
    assert "card 4111 1111 1111 1111" in decoded_views(f"data:text/plain;base64,{encoded}")
    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff mail jane@example.com").decode()
    assert decoded_views(urlsafe) == []  # not UTF-8 text
    assert decoded_views("internationalization_and_localization_helpers") == []


def test_nested_encodings_are_decoded_two_levels_deep() -> None:
    inner = base64.b64encode(b"jane@example.com").decode().replace("=", "%3D")
    assert K.EMAIL in detect_kinds(f"q={inner}")


def test_nir() -> None:
    assert checksums.nir_ok("184127645108946")  # INSEE's example, key 46
    assert not checksums.nir_ok("184127645108947")
    corsican = "184012A000001"  # department 2A counts as 19 in the key
    assert checksums.nir_ok(corsican + f"{97 - int('1840119000001') % 97:02}")
    assert not checksums.nir_ok(corsican + f"{97 - int('1840120000001') % 97:02}")
    assert not checksums.nir_ok("384127645108946")  # sex digit 3


def test_steuer_id() -> None:
    assert checksums.steuer_id_ok("86095742719")  # the BZSt's example
    assert not checksums.steuer_id_ok("86095742718")
    assert not checksums.steuer_id_ok("06095742719")  # leading 0
    assert not checksums.steuer_id_ok("12345678903")  # every digit once: no repeated digit


def test_verhoeff_and_aadhaar() -> None:
    assert checksums.verhoeff_ok("2363") and not checksums.verhoeff_ok("2364")  # Verhoeff's example
    assert checksums.aadhaar_ok("234123412346") and not checksums.aadhaar_ok("234123412347")
    assert not checksums.aadhaar_ok("134123412346")  # Aadhaar never starts with 0 or 1


def test_bsn() -> None:
    assert checksums.bsn_ok("111222333") and checksums.bsn_ok("123456782")
    assert not checksums.bsn_ok("111222334") and not checksums.bsn_ok("000000000")


@given(st.text(alphabet="0123456789", min_size=11, max_size=11))
def test_steuer_id_check_digit_is_the_only_one(digits: str) -> None:
    valid = [d for d in "0123456789" if checksums.steuer_id_ok(digits[:10] + d)]
    event(f"{len(valid)} valid check digits")
    assert len(valid) <= 1


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Ruf an: 0151/23456789", K.PHONE),
        ("mobile 92793 71425", K.PHONE),
        ("tel 05 56 12 34 56", K.PHONE),
        ("PAN ABCPE1234F", K.NATIONAL_ID),
        ("server 10.20.30.40:8080", K.IP_ADDRESS),
        ("postgres://app:s3cr3tPw@db.internal:5432/app", K.API_KEY),
        ("xa" + "pp-1-A01ABCDEF12-1234567890123-abcdef0123456789abcdef", K.API_KEY),
    ],
)
def test_new_formats_are_found(text: str, kind: K) -> None:
    assert kind in detect_kinds(text)


@pytest.mark.parametrize(
    "text",
    [
        "Meeting on 05.06.2023 12:00",
        "ISBN-10 0-306-40615-2",
        "PAN card format AAAAA9999A",
        "postgres://user:password@localhost/db",
        "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "NL91 ABNA 0417 1643 01",
    ],
)
def test_look_alikes_are_not_found(text: str) -> None:
    assert detect_kinds(text) == set()
