"""Admin configuration: one TOML file parsed into strict pydantic models.

Every mistake is reported as `path: what is wrong (what to change)`. Secrets never appear in the file, only
the names of environment variables that hold them (`api_key_env`). `Config()` with no file is the embedded
default: SQLite, the bundled engine on 127.0.0.1:8081, one model `smollm2`, one team `demo`.
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(Exception):
    """A config file could not be used. `problems` holds one line per mistake."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    admin_key_env: str = "SWITCHBOARD_ADMIN_KEY"
    key_cache_ttl_s: float = Field(default=5.0, ge=0, le=300)
    request_timeout_s: float = Field(default=600.0, gt=0)


class DatabaseConfig(_Strict):
    url: str = "sqlite:///./switchboard.db"
    schema_name: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")  # PostgreSQL only
    spill_path: str = "./switchboard.spill.jsonl"
    queue_max: int = Field(default=10_000, ge=1)
    batch_max: int = Field(default=500, ge=1)
    flush_interval_s: float = Field(default=0.2, gt=0)
    replay_interval_s: float = Field(default=2.0, gt=0)
    auto_migrate: bool | None = None  # None: migrate at start on SQLite only


class CloudBackendConfig(_Strict):
    kind: Literal["cloud"]
    provider: str  # litellm provider prefix: "openai", "anthropic", "azure", ...
    api_key_env: str | None = None
    api_base: str | None = None
    timeout_s: float = Field(default=600.0, gt=0)


class OpenAIBackendConfig(_Strict):
    kind: Literal["openai"]
    base_url: str  # e.g. "http://127.0.0.1:8081/v1"
    api_key_env: str | None = None
    timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    supports_tools: bool = True
    supports_response_format: bool = True


BackendConfig = Annotated[CloudBackendConfig | OpenAIBackendConfig, Field(discriminator="kind")]


class ModelConfig(_Strict):
    backend: str
    upstream_model: str | None = None  # defaults to the public name
    input_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_usd_per_mtok: Decimal | None = Field(default=None, ge=0)
    context_tokens: int | None = Field(default=None, ge=1)


class TeamConfig(_Strict):
    models: list[str] = Field(default_factory=lambda: ["*"])


_DEFAULT_BACKENDS: dict[str, CloudBackendConfig | OpenAIBackendConfig] = {
    "local": OpenAIBackendConfig(
        kind="openai",
        base_url="http://127.0.0.1:8081/v1",
        supports_tools=False,
        supports_response_format=False,
    )
}


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    backends: dict[str, BackendConfig] = Field(default_factory=lambda: dict(_DEFAULT_BACKENDS))
    models: dict[str, ModelConfig] = Field(
        default_factory=lambda: {
            "smollm2": ModelConfig(
                backend="local",
                upstream_model="smollm2",
                input_usd_per_mtok=Decimal(0),
                output_usd_per_mtok=Decimal(0),
            )
        }
    )
    teams: dict[str, TeamConfig] = Field(default_factory=lambda: {"demo": TeamConfig()})

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        problems: list[str] = []
        for name, model in self.models.items():
            if model.backend not in self.backends:
                known = ", ".join(sorted(self.backends)) or "none"
                problems.append(
                    f'models.{name}.backend: unknown backend "{model.backend}" (defined backends: {known})'
                )
        for team, policy in self.teams.items():
            for model_name in policy.models:
                if model_name != "*" and model_name not in self.models:
                    known = ", ".join(sorted(self.models)) or "none"
                    problems.append(
                        f'teams.{team}.models: unknown model "{model_name}" (defined models: {known}, or "*")'
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def upstream_model(self, public_name: str) -> str:
        return self.models[public_name].upstream_model or public_name


def _format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (remove it, or check its spelling against config.example.toml)"
        elif err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
            msg = 'set kind = "cloud" or kind = "openai"'
        elif msg.startswith("Value error, "):
            for line in msg.removeprefix("Value error, ").splitlines():
                problems.append(line)
            continue
        problems.append(f"{path}: {msg}" if path else msg)
    return problems


def parse_config(data: dict[str, object], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_validation_error(exc)) from exc


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load a TOML file; `None` gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read file: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from exc
    return parse_config(data, str(p))
