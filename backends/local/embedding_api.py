"""The engine's `POST /v1/embeddings`: OpenAI's wire format over the `Embedder` (backends/local/embedding.py).

Bad input is a 400 in the OpenAI envelope naming the field (`ApiError`); token-id input is refused (the
gateway's callers count tokens with their own tokenizers, which are not this model's). The model runs on one
worker thread of its own, so the event loop and the generation engine's thread never wait on it.
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.local.embedding import Embedder
from backends.local.wire import ApiError

MAX_INPUTS = 2048


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbeddingService:
    """The loaded embedder and the one thread it computes on (`threads` torch threads there)."""

    def __init__(self, embedder: Embedder, threads: int | None = None) -> None:
        self.embedder = embedder
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed", initializer=self._setup)

    def _setup(self) -> None:
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        done = await asyncio.get_running_loop().run_in_executor(self._pool, self.embedder.embed, texts)
        return done.vectors, done.prompt_tokens

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _parse(raw: bytes) -> EmbeddingsBody:
    try:
        return EmbeddingsBody.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None


def _texts(body: EmbeddingsBody, embedder: Embedder) -> list[str]:
    if body.model not in embedder.names:
        raise ApiError(
            404,
            f"model `{body.model}` is not served here; embedding models: {', '.join(embedder.names)}",
            code="model_not_found",
            param="model",
        )
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise ApiError(
            400, f"`dimensions` must be {embedder.dimensions} for this model, or left out", param="dimensions"
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "`input` must not be empty", param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"`input` holds more than {MAX_INPUTS} items", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "`input` must be text: this model does not take token ids", param="input")
    if not all(texts):
        raise ApiError(400, "`input` must not hold empty strings", param="input")
    return [str(t) for t in texts]


def _encoded(vector: list[float], encoding: str) -> Any:
    if encoding != "base64":
        return vector
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


async def embeddings(request: Request) -> Response:
    service: EmbeddingService | None = request.app.state.embeddings
    if service is None:
        said = "this engine serves no embedding model (start it with --embedding-model minilm)"
        raise ApiError(404, said, code="model_not_found", param="model")
    body = _parse(await request.body())
    vectors, tokens = await service.embed(_texts(body, service.embedder))
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    payload = {"object": "list", "data": data, "model": body.model, "usage": usage}
    return Response(orjson.dumps(payload), media_type="application/json")
