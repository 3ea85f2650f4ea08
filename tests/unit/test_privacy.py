"""Sensitive-data detectors against a corpus per kind, message scanning, and the privacy floor."""

from __future__ import annotations

import pytest

from routing.checksums import card_number_ok, iban_ok, luhn_ok
from routing.privacy import (
    Detection,
    DetectorKind,
    PrivacyTier,
    PrivacyVerdict,
    SensitiveDataBlocked,
    SensitivePolicy,
    detect,
    detect_messages,
    privacy_floor,
)
from tests.support.privacy_corpus import NEGATIVES, POSITIVES

K = DetectorKind
T = PrivacyTier
POSITIVE_CASES = [(kind, text, secret) for kind, cases in POSITIVES.items() for text, secret in cases]
NEGATIVE_CASES = [(kind, text) for kind, texts in NEGATIVES.items() for text in texts]


def _case_id(value: object) -> str:
    return str(value)[:40] if isinstance(value, str) else str(value)


def test_corpus_covers_every_kind_with_ten_of_each() -> None:
    for kind in DetectorKind:
        assert len(POSITIVES[kind]) >= 10, kind
        assert len(NEGATIVES[kind]) >= 10, kind


@pytest.mark.parametrize(("kind", "text", "secret"), POSITIVE_CASES, ids=_case_id)
def test_detector_finds_its_positive(kind: DetectorKind, text: str, secret: str) -> None:
    start = text.index(secret)
    assert Detection(kind, start, start + len(secret)) in detect(text, frozenset({kind}))
    assert kind in {d.kind for d in detect(text)}  # also found when every detector runs


@pytest.mark.parametrize(("kind", "text"), NEGATIVE_CASES, ids=_case_id)
def test_detector_ignores_its_negative(kind: DetectorKind, text: str) -> None:
    found = [(d.kind, text[d.start : d.end]) for d in detect(text) if d.kind == kind]
    assert not found


def test_detections_are_ordered_and_carry_no_text() -> None:
    text = "mail a.b@example.com, card 4111 1111 1111 1111, host 10.0.0.1"
    found = detect(text)
    assert [d.kind for d in found] == [K.EMAIL, K.CREDIT_CARD, K.IP_ADDRESS]
    assert [d.start for d in found] == sorted(d.start for d in found)
    assert all(not isinstance(getattr(d, f), str) or f == "kind" for d in found for f in ("start", "end"))


def test_kinds_limits_the_scan() -> None:
    text = "mail a.b@example.com from 10.0.0.1"
    assert {d.kind for d in detect(text, frozenset({K.IP_ADDRESS}))} == {K.IP_ADDRESS}
    assert detect(text, frozenset()) == ()
    assert detect("") == ()


def test_overlapping_detections_of_one_kind_merge() -> None:
    text = "::ffff:192.0.2.128"
    assert detect(text) == (Detection(K.IP_ADDRESS, 0, len(text)),)


def test_an_ssn_is_not_also_reported_as_a_phone() -> None:
    assert [d.kind for d in detect("SSN 078-05-1120")] == [K.NATIONAL_ID]


def test_offsets_stay_right_around_non_ascii_text() -> None:
    text = "İstanbul ☎ şifre: tel +90 212 555 0147 \ud800 key=Zx9Qw2Er7Ty4Ui1O"
    found = {d.kind: text[d.start : d.end] for d in detect(text)}
    assert found == {K.PHONE: "+90 212 555 0147", K.API_KEY: "Zx9Qw2Er7Ty4Ui1O"}


def test_iban_followed_by_a_code_word_is_cut_at_its_length() -> None:
    text = "to DE89 3704 0044 0532 0130 00 EUR"
    assert detect(text) == (Detection(K.IBAN, 3, 3 + len("DE89 3704 0044 0532 0130 00")),)


def test_checksums() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert card_number_ok("4111111111111111") and not card_number_ok("1234567812345670")  # Luhn ok, no IIN
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_a_4kb_prompt_with_everything_in_it() -> None:
    secrets = " ".join(text for cases in POSITIVES.values() for text, _ in cases[:1])
    text = ("Summarise this support thread for the on-call engineer. " * 80)[: 4096 - len(secrets)] + secrets
    assert {d.kind for d in detect(text)} == set(DetectorKind)


# --- messages ----------------------------------------------------------------------------------------------


def test_detect_messages_reads_strings_text_parts_and_tool_arguments() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "write to jane@example.com"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/10.0.0.1.png"}},
                {"type": "text", "text": "card 4111 1111 1111 1111"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"ip": "10.1.2.3"}'}},
        ]},
    ]  # fmt: skip
    assert detect_messages(messages) == (K.CREDIT_CARD, K.EMAIL, K.IP_ADDRESS)


def test_detect_messages_on_clean_or_odd_messages() -> None:
    assert detect_messages([]) == ()
    assert detect_messages([{"role": "user", "content": "hello there"}]) == ()
    assert detect_messages([{"role": "user", "content": [{"type": "text"}, "junk", {"text": 3}]}]) == ()


# --- the privacy floor -------------------------------------------------------------------------------------


@pytest.mark.parametrize("team", list(PrivacyTier))
@pytest.mark.parametrize("requested", [None, *PrivacyTier])
@pytest.mark.parametrize("policy", [SensitivePolicy.RAISE_FLOOR, SensitivePolicy.ALLOW])
@pytest.mark.parametrize("found", [(), (K.EMAIL,)])
def test_floor_is_never_below_the_team_floor(
    team: PrivacyTier, requested: PrivacyTier | None, policy: SensitivePolicy, found: tuple[DetectorKind, ...]
) -> None:
    verdict = privacy_floor(team, requested, found, policy)
    assert verdict.floor.rank <= team.rank
    if requested is not None:
        assert verdict.floor.rank <= requested.rank or verdict.floor == team


def test_clean_request_keeps_the_team_floor() -> None:
    verdict = privacy_floor(T.EXTERNAL, None, (), SensitivePolicy.RAISE_FLOOR)
    assert verdict == PrivacyVerdict(T.EXTERNAL, (), "team floor external")


def test_request_may_raise_but_not_lower_the_floor() -> None:
    assert privacy_floor(T.EXTERNAL, T.EXTERNAL_ZDR, ()).floor is T.EXTERNAL_ZDR
    lowered = privacy_floor(T.INTERNAL, T.EXTERNAL, ())
    assert lowered.floor is T.INTERNAL
    assert "cannot lower" in lowered.reason


def test_sensitive_request_is_raised_to_internal_by_default() -> None:
    verdict = privacy_floor(T.EXTERNAL, None, [K.EMAIL, K.API_KEY, K.EMAIL])
    assert verdict.floor is T.INTERNAL
    assert verdict.detections == (K.API_KEY, K.EMAIL)
    assert "api_key, email" in verdict.reason and "raised to internal" in verdict.reason


def test_sensitive_request_already_more_private_stays_put() -> None:
    assert privacy_floor(T.EDGE, None, [K.PHONE]).floor is T.EDGE
    assert privacy_floor(T.EXTERNAL, T.EDGE, [K.PHONE]).floor is T.EDGE


def test_allow_policy_routes_as_if_nothing_was_found() -> None:
    verdict = privacy_floor(T.EXTERNAL, None, [K.IBAN], SensitivePolicy.ALLOW)
    assert verdict.floor is T.EXTERNAL
    assert verdict.detections == (K.IBAN,)
    assert "allowed by policy" in verdict.reason


def test_block_policy_raises_with_the_kinds_and_no_text() -> None:
    with pytest.raises(SensitiveDataBlocked) as caught:
        privacy_floor(T.EXTERNAL, None, [K.PRIVATE_KEY, K.CREDIT_CARD], SensitivePolicy.BLOCK)
    assert caught.value.kinds == (K.CREDIT_CARD, K.PRIVATE_KEY)
    assert "credit_card, private_key" in str(caught.value)


def test_block_policy_lets_clean_requests_through() -> None:
    assert privacy_floor(T.EXTERNAL, None, (), SensitivePolicy.BLOCK).floor is T.EXTERNAL
