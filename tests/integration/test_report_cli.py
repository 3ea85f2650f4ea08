"""`switchboard report`, `rollup` and `prune` end to end on SQLite and PostgreSQL over a generated ledger.

Figures are checked against `tests.support.ledger_gen.aggregate`, a reference computed without SQL.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from gateway.cli import app, reports
from tests.support.db import DbTarget
from tests.support.ledger_gen import (
    SUM_FIELDS,
    LedgerSpec,
    Row,
    aggregate,
    generate_rows,
    insert_rows,
    percentile_cont,
    row_filter,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOW = dt.datetime.now(dt.UTC)
START = NOW.replace(minute=0, second=0, microsecond=0) - dt.timedelta(days=5)
SPEC = LedgerSpec(rows=1_500, start=START, hours=54, prefix="cli")  # 5 to ~2.75 days ago


@dataclass(frozen=True, slots=True)
class Ledger:
    config: Path
    rows: list[Row]

    def run(self, *args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(app, [*args, "--config", str(self.config)])
        return result.exit_code, result.stdout, result.output

    def json(self, *args: str) -> dict[str, Any]:
        code, out, everything = self.run("report", *args, "--format", "json")
        assert code == 0, everything
        parsed: dict[str, Any] = orjson.loads(out)
        return parsed


def config_text(target: DbTarget, tmp_path: Path, reports: str) -> str:
    schema = f'schema_name = "{target.schema}"\n' if target.schema else ""
    return (
        f'[database]\nurl = "{target.url}"\n{schema}'
        '[backends.gpu0]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nusd_per_hour = "3.6"\n'
        '[backends.cloud]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[models.smollm2]\nbackend = "gpu0"\n'
        '[models.gpt-4o-mini]\nbackend = "cloud"\ninput_usd_per_mtok = "3"\noutput_usd_per_mtok = "11"\n'
        f"{reports}"
    )


@pytest.fixture
def ledger(migrated_target: DbTarget, tmp_path: Path) -> Iterator[Ledger]:
    path = tmp_path / "sb.toml"
    path.write_text(config_text(migrated_target, tmp_path, '[reports]\nreference_model = "gpt-4o-mini"\n'))
    engine = migrated_target.make_engine()
    rows = list(generate_rows(SPEC))
    try:
        insert_rows(engine, rows)
    finally:
        engine.dispose()
    yield Ledger(path, rows)


def by_group(report: dict[str, Any], dims: list[str]) -> dict[tuple[str | None, ...], dict[str, Any]]:
    return {tuple(r[d] for d in dims): r for r in report["rows"]}


def test_report_json_matches_the_ledger(ledger: Ledger) -> None:
    since, until = START + dt.timedelta(hours=5, minutes=30), START + dt.timedelta(hours=40)
    window = ["--since", since.isoformat(), "--until", until.isoformat()]
    report = ledger.json("--group-by", "team,model", *window, "--source", "raw")
    expected = aggregate(ledger.rows, ["team", "model"], keep=row_filter(since=since, until=until))
    got = by_group(report, ["team", "model"])
    assert set(got) == set(expected) and report["percentiles_exact"] is True
    for key, exp in expected.items():
        assert {f: got[key][f] for f in SUM_FIELDS} == exp.sums()
        assert got[key]["latency_p95_ms"] == pytest.approx(percentile_cont(exp.latencies_ms, 0.95))
    assert report["totals"]["requests"] == sum(e.requests for e in expected.values())
    one_team = ledger.json("--group-by", "model", *window, "--team", "ops", "--model", "smollm2")
    assert [r["model"] for r in one_team["rows"]] == ["smollm2"]
    assert one_team["totals"]["requests"] == expected[("ops", "smollm2")].requests
    messages = ledger.json("--group-by", "endpoint,team", *window, "--endpoint", "messages")
    keep = row_filter(since=since, until=until, endpoint="messages")
    want = aggregate(ledger.rows, ["endpoint", "team"], keep=keep, keep_values=False)
    assert messages["query"]["endpoint"] == "messages" and len(want) == 3
    got_messages = {(r["endpoint"], r["team"]): r["requests"] for r in messages["rows"]}
    assert got_messages == {k: e.requests for k, e in want.items()}


def test_report_csv_and_table(ledger: Ledger) -> None:
    code, out, everything = ledger.run("report", "--group-by", "team", "--format", "csv")
    assert code == 0, everything
    lines = list(csv.DictReader(io.StringIO(out)))
    expected = aggregate(ledger.rows, ["team"], keep_values=False)
    assert {(r["team"], int(r["requests"])) for r in lines} == {
        (k[0], e.requests) for k, e in expected.items()
    }
    code, out, _ = ledger.run("report", "--group-by", "team,backend")
    assert code == 0 and "total" in out and "research" in out and "(none)" in out


def test_rollup_then_prune_keeps_the_figures(ledger: Ledger) -> None:
    raw = ledger.json("--group-by", "team,day", "--source", "raw")
    code, out, everything = ledger.run("rollup")
    assert code == 0 and "rollup: recomputed" in out and "hours" in out, everything
    rolled = ledger.json("--group-by", "team,day", "--source", "rollup")
    assert rolled["percentiles_exact"] is False
    strip = ("latency_p50_ms", "latency_p95_ms", "ttft_p50_ms", "ttft_p95_ms")
    sums = [{k: v for k, v in r.items() if k not in strip} for r in raw["rows"]]
    assert [{k: v for k, v in r.items() if k not in strip} for r in rolled["rows"]] == sums

    code, out, everything = ledger.run("prune", "--retention-days", "4")
    assert code == 0 and "pruned" in out, everything
    pruned = int(out.split("pruned", 1)[1].split()[0])
    assert 0 < pruned < len(ledger.rows)
    after = ledger.json("--group-by", "team,day")
    assert [{k: v for k, v in r.items() if k not in strip} for r in after["rows"]] == sums
    left = ledger.json("--source", "raw")["totals"]["requests"]
    assert left == len(ledger.rows) - pruned


def test_prune_needs_a_retention(ledger: Ledger) -> None:
    code, _, everything = ledger.run("prune")
    assert code == 2 and "--retention-days" in everything and "reports.retention_days" in everything
    assert "Traceback" not in everything


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--group-by", "team,colour"], "--group-by: unknown group-by dimension `colour`"),
        (["--group-by", "team,team"], "--group-by: group-by dimension `team` is listed twice"),
        (["--since", "yesterday"], "--since: `yesterday` is not a date or time"),
        (["--since", "2030-01-02", "--until", "2030-01-01"], "--until: until (2030-01-01T00:00:00+00:00)"),
        (["--source", "cache"], "--source"),
        (["--format", "xml"], "--format"),
        (["--chart-by", "model", "--chart", "x.png"], "--chart-by"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(ledger: Ledger, options: list[str], message: str) -> None:
    code, _, everything = ledger.run("report", *options)
    assert code == 2, everything
    assert message in everything and "Traceback" not in everything


@pytest.mark.parametrize("by", ["team", "backend"])
def test_chart_is_written(ledger: Ledger, tmp_path: Path, by: str) -> None:
    path = tmp_path / f"cost-{by}.png"
    code, out, everything = ledger.run("report", "--chart", str(path), "--chart-by", by, "--format", "json")
    assert code == 0, everything
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert orjson.loads(out)["totals"]["requests"] == len(ledger.rows)  # stdout holds only the report
    assert f"cost per day by {by} written to" in everything


def test_savings(ledger: Ledger) -> None:
    assert ledger.run("rollup")[0] == 0  # busy time comes from the rollups
    report = ledger.json("--savings", "--group-by", "team")
    assert report["reference"]["source"] == "config: models.gpt-4o-mini prices"
    hosted = [r for r in report["rows"] if r["served_by"] == "self_hosted"]
    assert {r["backend"] for r in hosted} == {"gpu0"} and {r["team"] for r in hosted} == {
        "ops",
        "research",
        "support",
    }
    assert all(r["busy_ms"] > 0 and r["actual_micro_usd"] > 0 for r in hosted)
    assert report["totals"]["saved_micro_usd"] == sum(r["saved_micro_usd"] for r in report["rows"])
    code, out, _ = ledger.run("report", "--savings")
    assert code == 0 and "reference" in out and "saved $" in out


def test_savings_without_a_reference_names_the_setting(db_target: DbTarget, tmp_path: Path) -> None:
    path = tmp_path / "bare.toml"
    path.write_text(config_text(db_target, tmp_path, ""))
    result = CliRunner().invoke(app, ["report", "--savings", "--config", str(path)])
    assert result.exit_code == 2 and "reports.reference_model" in result.output
    assert "Traceback" not in result.output


def test_progress_bar_on_a_terminal(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(reports, "err_console", Console(file=screen, force_terminal=True, width=100))
    code, out, everything = ledger.run("report", "--group-by", "team", "--format", "csv")
    assert code == 0, everything
    assert out.startswith("team,requests")  # the bar went to stderr, never into the CSV
    assert "report" in screen.getvalue()


@pytest.mark.parametrize("command", ["report", "rollup", "prune"])
def test_help_describes_every_option(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    for param in click_command.params:
        assert getattr(param, "help", None), f"switchboard {command} {param.opts}: no help text"
