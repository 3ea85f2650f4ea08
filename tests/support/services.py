"""Where the real PostgreSQL and Redis are (`SWITCHBOARD_TEST_PG_URL`, `SWITCHBOARD_TEST_REDIS_URL`), and
Redis key clean-up.

A module that imports `PG_URL` or `REDIS_URL` is marked `postgres` or `redis` (tests/conftest.py), so the
fast tier never needs the services. Tests that need a service fail, never skip, when it is down (README).
"""

from __future__ import annotations

import os

import redis

PG_URL = os.environ.get("SWITCHBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (what a test or rig wrote under a prefix of its own)."""
    client = redis.Redis.from_url(url)
    try:
        found = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(found), 500):
            client.delete(*found[i : i + 500])
    finally:
        client.close()
