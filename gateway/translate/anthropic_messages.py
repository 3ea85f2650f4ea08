"""Anthropic's `/v1/messages` wire format <-> the pipeline's chat values (rendering: `anthropic_render`).

Parsing is strict and names the field of every problem (`messages.0.content.1.type`); anything no backend
honours (images, documents, thinking, server tools, top_k) is refused by name, never dropped. Conversations
become OpenAI-shape chat messages: system blocks a system message, `tool_use` blocks `tool_calls`, each
`tool_result` block a `tool` message, and `cache_control` stays on the content parts, tools and system, where
litellm's Anthropic transformation reads it. `anthropic-version`/`-beta` travel as pass-through headers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import ChatRequest
from backends.errors import SwitchboardError
from gateway.errors import InvalidRequest, UnsupportedParameter
from gateway.pipeline.flow import Answer, ChunkStream
from gateway.pipeline.request import GatewayRequest, RequestContext
from gateway.translate import anthropic_render as render
from gateway.translate.anthropic_headers import FORWARDED, passthrough
from gateway.translate.checks import check_json_ints

ENDPOINT = "messages"
MAX_OUTPUT_TOKENS = 1 << 24  # beyond any context window: a larger value is a client bug
TOOL_ERROR_PREFIX = "[tool error] "  # chat tool messages have no is_error flag: the text carries it

# Fields Anthropic defines that no Switchboard backend honours: a neutral value passes, others are a 400.
_NEUTRAL_IF: dict[str, tuple[Any, ...]] = {
    "thinking": (None, {"type": "disabled"}),
    "service_tier": (None, "auto", "standard_only"),
    "top_k": (None,),
    "container": (None,),
    "mcp_servers": (None, []),
    "context_management": (None,),
}
_UNSUPPORTED_BLOCKS = {"image": "images", "document": "documents", "search_result": "search results"}
_UNSUPPORTED_BLOCKS |= {"thinking": "thinking blocks", "redacted_thinking": "thinking blocks"}
_UNSUPPORTED_BLOCKS |= {"server_tool_use": "server tools", "web_search_tool_result": "server tools"}
_B = TypeVar("_B", bound=BaseModel)
_Body = TypeVar("_Body", bound="CountTokensBody")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class _TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: _CacheControl | None = None
    citations: None = None  # citations need documents, which are refused


class _ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]
    cache_control: _CacheControl | None = None


class _ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    cache_control: _CacheControl | None = None


class _Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class _Tool(_Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: _CacheControl | None = None


class _ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, min_length=1, max_length=128)
    disable_parallel_tool_use: bool | None = None


class _Metadata(_Strict):
    user_id: str | None = Field(default=None, max_length=256)


class CountTokensBody(BaseModel):
    """`POST /v1/messages/count_tokens` as we accept it."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[_Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: _ToolChoice | None = None


class MessagesBody(CountTokensBody):
    """`POST /v1/messages` as we accept it."""

    max_tokens: int = Field(ge=1, le=MAX_OUTPUT_TOKENS)
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    metadata: _Metadata | None = None
    stream: bool = False
    switchboard: dict[str, Any] | None = None  # routing preferences (see routing.preferences)


@dataclass(frozen=True, slots=True)
class Conversation(Generic[_Body]):
    """A checked body and its chat translation."""

    body: _Body
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None
    tool_choice: str | dict[str, Any] | None


def parse_conversation(raw: bytes, model: type[_Body]) -> Conversation[_Body]:
    body = parse_body(raw, model)
    return Conversation(body, chat_messages(body), chat_tools(body), chat_tool_choice(body.tool_choice))


def parse_body(raw: bytes, model: type[_Body]) -> _Body:
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON Messages request")
    try:
        body = model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise invalid_from(exc) from None
    for name, value in (body.model_extra or {}).items():
        neutral = _NEUTRAL_IF.get(name)
        if neutral is None:
            raise UnsupportedParameter(f"unknown parameter `{name}`; remove it from the request", param=name)
        if value not in neutral:
            raise UnsupportedParameter(
                f"parameter `{name}` is not supported by Switchboard backends; remove it", param=name
            )
    for name in ("messages", "system", "tools", "switchboard"):
        value = getattr(body, name, None)
        if value is not None and not isinstance(value, str):
            check_json_ints(_dumpable(value), name)
    return body


def _dumpable(value: Any) -> Any:
    if isinstance(value, list):
        return [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
    return value


def invalid_from(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    err = exc.errors(include_url=False, include_input=False)[0]
    if err["type"] == "json_invalid":
        return InvalidRequest("request body is not valid JSON; send a JSON object")
    if err["type"] == "model_type" and not err["loc"] and not prefix:
        return InvalidRequest("request body must be a JSON object")
    head = tuple(prefix.split(".")) if prefix else ()
    param = ".".join(str(p) for p in (*head, *err["loc"]))
    if err["type"] == "missing":
        return InvalidRequest(f"missing required parameter `{param}`", param=param)
    if err["type"] == "extra_forbidden":
        return UnsupportedParameter(f"unknown parameter `{param}`; remove it from the request", param=param)
    if param == "messages" and err["type"] == "too_short":
        return InvalidRequest("`messages` must contain at least one message", param=param)
    return InvalidRequest(f"invalid value for `{param}`: {err['msg']}", param=param)


def _block(raw: Mapping[str, Any], model: type[_B], where: str) -> _B:
    try:
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise invalid_from(exc, where) from None


def _block_type(raw: Any, where: str, allowed: tuple[str, ...]) -> str:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if not isinstance(kind, str):
        raise InvalidRequest(f"`{where}` must be a content block object with a string `type`", param=where)
    if kind in allowed:
        return kind
    what = _UNSUPPORTED_BLOCKS.get(kind)
    if what is not None:
        raise UnsupportedParameter(
            f"`{where}.type`: {what} are not supported by Switchboard backends; send text, tool_use and "
            "tool_result blocks only",
            param=f"{where}.type",
        )
    raise InvalidRequest(f"`{where}.type` must be one of {', '.join(allowed)}", param=f"{where}.type")


def _text_part(block: _TextBlock) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "text", "text": block.text}
    if block.cache_control is not None:
        part["cache_control"] = block.cache_control.model_dump(exclude_none=True)
    return part


def _text_parts(content: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out = []
    for j, raw in enumerate(content):
        _block_type(raw, f"{where}.{j}", ("text",))
        out.append(_text_part(_block(raw, _TextBlock, f"{where}.{j}")))
    return out


def _tool_message(block: _ToolResultBlock, where: str) -> dict[str, Any]:
    content: str | list[dict[str, Any]]
    if block.content is None or isinstance(block.content, str):
        content = block.content or ""
        if block.is_error:
            content = TOOL_ERROR_PREFIX + content
    else:
        content = _text_parts(block.content, f"{where}.content")
        if block.is_error:
            content = [{"type": "text", "text": TOOL_ERROR_PREFIX}, *content]
    if block.cache_control is not None:
        cache = block.cache_control.model_dump(exclude_none=True)
        if isinstance(content, str):
            content = [{"type": "text", "text": content, "cache_control": cache}]
        elif content:
            content[-1] = {**content[-1], "cache_control": cache}
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _user_messages(content: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Tool results become `tool` messages, which must follow the assistant's calls; the text after them."""
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        at = f"{where}.{j}"
        if _block_type(raw, at, ("text", "tool_result")) == "tool_result":
            tools.append(_tool_message(_block(raw, _ToolResultBlock, at), at))
        else:
            parts.append(_text_part(_block(raw, _TextBlock, at)))
    return [*tools, {"role": "user", "content": parts}] if parts or not tools else tools


def _assistant_message(content: list[dict[str, Any]], where: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        at = f"{where}.{j}"
        if _block_type(raw, at, ("text", "tool_use")) == "tool_use":
            use = _block(raw, _ToolUseBlock, at)
            arguments = orjson.dumps(use.input).decode()
            calls.append(
                {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": arguments}}
            )
        else:
            parts.append(_text_part(_block(raw, _TextBlock, at)))
    message: dict[str, Any] = {"role": "assistant", "content": parts or None}
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(body: CountTokensBody) -> tuple[dict[str, Any], ...]:
    out: list[dict[str, Any]] = []
    if isinstance(body.system, str):
        if body.system:
            out.append({"role": "system", "content": body.system})
    elif body.system:
        out.append({"role": "system", "content": _text_parts(body.system, "system")})
    for i, message in enumerate(body.messages):
        where = f"messages.{i}.content"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out.extend(_user_messages(message.content, where))
        else:
            out.append(_assistant_message(message.content, where))
    return tuple(out)


def chat_tools(body: CountTokensBody) -> tuple[dict[str, Any], ...] | None:
    if body.tools is None:
        return None
    out = []
    for i, raw in enumerate(body.tools):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in (None, "custom"):
            raise UnsupportedParameter(
                f"`tools.{i}.type`: server tools are not supported by Switchboard "
                "backends; send client tools (name, description, input_schema)",
                param=f"tools.{i}.type",
            )
        tool = _block(raw, _Tool, f"tools.{i}")
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        chat: dict[str, Any] = {"type": "function", "function": function}
        if tool.cache_control is not None:
            chat["cache_control"] = tool.cache_control.model_dump(exclude_none=True)
        out.append(chat)
    return tuple(out)


def chat_tool_choice(choice: _ToolChoice | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if choice.disable_parallel_tool_use:
        raise UnsupportedParameter(
            "`tool_choice.disable_parallel_tool_use` is not supported by Switchboard backends; remove it",
            param="tool_choice.disable_parallel_tool_use",
        )
    if choice.type == "tool":
        if choice.name is None:
            raise InvalidRequest(
                "`tool_choice.name` is required when `tool_choice.type` is `tool`", param="tool_choice.name"
            )
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def chat_request(
    conv: Conversation[MessagesBody], request_id: str, timeout_s: float, headers: tuple[tuple[str, str], ...]
) -> ChatRequest:
    body = conv.body
    return ChatRequest(
        model=body.model,
        messages=conv.messages,
        request_id=request_id,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=tuple(body.stop_sequences or ()),
        user=body.metadata.user_id if body.metadata is not None else None,
        tools=conv.tools,
        tool_choice=conv.tool_choice,
        timeout_s=timeout_s,
        passthrough_headers=passthrough(headers),
    )


class AnthropicMessages:
    """`POST /v1/messages`: Anthropic's Messages API on the shared pipeline."""

    endpoint = ENDPOINT
    path = "/v1/messages"
    body_model = MessagesBody
    answer_model = render.MessageAnswer
    error_model = render.ErrorAnswer
    error_statuses = (400, 401, 403, 404, 413, 429, 500, 502, 504, 529)  # a 503 is sent as 529 (overloaded)
    api_key_header = "x-api-key"  # Anthropic's SDKs send the key here or as `Authorization: Bearer`
    forwarded_headers = FORWARDED  # checked and sent on to Anthropic backends (anthropic_headers)

    def parse(self, raw: bytes) -> Conversation[MessagesBody]:
        return parse_conversation(raw, MessagesBody)

    def to_request(self, conv: Conversation[MessagesBody], ctx: RequestContext) -> GatewayRequest:
        return ctx.gateway_request(
            ENDPOINT,
            chat_request(conv, ctx.request_id, ctx.timeout_s, ctx.headers),
            stream=conv.body.stream,
            preferences=conv.body.switchboard,
        )

    def render(self, answer: Answer, conv: Conversation[MessagesBody], request: GatewayRequest) -> bytes:
        return render.render_message(answer.chat, request_id=request.request_id, model=conv.body.model)

    def render_stream(
        self, stream: ChunkStream, conv: Conversation[MessagesBody], request: GatewayRequest
    ) -> AsyncIterator[bytes]:
        return render.render_events(stream, request_id=request.request_id, model=conv.body.model)

    def error_body(self, exc: SwitchboardError) -> bytes:
        return render.error_body(exc)

    def error_status(self, exc: SwitchboardError) -> int:
        return render.error_status(exc)
