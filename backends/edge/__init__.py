"""Edge nodes: small quantized models on devices that dial out to the gateway over one WebSocket.

`wire` defines the frames both sides speak (pure); `tunnel` is the gateway-side `Backend` over one node's
connection (`EdgeBackend` over a `Tunnel`); `node` is the agent that runs on the device (`switchboard edge
serve`): the local engine in an edge profile, enrolment, heartbeats, reconnects. Nothing here imports
`gateway` or `routing`, and nothing is loaded at import time.
"""
