"""A backstop under pytest-timeout, a pytest plugin (tests/conftest.py loads it): a test still running
`BACKSTOP_GRACE_S` after its timeout dumps every thread's stack to the terminal and ends the run.

pytest-timeout's default method raises an exception in the main thread; where that exception is swallowed
(raised inside a finalizer the garbage collector ran, or caught by a broad `except`), the test goes on, and a
hang then used up CI's 90 minutes. faulthandler's timer runs in C, on its own thread, and needs no GIL-free
main thread to fire.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import IO

import pytest

BACKSTOP_GRACE_S = float(os.environ.get("SWITCHBOARD_TEST_BACKSTOP_GRACE_S", "180"))
_TERMINAL: list[IO[str]] = []  # stderr as the run started (fd 2 is captured while a test runs)


def pytest_configure(config: pytest.Config) -> None:
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        _TERMINAL.append(sys.__stderr__ or sys.stderr)
        return
    with capman.global_and_fixture_disabled():
        _TERMINAL.append(os.fdopen(os.dup(2), "w"))


def limit_of(item: pytest.Item) -> float:
    """The test's pytest-timeout limit: its `timeout` mark, else the ini setting, else 300 s."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    try:
        return float(item.config.getini("timeout") or 300)
    except ValueError:  # pytest-timeout absent: no such ini key
        return 300.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    faulthandler.dump_traceback_later(limit_of(item) + BACKSTOP_GRACE_S, exit=True, file=_TERMINAL[0])
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()
