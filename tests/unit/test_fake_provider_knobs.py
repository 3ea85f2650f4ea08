"""The fake provider's `fail_every` knob, driven in process through its ASGI app (no socket)."""

from __future__ import annotations

import httpx

from tests.support.fake_provider import FakeProviderApp


async def test_fail_every_fails_one_request_in_n_for_its_model_only() -> None:
    app = FakeProviderApp()
    app.configure("flaky", fail_status=503, fail_every=3)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake") as client:
        flaky = [(await client.post("/v1/chat/completions", json={**body, "model": "flaky"})).status_code
                 for _ in range(7)]  # fmt: skip
        other = (await client.post("/v1/chat/completions", json={**body, "model": "steady"})).status_code
        app.configure("flaky", fail_every=None, fail_status=None)
        healed = (await client.post("/v1/chat/completions", json={**body, "model": "flaky"})).status_code
    assert flaky == [200, 200, 503, 200, 200, 503, 200]
    assert other == 200 and healed == 200
