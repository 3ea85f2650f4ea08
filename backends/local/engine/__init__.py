"""The self-hosted inference engine: continuous batching over a paged KV cache (see docs/ENGINE.md).

Token ids in, token ids out; no HTTP, teams or OpenAI here. `scheduler` never imports torch.
"""
