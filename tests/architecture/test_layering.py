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


# ---- inside gateway/ -----------------------------------------------------------------------------------


def resolved_imports(package: str) -> list[tuple[Path, str]]:
    """Every import of every module under `package`, relative ones resolved to absolute module names."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module or ""
                else:
                    is_pkg = path.name == "__init__.py"
                    anchor = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                found.append((path, base))
                found += [(path, f"{base}.{alias.name}") for alias in node.names]
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# Who may not import whom inside gateway/. The request flows http -> translate -> pipeline -> (live, limits,
# cache, store); the lower layers never reach back up, and nothing below the app knows the assembled app.
_ABOVE_LIVE = (
    "gateway.http",
    "gateway.translate",
    "gateway.pipeline",
    "gateway.services",
    "gateway.cli",
    "gateway.console",
)
FORBIDDEN = {
    "gateway/live": _ABOVE_LIVE,
    "gateway/limits": _ABOVE_LIVE,
    "gateway/cache": _ABOVE_LIVE,
    "gateway/store": _ABOVE_LIVE,
    "gateway/files": _ABOVE_LIVE,  # storage and the file service; multipart is the HTTP edge's
    "gateway/telemetry": _ABOVE_LIVE,  # the pipeline hands it values; it knows no request path
    "gateway/batch": ("gateway.http", "gateway.services", "gateway.cli"),  # runs items through translators
    "gateway/pipeline": ("gateway.http", "gateway.translate", "gateway.services", "gateway.cli"),
    "gateway/translate": ("gateway.http", "gateway.services", "gateway.cli"),
    "gateway/reports": ("gateway.http", "gateway.translate", "gateway.pipeline", "gateway.services"),
    # The console is a UI beside the HTTP routers: it reads through store, reports and the routers' deps,
    # never runs requests itself, and nothing below the app imports it.
    "gateway/console": ("gateway.pipeline", "gateway.services", "gateway.cli"),
    # The engine takes token ids and returns token ids; the adapter around it (server, loader) is above it.
    "backends/local/engine": (
        "backends.local.build",
        "backends.local.server",
        "backends.local.serving",
        "backends.local.wire",
        "backends.local.generate",
        "backends.local.loader",
        "gateway",
        "routing",
    ),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_inside_the_gateway_point_down(package: str) -> None:
    bad = sorted(
        {
            f"{p.relative_to(ROOT)}: {m}"
            for p, m in resolved_imports(package)
            if any(_under(m, f) for f in FORBIDDEN[package])
        }
    )
    assert not bad, bad


def test_relative_imports_are_resolved() -> None:
    # The rules above must see `from ..http import app` as gateway.http.app; a made-up module proves it.
    sample = ROOT / "gateway" / "live" / "_probe_relative.py"
    sample.write_text("from ..http import app\nfrom . import stats\n")
    try:
        found = {m for p, m in resolved_imports("gateway/live") if p == sample}
    finally:
        sample.unlink()
    assert {"gateway.http", "gateway.http.app", "gateway.live", "gateway.live.stats"} <= found


# Modules allowed past ~400 lines, each with its reason. Everything else stays under the limit.
SIZE_LIMIT = 400
LONG_MODULES = {
    "backends/http11.py": "one HTTP/1.1 client connection pool; splitting it would expose its internals",
    "backends/local/engine/engine.py": "the engine loop and its thread bridge",
    "backends/local/engine/quant.py": "int8 and int4 layers with their packing",
    "backends/local/engine/scheduler.py": "the torch-free scheduler with preemption",
    "gateway/config.py": "every config model, so one file is the config reference",
    "gateway/store/keys.py": "key generation, admin operations and the cached key store",
    "gateway/live/stats.py": "live statistics: EWMAs, windows and load",
    "gateway/edge/relay.py": "the edge relay's publish and listen halves",
}


def test_modules_stay_small() -> None:
    too_long = {}
    for package in ("gateway", "routing", "backends"):
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            lines = len(path.read_text().splitlines())
            if lines > SIZE_LIMIT and rel not in LONG_MODULES:
                too_long[rel] = lines
    assert not too_long, f"split these or justify them in LONG_MODULES: {too_long}"
    assert all(len((ROOT / p).read_text().splitlines()) < 2 * SIZE_LIMIT for p in LONG_MODULES)
