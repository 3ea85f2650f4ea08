"""The prefix key of a chat request (gateway/pipeline/prefix.py) and the config of owned capacity and SLOs."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config
from gateway.live.state import policy_of, with_model_slo
from gateway.pipeline.prefix import cached_messages, prefix_key, prefix_keys

SYSTEM = {"role": "system", "content": "You are a careful agent. " * 60}  # 1500 characters


def key(*messages: dict[str, object], min_chars: int = 1024, max_chars: int = 16_384) -> int | None:
    return prefix_key(list(messages), min_chars=min_chars, max_chars=max_chars)  # type: ignore[arg-type]


def test_every_turn_of_a_conversation_shares_the_key_of_its_opening() -> None:
    first = key(SYSTEM, {"role": "user", "content": "plan the migration"})
    later = key(
        SYSTEM,
        {"role": "user", "content": "plan the migration"},
        {"role": "assistant", "content": "step one ..."},
        {"role": "user", "content": "and step two?"},
    )
    assert first is not None and first == later
    other = key(SYSTEM, {"role": "user", "content": "summarise the incident"})
    assert other is not None and other != first  # another session of the same app: another key


def test_a_later_turn_expects_everything_but_its_last_message_cached() -> None:
    user = {"role": "user", "content": "plan the migration"}
    assert cached_messages([SYSTEM, user]) == 0  # the opening: nothing of this conversation was served yet
    later = [SYSTEM, user, {"role": "assistant", "content": "step one"}, {"role": "user", "content": "two?"}]
    assert cached_messages(later) == 3
    assert cached_messages([user, {"role": "assistant", "content": "ok"}, user]) == 2


def test_short_openings_and_a_zero_minimum_get_no_key() -> None:
    assert key({"role": "user", "content": "hi"}) is None
    assert key(SYSTEM, {"role": "user", "content": "x"}, min_chars=0) is None
    parts = {"role": "user", "content": [{"type": "text", "text": "y" * 2000}]}
    assert key(parts) is not None


def test_only_the_first_max_chars_are_hashed() -> None:
    a = key({"role": "system", "content": "z" * 5000 + "tail one"}, {"role": "user", "content": "q"})
    b = key({"role": "system", "content": "z" * 5000 + "tail two"}, {"role": "user", "content": "q"})
    assert a is not None and b is not None and a != b
    assert key(
        {"role": "system", "content": "z" * 5000 + "tail one"},
        {"role": "user", "content": "q"},
        max_chars=4096,
    ) == key(
        {"role": "system", "content": "z" * 5000 + "tail two"},
        {"role": "user", "content": "q"},
        max_chars=4096,
    )


def _config(**backend: object) -> dict[str, object]:
    return {
        "backends": {"gpu": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", **backend}},
        "models": {
            "m": {"backend": "gpu", "slo_p95_ttft_ms": 800, "max_ttft_ms": 3000, "max_latency_ms": 30_000},
            "bare": {"backend": "gpu"},
        },
        "teams": {
            "t": {
                "slo_p95_ttft_ms": 1200,
                "slo_p95_e2e_ms": 9000,
                "max_ttft_ms": 4000,
                "max_latency_ms": 20_000,
            }
        },
    }


def test_capacity_and_slo_config() -> None:
    cfg = parse_config(_config(usd_per_hour="2", capacity={"tokens_per_s": [[1, 40], [8, 200]]}))
    curve = cfg.backends["gpu"].capacity.curve()  # type: ignore[union-attr]
    assert curve.slots == 8 and curve.aggregate_tokens_per_s(8) == 200
    policy = with_model_slo(policy_of(cfg.teams["t"]), cfg.models["m"])
    assert (policy.slo_p95_ttft_ms, policy.slo_p95_e2e_ms) == (800, 9000)  # the tighter of team and model
    assert (policy.max_ttft_ms, policy.max_latency_ms) == (3000, 20_000)
    assert with_model_slo(policy, cfg.models["bare"]) == policy  # a model without them leaves the team's
    with pytest.raises(ConfigError, match=r"backends\.gpu\.capacity\.tokens_per_s: x values must increase"):
        parse_config(_config(capacity={"tokens_per_s": [[4, 100], [2, 50]]}))


def test_prefill_rate_and_must_stay_reserve_config() -> None:
    capacity = {"tokens_per_s": [[1, 40], [8, 200]], "prefill_tokens_per_s": 165}
    capacity |= {"reserve_slots": 2, "reserve_ttft_ms": 1250}
    backend = parse_config(_config(usd_per_hour="2", capacity=capacity)).backends["gpu"]
    curve = backend.capacity.curve()  # type: ignore[union-attr]
    assert (curve.prefill_tokens_per_s, curve.reserve_slots, curve.reserve_ttft_ms) == (165, 2, 1250)
    with pytest.raises(ConfigError, match=r"backends\.gpu\.capacity\.reserve_slots must be >= 0 and below"):
        parse_config(_config(capacity={"tokens_per_s": [[1, 40], [8, 200]], "reserve_slots": 8}))
    with pytest.raises(ConfigError, match=r"reserve_ttft_ms"):
        parse_config(_config(capacity={"tokens_per_s": [[1, 40]], "reserve_ttft_ms": 0}))
    capacity = {"tokens_per_s": [[1, 40]], "prefill_tokens_per_s": 165, "prefill_us_per_context_token": 0.9}
    curve = parse_config(_config(capacity=capacity)).backends["gpu"].capacity.curve()  # type: ignore[union-attr]
    assert curve.prefill_us_per_context_token == 0.9
    capacity = {"tokens_per_s": [[1, 40]], "decode_us_per_context_token": 2.9}
    assert (
        parse_config(_config(capacity=capacity)).backends["gpu"].capacity.curve().decode_us_per_context_token
        == 2.9
    )  # type: ignore[union-attr]
    with pytest.raises(
        ConfigError, match=r"capacity\.prefill_us_per_context_token .*needs .*prefill_tokens_per_s"
    ):
        parse_config(_config(capacity={"tokens_per_s": [[1, 40]], "prefill_us_per_context_token": 0.9}))


def test_prefix_holders_remember_the_latest_owned_deployment_of_recent_conversations() -> None:
    from gateway.live.state import PrefixHolders

    holders = PrefixHolders(capacity=2)

    def holder(key: int | None) -> str | None:
        held = holders.held(key)
        return None if held is None else held[0]

    holders.record(1, "m@gpu-a")
    holders.record(2, "m@gpu-b")
    holders.record(1, "m@gpu-c")  # the conversation moved (a spill): its cache is there now
    assert holder(1) == "m@gpu-c" and holder(None) is None
    holders.record(3, "m@gpu-a")  # over capacity: the least recently served conversation (2) is forgotten
    assert holder(2) is None and holder(3) == "m@gpu-a"
    holders.record(1, None)  # a turn the cloud served: gpu-c still holds the turns before it
    assert holder(1) == "m@gpu-c"
    holders.record(4, None)  # a conversation only the cloud has served: no holder
    assert holder(4) is None
    holders.record(5, "m@gpu-b", written=7, messages=3)  # its prompt's 2 messages and the reply
    assert holders.held(5) == ("m@gpu-b", 7, 3)


def test_the_system_prompt_has_a_key_of_its_own_shared_by_every_conversation_it_opens() -> None:
    def keys(*messages: dict[str, object], min_chars: int = 1024) -> tuple[int | None, int | None, int]:
        return prefix_keys(list(messages), min_chars=min_chars, max_chars=16_384)  # type: ignore[arg-type]

    developer = {"role": "developer", "content": "Answer in French."}
    a = keys(SYSTEM, developer, {"role": "user", "content": "plan the migration"})
    b = keys(SYSTEM, developer, {"role": "user", "content": "summarise the incident"})
    assert a[0] != b[0] and a[1] is not None and a[1] == b[1] and a[2] == b[2] == 2
    assert a[0] == key(SYSTEM, developer, {"role": "user", "content": "plan the migration"})
    assert keys(SYSTEM, {"role": "user", "content": "x"})[1] != a[1]  # another system prompt, another key
    # A short system prompt, none at all, or an opening that is all system prompt: no key of its own.
    short = {"role": "system", "content": "Be brief."}
    assert keys(short, {"role": "user", "content": "y" * 2000})[1:] == (None, 0)
    assert keys({"role": "user", "content": "y" * 2000})[1:] == (None, 0)
    assert keys(SYSTEM)[0] is not None and keys(SYSTEM)[1:] == (None, 0)
    assert keys(SYSTEM, {"role": "user", "content": "x"}, min_chars=0) == (None, None, 0)
