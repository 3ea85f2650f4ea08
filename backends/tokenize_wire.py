"""vLLM's `POST /tokenize` wire format, for backends that speak it over HTTP (`openai_compat`).

vLLM and our engine serve it at the server's root, beside `/v1`. A chat goes as its messages (and tools, which
vLLM renders through the chat template as a chat completion would) with the generation prompt added, so the
count is the `prompt_tokens` a completion of the same request reports; a legacy completion goes as its prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from backends.base import ChatRequest
from backends.errors import BackendBadResponse


def tokenize_url(base_url: str) -> str:
    """`http://host:8000/v1` -> `http://host:8000/tokenize` (a base without `/v1` is taken as the root)."""
    root = base_url.rstrip("/")
    return (root.removesuffix("/v1") if root.endswith("/v1") else root) + "/tokenize"


TIMEOUT_S = 5.0  # a count is one tokenizer pass: a server slower than this is left to the gateway's estimate


class TokenizeEndpoint:
    """One server's `/tokenize`: the request for a count, and the models it turned out not to serve it for
    (a 404 or 405 is remembered, so the server is not asked again for that model)."""

    def __init__(
        self, base_url: str, headers: httpx.Headers, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.url = httpx.URL(tokenize_url(base_url))
        self._headers = headers
        timeout_s = min(timeout_s, TIMEOUT_S)
        self._timeouts = httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)).as_dict()
        self._absent: set[str] = set()  # bounded: upstream model names come from config

    def request(self, request: ChatRequest) -> httpx.Request | None:
        """The POST for `request`'s count; None when this model's server has no `/tokenize`."""
        if request.model in self._absent:
            return None
        body = httpx.ByteStream(tokenize_body(request))
        return httpx.Request(
            "POST", self.url, headers=self._headers, stream=body, extensions={"timeout": self._timeouts}
        )

    def missing(self, model: str, status: int) -> bool:
        """Whether an answer's status says the server has no `/tokenize` (remembered for `model`)."""
        if status in (404, 405):
            self._absent.add(model)
            return True
        return False


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def tokenize_body(request: ChatRequest) -> bytes:
    body: dict[str, Any] = {"model": request.model}
    if request.prompt is not None:
        body["prompt"] = request.prompt
    else:
        body["messages"] = request.messages
        body["add_generation_prompt"] = True
        if request.tools is not None:
            body["tools"] = request.tools
    return orjson.dumps(body, default=_json_default)


def parse_count(name: str, content: bytes) -> int:
    try:
        count = orjson.loads(content)["count"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendBadResponse(
            f"backend `{name}` sent an unreadable token count", detail=repr(exc)
        ) from exc
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise BackendBadResponse(f"backend `{name}` sent an unreadable token count", detail=repr(count))
    return count
