"""The edge hub: the `/v1/edge/connect` WebSocket, one `NodeLink` per connected node, token re-checks.

A connection's `Authorization: Bearer sbe_...` token is checked before the upgrade: missing, unknown,
expired or revoked is an HTTP 401 (the node stops), an unreadable database a 503 with Retry-After (the node
retries), each with a JSON error body; only then is it accepted. Then its `hello` (malformed or late: 4400),
then `welcome`.
A node_id held by a live connection is refused (4409; the node retries with backoff), one held by a silent
connection is taken over. Every `edge.token_check_s` the tokens of all connected nodes are re-read in one
query and nodes whose token was revoked, expired or deleted are closed with 4401: revoking disconnects
within seconds. A node silent for `edge.ttl_s` leaves routing (`live_nodes` feeds RoutingState); its socket
is closed after `STALE_CLOSE_TTLS` x ttl_s. The registry is written off the read loop (a slow Redis never
delays a token). Routing sees this replica's links and, with Redis, the nodes other replicas hold, reached
through the relay (gateway/edge/relay.py); a node held here always goes over its own link.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from starlette.responses import Response
from starlette.websockets import WebSocket

from backends.base import Backend
from backends.edge import wire
from gateway.background import TaskSet, cancel_and_wait
from gateway.config import Config, EdgeBackendConfig
from gateway.edge import tokens
from gateway.edge.link import SOCKET_ERRORS, Load, NodeBackends, NodeLink, NodeTunnel, close_reason
from gateway.edge.pool import LiveNode
from gateway.edge.registry import NodeRecord, Registry
from gateway.edge.relay import Relay
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest, ServiceUnavailable, error_body
from gateway.live.state import RoutingState

log = logging.getLogger(__name__)

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
STALE_CLOSE_TTLS = 3  # a node silent this many ttl_s is presumed gone and its socket closed
TOKEN_RETRY_AFTER_S = 5  # Retry-After when the database cannot check a token
DENIAL = "websocket.http.response"  # the ASGI extension for an HTTP answer instead of the upgrade


class EdgeHub:
    def __init__(
        self,
        config: Config,
        db: Engine,
        registry: Registry,
        routing: RoutingState,
        static_backends: Mapping[str, Backend],
        *,
        replica_id: str,
        relay: Relay | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = config.edge
        self._db = db
        self.registry = registry
        self.relay = relay
        self._routing = routing
        self._replica = replica_id
        self._clock, self._wall = clock, wall
        self.links: dict[str, NodeLink] = {}
        edge_names = frozenset(n for n, b in config.backends.items() if isinstance(b, EdgeBackendConfig))
        self.backends = NodeBackends(static_backends, edge_names, self._tunnel_of)
        self._tasks = TaskSet()
        self._watcher: asyncio.Task[None] | None = None
        self._checked_s = -float("inf")
        self._db_failing = False

    def wall(self) -> float:
        """Epoch seconds, as the registry's records use them."""
        return self._wall()

    def live_nodes(self) -> list[LiveNode]:
        """Every node this replica holds, then those other replicas hold (through the relay); routing keeps
        those heard from within edge.ttl_s."""
        held = [link.live_node() for link in self.links.values() if link.connected]
        if self.relay is None:
            return held
        here = {node.node_id for node in held}
        return held + [node for node in self.relay.remote_nodes() if node.node_id not in here]

    def _held(self, node_id: str) -> NodeLink | None:
        link = self.links.get(node_id)
        return link if link is not None and link.connected else None

    def _tunnel_of(self, node_id: str) -> NodeTunnel | None:
        link = self._held(node_id)
        if link is not None or self.relay is None:
            return link
        return self.relay.tunnel(node_id)

    def start(self) -> None:
        self._routing.set_edge_source(self)
        self._watcher = asyncio.create_task(self._watch(), name="edge-hub watcher")
        if self.relay is not None:
            self.relay.start(self._held, self._routing.refresh)

    async def aclose(self) -> None:
        await cancel_and_wait(self._watcher)
        self._routing.set_edge_source(None)
        if self.relay is not None:
            await self.relay.aclose()  # first: relayed requests tell their nodes to cancel
        links = list(self.links.values())
        for link in links:
            await link.close(wire.CloseCode.GOING_AWAY, "gateway shutting down")
        await asyncio.gather(*(link.aclose() for link in links))
        await self._tasks.aclose()
        await self.registry.aclose()

    # ---- one connection -----------------------------------------------------------------------------------

    async def serve(self, ws: WebSocket) -> None:
        """The whole life of one node connection. The token is checked before the upgrade: a refused node
        never gets a WebSocket."""
        token = await self._check_token(ws)
        if token is None:
            return
        await ws.accept()
        hello = await self._read_hello(ws)
        if hello is None:
            return
        link = await self._attach(ws, hello, token)
        if link is None:
            return
        try:
            await self._read(link)
        finally:
            await self._detach(link)

    async def _refuse(self, ws: WebSocket, code: int, reason: str) -> None:
        try:
            await ws.close(code, close_reason(reason))
        except SOCKET_ERRORS:
            return

    async def _deny(self, ws: WebSocket, exc: GatewayError, close_code: int) -> None:
        """Answer the upgrade request with HTTP `exc.status_code` and the OpenAI error envelope. Without the
        denial extension, close before accepting (the server answers 403; `close_code` is for a server that
        can carry it)."""
        headers = {"retry-after": str(TOKEN_RETRY_AFTER_S)} if exc.status_code == 503 else None
        try:
            if DENIAL in ws.scope.get("extensions", {}):
                response = Response(error_body(exc), exc.status_code, headers, "application/json")
                await ws.send_denial_response(response)
            else:
                await ws.close(close_code, close_reason(exc.message))
        except SOCKET_ERRORS:
            return

    async def _check_token(self, ws: WebSocket) -> tokens.TokenInfo | None:
        """The connection's token, or None after refusing the upgrade (401, or 503 when unreadable)."""
        scheme, _, plaintext = (ws.headers.get("authorization") or "").partition(" ")
        unauthorized = wire.CloseCode.UNAUTHORIZED
        if scheme.lower() != "bearer" or not plaintext.strip():
            reason = "missing enrollment token: send Authorization: Bearer sbe_... (--token)"
            await self._deny(ws, AuthenticationFailed(reason), unauthorized)
            return None
        try:
            info = await asyncio.to_thread(tokens.lookup_token, self._db, plaintext.strip())
        except DBAPIError as exc:
            log.warning(
                "edge: cannot check an enrollment token (%s); the node will retry", type(exc).__name__
            )
            refusal = ServiceUnavailable("cannot check the enrollment token now (database); retry later")
            await self._deny(ws, refusal, wire.CloseCode.TRY_LATER)
            return None
        if info is None:
            reason = "unknown enrollment token (create one: `switchboard edge token create`)"
            await self._deny(ws, AuthenticationFailed(reason), unauthorized)
            return None
        problem = info.problem(_utc(self._wall()))
        if problem is not None:
            log.info("edge: refused a node: %s", problem)
            await self._deny(ws, AuthenticationFailed(problem), unauthorized)
            return None
        return info

    async def _receive(self, ws: WebSocket) -> str | bytes | None:
        """The next message's payload; None once the peer is gone."""
        try:
            message = await ws.receive()
        except SOCKET_ERRORS:
            return None
        if message["type"] == "websocket.disconnect":
            return None
        payload: str | bytes = message.get("text") or message.get("bytes") or ""
        return payload

    async def _read_hello(self, ws: WebSocket) -> wire.Hello | None:
        try:
            async with asyncio.timeout(self._cfg.hello_timeout_s):
                raw = await self._receive(ws)
            if raw is None:
                return None
            frame = wire.decode(raw, allowed=(wire.Hello,))
        except TimeoutError:
            await self._refuse(
                ws, wire.CloseCode.BAD_HELLO, f"no hello within {self._cfg.hello_timeout_s:g} s"
            )
            return None
        except wire.FrameError as exc:
            await self._refuse(ws, wire.CloseCode.BAD_HELLO, str(exc))
            return None
        assert isinstance(frame, wire.Hello)
        problem = None
        if frame.protocol != wire.PROTOCOL_VERSION:
            problem = f"protocol {frame.protocol} unsupported; this gateway speaks {wire.PROTOCOL_VERSION}"
        elif not NODE_ID.match(frame.node_id):
            problem = "node_id: use 1-128 letters, digits, '_', '.', ':' or '-' (--node-id)"
        else:
            try:
                tokens.check_labels(frame.labels, param="--label")
            except InvalidRequest as exc:
                problem = exc.message
        if problem is not None:
            await self._refuse(ws, wire.CloseCode.BAD_HELLO, problem)
            return None
        return frame

    async def _attach(self, ws: WebSocket, hello: wire.Hello, token: tokens.TokenInfo) -> NodeLink | None:
        now_s, now = self._clock(), self._wall()
        held = self.links.get(hello.node_id)
        if held is not None:
            if held.connected and now_s - held.load.seen_s <= self._cfg.ttl_s:
                reason = f"node_id {hello.node_id} is connected already; give each node its own --node-id"
                await self._refuse(ws, wire.CloseCode.DUPLICATE_NODE, reason)
                return None
            await held.close(wire.CloseCode.DUPLICATE_NODE, "replaced by a newer connection of this node")
        labels = {**hello.labels, **token.labels}  # the admin's scope wins over what the node says
        load = Load(0, 0, 0.0, hello.tokens_per_s, now_s, now)
        link_id = secrets.token_hex(8)
        link = NodeLink(
            ws, hello, token_id=token.token_id, labels=labels, link_id=link_id, load=load, connected_at=now
        )
        link.queue(wire.Welcome(hello.node_id, link.labels, self._cfg.heartbeat_s))
        self.links[hello.node_id] = link
        self._routing.refresh()
        self._tasks.spawn(self.registry.put(self._record(link)))
        log.info(
            "edge node %s connected (token %s, labels %s, models %s, %.1f tokens/s)",
            hello.node_id,
            token.token_id,
            dict(link.labels),
            ", ".join(hello.models),
            hello.tokens_per_s,
        )
        return link

    async def _read(self, link: NodeLink) -> None:
        while True:
            raw = await self._receive(link.ws)
            if raw is None:
                return
            try:
                frame = wire.decode(raw, allowed=wire.NODE_FRAMES)
            except wire.FrameError as exc:
                log.warning("edge node %s: ignored a frame: %s", link.node_id, exc)
                continue
            if isinstance(frame, wire.Heartbeat):
                link.heartbeat(frame, now_s=self._clock(), now=self._wall())
                self._tasks.spawn(self.registry.put(self._record(link)))
            elif isinstance(frame, wire.Chunk | wire.Done | wire.Error):
                link.deliver(frame)

    async def _detach(self, link: NodeLink) -> None:
        pending = link.pending
        link.drop()
        if self.links.get(link.node_id) is link:
            del self.links[link.node_id]
            self._routing.refresh()
        await link.aclose()
        self._tasks.spawn(self.registry.close(link.node_id, link.link_id, self._wall()))
        log.info("edge node %s disconnected (%d requests were pending)", link.node_id, pending)

    def _record(self, link: NodeLink) -> NodeRecord:
        hello, load = link.hello, link.load
        return NodeRecord(
            node_id=link.node_id,
            replica=self._replica,
            link_id=link.link_id,
            token_id=link.token_id,
            models=hello.models,
            labels=link.labels,
            max_batch=hello.capacity.max_batch,
            kv_cache_mb=hello.capacity.kv_cache_mb,
            tokens_per_s=load.tokens_per_s,
            usd_per_hour=hello.usd_per_hour,
            version=hello.version,
            connected_at=link.connected_at,
            last_seen=load.seen,
            in_flight=load.in_flight,
            queue_depth=load.queue_depth,
            kv_used_frac=load.kv_used_frac,
        )

    # ---- periodic checks ----------------------------------------------------------------------------------

    async def disconnect_token(self, token_id: str, reason: str) -> int:
        """Close this replica's nodes enrolled with `token_id` now (after a revoke here); how many."""
        links = [link for link in self.links.values() if link.token_id == token_id and link.connected]
        for link in links:
            log.warning("edge: disconnecting node %s: %s", link.node_id, reason)
            await link.close(wire.CloseCode.UNAUTHORIZED, reason)
        return len(links)

    async def check_tokens(self) -> int:
        """Re-read the tokens of every connected node in one query; close those no longer usable."""
        self._checked_s = self._clock()
        links = [link for link in self.links.values() if link.connected]
        if not links:
            return 0
        try:
            found = await asyncio.to_thread(tokens.states, self._db, {link.token_id for link in links})
        except DBAPIError as exc:
            if not self._db_failing:
                log.warning(
                    "edge: cannot re-check enrollment tokens (%s); nodes stay connected", type(exc).__name__
                )
            self._db_failing = True
            return 0
        self._db_failing = False
        now = _utc(self._wall())
        closed = 0
        for link in links:
            info = found.get(link.token_id)
            problem = f"edge token {link.token_id} was deleted" if info is None else info.problem(now)
            if problem is not None:
                log.warning("edge: disconnecting node %s: %s", link.node_id, problem)
                await link.close(wire.CloseCode.UNAUTHORIZED, problem)
                closed += 1
        return closed

    async def close_silent(self) -> int:
        """Close links silent for STALE_CLOSE_TTLS x ttl_s (they left routing after ttl_s already)."""
        limit_s = STALE_CLOSE_TTLS * self._cfg.ttl_s
        now_s = self._clock()
        silent = [
            link for link in self.links.values() if link.connected and now_s - link.load.seen_s > limit_s
        ]
        for link in silent:
            reason = f"no heartbeat for {limit_s:g} s (config: edge.ttl_s)"
            log.warning("edge: closing node %s: %s", link.node_id, reason)
            await link.close(wire.CloseCode.STALE, reason)
        return len(silent)

    async def _watch(self) -> None:
        every_s = min(self._cfg.token_check_s, self._cfg.ttl_s / 2)
        while True:
            await asyncio.sleep(every_s)
            try:
                if self._clock() - self._checked_s >= self._cfg.token_check_s - 1e-3:
                    await self.check_tokens()
                await self.close_silent()
            except Exception:  # noqa: BLE001 - a background loop: log and keep watching
                log.exception("edge: periodic check failed")


def _utc(epoch_s: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC)
