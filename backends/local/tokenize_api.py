"""The engine's `POST /tokenize`, in vLLM's shape: a chat (`messages`) or a raw `prompt` in, token ids out.

Chat messages go through the validation and chat template of `/v1/chat/completions` (`wire.encode_chat`), so
`count` equals the `prompt_tokens` a chat completion of the same messages reports; a prompt is encoded as
`/v1/completions` encodes it. Tools are refused as chat completions refuse them: this engine's template has no
place for them, and a count that silently left them out would be wrong. Bad input is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field

from backends.local.serving import EngineState, check_model
from backends.local.wire import ApiError, encode_chat, parse_json


class TokenizeBody(BaseModel):
    """vLLM's `TokenizeChatRequest` / `TokenizeCompletionRequest`, one of `messages` or `prompt`; other
    fields are ignored, as vLLM's own server ignores them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # vLLM's default: the served model
    messages: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # vLLM's defaults: False for messages, True for a prompt
    tools: list[Any] | None = None


def token_ids(state: EngineState, body: TokenizeBody) -> list[int]:
    if body.model is not None:
        check_model(state, body.model)
    if (body.messages is None) == (body.prompt is None):
        raise ApiError(400, "send exactly one of `messages` or `prompt`", param="messages")
    if body.tools:
        raise ApiError(400, "tools are not supported by this engine", param="tools")
    tokenizer = state.loaded.tokenizer
    if body.messages is not None:
        if body.add_special_tokens:  # the template writes the special tokens itself
            raise ApiError(
                400, "`add_special_tokens` must be false with `messages`", param="add_special_tokens"
            )
        return encode_chat(tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt)
    assert body.prompt is not None
    special = True if body.add_special_tokens is None else body.add_special_tokens
    return list(tokenizer.encode(body.prompt, add_special_tokens=special)) if body.prompt else []


async def tokenize(request: Request) -> Response:
    """`{"count": N, "max_model_len": context, "tokens": [ids], "token_strs": null}`."""
    state: EngineState = request.app.state.engine
    ids = token_ids(state, parse_json(await request.body(), TokenizeBody))
    body = {"count": len(ids), "max_model_len": state.context_tokens, "tokens": ids, "token_strs": None}
    return Response(orjson.dumps(body), media_type="application/json")
