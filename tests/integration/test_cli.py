"""The `switchboard` CLI end to end on a SQLite file: config checks, teams and keys."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gateway.cli import app
from gateway.cli import serve as serve_commands
from gateway.records import KeyBudget
from gateway.store import keys
from gateway.store.db import make_engine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "sb.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/cli.db"\n'
        '[backends.local]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[models.small]\nbackend = "local"\n[models.big]\nbackend = "local"\n'
        '[teams.ops]\nmodels = ["small"]\n'
    )
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("command", [[], ["teams"], ["keys"], ["engine"], ["batches"]])
def test_every_command_has_help(command: list[str]) -> None:
    code, out = run(*command, "--help")
    assert code == 0 and "Usage" in out


def test_check_config_ok_and_bad(tmp_path: Path) -> None:
    code, out = run("check-config", str(ROOT / "config.example.toml"))
    assert code == 0 and "gpt-4o-mini" in out and "research" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\nbackend = "gpu9"\n')
    code, out = run("check-config", str(bad))
    assert code == 2 and 'models.x.backend: unknown backend "gpu9"' in out


def test_check_config_says_where_edge_and_hourly_backends_go(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(serve_commands, "console", Console(file=screen, width=300))
    code, _ = run("check-config", str(ROOT / "config.example.toml"))
    rows = {
        line.split("│")[1].strip(): line for line in screen.getvalue().splitlines() if line.count("│") > 2
    }
    assert code == 0
    edge = rows["edge"]
    assert "edge nodes (enrolled with `switchboard edge token`; they dial /v1/edge/connect)" in edge
    assert "enrollment tokens" in edge
    auto_on_edge = [
        line for line in screen.getvalue().splitlines() if "│ auto " in line and "│ edge " in line
    ]
    assert len(auto_on_edge) == 1 and auto_on_edge[0].count("hourly: each node's $/h") == 2


def test_teams_and_keys_lifecycle(config_file: Path) -> None:
    cfg = ["--config", str(config_file)]
    assert run("migrate", *cfg)[0] == 0
    code, out = run("teams", "create", "research", "--models", "small,big", *cfg)
    assert code == 0, out
    code, out = run("keys", "create", "research", "--name", "nb", "--models", "small", *cfg)
    assert code == 0, out
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk-sb-") and len(key) >= 38
    code, out = run("keys", "list", "--team", "research", *cfg)
    assert code == 0 and key[:12] in out and key not in out
    code, out = run("keys", "create", "research", "--models", "nope", *cfg)
    assert code == 2 and "unknown model" in out
    code, out = run("keys", "create", "nobody", *cfg)
    assert code == 1 and "teams create" in out
    code, out = run("keys", "revoke", key[:12], *cfg)
    assert code == 0, out
    code, out = run("keys", "revoke", "sk-sb-doesnotexist", *cfg)
    assert code == 1


def test_keys_with_limits_and_budget(config_file: Path, tmp_path: Path) -> None:
    cfg = ["--config", str(config_file)]
    assert run("teams", "create", "research", *cfg)[0] == 0
    limited = ["--name", "capped", "--requests", "60", "--tokens", "5000", "--budget-usd", "12.5"]
    code, out = run("keys", "create", "research", *limited, "--soft-budget-usd", "10", *cfg)
    assert code == 0, out
    code, out = run("keys", "create", "research", "--budget-usd", "3", "--budget-period", "day", *cfg)
    assert code == 0, out
    assert run("keys", "create", "research", "--name", "plain", *cfg)[0] == 0
    code, out = run("keys", "list", *cfg)
    assert code == 0, out
    assert "60 req, 5000 tok" in out and "$12.50/month (soft $10.00)" in out and "$3.00/day" in out

    engine = make_engine(f"sqlite:///{tmp_path}/cli.db")
    try:
        stored = {k.name: k for k in keys.list_keys(engine)}
    finally:
        engine.dispose()
    assert (stored["capped"].limit_requests, stored["capped"].limit_tokens) == (60, 5000)
    assert stored["capped"].budget == KeyBudget("month", 12_500_000, 10_000_000)
    assert stored[""].budget == KeyBudget("day", 3_000_000)
    assert stored["plain"].budget is None and stored["plain"].limit_requests is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--requests", "0"], "--requests"),
        (["--tokens", "-1"], "--tokens"),
        (["--budget-period", "week", "--budget-usd", "1"], "--budget-period"),
        (["--budget-period", "day"], "need --budget-usd"),
        (["--soft-budget-usd", "1"], "need --budget-usd"),
        (["--budget-usd", "twelve"], "--budget-usd: 'twelve' is not a USD amount"),
        (["--budget-usd", "0"], "--budget-usd must be more than 0 USD"),
        (["--budget-usd", "1", "--soft-budget-usd", "-1"], "--soft-budget-usd must be more than 0 USD"),
        (["--budget-usd", "0.0000001"], "6 decimal places"),
        (
            ["--budget-usd", "5", "--soft-budget-usd", "6"],
            "--soft-budget-usd (6) must not exceed --budget-usd (5)",
        ),
    ],
)
def test_keys_create_refuses_bad_limits(config_file: Path, options: list[str], message: str) -> None:
    cfg = ["--config", str(config_file)]
    assert run("teams", "create", "research", *cfg)[0] == 0
    code, out = run("keys", "create", "research", *options, *cfg)
    assert code == 2 and message in out, out
    code, out = run("keys", "list", *cfg)
    assert "research" not in out  # nothing was created


def test_keys_create_help_names_every_option() -> None:
    code, out = run("keys", "create", "--help")
    assert code == 0
    for option in ["--requests", "--tokens", "--budget-usd", "--budget-period", "--soft-budget-usd"]:
        assert option in out


def test_serve_refuses_missing_secret_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/x.db"\n'
        '[backends.c]\nkind = "cloud"\nprovider = "openai"\napi_key_env = "SB_SURELY_UNSET_KEY"\n'
        '[models.m]\nbackend = "c"\n[teams.t]\n'
    )
    code, out = run("serve", "--config", str(path))
    assert code == 2 and "backends.c.api_key_env: environment variable SB_SURELY_UNSET_KEY is not set" in out
