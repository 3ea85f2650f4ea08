"""Responses API items <-> chat values: input items to chat messages, function tools, `text.format`, and a
chat answer back to output items (a `message` with `output_text`, `function_call`s).

Everything is checked strictly, one item at a time, and a problem names its path (`input.2.call_id`). Only
text and function tools cross: images, files and built-in tools (web_search, file_search, ...) are refused
by name, never dropped. Item ids a client leaves out are assigned here (`msg_...`, `fc_...`, `fco_...`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest, UnsupportedParameter

_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
Item = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Message(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]
    id: str | None = Field(default=None, max_length=128)
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class _TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # output_text sent back as it was answered
    logprobs: list[Any] | None = None


class _RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class _FunctionCall(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(pattern=_NAME)
    arguments: str
    id: str | None = Field(default=None, max_length=128)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class _FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str | list[dict[str, Any]]
    id: str | None = Field(default=None, max_length=128)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _NamedFunction(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=_NAME)


class _PlainFormat(_Strict):
    type: Literal["text", "json_object"]


class _SchemaFormat(_Strict):
    type: Literal["json_schema"]
    name: str = Field(pattern=_NAME)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


def invalid_from(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    """The first problem pydantic found, as a 400 naming its path (422 never escapes)."""
    err = exc.errors(include_url=False, include_input=False)[0]
    if err["type"] == "json_invalid":
        return InvalidRequest("request body is not valid JSON; send a JSON object")
    if err["type"] == "model_type" and not err["loc"] and not prefix:
        return InvalidRequest("request body must be a JSON object")
    param = ".".join(str(p) for p in (prefix, *_field_path(err["loc"])) if p != "")
    if err["type"] == "missing":
        return InvalidRequest(f"missing required parameter `{param}`", param=param)
    if err["type"] == "extra_forbidden":
        return UnsupportedParameter(f"unknown parameter `{param}`; remove it from the request", param=param)
    what = f"`{param}`" if param else "the request body"
    return InvalidRequest(f"invalid value for {what}: {err['msg']}", param=param or None)


_UNION_TAGS = frozenset(("str", "int", "float", "bool", "list", "dict", "none", "json-or-python"))


def _field_path(loc: tuple[int | str, ...]) -> list[int | str]:
    """The error's location up to the first union member pydantic names (`input.str` -> `input`)."""
    path: list[int | str] = []
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-")):
            break
        path.append(part)
    return path


def _check(model: type[BaseModel], value: Any, where: str) -> Any:
    try:
        return model.model_validate(value, strict=True)
    except ValidationError as exc:
        raise invalid_from(exc, where) from None


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- input items -----------------------------------------------------------------------------------------


def _text_parts(content: str | list[dict[str, Any]], where: str, *, output: bool) -> list[Item]:
    if isinstance(content, str):
        content = [{"type": "output_text" if output else "input_text", "text": content}]
    parts: list[Item] = []
    for j, raw in enumerate(content):
        kind = raw.get("type")
        if kind == "refusal" and output:
            parts.append(_check(_RefusalPart, raw, f"{where}.{j}").model_dump())
            continue
        if kind not in ("input_text", "output_text"):
            raise UnsupportedParameter(
                f"content part type `{str(kind)[:40]}` at `{where}.{j}` is not supported: Switchboard "
                "forwards text parts (input_text, output_text) only",
                param=f"{where}.{j}.type",
            )
        text = _check(_TextPart, raw, f"{where}.{j}").text
        parts.append({"type": "output_text", "text": text, "annotations": []} if output else
                     {"type": "input_text", "text": text})  # fmt: skip
    return parts


def parse_items(raw: str | list[dict[str, Any]]) -> list[Item]:
    """The request's `input` as stored items (ids assigned), each checked; refusals name the item's path."""
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    items: list[Item] = []
    for i, entry in enumerate(raw):
        where = f"input.{i}"
        kind = entry.get("type", "message")
        if kind == "message":
            msg = _check(_Message, entry, where)
            output = msg.role == "assistant"
            content = _text_parts(msg.content, f"{where}.content", output=output)
            item = {"id": msg.id or _new_id("msg"), "type": "message", "role": msg.role}
            items.append({**item, "status": "completed", "content": content})
        elif kind == "function_call":
            call = _check(_FunctionCall, entry, where)
            items.append({**call.model_dump(), "id": call.id or _new_id("fc"), "status": "completed"})
        elif kind == "function_call_output":
            out = _check(_FunctionCallOutput, entry, where)
            result: Any = out.output
            if isinstance(result, list):
                result = _text_parts(result, f"{where}.output", output=False)
            item = {"id": out.id or _new_id("fco"), "type": kind, "call_id": out.call_id, "output": result}
            items.append({**item, "status": "completed"})
        else:
            raise UnsupportedParameter(
                f"input item type `{str(kind)[:40]}` at `{where}` is not supported: send messages, "
                "function_call and function_call_output items",
                param=f"{where}.type",
            )
    return items


def _chat_content(parts: Sequence[Mapping[str, Any]]) -> str | list[Item]:
    texts = [str(p.get("text", p.get("refusal", ""))) for p in parts]
    if len(texts) == 1:
        return texts[0]
    return [{"type": "text", "text": t} for t in texts]


def chat_messages(items: Sequence[Mapping[str, Any]]) -> list[Item]:
    """Stored items as chat messages: consecutive function calls join one assistant message's tool_calls."""
    messages: list[Item] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append({"role": item["role"], "content": _chat_content(item["content"])})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last.setdefault("content", None)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            output = item["output"]
            content = output if isinstance(output, str) else "".join(p["text"] for p in output)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
    return messages


# ---- tools and formats -----------------------------------------------------------------------------------


def chat_tools(tools: Sequence[dict[str, Any]]) -> list[Item]:
    out = []
    for i, raw in enumerate(tools):
        kind = raw.get("type")
        if kind != "function":
            raise UnsupportedParameter(
                f"tool type `{str(kind)[:40]}` at `tools.{i}` is not supported: Switchboard runs function "
                "tools only (built-in tools such as web_search and file_search are not available)",
                param=f"tools.{i}.type",
            )
        tool = _check(FunctionTool, raw, f"tools.{i}")
        out.append({"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        named = _check(_NamedFunction, choice, "tool_choice")
        return {"type": "function", "function": {"name": named.name}}
    raise UnsupportedParameter(
        "`tool_choice` must be none, auto, required or {type: function, name}; other tool choices are not "
        "supported",
        param="tool_choice",
    )


def chat_response_format(text: Mapping[str, Any] | None) -> Item | None:
    """`text.format` as chat's `response_format` (None: plain text)."""
    if not text:
        return None
    unknown = set(text) - {"format", "verbosity"}
    if unknown:
        name = sorted(unknown)[0]
        raise UnsupportedParameter(f"unknown parameter `text.{name}`", param=f"text.{name}")
    if text.get("verbosity") is not None:
        raise UnsupportedParameter("`text.verbosity` is not supported; remove it", param="text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        plain = _check(_PlainFormat, fmt, "text.format")
        return None if plain.type == "text" else {"type": "json_object"}
    schema = _check(_SchemaFormat, fmt, "text.format")
    spec = schema.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
    return {"type": "json_schema", "json_schema": spec}


# ---- the answer ------------------------------------------------------------------------------------------


def output_items(message: Mapping[str, Any], request_id: str, *, incomplete: bool) -> list[Item]:
    """A chat answer's assistant message as Responses output items (ids derived from the request id)."""
    items: list[Item] = []
    content = message.get("content")
    calls = message.get("tool_calls") or []
    status = "incomplete" if incomplete else "completed"
    if content or not calls:
        text = content if isinstance(content, str) else ""
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        items.append(message_item(request_id, status, [part]))
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        items.append(
            function_call_item(
                request_id, i, call.get("id") or "", str(fn.get("name") or ""), str(fn.get("arguments") or "")
            )
        )
    return items


def message_item(request_id: str, status: str, content: list[Item]) -> Item:
    return {"id": f"msg_{request_id}", "type": "message", "role": "assistant", "status": status,
            "content": content}  # fmt: skip


def function_call_item(request_id: str, index: int, call_id: str, name: str, arguments: str) -> Item:
    return {
        "id": f"fc_{request_id}_{index}",
        "type": "function_call",
        "status": "completed",
        "call_id": call_id or f"call_{request_id}_{index}",
        "name": name,
        "arguments": arguments,
    }


def history_message(output: Sequence[Mapping[str, Any]]) -> Item:
    """The output items as the assistant chat message a follow-up request carries."""
    message: Item = {"role": "assistant", "content": None}
    for item in output:
        if item["type"] == "message":
            message["content"] = "".join(str(p.get("text", "")) for p in item["content"])
        else:
            call = {"name": item["name"], "arguments": item["arguments"]}
            message.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": call}
            )
    return message
