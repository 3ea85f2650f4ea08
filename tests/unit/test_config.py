"""Config: the example loads, the defaults are usable, and every mistake names its path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli.workers import worker_config
from gateway.config import Config, ConfigError, RoutingConfig, TeamConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads_and_is_consistent() -> None:
    cfg = load_config(ROOT / "config.example.toml")
    assert set(cfg.models) >= {"smollm2", "gpt-4o-mini"}
    for model in cfg.models.values():
        assert all(d.backend in cfg.backends for d in model.all_deployments())
    assert cfg.teams["research"].models == ["smollm2", "gpt-4o-mini"]


def test_example_routes_auto_over_several_deployments() -> None:
    cfg = load_config(ROOT / "config.example.toml")
    deployments = cfg.models["auto"].all_deployments()
    assert len(deployments) >= 3 and len({d.backend for d in deployments}) == len(deployments)
    tiers = {cfg.backends[d.backend].tier for d in deployments}
    assert {"internal", "external"} <= tiers  # so a privacy floor visibly narrows the choice
    assert cfg.teams["legal"].privacy_floor == "internal"
    assert cfg.routing == RoutingConfig()  # the [routing] section shows the defaults
    assert cfg.teams["research"] == TeamConfig(models=["smollm2", "gpt-4o-mini"])  # so does `research`


def test_embedded_defaults_serve_the_bundled_model() -> None:
    cfg = load_config(None)
    assert cfg.database.url.startswith("sqlite")
    assert cfg.models["smollm2"].backend == "local"
    assert cfg == Config()


def test_the_journal_defaults_beside_the_spill_file_and_workers_share_it() -> None:
    cfg = parse_config({"database": {"spill_path": "/data/sb.spill.jsonl"}})
    assert cfg.database.journal_dir == "/data/sb.spill.jsonl.journal"
    worker = worker_config(cfg, 1).database
    assert worker.spill_path == "/data/sb.spill.jsonl.worker1"  # spill files are per worker ...
    assert worker.journal_dir == "/data/sb.spill.jsonl.journal"  # ... the journal directory is shared (slots)
    assert parse_config({"database": {"journal_dir": "/j"}}).database.journal_dir == "/j"


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_unknown_setting_names_its_path() -> None:
    assert problems({"server": {"prot": 80}}) == [
        "server.prot: unknown setting (remove it, or check its spelling against config.example.toml)"
    ]


def test_unknown_backend_reference_names_the_defined_ones() -> None:
    got = problems(
        {
            "backends": {"gpu0": {"kind": "openai", "base_url": "http://x/v1"}},
            "models": {"m": {"backend": "gpu9"}},
            "teams": {},
        }
    )
    assert got == ['models.m.backend: unknown backend "gpu9" (defined backends: gpu0)']


def test_team_with_unknown_model() -> None:
    got = problems({"teams": {"t": {"models": ["nope"]}}})
    assert got == ['teams.t.models: unknown model "nope" (defined models: minilm, smollm2, or "*")']


def test_bad_kind_and_bad_type() -> None:
    got = problems({"backends": {"b": {"kind": "grpc"}}, "server": {"port": "eighty"}})
    assert any(p.startswith("server.port:") for p in got)
    assert 'backends.b: set kind = "cloud", "openai" or "edge"' in got


def test_secrets_only_by_env_reference() -> None:
    got = problems({"backends": {"c": {"kind": "cloud", "provider": "openai", "api_key": "sk-123"}}})
    assert got[0].startswith("backends.c.cloud.api_key: unknown setting") or "api_key" in got[0]
    assert all("sk-123" not in p for p in got)


def test_invalid_toml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "not valid TOML" in info.value.problems[0]


def test_model_with_several_deployments_and_tier_defaults() -> None:
    cfg = parse_config(
        {
            "backends": {
                "gpu": {
                    "kind": "openai",
                    "base_url": "http://g/v1",
                    "usd_per_hour": "2.5",
                    "labels": {"site": "f"},
                },
                "cloud": {"kind": "cloud", "provider": "openai", "privacy_tier": "external_zdr"},
                "other": {"kind": "cloud", "provider": "anthropic"},
            },
            "models": {
                "auto": {
                    "deployments": [
                        {"backend": "gpu", "upstream_model": "smollm2", "quality_tier": 1},
                        {"backend": "cloud", "upstream_model": "gpt-4o-mini", "input_usd_per_mtok": "0.15"},
                    ]
                },
                "claude": {"backend": "other"},
            },
            "teams": {"t": {"privacy_floor": "internal", "on_sensitive": "block", "objective": "cost"}},
        }
    )
    assert [d.backend for d in cfg.models["auto"].all_deployments()] == ["gpu", "cloud"]
    assert [d.backend for d in cfg.models["claude"].all_deployments()] == ["other"]
    assert cfg.backends["gpu"].tier == "internal" and cfg.backends["cloud"].tier == "external_zdr"
    assert cfg.backends["other"].tier == "external"
    assert cfg.teams["t"].privacy_floor == "internal" and cfg.teams["t"].on_sensitive == "block"


def test_deployment_forms_are_exclusive_and_checked() -> None:
    got = problems({"models": {"m": {"backend": "local", "deployments": [{"backend": "local"}]}}})
    assert any("set either `backend`" in p for p in got)
    got = problems({"models": {"m": {"deployments": [{"backend": "local"}, {"backend": "gpu9"}]}}})
    assert got == ['models.m.deployments.1.backend: unknown backend "gpu9" (defined backends: local)']
    got = problems({"teams": {"t": {"privacy_floor": "public"}}})
    assert got[0].startswith("teams.t.privacy_floor:")


def test_limits_budgets_cache_and_reports_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "teams": {
                    "t": {
                        "limits": {"requests": 0, "models": {"nope": {"requests": 1}}},
                        "budgets": [{"period": "week", "usd": 1}, {"period": "day", "usd": 1, "soft_usd": 2}],
                        "cache_share": "has space",
                    }
                },
                "reports": {"reference_model": "gpt-9"},
            }
        )
    text = str(info.value)
    for expected in (
        "teams.t.limits.requests",
        "teams.t.budgets.0.period",
        "soft_usd (2) must not exceed usd (1)",
        "teams.t.cache_share",
    ):
        assert expected in text, text
    with pytest.raises(ConfigError) as refs:
        bad_refs = {"teams": {"t": {"limits": {"models": {"nope": {}}}}}, "reports": {"reference_model": "x"}}
        parse_config(bad_refs)
    assert 'teams.t.limits.models: unknown model "nope"' in str(refs.value)
    assert 'reports.reference_model: unknown model "x"' in str(refs.value)
