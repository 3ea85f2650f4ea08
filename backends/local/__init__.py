"""The bundled self-hosted engine: SmolLM2 (or any causal LM) behind an OpenAI-compatible HTTP server.

`loader` resolves a model spec and loads weights and tokenizer; `generate` runs generation in one background
thread and bridges tokens to asyncio; `wire` parses OpenAI bodies and owns the chat template; `server` is
the HTTP edge (FastAPI).
Nothing here imports `gateway` or `routing`, and nothing is loaded at import time.
"""
