"""Dependencies point one way: gateway -> routing -> backends.base; backends import neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports_of(package: str) -> list[tuple[Path, str]]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((path, node.module))
    return found


@pytest.mark.parametrize("forbidden", ["gateway", "routing"])
def test_backends_do_not_import_upward(forbidden: str) -> None:
    bad = [f"{p.relative_to(ROOT)}: {m}" for p, m in imports_of("backends") if m.split(".")[0] == forbidden]
    assert not bad, bad


def test_routing_imports_only_backend_types() -> None:
    bad = []
    for path, module in imports_of("routing"):
        top = module.split(".")[0]
        if top == "gateway" or (top == "backends" and module not in ("backends.base", "backends.errors")):
            bad.append(f"{path.relative_to(ROOT)}: {module}")
    assert not bad, bad


def test_only_cloud_backend_imports_litellm() -> None:
    users = {
        str(p.relative_to(ROOT))
        for pkg in ("gateway", "routing", "backends")
        for p, m in imports_of(pkg)
        if m.split(".")[0] == "litellm"
    }
    assert users <= {"backends/cloud.py"}, users


def test_routing_does_no_io() -> None:
    io_modules = {"socket", "httpx", "asyncio", "time", "random", "sqlalchemy", "redis", "os"}
    bad = [f"{p.relative_to(ROOT)}: {m}" for p, m in imports_of("routing") if m.split(".")[0] in io_modules]
    assert not bad, bad
