"""Schemathesis against the live gateway: every documented operation, a bounded number of examples.

Goals (issue: "Fuzzing that sees the real API"): no status 500, no response outside the published schema
(status, content type, body, headers), no schema-violating request accepted, no hang. The longer run with
figures is `python -m bench.fuzz` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.api_gateway import ADMIN_KEY
from tests.support.fake_provider import FakeProvider
from tests.support.fuzz import docs_gateway, fuzz

EXAMPLES = 20  # per operation and generation mode: ~400 requests, ~15 s on 2 cores

OPERATIONS = {
    "POST /v1/chat/completions",
    "POST /v1/responses",
    "GET /v1/responses/{response_id}",
    "DELETE /v1/responses/{response_id}",
    "GET /v1/responses/{response_id}/input_items",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/files",
    "GET /v1/files",
    "GET /v1/files/{file_id}",
    "GET /v1/files/{file_id}/content",
    "DELETE /v1/files/{file_id}",
    "POST /v1/batches",
    "GET /v1/batches",
    "GET /v1/batches/{batch_id}",
    "POST /v1/batches/{batch_id}/cancel",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
    "GET /v1/models",
    "GET /v1/usage",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /admin/teams",
    "POST /admin/teams",
    "GET /admin/keys",
    "POST /admin/keys",
    "POST /admin/keys/{key_id}/revoke",
    "GET /admin/route/explain",
    "GET /admin/reports/usage",
    "GET /admin/reports/savings",
    "GET /admin/edge/tokens",
    "POST /admin/edge/tokens",
    "DELETE /admin/edge/tokens/{token_id}",
    "GET /admin/edge/nodes",
}


def test_schemathesis_finds_nothing(fake: FakeProvider, tmp_path: Path) -> None:
    with docs_gateway(fake, str(tmp_path)) as (base_url, team_key):
        report = fuzz(base_url, team_key=team_key, admin_key=ADMIN_KEY, max_examples=EXAMPLES, timeout_s=10.0)
    assert set(report.operations) == OPERATIONS
    assert report.failures == {}
    assert report.server_errors == 0 and report.hangs == 0
    # The examples reach past authentication and validation: real answers, on team and admin routes alike.
    assert report.per_operation["POST /v1/chat/completions"][200] > 0
    assert report.per_operation["GET /v1/usage"][200] > 0
    assert report.per_operation["POST /admin/keys"][201] > 0
    assert report.examples >= 300
