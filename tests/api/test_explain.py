"""`GET /admin/route/explain`: a dry run of routing that reports, never raises, and never echoes the text."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.config import parse_config
from gateway.http.app import create_app
from gateway.store import keys
from gateway.store.db import make_engine
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, Gateway, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer

SECRET_TEXT = "mail jane.doe@example.com or phone number: 212.555.0199"
SECRET_PIECES = ("jane.doe", "example.com", "212.555.0199", "0199")


def explain(gw: Gateway, **params: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.get(gw.base_url + "/admin/route/explain", params=params, headers=headers, timeout=10)


def explained(gw: Gateway, **params: Any) -> dict[str, Any]:
    resp = explain(gw, **params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


@pytest.fixture(scope="module")
def routed(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with `auto` over three deployments: internal (pricey), internal without tools, external."""
    tmp = tmp_path_factory.mktemp("gw-explain")
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    db = {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "spill.jsonl")}
    data = gateway_config(fake.base_url, db).model_dump(mode="json")
    data["models"]["auto"] = {
        "deployments": [
            {
                "backend": "fakeoai",
                "upstream_model": "fast",
                "input_usd_per_mtok": 1.5,
                "output_usd_per_mtok": 6,
            },
            {
                "backend": "notools",
                "upstream_model": "fast",
                "input_usd_per_mtok": 0.5,
                "output_usd_per_mtok": 2,
            },
            {
                "backend": "cloud_openai",
                "upstream_model": "gpt-4o-mini",
                "input_usd_per_mtok": 0.15,
                "output_usd_per_mtok": 0.6,
            },
        ]
    }
    data["teams"] = {
        "open": {"objective": "cost"},
        "private": {"objective": "cost", "privacy_floor": "internal", "max_attempts": 2},
        "guarded": {"on_sensitive": "block"},
        "narrow": {"models": ["fast"]},
    }
    config = parse_config(data)
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url)
        try:
            yield Gateway(server.base_url, config, engine, fake)
        finally:
            engine.dispose()


def test_admin_key_only(gateway: Gateway) -> None:
    url = gateway.base_url + "/admin/route/explain"
    params = {"team": "alpha", "model": "fast"}
    resp = httpx.get(url, params=params, headers={"authorization": f"Bearer {gateway.key()}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "admin_only"
    assert httpx.get(url, params=params).status_code == 401


def test_unknown_model_team_and_bad_query(gateway: Gateway) -> None:
    resp = explain(gateway, team="alpha", model="gpt-9")
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert (
        error["code"] == "model_not_found" and "fast" in error["message"] and "cloud-gpt" in error["message"]
    )
    resp = explain(gateway, team="no-such-team", model="fast")
    assert resp.status_code == 404 and "no-such-team" in resp.json()["error"]["message"]
    assert explain(gateway, model="fast").status_code == 400
    resp = explain(gateway, team="alpha", model="fast", privacy="public")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "privacy"
    resp = explain(gateway, team="alpha", model="fast", preferences="[1]")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "preferences"
    resp = explain(gateway, team="alpha", model="fast", preferences='{"bogus": 1}')
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "switchboard"


def test_single_deployment_explained(gateway: Gateway) -> None:
    got = explained(gateway, team="alpha", model="fast", max_tokens=64)
    assert got["model"] == "fast" and got["team"] == "alpha" and got["error"] is None
    assert got["privacy"] == {"floor": "external", "detections": [], "reason": "team floor external"}
    assert got["policy"]["objective"] == "balanced" and got["policy"]["max_attempts"] == 3
    assert got["tokens"]["expected_output"] == 64
    [cand] = got["candidates"]
    assert cand["deployment"] == "fast@fakeoai" and cand["backend"] == "fakeoai" and cand["tried"]
    assert cand["latency_ms"] > 0 and float(cand["cost_usd"]) > 0
    assert got["rejected"] == [] and got["reason"].startswith("best cost/latency balance: fast@fakeoai")


def test_floor_that_rejects_everything_reports_the_would_be_error(gateway: Gateway) -> None:
    got = explained(gateway, team="alpha", model="cloud-gpt", privacy="internal")
    assert got["candidates"] == []
    assert got["rejected"] == [
        {
            "deployment": "cloud-gpt@cloud_openai",
            "backend": "cloud_openai",
            "codes": ["privacy"],
            "reasons": ["tier external < floor internal"],
        }
    ]
    assert (
        got["privacy"]["floor"] == "internal" and "request raised it to internal" in got["privacy"]["reason"]
    )
    error = got["error"]
    assert error["status"] == 400 and error["code"] == "no_eligible_deployment"
    # Exactly what a real request gets.
    sdk = OpenAI(base_url=gateway.v1, api_key=gateway.key(), max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model="cloud-gpt",
            messages=[{"role": "user", "content": ""}],
            extra_headers={"x-switchboard-privacy": "internal"},
        )
    assert info.value.code == error["code"]
    assert info.value.body["message"] == error["message"]  # type: ignore[index]


def test_detectors_reported_by_kind_and_text_never_echoed(gateway: Gateway) -> None:
    resp = explain(gateway, team="alpha", model="cloud-gpt", text=SECRET_TEXT)
    got = resp.json()
    assert got["privacy"]["detections"] == ["email", "phone"]
    assert got["privacy"]["floor"] == "internal" and "detected email, phone" in got["privacy"]["reason"]
    assert got["error"]["code"] == "no_eligible_deployment"
    assert got["tokens"]["prompt"] == len(SECRET_TEXT) // 4 + 4
    got = explained(gateway, team="alpha", model="fast", text=SECRET_TEXT)
    assert got["error"] is None and [c["backend"] for c in got["candidates"]] == ["fakeoai"]
    for body in (resp.text, str(got)):
        assert all(piece not in body for piece in SECRET_PIECES)


def test_ranked_in_try_order_and_matches_a_real_request(routed: Gateway) -> None:
    got = explained(routed, team="open", model="auto")
    assert [c["deployment"] for c in got["candidates"]] == [
        "auto@cloud_openai",
        "auto@notools",
        "auto@fakeoai",
    ]
    assert all(c["tried"] for c in got["candidates"])
    costs = [float(c["cost_usd"]) for c in got["candidates"]]
    assert costs == sorted(costs)
    assert got["reason"].startswith("cheapest eligible: auto@cloud_openai")
    key = keys.create_key(routed.db, "open", name="t", models=None, expires_at=None).plaintext
    raw = OpenAI(base_url=routed.v1, api_key=key, max_retries=0).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-switchboard-backend"] == "cloud_openai"
    assert raw.headers["x-switchboard-route"].startswith("cheapest eligible: auto@cloud_openai")


def test_privacy_floor_and_capabilities_reject_with_reasons(routed: Gateway) -> None:
    got = explained(routed, team="private", model="auto")
    assert [c["deployment"] for c in got["candidates"]] == ["auto@notools", "auto@fakeoai"]
    assert [r["deployment"] for r in got["rejected"]] == ["auto@cloud_openai"]
    assert got["rejected"][0]["reasons"] == ["tier external < floor internal"]
    assert got["policy"]["max_attempts"] == 2
    got = explained(routed, team="private", model="auto", tools=True, json=True)
    [rejected_notools] = [r for r in got["rejected"] if r["backend"] == "notools"]
    assert rejected_notools["codes"] == ["tools", "json"]
    assert rejected_notools["reasons"] == ["no tool support", "no JSON mode"]
    assert [c["deployment"] for c in got["candidates"]] == ["auto@fakeoai"]


def test_preferences_narrow_and_reorder(routed: Gateway) -> None:
    got = explained(routed, team="open", model="auto", preferences='{"only": ["fakeoai"]}')
    assert [c["backend"] for c in got["candidates"]] == ["fakeoai"]
    assert {r["backend"]: r["reasons"] for r in got["rejected"]} == {
        "cloud_openai": ["not in request `only`"],
        "notools": ["not in request `only`"],
    }
    got = explained(
        routed, team="open", model="auto", preferences='{"order": ["fakeoai"], "allow_fallbacks": false}'
    )
    tried = [(c["backend"], c["tried"]) for c in got["candidates"]]
    assert tried == [("fakeoai", True), ("cloud_openai", False), ("notools", False)]
    assert got["reason"].startswith("first in requested order: auto@fakeoai")
    assert got["policy"]["order"] == ["fakeoai"] and got["policy"]["allow_fallbacks"] is False
    got = explained(
        routed, team="open", model="auto", preferences='{"sort": "latency", "max_price": {"prompt": 1}}'
    )
    assert got["policy"]["objective"] == "latency" and got["policy"]["max_input_usd_per_mtok"] == "1"
    assert {r["backend"]: r["codes"] for r in got["rejected"]} == {"fakeoai": ["price"]}


def test_blocked_and_not_allowed_are_reported(routed: Gateway) -> None:
    resp = explain(routed, team="guarded", model="auto", text=SECRET_TEXT)
    got = resp.json()
    assert got["error"]["status"] == 403 and got["error"]["code"] == "sensitive_data_blocked"
    assert got["privacy"]["detections"] == ["email", "phone"]
    assert "teams.guarded.on_sensitive" in got["privacy"]["reason"]
    assert got["candidates"] == [] and got["rejected"] == []
    assert all(piece not in resp.text for piece in SECRET_PIECES)
    got = explained(routed, team="narrow", model="auto")
    assert got["error"]["status"] == 403 and got["error"]["code"] == "model_not_allowed"
    assert "teams.narrow.models" in got["error"]["message"]
    assert got["candidates"]  # routing is still explained
