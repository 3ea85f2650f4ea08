"""Suite-wide settings: where the real PostgreSQL and Redis are, the env litellm needs to stay offline, and
the converted-weights cache (in the system temp dir, shared by test runs and the processes tests start)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SWITCHBOARD_CACHE_DIR", str(Path(tempfile.gettempdir()) / "switchboard-test-cache"))

PG_URL = os.environ.get("SWITCHBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_sessionstart(session: object) -> None:
    """Build the engine's C++ kernels once, up front, so no engine process a test starts pays for the build
    inside its ready deadline (processes started later load the cached library). Without torch: nothing."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return
    from backends.local.engine.kernels import kernel_op

    kernel_op("paged_attention")
