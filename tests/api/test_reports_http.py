"""Reports over HTTP: `/admin/reports/*` with the admin key, `/v1/usage` with a team key (own team only).

Each test makes its own teams, so traffic from other tests on the shared gateways never changes its sums.
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.config import ReportsConfig
from gateway.http.app import create_app
from gateway.store import keys
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, Gateway, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.ledger_gen import SUM_FIELDS, LedgerSpec, Row, aggregate, generate_rows, insert_rows
from tests.support.live import LiveServer

HELLO = [{"role": "user", "content": "hello"}]


@dataclass(frozen=True, slots=True)
class Teams:
    """Two fresh teams with a key each, one real request each through the gateway, plus generated rows."""

    gw: Gateway
    names: tuple[str, str]
    keys: tuple[str, str]
    rows: list[Row]  # generated rows; the ledger also holds one real request per team

    def requests(self, team: str) -> int:
        return sum(r["team"] == team for r in self.rows) + 1

    def get(self, path: str, key: str, **params: str) -> httpx.Response:
        return httpx.get(self.gw.base_url + path, params=params, headers={"authorization": f"Bearer {key}"})


def make_teams(gw: Gateway) -> Teams:
    tag = uuid.uuid4().hex[:8]
    names = (f"rep-a-{tag}", f"rep-b-{tag}")
    plain_keys = []
    for team in names:
        keys.create_team(gw.db, team, ["fast"])
        key = gw.key(team)
        plain_keys.append(key)
        raw = OpenAI(base_url=gw.v1, api_key=key, max_retries=0).chat.completions.with_raw_response.create(
            model="fast", messages=HELLO
        )
        gw.usage_row(raw.headers["x-request-id"])  # written: reports will see it
    rows = list(generate_rows(LedgerSpec(rows=300, teams=names, models=("fast", "cloud-gpt"), prefix=tag)))
    insert_rows(gw.db, rows)
    return Teams(gw, names, (plain_keys[0], plain_keys[1]), rows)


@pytest.fixture
def teams(any_gateway: Gateway) -> Teams:
    return make_teams(any_gateway)


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    return err


def test_team_key_sees_only_its_own_team(teams: Teams) -> None:
    for name, key, other in zip(teams.names, teams.keys, reversed(teams.names), strict=True):
        report = teams.get("/v1/usage", key, group_by="team").json()
        assert [r["team"] for r in report["rows"]] == [name]
        assert report["query"]["team"] == name
        assert report["totals"]["requests"] == teams.requests(name)
        by_model = teams.get("/v1/usage", key, group_by="model,backend").json()
        assert sum(r["requests"] for r in by_model["rows"]) == teams.requests(name)
        assert teams.get("/v1/usage", key, team=name).json()["totals"]["requests"] == teams.requests(name)
        err = error_of(teams.get("/v1/usage", key, team=other, group_by="team"), 403)
        assert err["param"] == "team" and err["type"] == "permission_error"
        assert f"team `{name}`" in err["message"] and f"/admin/reports/usage?team={other}" in err["message"]
        assert other not in teams.get("/v1/usage", key, format="csv", group_by="team").text


def test_v1_usage_needs_a_valid_team_key(teams: Teams) -> None:
    assert error_of(httpx.get(teams.gw.base_url + "/v1/usage"), 401)["code"] == "invalid_api_key"
    assert error_of(teams.get("/v1/usage", ADMIN_KEY), 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("params", "param", "fragment"),
    [
        ({"since": "last tuesday"}, "since", "is not a date or time"),
        ({"until": "2030-13-45"}, "until", "is not a date or time"),
        ({"since": "2030-02-01", "until": "2030-01-01"}, "until", "must be after since"),
        ({"group_by": "team,colour"}, "group_by", "unknown group-by dimension `colour`"),
        ({"source": "cache"}, "source", "unknown source"),
        ({"format": "xml"}, "format", "must be one of json, csv"),
        # Security findings: a window from year 1 kept a core busy for minutes; a date past year 9999 in
        # UTC was a 500.
        ({"since": "0001-01-01"}, "since", "reports.max_span_days"),
        ({"since": "2020-01-01", "until": "2026-01-01"}, "since", "reports.max_span_days"),
        ({"until": "9999-12-31T23:59:59-14:00"}, "until", "is not a date or time"),
    ],
)
def test_bad_query_is_400_naming_the_param(
    teams: Teams, params: dict[str, str], param: str, fragment: str
) -> None:
    for path, key in (("/v1/usage", teams.keys[0]), ("/admin/reports/usage", ADMIN_KEY)):
        err = error_of(teams.get(path, key, **params), 400)
        assert err["param"] == param and err["type"] == "invalid_request_error", (path, err)
        assert fragment in err["message"], (path, err)


def test_admin_usage_json_and_csv(teams: Teams) -> None:
    team = teams.names[0]
    report = teams.get("/admin/reports/usage", ADMIN_KEY, team=team, group_by="model", source="raw").json()
    expected = aggregate((r for r in teams.rows if r["team"] == team), ["model"], keep_values=False)
    expected[("fast",)].requests += 1  # the real request
    got = {r["model"]: r for r in report["rows"]}
    assert {m: got[m]["requests"] for m in got} == {k[0]: e.requests for k, e in expected.items()}
    generated = expected[("cloud-gpt",)].sums()
    assert {f: got["cloud-gpt"][f] for f in SUM_FIELDS} == generated
    assert report["percentiles_exact"] is True and report["source"] == "raw"

    both = f"{teams.names[0]},{teams.names[1]}"
    resp = teams.get("/admin/reports/usage", ADMIN_KEY, group_by="team,model", format="csv")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    assert 'filename="usage.csv"' in resp.headers["content-disposition"]
    lines = [r for r in csv.DictReader(io.StringIO(resp.text)) if r["team"] in both.split(",")]
    assert sum(int(r["requests"]) for r in lines) == teams.requests(teams.names[0]) + teams.requests(
        teams.names[1]
    )
    assert {r["model"] for r in lines} == {"fast", "cloud-gpt"}


def test_usage_groups_and_filters_by_endpoint(teams: Teams) -> None:
    name, key = teams.names[0], teams.keys[0]
    expected = aggregate((r for r in teams.rows if r["team"] == name), ["endpoint"], keep_values=False)
    expected[("chat.completions",)].requests += 1  # the real request, through /v1/chat/completions
    want = {k[0]: e.requests for k, e in expected.items()}
    assert len(want) > 1
    report = teams.get("/v1/usage", key, group_by="endpoint").json()
    assert {r["endpoint"]: r["requests"] for r in report["rows"]} == want
    only = teams.get("/v1/usage", key, group_by="endpoint", endpoint="embeddings").json()
    assert only["query"]["endpoint"] == "embeddings"
    assert [(r["endpoint"], r["requests"]) for r in only["rows"]] == [("embeddings", want["embeddings"])]
    chat = teams.get(
        "/admin/reports/usage",
        ADMIN_KEY,
        team=name,
        endpoint="chat.completions",
        group_by="model",
        format="csv",
    )
    assert sum(int(r["requests"]) for r in csv.DictReader(io.StringIO(chat.text))) == want["chat.completions"]


def test_admin_reports_refuse_team_keys(teams: Teams) -> None:
    for path in ("/admin/reports/usage", "/admin/reports/savings"):
        assert error_of(teams.get(path, teams.keys[0]), 403)["code"] == "admin_only"


def test_admin_savings_without_a_reference_names_the_setting(teams: Teams) -> None:
    err = error_of(teams.get("/admin/reports/savings", ADMIN_KEY), 400)
    assert "reports.reference_model" in err["message"]


@pytest.fixture(scope="module")
def savings_gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A SQLite gateway whose config names reference prices, so savings can be computed."""
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY  # the env the test config names, as conftest's gateways set
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    tmp = tmp_path_factory.mktemp("gw-savings")
    db = {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "spill.jsonl")}
    config = gateway_config(fake.base_url, db)
    reports = ReportsConfig(
        reference_input_usd_per_mtok=Decimal("2.5"), reference_output_usd_per_mtok=Decimal(10)
    )
    config = config.model_copy(update={"reports": reports})
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, engine, fake)
        finally:
            engine.dispose()


def test_admin_savings_json_and_csv(savings_gateway: Gateway) -> None:
    teams = make_teams(savings_gateway)
    report = teams.get("/admin/reports/savings", ADMIN_KEY, group_by="team", team=teams.names[0]).json()
    assert report["reference"]["input_usd_per_mtok"] == "2.5"
    cached = [r for r in report["rows"] if r["served_by"] == "cache"]
    assert cached and all(r["team"] == teams.names[0] and r["actual_micro_usd"] == 0 for r in cached)
    assert report["totals"]["saved_micro_usd"] == sum(r["saved_micro_usd"] for r in report["rows"])
    resp = teams.get("/admin/reports/savings", ADMIN_KEY, format="csv")
    assert resp.status_code == 200 and resp.text.startswith("backend,served_by,requests")


def test_report_calls_are_rate_limited_per_key(any_gateway: Gateway) -> None:
    # Security finding: any team key could run reports back to back without limit. GCRA refills one call
    # every 60/limit s, so a slow database may see a few more than `limit` pass before the first 429.
    key = any_gateway.key()
    limit = any_gateway.config.reports.requests_per_minute
    headers = {"authorization": f"Bearer {key}"}
    statuses: list[int] = []
    with httpx.Client(base_url=any_gateway.base_url, headers=headers, timeout=30) as client:
        while len(statuses) < 3 * limit:
            refused = client.get("/v1/usage", params={"since": "2030-01-01"})
            statuses.append(refused.status_code)
            if refused.status_code != 200:
                break
    assert statuses[:limit] == [200] * limit and statuses[-1] == 429, statuses
    err = error_of(refused, 429)
    assert "reports.requests_per_minute" in err["message"] and int(refused.headers["retry-after"]) >= 1
    other = {"authorization": f"Bearer {any_gateway.key()}"}
    assert httpx.get(any_gateway.base_url + "/v1/usage", headers=other).status_code == 200  # per key
