"""The bundled self-hosted engine: SmolLM2 (or any Llama-family LM) behind an OpenAI-compatible HTTP server.

`loader` resolves a model spec and loads weights and tokenizer; `engine/` is the continuous-batching engine
(paged KV cache, scheduler, runner, quantization, speculative decoding; token ids in, token ids out);
`build` turns `switchboard engine serve` flags into a running engine; `generate` detokenises and matches stop
strings; `wire` parses OpenAI bodies and owns the chat template; `server` is the HTTP edge (FastAPI).
Nothing here imports `gateway` or `routing`, and nothing is loaded at import time.
"""
