"""`POST /v1/messages/count_tokens`: its body as the chat `/v1/messages` would send, and its answer.

The conversation is translated exactly as for `/v1/messages` (`anthropic_messages.parse_conversation`): the
same messages, tools, tool_choice and pass-through headers, so the privacy detectors and routing see what a
request would carry. It has no generation knobs: routing plans it with `routing.default_output_tokens`.
"""

from __future__ import annotations

import orjson

from backends.base import ChatRequest
from gateway.translate.anthropic_headers import passthrough
from gateway.translate.anthropic_messages import Conversation, CountTokensBody

COUNT_HEADER = "x-switchboard-token-count"  # `tokenizer` (the routed model's own) or `estimate`


def count_request(
    conv: Conversation[CountTokensBody],
    request_id: str,
    timeout_s: float,
    headers: tuple[tuple[str, str], ...],
) -> ChatRequest:
    return ChatRequest(
        model=conv.body.model,
        messages=conv.messages,
        request_id=request_id,
        tools=conv.tools,
        tool_choice=conv.tool_choice,
        timeout_s=timeout_s,
        passthrough_headers=passthrough(headers),
    )


def render_count(input_tokens: int) -> bytes:
    return orjson.dumps({"input_tokens": input_tokens})
