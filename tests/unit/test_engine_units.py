"""The engine's pure parts: stop-string detokenising and OpenAI body checks, with no model and no I/O.

`StopStringDecoder` is fed by a byte-level fake tokenizer (a test double of `decode`), so tokens can split
words, stop strings and even UTF-8 sequences wherever a test wants. The real tokenizer is exercised by
tests/e2e/test_engine_server.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from backends.local.generate import StopStringDecoder
from backends.local.wire import (
    ApiError,
    ChatCompletionBody,
    encode_chat,
    error_envelope,
    normalize_messages,
    parse_body,
    reject_unsupported,
    sampling_params,
)


class ByteTokenizer:
    """Token id i is `vocab[i]` (bytes); decoding replaces a cut UTF-8 sequence with U+FFFD, as HF does."""

    def __init__(self, pieces: Sequence[str | bytes]) -> None:
        self.vocab = [p.encode() if isinstance(p, str) else p for p in pieces]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def _feed(pieces: Sequence[str | bytes], stop: Sequence[str]) -> tuple[list[str], str, bool]:
    """Per-token outputs, the text after `finish()`, and whether a stop string ended it."""
    decoder = StopStringDecoder(ByteTokenizer(pieces), stop)
    deltas = []
    for token_id in range(len(pieces)):
        deltas.append(decoder.add(token_id))
        if decoder.stopped:
            break
    return deltas, decoder.finish(), decoder.stopped


def test_no_stop_strings_emit_each_token_at_once() -> None:
    deltas, tail, stopped = _feed(["Hel", "lo", ",", " world"], stop=())
    assert deltas == ["Hel", "lo", ",", " world"]
    assert tail == "" and not stopped


def test_prefix_of_a_stop_is_held_back_then_released() -> None:
    deltas, tail, stopped = _feed(["1,", "\n", "2,", "\n"], stop=["\n3"])
    assert deltas == ["1,", "", "\n2,", ""]
    assert tail == "\n" and not stopped  # generation ended: the held-back prefix was never a stop


def test_stop_spanning_several_tokens_emits_text_before_it_only() -> None:
    deltas, tail, stopped = _feed(["say S", "T", "O", "P", " more"], stop=["STOP"])
    assert deltas == ["say ", "", "", ""]
    assert tail == "" and stopped


def test_stop_inside_one_token_cuts_that_token() -> None:
    deltas, tail, stopped = _feed(["one", " two<END> three"], stop=["<END>"])
    assert deltas == ["one", " two"]
    assert tail == "" and stopped


def test_stop_at_the_very_start_emits_nothing() -> None:
    deltas, tail, stopped = _feed(["Sto", "p", "after"], stop=["Stop"])
    assert deltas == ["", ""]
    assert tail == "" and stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    deltas, _, stopped = _feed(["xab", "cd"], stop=["cd", "bc", "zz"])
    assert "".join(deltas) == "xa" and stopped


def test_only_the_longest_matching_prefix_is_held_back() -> None:
    # "ab" could start "abc"; "b" alone could start "bcd": hold back two characters, not one.
    deltas, tail, _ = _feed(["xxab"], stop=["abc", "bcd"])
    assert deltas == ["xx"] and tail == "ab"


def test_empty_stop_strings_are_ignored() -> None:
    deltas, tail, stopped = _feed(["a", "b"], stop=["", "zz"])
    assert deltas == ["a", "b"] and tail == "" and not stopped


def test_incomplete_utf8_is_held_until_the_character_is_whole() -> None:
    e_acute = "é".encode()
    deltas, tail, _ = _feed(["caf", e_acute[:1], e_acute[1:], "!"], stop=())
    assert deltas == ["caf", "", "é", "!"] and tail == ""


def _splits(text: str) -> list[list[str]]:
    """Every way to cut `text` into three non-empty tokens."""
    n = len(text)
    return [[text[:i], text[i:j], text[j:]] for i in range(1, n - 1) for j in range(i + 1, n)]


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("a\n1\n2\n3\n4", ["\n3"], "a\n1\n2"),
        ("<|im_end|>x", ["<|im_end|>"], ""),
        ("abcabd", ["abd", "zz"], "abc"),
        ("no stop here", ["stop!"], "no stop here"),
    ],
)
def test_output_is_the_text_before_the_first_stop_however_it_is_tokenised(
    text: str, stop: list[str], expected: str
) -> None:
    for pieces in _splits(text):
        decoder = StopStringDecoder(ByteTokenizer(pieces), stop)
        shown = ""
        for token_id in range(len(pieces)):
            shown += decoder.add(token_id)
            assert expected.startswith(shown), pieces  # nothing past a stop ever leaks out
            if decoder.stopped:
                break
        assert shown + decoder.finish() == expected, pieces


def _body(**fields: Any) -> ChatCompletionBody:
    return ChatCompletionBody.model_validate(
        {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def _raised(call: Any, *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    assert caught.value.status_code == 400
    return caught.value


def test_parse_body_rejects_malformed_json() -> None:
    error = _raised(parse_body, b"{not json")
    assert error.openai_type == "invalid_request_error" and "not valid JSON" in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": 7}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
    ],
)
def test_parse_body_names_the_bad_field(fields: dict[str, Any], param: str) -> None:
    raw = orjson.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **fields})
    assert _raised(parse_body, raw).param == param


def test_parse_body_ignores_unknown_fields() -> None:
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "user": "u1"})
    assert parse_body(raw).model == "m"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_unsupported_fields_are_refused(fields: dict[str, Any], param: str) -> None:
    assert _raised(reject_unsupported, _body(**fields)).param == param


def test_harmless_defaults_of_unsupported_fields_pass() -> None:
    reject_unsupported(_body(n=1, tools=[], tool_choice="none", response_format={"type": "text"}))


def test_roles_are_mapped_and_text_parts_joined() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert normalize_messages(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "x"}, "messages.1.role"),
        ({"role": None, "content": "x"}, "messages.1.role"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "messages.1.content"),
        ({"role": "user", "content": 42}, "messages.1.content"),
    ],
)
def test_bad_messages_name_their_index(message: dict[str, Any], param: str) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "ok"}, message]
    error = _raised(normalize_messages, messages)
    assert error.param == param


class TemplateTokenizer:
    """Records what reaches the chat template; token ids are just character codes."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> dict[str, list[int]]:
        self.calls.append((messages, kwargs))
        return {"input_ids": [ord(c) for c in messages[-1]["content"]]}


def test_encode_chat_applies_the_template_with_a_generation_prompt() -> None:
    tokenizer = TemplateTokenizer()
    assert encode_chat(tokenizer, [{"role": "user", "content": "hi"}]) == [ord("h"), ord("i")]
    [(messages, kwargs)] = tokenizer.calls
    assert messages == [{"role": "user", "content": "hi"}]
    assert kwargs["add_generation_prompt"] is True and kwargs["tokenize"] is True


def test_absent_max_tokens_is_capped_by_the_server_default() -> None:
    assert sampling_params(_body(), 10, 8192, default_max_tokens=1024).max_tokens == 1024
    assert sampling_params(_body(), 8000, 8192, default_max_tokens=1024).max_tokens == 192  # room left
    assert sampling_params(_body(), 10, 8192).max_tokens == 1024  # the module default


def test_explicit_max_tokens_may_exceed_the_default_but_not_the_context() -> None:
    assert sampling_params(_body(max_tokens=4000), 10, 8192, default_max_tokens=16).max_tokens == 4000
    assert sampling_params(_body(max_tokens=9, max_completion_tokens=3), 10, 100).max_tokens == 3
    error = _raised(sampling_params, _body(max_tokens=91), 10, 100)
    assert error.param == "max_tokens" and error.code == "context_length_exceeded"


def test_prompt_that_fills_the_context_is_refused() -> None:
    error = _raised(sampling_params, _body(), 100, 100)
    assert error.param == "messages" and error.code == "context_length_exceeded"


def test_sampling_knobs_and_stop_strings_pass_through() -> None:
    params = sampling_params(_body(temperature=0, top_p=0.5, seed=7, stop="\n"), 10, 100)
    assert (params.temperature, params.top_p, params.seed, params.stop) == (0.0, 0.5, 7, ("\n",))
    assert sampling_params(_body(stop=["a", "b"]), 10, 100).stop == ("a", "b")


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], ["a", ""], ""])
def test_bad_stop_lists_are_refused(stop: Any) -> None:
    assert _raised(sampling_params, _body(stop=stop), 10, 100).param == "stop"


def test_error_envelope_has_the_openai_shape() -> None:
    error = ApiError(400, "use n=1", param="n", code="bad_n")
    assert error_envelope(error) == {
        "error": {"message": "use n=1", "type": "invalid_request_error", "param": "n", "code": "bad_n"}
    }


class PieceTokenizer:
    """SentencePiece-like: "▁" is a space, and a decoded text never starts with one (as Llama's decode).

    So decoding a window is not a slice of decoding everything: the decoder must use the window's context.
    """

    def __init__(self, pieces: Sequence[str | bytes]) -> None:
        self.vocab = [p.encode() if isinstance(p, str) else p for p in pieces]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")
        return text.replace("▁", " ").removeprefix(" ")


@pytest.mark.parametrize("seed", range(20))
def test_incremental_text_equals_decoding_everything_at_once(seed: int) -> None:
    import random

    e_acute, snow = "é".encode(), "☃".encode()
    vocab: list[str | bytes] = ["▁the", "▁cat", "s", "▁", "é", e_acute[:1], e_acute[1:], snow[:2], snow[2:]]
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < 40:  # random text, but a cut character is always completed next
        i = rng.randrange(len(vocab))
        ids += [i, i + 1] if i in (5, 7) else [] if i in (6, 8) else [i]
    tokenizer = PieceTokenizer(vocab)
    decoder = StopStringDecoder(tokenizer, stop=())
    shown = "".join(decoder.add(i) for i in ids) + decoder.finish()
    assert shown == tokenizer.decode(ids)
    cut = ids + [7]  # generation ends inside a character: the tail decodes as a whole decode would
    decoder = StopStringDecoder(tokenizer, stop=())
    shown = "".join(decoder.add(i) for i in cut) + decoder.finish()
    assert shown == tokenizer.decode(cut) and shown.endswith("\ufffd")
