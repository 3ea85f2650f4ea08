"""The hang backstop (tests/support/backstop.py): a child pytest run whose test swallows pytest-timeout's
exception and goes on ends anyway, with every thread's stack, soon after the backstop's grace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import threading
import time

import pytest


def _parked(event):
    event.wait()


@pytest.mark.timeout(1)
def test_swallows_the_timeout():
    threading.Thread(target=_parked, args=(threading.Event(),), name="parked-helper", daemon=True).start()
    while True:
        try:
            time.sleep(0.2)
        except BaseException:  # what a finalizer or a broad except does with pytest-timeout's exception
            pass
"""


def test_a_test_that_swallows_its_timeout_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 300\n")
    (tmp_path / "test_child.py").write_text(CHILD)
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.support.backstop", "-c", str(tmp_path / "pytest.ini")]
    cmd += ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path / "test_child.py")]
    env = {**os.environ, "SWITCHBOARD_TEST_BACKSTOP_GRACE_S": "3"}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as base:
        result = subprocess.run(
            [*cmd, "--basetemp", base], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
    took = time.monotonic() - started
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert re.search(r"Timeout \(0:00:0\d\)!", out), out  # faulthandler's timer: 1 s limit + 3 s grace
    assert "most recent call first" in out and "_parked" in out, out  # faulthandler's dump, every thread
    assert "test_swallows_the_timeout" in out, out
    assert took < 100, f"the run took {took:.0f} s to end"
