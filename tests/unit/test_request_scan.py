"""`detect_request` over the labelled corpus of whole requests: recall >= 0.98, false alarms <= 2%."""

from __future__ import annotations

from collections import Counter

import pytest

from routing.privacy import DetectorKind as K
from routing.privacy import detect_messages, detect_request
from tests.support.privacy_corpus_v2 import CASES, Case

POSITIVES = [c for c in CASES if c.kind is not None]
NEGATIVES = [c for c in CASES if c.kind is None]


def _found(case: Case) -> tuple[K, ...]:
    return detect_request(case.messages, case.extras)


def score() -> tuple[float, float, dict[str, tuple[int, int]]]:
    """(recall, false-alarm rate, {label: (found, total)}) over the corpus."""
    per_label: dict[str, list[int]] = {}
    for case in POSITIVES:
        hits = per_label.setdefault(case.label, [0, 0])
        hits[0] += case.kind in _found(case)
        hits[1] += 1
    found = sum(h for h, _ in per_label.values())
    alarms = sum(1 for case in NEGATIVES if _found(case))
    return found / len(POSITIVES), alarms / len(NEGATIVES), {k: (h, n) for k, (h, n) in per_label.items()}


def test_corpus_is_large_and_covers_every_kind() -> None:
    assert len(POSITIVES) >= 250 and len(NEGATIVES) >= 150
    assert {c.kind for c in POSITIVES} == set(K)


def test_recall_and_false_alarms_on_the_corpus(capsys: pytest.CaptureFixture[str]) -> None:
    recall, false_alarms, per_label = score()
    with capsys.disabled():
        print(f"\ncorpus: {len(POSITIVES)} positives, {len(NEGATIVES)} negatives; "
              f"recall {recall:.3f}, false alarms {false_alarms:.3f}")  # fmt: skip
        missed = {k: f"{h}/{n}" for k, (h, n) in per_label.items() if h < n}
        print(f"labels with misses: {missed or 'none'}")
    assert recall >= 0.98
    assert false_alarms <= 0.02


def test_per_kind_recall_is_reported() -> None:
    by_kind: Counter[K] = Counter(c.kind for c in POSITIVES if c.kind in _found(c))
    totals: Counter[K] = Counter(c.kind for c in POSITIVES)
    assert all(by_kind[k] / totals[k] >= 0.9 for k in totals), {k: (by_kind[k], totals[k]) for k in totals}


def test_detect_messages_scans_every_field_of_a_message() -> None:
    messages = [{"role": "user", "name": "jane@example.com", "content": "hi", "meta": {"x": ["10.1.2.3"]}}]
    assert detect_messages(messages) == (K.EMAIL, K.IP_ADDRESS)


def test_values_split_across_parts_and_messages() -> None:
    parts = [{"type": "text", "text": "jane.doe@exa"}, {"type": "text", "text": "mple.com"}]
    assert detect_request([{"role": "user", "content": parts}]) == (K.EMAIL,)
    two = [{"role": "user", "content": "card 4111 1111"}, {"role": "user", "content": "1111 1111"}]
    assert detect_request(two) == (K.CREDIT_CARD,)


def test_request_level_extras_are_scanned() -> None:
    hi = [{"role": "user", "content": "hi"}]
    assert detect_request(hi, (["jane@example.com"],)) == (K.EMAIL,)
    assert detect_request(hi, ({"schema": {"default": "4111-1111-1111-1111"}},)) == (K.CREDIT_CARD,)
    assert detect_request(hi, (None, 3, True, b"plain", {"type": "json_object"})) == ()


def test_hostile_shapes_do_not_break_the_walk() -> None:
    deep: object = "jane@example.com"
    for _ in range(5000):
        deep = [deep]
    assert detect_request([{"role": "user", "content": deep}]) == (K.EMAIL,)  # type: ignore[dict-item]
    assert detect_request([{"role": "user", "content": "[" * 3000}]) == ()
    assert detect_request([{"role": "user", 1: "jane@example.com"}]) == (K.EMAIL,)  # type: ignore[dict-item]
