"""The chat completions translator: OpenAI's `/v1/chat/completions` wire format <-> the pipeline's values.

Parsing turns every problem into `InvalidRequest`/`UnsupportedParameter` naming the field (422 never escapes).
Rendering works on plain dicts and orjson, because it sits on the hot path. This module is the only
chat-specific code on the request path; the pipeline behind it knows no wire format.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import ChatRequest, ChatResult, StreamChunk, Usage
from backends.errors import SwitchboardError
from gateway.errors import InvalidRequest, UnsupportedParameter, error_body
from gateway.pipeline.flow import Answer, ChunkStream
from gateway.pipeline.request import GatewayRequest, RequestContext
from gateway.translate.checks import check_json_ints

# Fields OpenAI defines that no Switchboard backend honours yet. A neutral value is accepted; anything else is
# refused by name, so a client never silently gets something other than what it asked for.
_NEUTRAL_IF: dict[str, Any] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "parallel_tool_calls": (None, True),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}


MAX_OUTPUT_TOKENS = 1 << 24  # beyond any context window: a larger value is a client bug, not a request


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


def _document_neutral_fields(schema: dict[str, Any]) -> None:
    """The published schema: the neutral OpenAI fields with the values accepted, and nothing else."""
    props = schema.setdefault("properties", {})
    for name, values in _NEUTRAL_IF.items():
        neutral: list[Any] = []
        for value in values:
            if value not in neutral:  # 0 and 0.0 are one JSON value
                neutral.append(value)
        props[name] = {"enum": neutral}
    schema["additionalProperties"] = False


class ChatCompletionBody(BaseModel):
    """`POST /v1/chat/completions` as we accept it."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_document_neutral_fields)

    model: str = Field(min_length=1, max_length=256)
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"maxItems": 4})
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)
    n: int | None = Field(default=None, ge=1, le=128, json_schema_extra={"maximum": 1})  # n > 1: 400
    stream: bool = False
    stream_options: _StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    switchboard: dict[str, Any] | None = None  # routing preferences (see routing.preferences)

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_chat_body(raw: bytes) -> ChatCompletionBody:
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON chat completion request")
    try:
        # Strict: "stream": "yes", "max_tokens": "100" or true are type errors, not coerced.
        body = ChatCompletionBody.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise invalid_from(exc) from None
    _refuse_unsupported(body)
    _check_content_parts(body)
    _check_forwarded_ints(body)
    return body


# Content part types OpenAI defines, per role. Anything else is refused here, by name, rather than left for a
# backend library to reject (litellm raises a connection error for it, which reads as a failed backend).
_PART_TYPES: dict[str, frozenset[str]] = {
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset({"text"}),
    "function": frozenset({"text"}),
}
_PART_FIELD = {"text": "text", "image_url": "image_url", "input_audio": "input_audio", "file": "file",
               "refusal": "refusal"}  # fmt: skip


def _check_content_parts(body: ChatCompletionBody) -> None:
    for i, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        allowed = _PART_TYPES[message.role]
        for j, part in enumerate(message.content):
            param = f"messages.{i}.content.{j}"
            kind = part.get("type")
            if kind not in allowed:
                raise InvalidRequest(
                    f"`{param}.type` must be one of {', '.join(sorted(allowed))} for a {message.role} "
                    "message",
                    param=f"{param}.type",
                )
            field = _PART_FIELD[kind]
            where = f"{param}.{field}"
            if field not in part:
                raise InvalidRequest(f"missing required parameter `{where}`", param=where)
            if kind in ("text", "refusal") and not isinstance(part[field], str):
                raise InvalidRequest(f"`{where}` must be a string", param=where)


def _check_forwarded_ints(body: ChatCompletionBody) -> None:
    for i, message in enumerate(body.messages):
        if isinstance(message.content, list) or message.model_extra:
            check_json_ints(message.model_dump(exclude_none=True), f"messages.{i}")
    for name in ("tools", "tool_choice", "response_format", "switchboard"):
        value = getattr(body, name)
        if value is not None:
            check_json_ints(value, name)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\])$")


def invalid_from(exc: ValidationError) -> InvalidRequest:
    err = exc.errors(include_url=False, include_input=False)[0]
    if err["type"] == "json_invalid":
        return InvalidRequest("request body is not valid JSON; send a JSON object")
    if err["type"] == "model_type" and not err["loc"]:
        return InvalidRequest("request body must be a JSON object")
    # A union's member type is in the path too ("stop.list[str].0"): the client's field path omits it.
    param = ".".join(str(p) for p in err["loc"] if not _UNION_TAG.match(str(p)))
    msg = str(err["msg"])
    if err["type"] == "missing":
        return InvalidRequest(f"missing required parameter `{param}`", param=param)
    if param == "messages" and err["type"] == "too_short":
        return InvalidRequest("`messages` must contain at least one message", param=param)
    return InvalidRequest(f"invalid value for `{param}`: {msg}", param=param)


def _refuse_unsupported(body: ChatCompletionBody) -> None:
    if body.n is not None and body.n > 1:
        raise UnsupportedParameter(
            "`n` > 1 is not supported: Switchboard returns one choice per request; send n=1 "
            "or make several requests",
            param="n",
        )
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise InvalidRequest("`stop` takes at most 4 sequences", param="stop")
    refuse_unknown_fields(body.model_extra, _NEUTRAL_IF)


def refuse_unknown_fields(extra: Mapping[str, Any] | None, neutral_if: Mapping[str, Any]) -> None:
    """Fields beyond a body model: known-but-unhonoured ones only at a neutral value, others never."""
    for name, value in (extra or {}).items():
        neutral = neutral_if.get(name)
        if neutral is None:
            raise UnsupportedParameter(f"unknown parameter `{name}`; remove it from the request", param=name)
        if value not in neutral:
            raise UnsupportedParameter(
                f"parameter `{name}` is not supported by Switchboard backends; remove it or leave it at "
                "its default",
                param=name,
            )


class _AnswerUsage(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _AnswerChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    message: dict[str, Any]
    logprobs: None
    finish_reason: str | None


class ChatCompletionAnswer(BaseModel):
    """What `render_completion` writes, for the published schema (rendering itself uses plain dicts)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_AnswerChoice]
    usage: _AnswerUsage


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def render_completion(result: ChatResult, *, request_id: str, model: str, created: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": dict(result.message),
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": _usage_dict(result.usage),
        }
    )


class ChunkRenderer:
    """One stream's `chat.completion.chunk` events. Every event of a stream shares its id, created and
    model, so that part is rendered once; per chunk only the delta and the finish reason are serialised.
    The bytes are exactly `orjson.dumps` of the whole chunk object (tests/unit/test_stream_render.py)."""

    __slots__ = ("_head",)
    _TAIL_NULL = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def __init__(self, *, request_id: str, model: str, created: int) -> None:
        self._head = b"".join(
            (
                b'data: {"id":',
                orjson.dumps(f"chatcmpl-{request_id}"),
                b',"object":"chat.completion.chunk","created":',
                orjson.dumps(created),
                b',"model":',
                orjson.dumps(model),
                b',"choices":[{"index":0,"delta":',
            )
        )

    def render(self, chunk: StreamChunk) -> bytes:
        delta = chunk.delta
        body = orjson.dumps(delta if type(delta) is dict else dict(delta))
        reason = chunk.finish_reason
        if reason is None:
            return self._head + body + self._TAIL_NULL
        return b"".join(
            (self._head, body, b',"logprobs":null,"finish_reason":', orjson.dumps(reason), b"}]}\n\n")
        )


def render_usage_chunk(usage: Usage, *, request_id: str, model: str, created: int) -> bytes:
    payload = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage_dict(usage),
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def render_sse_error(error_json: bytes) -> bytes:
    return b"data: " + error_json + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# ---- the translator ---------------------------------------------------------------------------------------

ENDPOINT = "chat.completions"


def chat_request(body: ChatCompletionBody, request_id: str, timeout_s: float) -> ChatRequest:
    return ChatRequest(
        model=body.model,
        messages=tuple(m.model_dump(exclude_none=True) for m in body.messages),
        request_id=request_id,
        max_tokens=body.max_output_tokens(),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_tuple(),
        seed=body.seed,
        user=body.user,
        tools=tuple(body.tools) if body.tools is not None else None,
        tool_choice=body.tool_choice,
        response_format=body.response_format,
        timeout_s=timeout_s,
    )


class ChatCompletions:
    """`POST /v1/chat/completions`: the first translator on the shared pipeline."""

    endpoint = ENDPOINT
    path = "/v1/chat/completions"
    body_model = ChatCompletionBody  # published in /openapi.json; `parse` is what reads a body
    answer_model = ChatCompletionAnswer

    def parse(self, raw: bytes) -> ChatCompletionBody:
        return parse_chat_body(raw)

    def to_request(self, body: ChatCompletionBody, ctx: RequestContext) -> GatewayRequest:
        return ctx.gateway_request(
            ENDPOINT,
            chat_request(body, ctx.request_id, ctx.timeout_s),
            stream=body.stream,
            preferences=body.switchboard,
        )

    def render(self, answer: Answer, body: ChatCompletionBody, request: GatewayRequest) -> bytes:
        return render_completion(
            answer.chat, request_id=request.request_id, model=body.model, created=int(time.time())
        )

    async def render_stream(
        self, stream: ChunkStream, body: ChatCompletionBody, request: GatewayRequest
    ) -> AsyncIterator[bytes]:
        rid, model, created = request.request_id, body.model, int(time.time())
        render = ChunkRenderer(request_id=rid, model=model, created=created).render
        try:
            async for chunk in stream:
                if chunk.delta or chunk.finish_reason:
                    yield render(chunk)
        except SwitchboardError as exc:
            # Headers are gone: the error travels as an SSE event, which the OpenAI SDKs raise as APIError.
            yield render_sse_error(error_body(exc))
            yield SSE_DONE
            return
        if body.stream_options is not None and body.stream_options.include_usage:
            yield render_usage_chunk(stream.rec.usage, request_id=rid, model=model, created=created)
        yield SSE_DONE

    def error_body(self, exc: SwitchboardError) -> bytes:
        return error_body(exc)
