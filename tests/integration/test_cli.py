"""The `switchboard` CLI end to end on a SQLite file: config checks, teams and keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app

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


@pytest.mark.parametrize("command", [[], ["teams"], ["keys"], ["engine"]])
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


def test_serve_refuses_missing_secret_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/x.db"\n'
        '[backends.c]\nkind = "cloud"\nprovider = "openai"\napi_key_env = "SB_SURELY_UNSET_KEY"\n'
        '[models.m]\nbackend = "c"\n[teams.t]\n'
    )
    code, out = run("serve", "--config", str(path))
    assert code == 2 and "backends.c.api_key_env: environment variable SB_SURELY_UNSET_KEY is not set" in out
