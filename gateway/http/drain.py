"""Graceful shutdown with a bound: uvicorn's server, drained for at most `server.drain_timeout_s`.

On SIGTERM (or SIGINT) the listeners close at once, so new connections are refused. Idle connections close;
the requests in flight (streams and reports included) get the drain window to finish. At its end each
remaining request task is cancelled and its connection closed (the client sees it end, mid-stream or before
any answer); the pipeline writes that request's row (client_closed) as it unwinds, and only once
those tasks have finished does the lifespan close the services, flushing the ledger. uvicorn's own
`timeout_graceful_shutdown` cancels too but does not wait for the cancelled tasks, so their rows could come
after the ledger writer closed (and land in the spill file instead of the database).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

log = logging.getLogger("uvicorn.error")
CANCEL_WAIT_S = 5.0  # how long cancelled requests get to write their rows before the services close
CUT_OFF = "switchboard: the drain timeout passed (server.drain_timeout_s)"  # the cancel message
_POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose shutdown waits for in-flight requests at most `drain_timeout_s`."""

    def __init__(self, config: uvicorn.Config, *, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.server_state
        log.info(
            "Shutting down: new connections are refused; %d request(s) in flight get %g s "
            "(server.drain_timeout_s)",
            len(state.tasks),
            self.drain_timeout_s,
        )
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(state.connections):
            connection.shutdown()  # idle: closed now; busy: closed after its response
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                while (state.connections or state.tasks) and not self.force_exit:
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            await self._cut_off()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _cut_off(self) -> None:
        """Close what is left and cancel its requests; wait (bounded) until their rows are written."""
        state = self.server_state
        tasks = list(state.tasks)
        log.warning(
            "drain timeout (%g s, server.drain_timeout_s) passed: closing %d connection(s) and cancelling "
            "%d request(s)",
            self.drain_timeout_s,
            len(state.connections),
            len(tasks),
        )
        # Cancel first, then close, in one step: each task sees its cancel before its connection's loss
        # (the loss would make a stream's disconnect watcher cancel it a second time, cutting its row's
        # write short), and a closed transport drops what uvicorn then writes (its 500 for an unanswered
        # request): the client sees the connection end.
        for task in tasks:
            task.cancel(msg=CUT_OFF)
        for connection in list(state.connections):
            connection.transport.close()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
            if pending:
                log.error("%d request(s) still running %g s after the cancel", len(pending), CANCEL_WAIT_S)
