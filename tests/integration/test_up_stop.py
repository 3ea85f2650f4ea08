"""`switchboard up` stops the engine it started when it gets SIGTERM, as it does on Ctrl+C: while serving,
and while it is still waiting for the engine. The engine is a stand-in process (tests/support/quickstart.py);
the command around it is the real one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.replicas import ROOT, free_port, to_toml

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return {int(c) for task in tasks for c in (task / "children").read_text().split()}


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _wait(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert proc.poll() is None, f"up exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("phase", ["serving", "waiting_for_engine"])
def test_sigterm_stops_the_engine_up_started(tmp_path: Path, phase: str) -> None:
    port, engine_port = free_port(), free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout_s": 5},
        "database": {"url": f"sqlite:///{tmp_path / 'up.db'}", "spill_path": str(tmp_path / "spill.jsonl")},
        "backends": {"local": {"kind": "openai", "base_url": f"http://127.0.0.1:{engine_port}/v1"}},
        "models": {"smol": {"backend": "local"}},
        "teams": {"demo": {"models": ["*"]}},
    }
    path = tmp_path / "up.toml"
    path.write_text(to_toml(config))
    cmd = [sys.executable, "-m", "tests.support.quickstart", "--config", str(path)]
    cmd += ["--engine-port", str(engine_port)]
    if phase == "waiting_for_engine":
        cmd.append("--engine-never-ready")
    log = tmp_path / "up.out"  # not *.log: the log scan would flag the demo key, which up prints by design
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait("the engine to listen", lambda: _listening(engine_port), proc, log)
        if phase == "serving":
            _wait("the gateway", lambda: _healthy(port), proc, log)
        engines = _children(proc.pid)
        assert len(engines) == 1, engines
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (engine,) = engines
    deadline = time.monotonic() + 10
    while not _gone(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = not _gone(engine)
    if survived:
        os.kill(engine, signal.SIGKILL)  # this test's own stand-in: leave nothing behind
    assert not survived, f"the engine (pid {engine}) outlived up's SIGTERM:\n{log.read_text()[-3000:]}"
    assert not _listening(engine_port)
    assert status == 128 + signal.SIGTERM, log.read_text()[-3000:]
    if phase == "serving":
        assert "Application shutdown complete" in log.read_text()  # the gateway drained before the engine


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
