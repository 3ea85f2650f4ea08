"""The embeddings translator: OpenAI's `/v1/embeddings` wire format <-> the pipeline's values.

Parsing is strict and turns every problem into an `InvalidRequest` naming the field: `input` is a non-empty
string, a list of them, a token-id array or a list of those (at most `MAX_INPUTS`, none empty).
Backends return floats; `encoding_format = "base64"` (what recent `openai` SDKs ask for by default) is done
here: each vector as little-endian float32 bytes, base64-encoded, as OpenAI sends it.
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import EmbeddingRequest, EmbeddingResult
from backends.errors import SwitchboardError
from gateway.errors import InvalidRequest, error_body
from gateway.pipeline.flow import Answer, ChunkStream
from gateway.pipeline.request import GatewayRequest, RequestContext
from gateway.translate.checks import check_json_ints

ENDPOINT = "embeddings"
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
MAX_TOKEN_ID = 2**31 - 1
_INPUT_SHAPES = (
    "a non-empty string, a list of non-empty strings, or token ids (a list of integers, or a list of them)"
)


class EmbeddingsBody(BaseModel):
    """`POST /v1/embeddings` as we accept it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]] = Field(json_schema_extra={"maxItems": MAX_INPUTS})
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65_536)
    user: str | None = Field(default=None, max_length=256)
    switchboard: dict[str, Any] | None = None  # routing preferences (see routing.preferences)


class _Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class _Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingsAnswer(BaseModel):
    """What `render_embeddings` writes, for the published schema."""

    object: Literal["list"]
    data: list[_Embedding]
    model: str
    usage: _Usage


def parse_embeddings_body(raw: bytes) -> tuple[EmbeddingsBody, tuple[str, ...] | tuple[tuple[int, ...], ...]]:
    """The body and its inputs, normalised to a tuple of texts or a tuple of token-id tuples."""
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON embeddings request")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON; send a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    if "input" not in data:
        raise InvalidRequest("missing required parameter `input`", param="input")
    inputs = parse_input(data["input"])
    try:
        body = EmbeddingsBody.model_validate({**data, "input": ""}, strict=True)  # `input` checked above
    except ValidationError as exc:
        raise _invalid_from(exc) from None
    if body.switchboard is not None:
        check_json_ints(body.switchboard, "switchboard")
    return body.model_copy(update={"input": data["input"]}), inputs


def parse_input(value: object) -> tuple[str, ...] | tuple[tuple[int, ...], ...]:
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("`input` must not be an empty string", param="input")
        return (value,)
    if not isinstance(value, list):
        raise InvalidRequest(f"`input` must be {_INPUT_SHAPES}", param="input")
    if not value:
        raise InvalidRequest("`input` must not be an empty list", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(
            f"`input` holds {len(value)} items; at most {MAX_INPUTS} per request (split it)", param="input"
        )
    if all(isinstance(item, str) for item in value):
        for i, item in enumerate(value):
            if not item:
                raise InvalidRequest(f"`input.{i}` must not be an empty string", param=f"input.{i}")
        return tuple(value)
    if all(_is_token(item) for item in value):
        return (_token_ids(value, "input"),)
    if all(isinstance(item, list) for item in value):
        return tuple(_token_ids(item, f"input.{i}") for i, item in enumerate(value))
    raise InvalidRequest(f"`input` must be {_INPUT_SHAPES}, not a mix", param="input")


def _is_token(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _token_ids(items: Sequence[object], param: str) -> tuple[int, ...]:
    if not items:
        raise InvalidRequest(f"`{param}` must not be an empty list of token ids", param=param)
    for item in items:
        if not _is_token(item) or not 0 <= item <= MAX_TOKEN_ID:  # type: ignore[operator]
            raise InvalidRequest(
                f"`{param}` must hold token ids: integers from 0 to {MAX_TOKEN_ID}", param=param
            )
    return tuple(items)  # type: ignore[arg-type]


def _invalid_from(exc: ValidationError) -> InvalidRequest:
    err = exc.errors(include_url=False, include_input=False)[0]
    param = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return InvalidRequest(f"missing required parameter `{param}`", param=param)
    if err["type"] == "extra_forbidden":
        name = param[:64]
        return InvalidRequest(f"unknown parameter `{name}`; remove it from the request", param=name)
    return InvalidRequest(f"invalid value for `{param}`: {err['msg']}", param=param)


def float32_base64(vector: Sequence[float]) -> str:
    """Little-endian float32 bytes, base64: what OpenAI sends for `encoding_format = "base64"`."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def render_embeddings(result: EmbeddingResult, *, model: str, encoding: str) -> bytes:
    encode = float32_base64 if encoding == "base64" else list
    tokens = result.usage.prompt_tokens
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(vector)}
                for i, vector in enumerate(result.vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


Parsed = tuple[EmbeddingsBody, tuple[str, ...] | tuple[tuple[int, ...], ...]]


class Embeddings:
    """`POST /v1/embeddings` on the shared pipeline (never streamed)."""

    endpoint = ENDPOINT
    path = "/v1/embeddings"
    body_model = EmbeddingsBody
    answer_model = EmbeddingsAnswer

    def parse(self, raw: bytes) -> Parsed:
        return parse_embeddings_body(raw)

    def to_request(self, parsed: Parsed, ctx: RequestContext) -> GatewayRequest:
        body, inputs = parsed
        call = EmbeddingRequest(
            model=body.model,
            inputs=inputs,
            request_id=ctx.request_id,
            dimensions=body.dimensions,
            user=body.user,
            timeout_s=ctx.timeout_s,
        )
        return ctx.gateway_request(ENDPOINT, call, preferences=body.switchboard)

    def render(self, answer: Answer, parsed: Parsed, request: GatewayRequest) -> bytes:
        body = parsed[0]
        return render_embeddings(answer.embedding, model=body.model, encoding=body.encoding_format)

    async def render_stream(
        self, stream: ChunkStream, parsed: Parsed, request: GatewayRequest
    ) -> AsyncIterator[bytes]:
        raise InvalidRequest("`stream` is not a field of embeddings requests", param="stream")
        yield b""  # pragma: no cover - makes this an async generator

    def error_body(self, exc: SwitchboardError) -> bytes:
        return error_body(exc)
