"""`switchboard up`: the bundled engine in a child process, a demo key, and the gateway in the foreground.

The engine serves the bundled chat model and the bundled embedding model (`minilm` in the default config).

The engine child is stopped when the gateway stops: Ctrl+C, SIGTERM (after the gateway has drained), or an
error. uvicorn re-raises the SIGTERM it caught once it has shut down; by default that would end this process
on the spot, before the engine is stopped, so SIGTERM raises SystemExit here instead.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

import httpx

from gateway.config import Config
from gateway.store.db import make_engine, migrate
from gateway.store.keys import create_key, upsert_teams

_ENGINE_READY_TIMEOUT_S = 600.0


def _start_engine(port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "gateway.cli", "engine", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "auto", "--quant", "auto"]  # timed on this machine at first start (docs/ENGINE.md)
    cmd += ["--embedding-model", "minilm"]  # POST /v1/embeddings, public model `minilm`
    return subprocess.Popen(cmd)


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + _ENGINE_READY_TIMEOUT_S
    print("waiting for the engine to load the model", end="", flush=True)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"\nthe engine exited with status {proc.returncode}; see its log above")
            return False
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                print(" ready")
                return True
        except httpx.TransportError:
            pass  # not listening yet: keep polling
        print(".", end="", flush=True)
        time.sleep(1.0)
    print("\nthe engine did not become ready in time")
    return False


def _print_demo(config: Config, key: str) -> None:
    base = f"http://{config.server.host}:{config.server.port}"
    model = next(iter(config.models))
    print(
        f"""
Switchboard is starting on {base}
  demo API key (team `demo`, shown once): {key}

  curl {base}/v1/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Say hello in five words."}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}/v1", api_key="{key}"); \\
print(c.chat.completions.create(model="{model}", \\
messages=[{{"role": "user", "content": "Say hello"}}]).choices[0].message.content)'
""",
        flush=True,
    )


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # the shell's status for "ended by this signal"


def run_quickstart(
    config: Config,
    *,
    engine_port: int,
    with_engine: bool,
    start_engine: Callable[[int], subprocess.Popen[bytes]] = _start_engine,
) -> int:
    from gateway.http.app import create_app
    from gateway.http.server import run_server

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_engine(engine_port) if with_engine else None
        if proc is not None and not _wait_ready(proc, engine_port):
            return 1
        migrate(config.database.url, config.database.schema_name)
        db = make_engine(config.database.url, config.database.schema_name)
        upsert_teams(db, {name: team.models for name, team in config.teams.items()})
        team = "demo" if "demo" in config.teams else next(iter(config.teams))
        created = create_key(db, team, name="quickstart demo", models=None, expires_at=None)
        db.dispose()
        _print_demo(config, created.plaintext)
        run_server(
            create_app(config), config, host=config.server.host, port=config.server.port, access_log=False
        )
        return 0
    finally:
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        finally:
            signal.signal(signal.SIGTERM, previous)
