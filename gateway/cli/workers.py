"""`switchboard serve --workers N`: N gateway processes on one port, each with its own SO_REUSEPORT socket.

The parent only supervises. It migrates the database once, starts the workers (spawned, not forked), waits for
each to finish its start-up, forwards SIGTERM/SIGINT, replaces a worker that dies after start-up, and stops
everything with a non-zero status when one dies during start-up. Each worker builds its own services, so it
has its own ledger writer and spill file (`<database.spill_path>.worker<i>` for i >= 1). Limits, budgets,
cache and routing state are shared through Redis as between replicas, which is why N > 1 needs `redis.url`.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from gateway.cli.common import err_console
from gateway.config import Config

STARTUP_FAILURE = 3  # uvicorn's exit status when the app's start-up fails
# After SIGTERM a worker drains for server.drain_timeout_s, then closes its services (the ledger writer's
# flush is bounded by 10 s): one still running this long after that is killed.
EXIT_MARGIN_S = 30.0
_PR_SET_PDEATHSIG = 1


def refusal(config: Config, workers: int) -> str | None:
    """Why `workers` processes cannot serve this config, or None when they can."""
    if config.redis.url is None:
        return (
            f"--workers {workers}: without Redis each worker keeps its own rate limits, budgets, cache and "
            f"routing state, so {workers} workers would allow {workers} times every limit; set redis.url "
            "(config: [redis] url) or run one worker"
        )
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return f"--workers {workers}: needs SO_REUSEPORT load balancing (Linux); run one worker per port"
    return None


def worker_config(config: Config, index: int) -> Config:
    """Worker `index`'s config: its own spill file (worker 0 keeps the configured one), no migrations."""
    spill = config.database.spill_path if index == 0 else f"{config.database.spill_path}.worker{index}"
    database = config.database.model_copy(update={"spill_path": spill, "auto_migrate": False})
    return config.model_copy(update={"database": database})


def reuseport_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def run_worker(config: Config, host: str, port: int, access_log: bool, ready: Connection) -> None:
    """One worker process: bind, build the app, serve until SIGTERM/SIGINT; exit 3 if start-up failed."""
    from gateway.http.app import create_app
    from gateway.http.drain import DrainingServer
    from gateway.http.server import uvicorn_config

    _die_with_parent()
    sock = reuseport_socket(host, port)

    class Server(DrainingServer):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                ready.send(True)

    app = create_app(config)
    uv_config = uvicorn_config(app, config, host=host, port=port, access_log=access_log)
    server = Server(uv_config, drain_timeout_s=config.server.drain_timeout_s)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises a captured SIGINT after shutting down
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _die_with_parent() -> None:
    """SIGTERM this worker if the supervisor dies without stopping it (kill -9): no orphan keeps the port."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's own shutdown still stops the workers


class Supervisor:
    """Starts and watches the workers; `run()` returns the command's exit status."""

    def __init__(self, config: Config, host: str, port: int, workers: int, *, access_log: bool) -> None:
        self._config, self._host, self._port, self._access_log = config, host, port, access_log
        self._count = workers
        self._ctx = mp.get_context("spawn")
        self._procs: dict[int, BaseProcess] = {}
        self._ready_pipes: dict[int, Connection] = {}
        self._ready: set[int] = set()
        self.stopping = False
        self._kill_at: float | None = None  # monotonic: when workers that ignore the SIGTERM are killed

    def _start(self, index: int) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        args = (worker_config(self._config, index), self._host, self._port, self._access_log, send)
        proc = self._ctx.Process(target=run_worker, args=args, name=f"switchboard-worker-{index}")
        proc.start()
        send.close()
        self._procs[index], self._ready_pipes[index] = proc, receive
        self._ready.discard(index)

    def stop(self) -> None:
        """SIGTERM every live worker: each finishes its requests and flushes its ledger, then exits."""
        self.stopping = True
        if self._kill_at is None:
            self._kill_at = time.monotonic() + self._config.server.drain_timeout_s + EXIT_MARGIN_S
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()

    def _kill_stragglers(self) -> None:
        if self._kill_at is None or time.monotonic() < self._kill_at:
            return
        for index, proc in self._procs.items():
            if proc.is_alive():
                err_console.print(f"[red]worker {index} (pid {proc.pid}) outlived its SIGTERM; killing it")
                proc.kill()

    def run(self) -> int:
        for index in range(self._count):
            self._start(index)
        status = 0
        while self._procs:
            pipes = {self._ready_pipes[i]: i for i in self._procs if i not in self._ready}
            sentinels = {p.sentinel: i for i, p in self._procs.items()}
            for handle in wait([*pipes, *sentinels], timeout=1.0):
                if handle in pipes:
                    self._on_ready(pipes[handle])
            for index, proc in list(self._procs.items()):
                if proc.exitcode is not None:
                    status = max(status, self._on_exit(index, proc))
            self._kill_stragglers()
        return status

    def _on_ready(self, index: int) -> None:
        try:
            self._ready_pipes[index].recv()
        except EOFError:
            return  # the worker died before it was ready; its sentinel tells the rest
        self._ready.add(index)
        pid = self._procs[index].pid
        err_console.print(f"worker {index} (pid {pid}) serving on {self._host}:{self._port}")

    def _on_exit(self, index: int, proc: BaseProcess) -> int:
        del self._procs[index]
        self._ready_pipes.pop(index).close()
        if self.stopping:
            return 0
        if index not in self._ready:
            err_console.print(
                f"[red]worker {index} (pid {proc.pid}) exited with status {proc.exitcode} during start-up; "
                "stopping the others (see its log above)[/red]"
            )
            self.stop()
            return 1
        err_console.print(f"[yellow]worker {index} (pid {proc.pid}) exited with {proc.exitcode}; restarting")
        self._start(index)
        return 0


def run_workers(config: Config, host: str, port: int, workers: int, *, access_log: bool) -> int:
    from gateway.services.build import should_migrate
    from gateway.store.db import migrate

    if should_migrate(config):  # once, here: concurrent migrations of one SQLite file would collide
        migrate(config.database.url, config.database.schema_name)
    supervisor = Supervisor(config, host, port, workers, access_log=access_log)

    def forward(signum: int, frame: FrameType | None) -> None:
        # SIGINT too becomes SIGTERM: a worker that also got the terminal's SIGINT would take a second
        # SIGINT as "force exit" and skip its graceful shutdown (ledger flush).
        supervisor.stop()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run()
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
