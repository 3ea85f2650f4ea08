"""The log scan (tests/support/logscan.py) is on in this run, and it can fail: a child pytest run with it
logs a key, puts planted prompt text in an error message and writes a token to a log file, and fails."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests.support import logscan

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import logging
from pathlib import Path

from gateway.errors import InvalidRequest
from gateway.store import keys
from tests.support import logscan

OUT = Path(__file__).parent / "secrets.txt"
logging.getLogger("child").warning("at import: %s", logscan.PROMPT_MARKER)  # outside any test


def _made(secret):
    with OUT.open("a") as f:
        f.write(secret + "\\n")
    return secret


def test_logs_a_key():
    logging.getLogger("child").debug("created %s", _made(keys.generate_key()[0]))


def test_error_message_holds_prompt_text():
    _made(logscan.PROMPT_MARKER)
    InvalidRequest(f"cannot parse {logscan.PROMPT_MARKER!r}")


def test_log_file_holds_a_token(tmp_path):
    (tmp_path / "server.log").write_text("enrolled with " + _made(keys.new_secret("sbe_")) + "\\n")


def test_traceback_holds_a_key():
    try:
        raise ValueError(_made(keys.generate_key()[0]))
    except ValueError:
        logging.getLogger("child").exception("failed")


def test_clean():
    logging.getLogger("child").info("created key %s", keys.generate_key()[0][:12])  # a display prefix is fine
"""


def test_the_scan_is_on_in_this_run(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.has_plugin("tests.support.logscan")
    assert logscan.is_active(request.config)


def test_a_leaking_run_fails_without_printing_the_secrets(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_child.py").write_text(CHILD)
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.support.logscan", "-c", str(tmp_path / "pytest.ini")]
    cmd += ["-q", "-rE", "--show-capture=no", "-p", "no:cacheprovider", str(tmp_path / "test_child.py")]
    with tempfile.TemporaryDirectory() as base:  # not under this run's tmp dirs: its leaks are planted
        result = subprocess.run(
            [*cmd, "--basetemp", base], cwd=ROOT, capture_output=True, text=True, timeout=240
        )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("ERROR ")]
    for name in (
        "logs_a_key",
        "error_message_holds_prompt_text",
        "log_file_holds_a_token",
        "traceback_holds",
    ):
        assert any(f"test_child.py::test_{name}" in line for line in errors), out
    assert "5 passed, 4 errors" in out, out
    assert "outside any test: the session fails" in out, out
    assert "planted prompt text" in out and "API key" in out and "enrollment token" in out, out
    secrets = (tmp_path / "secrets.txt").read_text().split()
    assert len(secrets) == 4
    for secret in secrets:
        assert secret not in out, "a scan report printed the secret it found"


def test_a_record_made_while_the_scan_holds_its_lock_does_not_deadlock() -> None:
    """What a finalizer that logs does when the garbage collector runs it inside `Scan.add` on the same
    thread: the scan's lock is taken again by its holder."""
    scan = logscan.Scan()

    def nested() -> None:
        with scan._lock:
            scan.add(lambda: "outer", lambda: "outer text", "records")
            with scan._lock:  # the finalizer's record, on the thread inside `add`
                scan.add(lambda: "finalizer", lambda: "finalizer text", "records")

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the scan's lock deadlocked its own holder"
    assert scan.counts["records"] == 2
    assert scan.drain() == [] and scan.pending == []
