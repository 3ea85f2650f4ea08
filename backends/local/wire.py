"""The engine's OpenAI wire format: parse and check chat and completion bodies, turn them into ids and knobs.

Pure functions over bytes, pydantic models and a tokenizer: no HTTP, no I/O, no clock. Every problem with
the input is raised as an `ApiError` carrying a 4xx status and the offending `param`, so the server can
render `{"error": {message, type, param, code}}` and never answers bad input with a 500. When the client
sends no `max_tokens`, generation is capped at the server's default (chat) or OpenAI's 16 (completions),
and never beyond the room left in the context or the KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import jinja2
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.local.engine.scheduler import SamplingParams

DEFAULT_MAX_TOKENS = 1024  # a CPU engine must not run to the full context just because max_tokens is absent
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI legacy completions default
MAX_STOP_STRINGS = 4
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error rendered as an OpenAI error envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        openai_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.openai_type = openai_type
        self.code = code
        self.param = param


def error_envelope(error: ApiError) -> dict[str, Any]:
    """The OpenAI error body: `{"error": {message, type, param, code}}`."""
    return {
        "error": {
            "message": error.message,
            "type": error.openai_type,
            "param": error.param,
            "code": error.code,
        }
    }


class ChatCompletionBody(BaseModel):
    """The subset of the OpenAI chat request this engine reads; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # None: the model's default
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch.manual_seed's range
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None


class CompletionBody(BaseModel):
    """The subset of the OpenAI (legacy) completions request this engine reads."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # None: the model's default
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes) -> ChatCompletionBody:
    """Decode and validate a chat request body."""
    return parse_json(raw, ChatCompletionBody)


def parse_json(raw: bytes, model: type[Body]) -> Body:
    """Decode and validate a request body; the first validation problem names its field as `param`."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc.msg}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from exc


def reject_unsupported(body: ChatCompletionBody) -> None:
    """Refuse fields this engine cannot honour, rather than silently ignoring them."""
    if body.n != 1:
        raise ApiError(
            400, f"n={body.n} is unsupported: this engine returns exactly one choice (use n=1)", param="n"
        )
    if body.tools:
        raise ApiError(400, "tools are not supported by this engine", param="tools")
    if body.tool_choice not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this engine", param="tool_choice")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format is not supported by this engine", param="response_format")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported by this engine", param="logprobs")


def reject_unsupported_completion(body: CompletionBody) -> None:
    """Refuse completion fields this engine cannot honour."""
    if body.n != 1 or body.best_of not in (None, 1):
        raise ApiError(400, "this engine returns exactly one choice (use n=1 and best_of=1)", param="n")
    if body.echo:
        raise ApiError(400, "echo is not supported by this engine", param="echo")
    if body.logprobs is not None:
        raise ApiError(400, "logprobs are not supported by this engine", param="logprobs")
    if body.suffix:
        raise ApiError(400, "suffix is not supported by this engine", param="suffix")


def _message_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400,
                    "only text content parts are supported by this engine",
                    param=f"messages.{index}.content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(
        400, "message content must be a string or a list of text parts", param=f"messages.{index}.content"
    )


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Map OpenAI roles onto the chat template's (developer -> system) and flatten text parts."""
    normalized = []
    for index, message in enumerate(messages):
        role = _ROLE_ALIASES.get(str(message.get("role")))
        if role is None:
            raise ApiError(
                400,
                f"message role `{message.get('role')}` is not supported by this engine; "
                f"use one of: {', '.join(_ROLE_ALIASES)}",
                param=f"messages.{index}.role",
            )
        normalized.append({"role": role, "content": _message_text(index, message.get("content"))})
    return normalized


def encode_chat(
    tokenizer: Any, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Validate OpenAI messages and apply the model's chat template; returns prompt token ids.

    A template may refuse a conversation (`raise_exception`, e.g. roles that do not alternate): a 400 with the
    template's own message, which names a rule of the template, not the prompt."""
    try:
        encoded = tokenizer.apply_chat_template(
            normalize_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
        )
    except jinja2.TemplateError as exc:
        raise ApiError(
            400,
            f"the model's chat template refused these messages: {exc.message or type(exc).__name__}",
            param="messages",
        ) from exc
    return list(encoded["input_ids"])


def encode_prompt(
    tokenizer: Any, prompt: str | list[int] | list[str] | list[list[int]], vocab_size: int
) -> list[int]:
    """A completions prompt (text, token ids, or a one-element list of either) as token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise ApiError(
                400, f"this engine takes one prompt per request, got {len(prompt)}", param="prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt)) if prompt else []
    else:
        ids = [int(i) for i in prompt]  # type: ignore[arg-type]
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise ApiError(
                400, f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})", param="prompt"
            )
    if not ids:
        raise ApiError(400, "prompt is empty; send at least one token", param="prompt")
    return ids


# Model-card recommendations for models whose generation config carries none (the GGUF packages ship none).
# SmolLM2's card samples with temperature 0.2 and top_p 0.9; OpenAI's own defaults are 1.0 and 1.0.
RECOMMENDED_SAMPLING = {"smollm2": (0.2, 0.9)}


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """What a request that leaves temperature / top_p unset samples with, and where the values came from."""

    temperature: float = 1.0
    top_p: float = 1.0
    source: str = "OpenAI defaults"


def sampling_defaults(generation_config: Any, model_name: str) -> SamplingDefaults:
    """The model's recommended sampling, as vLLM takes it: the generation config's explicit temperature /
    top_p (when it samples), else the model card's (`RECOMMENDED_SAMPLING`), else OpenAI's 1.0 / 1.0."""
    explicit = generation_config.to_diff_dict() if generation_config is not None else {}
    if explicit.get("do_sample", True) and ("temperature" in explicit or "top_p" in explicit):
        return SamplingDefaults(
            float(explicit.get("temperature", 1.0)), float(explicit.get("top_p", 1.0)), "generation config"
        )
    for prefix, (temperature, top_p) in RECOMMENDED_SAMPLING.items():
        if model_name.lower().startswith(prefix):
            return SamplingDefaults(temperature, top_p, f"{prefix} model card")
    return SamplingDefaults()


def sampling_params(
    body: ChatCompletionBody | CompletionBody,
    prompt_tokens: int,
    context_tokens: int,
    *,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    kv_tokens: int | None = None,
    prompt_param: str = "messages",
    defaults: SamplingDefaults | None = None,
) -> SamplingParams:
    """Check the token budget and stop strings; an absent max_tokens means min(default, room left).

    `kv_tokens` (positions the KV cache holds) only caps the default: an explicit max_tokens that cannot fit
    the cache is the engine's to refuse, with a message naming --kv-cache-mb.
    """
    room = context_tokens - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"prompt is {prompt_tokens} tokens; this model's context is {context_tokens} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if requested is not None and requested > room:
        raise ApiError(
            400,
            f"max_tokens={requested} plus the {prompt_tokens}-token prompt exceeds the "
            f"{context_tokens}-token context; lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise ApiError(400, f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    if requested is None:
        # The last sampled token is never cached, so a cache of kv_tokens positions allows one more.
        kv_room = room if kv_tokens is None else kv_tokens + 1 - prompt_tokens
        requested = max(1, min(default_max_tokens, room, kv_room))
    defaults = defaults or SamplingDefaults()
    return SamplingParams(
        max_tokens=requested,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        stop=stop,
        seed=body.seed,
    )
