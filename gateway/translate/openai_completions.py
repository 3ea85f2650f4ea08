"""The legacy completions translator: OpenAI's `/v1/completions` wire format <-> the pipeline's values.

A prompt completion becomes a `ChatRequest` that carries both forms: `prompt`, sent as it is to backends
with a completions endpoint (any OpenAI-compatible server, our engine included), and its chat translation
(one user message) for backends that speak only chat (cloud, edge nodes). The privacy scan reads both.
OpenAI's defaults hold: `max_tokens` is 16 when omitted, one choice, no echo, no logprobs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import ChatRequest, ChatResult, Usage
from backends.errors import SwitchboardError
from gateway.errors import InvalidRequest, UnsupportedParameter, error_body
from gateway.pipeline.flow import Answer, ChunkStream
from gateway.pipeline.request import GatewayRequest, RequestContext
from gateway.translate.checks import check_json_ints
from gateway.translate.openai_chat import (
    MAX_OUTPUT_TOKENS,
    SSE_DONE,
    invalid_from,
    refuse_unknown_fields,
    render_sse_error,
)

ENDPOINT = "completions"
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API

# Defined by OpenAI, honoured by no Switchboard backend: only the neutral value is accepted.
_NEUTRAL_IF: dict[str, Any] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None,),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionBody(BaseModel):
    """`POST /v1/completions` as we accept it."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    switchboard: dict[str, Any] | None = None  # routing preferences (see routing.preferences)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def parse_completion_body(raw: bytes) -> CompletionBody:
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON completion request")
    try:
        body = CompletionBody.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise invalid_from(exc) from None
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise UnsupportedParameter(
            "`prompt` takes one string (or a list of exactly one): Switchboard returns one choice per "
            "request; send one request per prompt",
            param="prompt",
        )
    if not body.prompt_text():
        raise InvalidRequest("`prompt` is empty; send the text to complete", param="prompt")
    if body.n is not None and body.n > 1:
        raise UnsupportedParameter(
            "`n` > 1 is not supported: Switchboard returns one choice per request; send n=1 or make "
            "several requests",
            param="n",
        )
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise InvalidRequest("`stop` takes at most 4 sequences", param="stop")
    refuse_unknown_fields(body.model_extra, _NEUTRAL_IF)
    if body.switchboard is not None:
        check_json_ints(body.switchboard, "switchboard")
    return body


def completion_request(body: CompletionBody, request_id: str, timeout_s: float) -> ChatRequest:
    prompt = body.prompt_text()
    return ChatRequest(
        model=body.model,
        messages=({"role": "user", "content": prompt},),
        request_id=request_id,
        max_tokens=body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_tuple(),
        seed=body.seed,
        user=body.user,
        timeout_s=timeout_s,
        prompt=prompt,
    )


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _text_of(message_or_delta: Any) -> str:
    content = message_or_delta.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts from a chat backend
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def render_completion(result: ChatResult, *, request_id: str, model: str, created: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [_choice(_text_of(result.message), result.finish_reason)],
            "usage": _usage_dict(result.usage),
        }
    )


class Completions:
    """`POST /v1/completions`: legacy prompt completion on the shared pipeline."""

    endpoint = ENDPOINT
    path = "/v1/completions"
    body_model = CompletionBody

    def parse(self, raw: bytes) -> CompletionBody:
        return parse_completion_body(raw)

    def to_request(self, body: CompletionBody, ctx: RequestContext) -> GatewayRequest:
        return ctx.gateway_request(
            ENDPOINT,
            completion_request(body, ctx.request_id, ctx.timeout_s),
            stream=body.stream,
            preferences=body.switchboard,
        )

    def render(self, answer: Answer, body: CompletionBody, request: GatewayRequest) -> bytes:
        return render_completion(
            answer.chat, request_id=request.request_id, model=body.model, created=int(time.time())
        )

    async def render_stream(
        self, stream: ChunkStream, body: CompletionBody, request: GatewayRequest
    ) -> AsyncIterator[bytes]:
        base = {
            "id": f"cmpl-{request.request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        try:
            async for chunk in stream:
                text = _text_of(chunk.delta)
                if text or chunk.finish_reason:
                    event = {**base, "choices": [_choice(text, chunk.finish_reason)]}
                    yield b"data: " + orjson.dumps(event) + b"\n\n"
        except SwitchboardError as exc:
            yield render_sse_error(error_body(exc))
            yield SSE_DONE
            return
        if body.stream_options is not None and body.stream_options.include_usage:
            event = {**base, "choices": [], "usage": _usage_dict(stream.rec.usage)}
            yield b"data: " + orjson.dumps(event) + b"\n\n"
        yield SSE_DONE

    def error_body(self, exc: SwitchboardError) -> bytes:
        return error_body(exc)
