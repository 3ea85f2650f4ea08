"""The gateway side of edge nodes: enrollment tokens, the live-node registry, the WebSocket hub, routing.

Nodes dial out to `/v1/edge/connect` (`hub`), authenticate with an enrollment token (`tokens`), and are kept
in a registry (`registry`: memory or Redis) that `/admin/edge/nodes` lists. Each connected node becomes one
deployment per configured edge model at snapshot time (`pool`). Nothing is loaded at import time.
"""
