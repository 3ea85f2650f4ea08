"""Embeddings pieces without I/O: input parsing, base64 encoding, cache keys and entries, wire parsing."""

from __future__ import annotations

import base64
import struct

import pytest

from backends.base import ChatRequest, EmbeddingRequest, EmbeddingResult, Usage
from backends.embedding_wire import decode_vector, parse_embeddings
from backends.errors import BackendBadResponse
from gateway.cache.keys import cache_key, cacheable
from gateway.cache.store import decode_entry, encode_entry, entry_from_result
from gateway.errors import InvalidRequest
from gateway.translate.openai_embeddings import float32_base64, parse_embeddings_body, parse_input


def test_inputs_normalise_to_texts_or_token_arrays() -> None:
    assert parse_input("hi") == ("hi",)
    assert parse_input(["a", "b"]) == ("a", "b")
    assert parse_input([1, 2, 3]) == ((1, 2, 3),)
    assert parse_input([[1, 2], [3]]) == ((1, 2), (3,))


@pytest.mark.parametrize("bad", ["", [], [""], [[]], ["a", [1]], [True], [1.5], None, [-1], [2**40]])
def test_bad_inputs_are_refused_by_name(bad: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_input(bad)
    assert info.value.param is not None and info.value.param.startswith("input")


def test_body_keeps_its_fields_and_refuses_unknown_ones() -> None:
    body, inputs = parse_embeddings_body(b'{"model": "m", "input": ["x"], "encoding_format": "base64"}')
    assert body.encoding_format == "base64" and inputs == ("x",) and body.input == ["x"]
    with pytest.raises(InvalidRequest) as info:
        parse_embeddings_body(b'{"model": "m", "input": "x", "n": 2}')
    assert info.value.param == "n"


def test_base64_is_little_endian_float32_both_ways() -> None:
    vector = [0.5, -1.25, 3.0]
    encoded = float32_base64(vector)
    assert struct.unpack("<3f", base64.b64decode(encoded)) == tuple(vector)
    assert decode_vector(encoded) == tuple(vector)


def test_embedding_keys_differ_from_chat_and_ignore_user() -> None:
    emb = EmbeddingRequest(model="m", inputs=("hi",), request_id="r1", user="u1")
    same = EmbeddingRequest(model="m", inputs=("hi",), request_id="r2", user="u2")
    chat = ChatRequest(model="m", messages=({"role": "user", "content": "hi"},), request_id="r3")
    assert cache_key("team:a", emb) == cache_key("team:a", same)
    assert cache_key("team:a", emb) != cache_key("team:a", chat)
    wider = EmbeddingRequest(model="m", inputs=("hi",), request_id="r4", dimensions=4)
    assert cache_key("team:a", wider) != cache_key("team:a", emb)
    tokens = EmbeddingRequest(model="m", inputs=((1, 2),), request_id="r5")
    assert cache_key("team:a", tokens) != cache_key("team:a", emb)
    assert cacheable(emb, opt_in=False)


def test_entries_hold_vectors() -> None:
    result = EmbeddingResult(((0.1, 0.2), (0.3, -0.4)), Usage(7, 0), "served")
    entry = entry_from_result(result, backend="b", cost_micro_usd=5, route_reason="why")
    back = decode_entry(encode_entry(entry))
    assert back is not None and back.to_result() == result and back.backend == "b"


def test_wire_parse_orders_by_index_and_counts() -> None:
    request = EmbeddingRequest(model="m", inputs=("a", "b"), request_id="r")
    raw = b'{"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}], "model": "x"}'
    got = parse_embeddings("b", raw, request)
    assert got.vectors == ((1.0,), (2.0,)) and got.served_model == "x" and got.usage.prompt_tokens > 0
    with pytest.raises(BackendBadResponse):
        parse_embeddings("b", b'{"data": [{"index": 0, "embedding": [1.0]}]}', request)
    with pytest.raises(BackendBadResponse):
        parse_embeddings("b", b'{"data": "nope"}', request)
