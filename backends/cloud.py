"""`CloudBackend` (kind `cloud`): a cloud LLM API reached through `litellm.acompletion`.

The only module that imports litellm, and lazily (it is slow to import and may never be needed).
Invariant: no litellm type crosses this module; `_translate_errors` is the one place its exceptions become
`BackendError`s. litellm's retries are off (the gateway's dispatch retries elsewhere), its callbacks are
cleared, and its cost map is read locally, so nothing goes to the network except `api_base`.
Pass-through (litellm 1.106): stop, temperature, top_p, max_tokens, tools, tool_choice and response_format
reach both openai and anthropic; seed is dropped here where the provider lacks it (see `info.supports_seed`);
`user` reaches openai only for models in litellm's OpenAI catalog and becomes metadata.user_id on anthropic.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from decimal import Decimal
from typing import Any

from backends.base import (
    BackendHealth,
    BackendInfo,
    BackendKind,
    ChatRequest,
    ChatResult,
    StreamChunk,
    Usage,
)
from backends.errors import (
    BackendBadResponse,
    BackendError,
    BackendMisconfigured,
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    rejected_message,
)

_MESSAGE_MAX_CHARS = 500


LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def _import_litellm() -> Any:
    """Import litellm with its network-facing defaults off. Idempotent: the settings are plain assignments."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    # Otherwise the first request with an anthropic-beta header fetches litellm's list of betas from GitHub.
    os.environ.setdefault("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.turn_off_message_logging = True
    litellm.num_retries = 0
    litellm.callbacks = []
    litellm.success_callback = []
    litellm.failure_callback = []
    # `turn_off_message_logging` covers callbacks only: litellm's own loggers print whole requests (messages,
    # headers) at DEBUG. Pin them at INFO or above (what they inherit now), so a root at DEBUG set later
    # (a gateway run at log level debug) does not reach them.
    for name in LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:
            logger.setLevel(max(logging.INFO, logger.getEffectiveLevel()))
    return litellm


class CloudBackend:
    """`provider` is litellm's provider prefix ("openai", "anthropic", ...); `api_base` None means the
    provider's public endpoint. For anthropic, `api_base` is the root URL: litellm appends /v1/messages."""

    def __init__(
        self,
        name: str,
        provider: str,
        *,
        api_key: str | None,
        api_base: str | None,
        timeout_s: float,
    ) -> None:
        self._litellm = _import_litellm()
        if provider not in self._litellm.provider_list:
            raise BackendMisconfigured(
                f"backend `{name}`: litellm knows no provider `{provider}` (config: backends.{name}.provider)"
            )
        supported = self._litellm.get_supported_openai_params(model="", custom_llm_provider=provider) or []
        self._info = BackendInfo(name=name, kind=BackendKind.CLOUD, supports_seed="seed" in supported)
        self._provider = provider
        self._timeout_s = timeout_s
        # Fixed per-call arguments, built once. `_skip_mcp_handler` keeps litellm from acting as an MCP
        # client for tools that carry a server_url (it would reach out to that URL, and needs `mcp`).
        self._fixed: dict[str, Any] = {"num_retries": 0, "max_retries": 0, "_skip_mcp_handler": True}
        if api_base is not None:
            self._fixed["api_base"] = api_base
        if api_key is not None:
            self._fixed["api_key"] = api_key

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def complete(self, request: ChatRequest) -> ChatResult:
        kwargs = self._kwargs(request)
        with _translate_errors(self._info.name):
            response = await self._litellm.acompletion(**kwargs)
        try:
            choice = response.choices[0]
            usage = response.usage
            return ChatResult(
                message=_message(choice.message),
                finish_reason=choice.finish_reason or "stop",
                usage=Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0),
                served_model=str(response.model or request.model),
            )
        except (AttributeError, IndexError, TypeError) as exc:
            raise BackendBadResponse(
                f"backend `{self._info.name}` got an unreadable answer", detail=repr(exc)
            ) from exc

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        """Holds back the finishing chunk so the last one yielded carries usage."""
        kwargs = self._kwargs(request)
        kwargs["stream"] = True
        kwargs["stream_options"] = {"include_usage": True}
        finish_reason: str | None = None
        last_delta: Mapping[str, Any] = {}
        usage: Usage | None = None
        served_model = request.model
        n_deltas = 0
        with _translate_errors(self._info.name):
            chunks = await self._litellm.acompletion(**kwargs)
            try:
                async for chunk in chunks:
                    usage = _usage(getattr(chunk, "usage", None)) or usage
                    served_model = chunk.model or served_model
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    delta = _delta(choice.delta)
                    if choice.finish_reason is not None:
                        finish_reason, last_delta = choice.finish_reason, delta
                    elif delta:
                        n_deltas += 1
                        yield StreamChunk(delta=delta)
            finally:
                await chunks.aclose()  # frees the upstream connection when the caller stops early
        if finish_reason is None:
            raise BackendBadResponse(f"backend `{self._info.name}` ended the stream before a finish_reason")
        if usage is None:
            usage = Usage(0, n_deltas + bool(last_delta))
        yield StreamChunk(
            delta=last_delta, finish_reason=finish_reason, usage=usage, served_model=served_model
        )

    async def health(self) -> BackendHealth:
        """Not probed: a probe would spend tokens. Health comes from request outcomes in the gateway."""
        return BackendHealth(ok=True, detail=f"{self._provider}: not probed (cloud)")

    async def aclose(self) -> None:
        """Nothing to close: litellm keeps its HTTP clients in a process-wide cache shared by all backends."""

    def price_usd_per_mtok(self, model: str) -> tuple[Decimal, Decimal] | None:
        """(input, output) USD per million tokens from litellm's local cost map, or None when unknown."""
        cost_map: Mapping[str, Any] = self._litellm.model_cost
        entry = cost_map.get(f"{self._provider}/{model}") or cost_map.get(model)
        if not entry:
            return None
        prompt = entry.get("input_cost_per_token")
        completion = entry.get("output_cost_per_token")
        if prompt is None or completion is None:
            return None
        return Decimal(str(prompt)).scaleb(6), Decimal(str(completion)).scaleb(6)

    def _kwargs(self, request: ChatRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            **self._fixed,
            "model": f"{self._provider}/{request.model}",
            "messages": [dict(m) for m in request.messages],
            "timeout": min(self._timeout_s, request.timeout_s),
        }
        optional = {
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": list(request.stop) or None,
            "seed": request.seed if self._info.supports_seed else None,
            "user": request.user,
            "tools": [dict(t) for t in request.tools] if request.tools is not None else None,
            "tool_choice": request.tool_choice,
            "response_format": dict(request.response_format) if request.response_format is not None else None,
        }
        kwargs.update((k, v) for k, v in optional.items() if v is not None)
        if request.passthrough_headers and self._provider == "anthropic":
            # Anthropic's own API version and beta flags (prompt caching, ...) reach Anthropic unchanged.
            kwargs["extra_headers"] = dict(request.passthrough_headers)
        return kwargs


def _message(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    tool_calls = getattr(message, "tool_calls", None)
    if tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in tool_calls
        ]
    return out


def _delta(delta: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delta is None:
        return out
    if getattr(delta, "role", None):
        out["role"] = delta.role
    if getattr(delta, "content", None):
        out["content"] = delta.content
    tool_calls = getattr(delta, "tool_calls", None)
    if tool_calls:
        out["tool_calls"] = [_tool_call_delta(call) for call in tool_calls]
    return out


def _tool_call_delta(call: Any) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if call.function.name:
        function["name"] = call.function.name
    if call.function.arguments:
        function["arguments"] = call.function.arguments
    out: dict[str, Any] = {"index": getattr(call, "index", 0) or 0, "function": function}
    if call.id:
        out["id"] = call.id
        out["type"] = "function"
    return out


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    return Usage(getattr(raw, "prompt_tokens", 0) or 0, getattr(raw, "completion_tokens", 0) or 0)


# ---- errors: the one place litellm's exceptions become ours ----------------------------------------------


@contextlib.contextmanager
def _translate_errors(name: str) -> Iterator[None]:
    import httpx
    import openai
    from litellm import exceptions as llm

    try:
        yield
    except llm.Timeout as exc:  # before APIConnectionError: litellm's Timeout subclasses it
        raise BackendTimeout(f"backend `{name}` timed out", detail=_text(exc)) from exc
    except llm.MidStreamFallbackError as exc:
        raise BackendBadResponse(f"backend `{name}` broke off the stream", detail=_text(exc)) from exc
    except llm.UnsupportedParamsError as exc:  # raised locally with status 500, but it is the request's fault
        said = f"backend `{name}` cannot take this request"
        raise BackendRejected(rejected_message(said, _text(exc)), detail=_text(exc)) from exc
    except llm.APIResponseValidationError as exc:
        raise BackendBadResponse(f"backend `{name}` sent an unreadable answer", detail=_text(exc)) from exc
    except llm.APIConnectionError as exc:
        if _transport_failed(exc):
            raise BackendUnavailable(f"backend `{name}` unreachable", detail=_text(exc)) from exc
        # litellm raises this class for requests it refuses to build (a content part of an unknown type,
        # say) too: nothing was sent, and the request, not the backend, is at fault. Not retried, and it
        # neither trips the breaker nor moves the live stats, so one client's bad input cannot take a
        # shared deployment out of routing.
        said = f"backend `{name}` cannot take this request"
        raise BackendRejected(rejected_message(said, _text(exc)), detail=_text(exc)) from exc
    except openai.APIError as exc:  # every other litellm exception; its status_code beats its class
        raise _status_error(name, exc) from exc
    except httpx.TimeoutException as exc:  # litellm does not always wrap transport errors mid-stream
        raise BackendTimeout(f"backend `{name}` timed out: {type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        raise BackendBadResponse(
            f"backend `{name}` transport failed", detail=f"{type(exc).__name__}: {exc}"
        ) from exc


def _transport_failed(exc: BaseException) -> bool:
    """Whether a network failure (connect, TLS, read, timeout) is anywhere in the exception's chain."""
    import httpx

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, httpx.TransportError | OSError | TimeoutError):
            return True
        if type(cause).__module__.startswith("aiohttp"):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _status_error(name: str, exc: Any) -> BackendError:
    """By HTTP status: litellm's class is unreliable (an OpenAI 401 arrives as BadRequestError)."""
    status = getattr(exc, "status_code", None)
    said, detail = f"backend `{name}` answered {status}", _text(exc)
    if status == 429:
        return BackendRateLimited(said, retry_after_s=_retry_after_s(exc), detail=detail)
    if status in (401, 403):
        return BackendMisconfigured(f"{said} (check the key: backends.{name}.api_key_env)", detail=detail)
    if isinstance(status, int) and 400 <= status < 500:
        return BackendRejected(rejected_message(said, detail), detail=detail)
    if isinstance(status, int) and status >= 500:
        return BackendUnavailable(said, detail=detail)
    return BackendBadResponse(said, detail=detail)


def _retry_after_s(exc: Any) -> float | None:
    headers = getattr(exc, "litellm_response_headers", None) or getattr(
        getattr(exc, "response", None), "headers", None
    )
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _text(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)[:_MESSAGE_MAX_CHARS]
