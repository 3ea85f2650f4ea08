"""The OpenAI embeddings wire format, for backends that speak it over HTTP (`openai_compat`).

The body always asks for `encoding_format = "float"`; an upstream that answers base64 anyway (little-endian
float32, as OpenAI encodes it) is decoded too. Vectors come back in input order whatever order `data` lists.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

import orjson

from backends.base import EmbeddingRequest, EmbeddingResult, Usage
from backends.errors import BackendBadResponse


def embeddings_body(request: EmbeddingRequest) -> bytes:
    body: dict[str, Any] = {"model": request.model, "input": request.inputs, "encoding_format": "float"}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.user is not None:
        body["user"] = request.user
    return orjson.dumps(body)


def decode_vector(value: Any) -> tuple[float, ...]:
    """A vector as floats, or base64 little-endian float32 bytes."""
    if isinstance(value, str):
        packed = array("f")
        packed.frombytes(base64.b64decode(value, validate=True))
        if sys.byteorder == "big":
            packed.byteswap()
        return tuple(packed)
    if not isinstance(value, list) or not all(isinstance(x, float | int) for x in value):
        raise TypeError("an embedding must be a list of numbers or a base64 string")
    return tuple(float(x) for x in value)


def estimate_input_tokens(request: EmbeddingRequest) -> int:
    """About four characters a token; used only when the upstream reports no usage."""
    return sum((len(i) + 3) // 4 if isinstance(i, str) else len(i) for i in request.inputs)


def parse_embeddings(name: str, content: bytes, request: EmbeddingRequest) -> EmbeddingResult:
    try:
        payload = orjson.loads(content)
        data = sorted(payload["data"], key=lambda item: int(item.get("index", 0)))
        vectors = tuple(decode_vector(item["embedding"]) for item in data)
        usage = payload.get("usage")
        tokens = int(usage.get("prompt_tokens") or 0) if isinstance(usage, dict) else 0
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackendBadResponse(f"backend `{name}` sent unreadable embeddings", detail=repr(exc)) from exc
    if len(vectors) != len(request.inputs):
        raise BackendBadResponse(
            f"backend `{name}` sent {len(vectors)} embeddings for {len(request.inputs)} inputs"
        )
    return EmbeddingResult(
        vectors=vectors,
        usage=Usage(tokens or estimate_input_tokens(request), 0),
        served_model=str(payload.get("model") or request.model),
    )
