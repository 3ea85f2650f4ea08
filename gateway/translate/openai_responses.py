"""The Responses translator: OpenAI's `POST /v1/responses` <-> a chat request on the shared pipeline.

Backends speak chat: `instructions` become a system message, input items chat messages (function calls and
their outputs included), function tools and `text.format` chat's tools and response_format; the chat answer
comes back as output items. With `store` the answer and its input are kept (gateway/store/responses.py) so
`previous_response_id` works on any replica; that state is read in `prepare` and written in `after` (or at
the end of a stream), the two hooks gateway/http/endpoints.py awaits around the pipeline.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import ChatRequest, Usage
from backends.errors import SwitchboardError
from gateway.errors import InvalidRequest, PreviousResponseNotFound, UnsupportedParameter, error_body
from gateway.pipeline.flow import Answer, ChunkStream
from gateway.pipeline.request import GatewayRequest, RequestContext
from gateway.store.responses import ResponseStore, StoredResponse
from gateway.translate import responses_items as items
from gateway.translate.checks import check_json_ints
from gateway.translate.openai_chat import MAX_OUTPUT_TOKENS
from gateway.translate.responses_stream import StreamEvents

ENDPOINT = "responses"

# OpenAI fields no Switchboard backend honours: the neutral value is accepted, anything else refused by name.
_NEUTRAL_IF: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "include": (None, []),
    "reasoning": (None,),
    "parallel_tool_calls": (None, True),
    "truncation": (None, "disabled"),
    "service_tier": (None, "auto", "default"),
    "top_logprobs": (None, 0),
    "max_tool_calls": (None,),
    "prompt": (None,),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
    "stream_options": (None,),
    "conversation": (None,),
}


def _document_neutral_fields(schema: dict[str, Any]) -> None:
    props = schema.setdefault("properties", {})
    for name, values in _NEUTRAL_IF.items():
        props[name] = {"enum": list(values)}
    schema["additionalProperties"] = False


class ResponsesBody(BaseModel):
    """`POST /v1/responses` as we accept it (input items, tools and text.format are checked one by one)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_document_neutral_fields)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=64)
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)
    switchboard: dict[str, Any] | None = None  # routing preferences (see routing.preferences)


class ResponseObject(BaseModel):
    """What a whole answer looks like, for the published schema (rendering itself uses plain dicts)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: str
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class ResponsesCall:
    """One parsed request; after `prepare`, with the conversation so far and where to keep the answer."""

    body: ResponsesBody
    items: list[dict[str, Any]]  # this request's input items, ids assigned
    tools: list[dict[str, Any]] | None  # chat shape
    tool_choice: Any
    response_format: dict[str, Any] | None
    history: tuple[Mapping[str, Any], ...] = ()  # chat messages of the previous responses
    store: ResponseStore | None = None  # None: this answer is not kept

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as chat messages, instructions not included (they are not carried over)."""
        return [*map(dict, self.history), *items.chat_messages(self.items)]


def parse_responses_body(raw: bytes) -> ResponsesCall:
    if not raw:
        raise InvalidRequest("request body is empty; send a JSON Responses request")
    try:
        body = ResponsesBody.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise items.invalid_from(exc) from None
    _refuse_unsupported(body)
    for name in ("input", "tools", "tool_choice", "text", "switchboard"):
        value = getattr(body, name)
        if value is not None:
            check_json_ints(value, name)
    for key, value in (body.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise InvalidRequest("`metadata` keys take at most 64 characters, values 512", param="metadata")
    return ResponsesCall(
        body,
        items.parse_items(body.input),
        items.chat_tools(body.tools) if body.tools else None,
        items.chat_tool_choice(body.tool_choice),
        items.chat_response_format(body.text),
    )


def _refuse_unsupported(body: ResponsesBody) -> None:
    for name, value in (body.model_extra or {}).items():
        neutral = _NEUTRAL_IF.get(name)
        if neutral is None:
            raise UnsupportedParameter(f"unknown parameter `{name}`; remove it from the request", param=name)
        if value not in neutral:
            raise UnsupportedParameter(
                f"parameter `{name}` is not supported by Switchboard; remove it or leave it at its default",
                param=name,
            )


def _keep_decision(body: ResponsesBody, store: ResponseStore, team: str) -> bool:
    if not store.team_may_store(team):
        if body.store:
            raise InvalidRequest(
                f"team `{team}` does not keep responses; send store=false or leave it out "
                f"(config: teams.{team}.store_responses)",
                param="store",
            )
        return False
    return store.store_default if body.store is None else body.store


# ---- the Response object ---------------------------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def incomplete_reason(finish_reason: str | None) -> str | None:
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason or "")


def response_object(
    call: ResponsesCall,
    request: GatewayRequest,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    reason: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body = call.body
    return {
        "id": f"resp_{request.request_id}",
        "object": "response",
        "created_at": int(request.received_at.timestamp()),
        "status": status,
        "error": error,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.previous_response_id,
        "reasoning": None,
        "store": call.store is not None,
        "temperature": body.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": [
            {"description": None, "parameters": None, "strict": None, **t["function"], "type": "function"}
            for t in call.tools or ()
        ],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": usage_json(usage) if usage is not None else None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def _failure_code(exc: SwitchboardError) -> str:
    return "rate_limit_exceeded" if exc.status_code == 429 else "server_error"


async def keep(call: ResponsesCall, request: GatewayRequest, response: dict[str, Any]) -> None:
    """Store the answered response, when the request asked for it."""
    if call.store is None:
        return
    history = [*call.messages(), items.history_message(response["output"])]
    await call.store.save(
        StoredResponse(
            id=response["id"],
            team=request.identity.team,
            key_id=request.identity.key_id,
            created_at=request.received_at,
            previous_response_id=call.body.previous_response_id,
            response=response,
            input_items=call.items,
            history=history,
        )
    )


# ---- the translator --------------------------------------------------------------------------------------


class Responses:
    """`POST /v1/responses` on the shared pipeline, with conversation state in SQL."""

    endpoint = ENDPOINT
    path = "/v1/responses"
    body_model = ResponsesBody
    answer_model = ResponseObject

    def parse(self, raw: bytes) -> ResponsesCall:
        return parse_responses_body(raw)

    async def prepare(self, call: ResponsesCall, ctx: RequestContext, store: ResponseStore) -> ResponsesCall:
        """Load the conversation `previous_response_id` names (the caller's team only) and decide whether
        this answer is kept."""
        body, team = call.body, ctx.identity.team
        history: tuple[Mapping[str, Any], ...] = ()
        if body.previous_response_id is not None:
            found = await store.load(body.previous_response_id, team, now=dt.datetime.now(dt.UTC))
            if found is None:
                raise PreviousResponseNotFound(
                    f"previous response `{body.previous_response_id}` was not found: it was never stored, "
                    "was deleted, or is older than the retention (config: responses.retention_days)",
                    param="previous_response_id",
                )
            history = tuple(found.history)
        kept = store if _keep_decision(body, store, team) else None
        if not history and not call.items and body.instructions is None:
            raise InvalidRequest("`input` must contain at least one item", param="input")
        return ResponsesCall(
            body, call.items, call.tools, call.tool_choice, call.response_format, history, kept
        )

    def to_request(self, call: ResponsesCall, ctx: RequestContext) -> GatewayRequest:
        body = call.body
        system = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
        chat = ChatRequest(
            model=body.model,
            messages=tuple([*system, *call.messages()]),
            request_id=ctx.request_id,
            max_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            user=body.user,
            tools=tuple(call.tools) if call.tools is not None else None,
            tool_choice=call.tool_choice,
            response_format=call.response_format,
            timeout_s=ctx.timeout_s,
        )
        return ctx.gateway_request(ENDPOINT, chat, stream=body.stream, preferences=body.switchboard)

    def _answered(self, answer: Answer, call: ResponsesCall, request: GatewayRequest) -> dict[str, Any]:
        result = answer.chat
        reason = incomplete_reason(result.finish_reason)
        output = items.output_items(result.message, request.request_id, incomplete=reason is not None)
        status = "incomplete" if reason else "completed"
        return response_object(call, request, status=status, output=output, usage=result.usage, reason=reason)

    async def after(self, answer: Answer, call: ResponsesCall, request: GatewayRequest) -> None:
        await keep(call, request, self._answered(answer, call, request))

    def render(self, answer: Answer, call: ResponsesCall, request: GatewayRequest) -> bytes:
        return orjson.dumps(self._answered(answer, call, request))

    async def render_stream(
        self, stream: ChunkStream, call: ResponsesCall, request: GatewayRequest
    ) -> AsyncIterator[bytes]:
        """The typed events; the answer is stored before `response.completed` goes out, so a client that
        chains on it at once finds it (a store that fails turns the end into `response.failed`)."""
        events = StreamEvents(request.request_id)
        yield events.lifecycle(
            "response.created", response_object(call, request, status="in_progress", output=[])
        )
        yield events.lifecycle(
            "response.in_progress", response_object(call, request, status="in_progress", output=[])
        )
        finish_reason = None
        try:
            async for chunk in stream:
                finish_reason = chunk.finish_reason or finish_reason
                for piece in events.chunk(chunk):
                    yield piece
            reason = incomplete_reason(finish_reason)
            for piece in events.finish(incomplete=reason is not None):
                yield piece
            status = "incomplete" if reason else "completed"
            response = response_object(
                call, request, status=status, output=events.output, usage=stream.rec.usage, reason=reason
            )
            await keep(call, request, response)
        except SwitchboardError as exc:
            # Headers are gone: the failure travels as `response.failed`, with what was answered so far.
            error = {"code": _failure_code(exc), "message": exc.message}
            failed = response_object(
                call, request, status="failed", output=events.partial_output(), error=error
            )
            yield events.lifecycle("response.failed", failed)
            return
        yield events.lifecycle(f"response.{status}", response)

    def error_body(self, exc: SwitchboardError) -> bytes:
        return error_body(exc)
