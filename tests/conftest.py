"""Suite-wide settings and the test tiers.

Settings: the env litellm needs to stay offline, and the converted-weights cache (in the system temp dir,
shared by test runs and the processes tests start). Where PostgreSQL and Redis are: tests/support/services.py.
Database fixtures (tests/support/db.py), the log scan (tests/support/logscan.py: no key, token or planted
prompt text in a log line or error message) and the hang backstop (tests/support/backstop.py: a test that
outlives its timeout by minutes ends the run with every thread's stack) are loaded here as plugins.

Tiers are markers, set at collection (`pytest_collection_modifyitems`) from what a test uses, so a new test
lands in the right tier without marking it by hand:

- `postgres` / `redis`: the test's module imports the server's address (`PG_URL`, `REDIS_URL` from
  tests/support/services.py), or the test uses a fixture that needs the server (`pg_target`, the
  PostgreSQL case of `db_target`, `migrated_target`, `any_gateway`, ...).
- `slow`: a live server or processes: everything under tests/api, tests/replicas and tests/e2e, a module that
  imports `LiveServer` or `FakeProvider`, a test using a fixture that starts one, and every `model` test.
- `model`: the real SmolLM2 (the `smollm2` fixture; tests that load it otherwise are marked by hand).
- `fast`: none of the above nor `gpu`. `pytest -m fast` is the fast tier (README); CI runs every tier.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SWITCHBOARD_CACHE_DIR", str(Path(tempfile.gettempdir()) / "switchboard-test-cache"))

pytest_plugins = ("tests.support.db", "tests.support.logscan", "tests.support.backstop")

TIERS = ("slow", "model", "redis", "postgres", "gpu")
SLOW_DIRS = ("api", "replicas", "e2e")  # live gateways, replica processes, the engine server
FIXTURE_TIERS: dict[str, tuple[str, ...]] = {
    "pg_target": ("postgres",),
    "migrated_pg_target": ("postgres",),
    "fake_provider": ("slow",),
    "fake": ("slow",),
    "gateway": ("slow",),
    "pg_gateway": ("slow", "postgres"),
    "any_gateway": ("slow",),  # its PostgreSQL case is marked `postgres` by its param
    "rig": ("slow", "redis", "postgres"),
    "smollm2": ("model",),
}
MODULE_TIERS: dict[str, tuple[str, ...]] = {  # a name a module imports -> the tiers its tests are in
    "PG_URL": ("postgres",),
    "REDIS_URL": ("redis",),
    "LiveServer": ("slow",),
    "FakeProvider": ("slow",),
}


def tiers_of(item: pytest.Item) -> set[str]:
    found = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
    for name in getattr(item, "fixturenames", ()):
        found.update(FIXTURE_TIERS.get(name, ()))
    module = getattr(item, "module", None)
    if module is not None:
        names = vars(module)
        for name, tiers in MODULE_TIERS.items():
            if name in names:
                found.update(tiers)
    parts = item.path.relative_to(Path(__file__).parent).parts
    if parts[0] in SLOW_DIRS:
        found.add("slow")
    if "model" in found:
        found.add("slow")
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = tiers_of(item)
        for tier in sorted(tiers):
            item.add_marker(tier)
        if not tiers:
            item.add_marker("fast")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the engine's C++ kernels once, up front, when a selected test may start the engine (anything
    outside the fast tier, and the engine's own tests), so no engine process a test starts pays for the build
    inside its ready deadline (processes started later load the cached library). Without torch: nothing."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return
    engine_dir = Path(__file__).parent / "engine"
    if not any(
        item.get_closest_marker("fast") is None or engine_dir in item.path.parents for item in session.items
    ):
        return
    from backends.local.engine.kernels import kernel_op

    kernel_op("paged_attention")
