"""Schemathesis against a live gateway: every operation of its /openapi.json, each with the key it needs.

`fuzz(...)` runs positive (schema-valid) and negative (schema-violating) cases per operation with a
per-request timeout, collects every failed check instead of stopping at the first, and counts statuses and
hangs. The slow test (tests/api/test_fuzz.py) and the benchmark (bench/fuzz.py) share it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import HypothesisException, Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.http.app import create_app
from gateway.store.db import make_engine
from gateway.store.keys import create_key
from tests.support.api_gateway import ADMIN_KEY, FAKE_UPSTREAM_KEY, gateway_config
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    ignored_auth,
]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@dataclass
class FuzzReport:
    operations: list[str] = field(default_factory=list)
    examples: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: dict[str, Counter[int]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # "operation: check" -> first message
    hangs: int = 0
    skipped: list[str] = field(default_factory=list)  # operation (mode) with no case to generate
    server_errors: int = 0
    seconds: float = 0.0

    def fail(self, where: str, message: str) -> None:
        self.failures.setdefault(where, message[:900])


@contextmanager
def docs_gateway(fake: FakeProvider, tmp: str) -> Iterator[tuple[str, str]]:
    """(base URL, team key of team `alpha`) of the API tests' gateway with `server.docs` on."""
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    config = gateway_config(fake.base_url, {"url": f"sqlite:///{tmp}/sb.db", "spill_path": f"{tmp}/s.jsonl"})
    config = config.model_copy(update={"server": config.server.model_copy(update={"docs": True})})
    with LiveServer(create_app(config)) as server:
        engine = make_engine(config.database.url, config.database.schema_name)
        try:
            key = create_key(engine, "alpha", name="fuzz", models=None, expires_at=None).plaintext
            yield server.base_url, key
        finally:
            engine.dispose()


def _key_for(op: dict[str, Any], team_key: str, admin_key: str) -> str | None:
    names = {name for need in op.get("security", ()) for name in need}
    if "adminKey" in names:
        return admin_key
    return team_key if "teamKey" in names else None


def fuzz(
    base_url: str,
    *,
    team_key: str,
    admin_key: str,
    max_examples: int,
    timeout_s: float = 10.0,
    real_model: str = "fast",
    derandomize: bool = True,
) -> FuzzReport:
    """`max_examples` per operation and generation mode. Every other positive chat body names
    `real_model`, so that half of them get a real answer from the fake provider behind the gateway."""
    doc = httpx.get(base_url + "/openapi.json", timeout=timeout_s).json()
    schema = schemathesis.openapi.from_dict(doc)
    report = FuzzReport()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        raw = doc["paths"][operation.path][operation.method.lower()]
        key = _key_for(raw, team_key, admin_key)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        report.operations.append(operation.label)
        seen = report.per_operation.setdefault(operation.label, Counter())
        for mode in MODES:
            _run(
                operation,
                mode,
                headers,
                base_url,
                report,
                seen,
                max_examples,
                timeout_s,
                real_model,
                derandomize,
            )
    report.seconds = time.monotonic() - started
    return report


def _run(
    operation: Any,
    mode: GenerationMode,
    headers: dict[str, str],
    base_url: str,
    report: FuzzReport,
    seen: Counter[int],
    max_examples: int,
    timeout_s: float,
    real_model: str,
    derandomize: bool,
) -> None:
    count = 0

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        report_multiple_bugs=False,
    )
    # The key as an explicit header: negative cases then negate parameters and bodies, never the key (a case
    # "without Authorization" that is sent with it would read as a schema-violating request accepted).
    @given(case=operation.as_strategy(generation_mode=mode, headers=headers or None))
    def one(case: Any) -> None:
        nonlocal count
        count += 1
        chat = isinstance(case.body, dict) and "messages" in case.body
        if mode is GenerationMode.POSITIVE and chat and count % 2 == 0:
            case.body["model"] = real_model
        report.examples += 1
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=timeout_s)
        except requests.Timeout:
            report.hangs += 1
            report.fail(f"{operation.label}: hang", f"no answer within {timeout_s} s ({mode.value})")
            return
        report.statuses[response.status_code] += 1
        seen[response.status_code] += 1
        if response.status_code >= 500 and response.status_code not in (502, 503, 504):
            report.server_errors += 1
        try:
            case.validate_response(
                response, checks=CHECKS, headers=headers, transport_kwargs={"base_url": base_url}
            )
        except FailureGroup as group:
            for failure in group.exceptions:
                _record(report, operation.label, failure, case, response)
        except Failure as failure:
            _record(report, operation.label, failure, case, response)

    try:
        one()
    except Unsatisfiable:  # no negative case exists for an operation that takes no input
        report.skipped.append(f"{operation.label} ({mode.value})")
    except HypothesisException as exc:  # e.g. no negative case exists for an operation without inputs
        report.fail(f"{operation.label}: {mode.value} generation", f"{type(exc).__name__}: {exc}")


def _record(report: FuzzReport, label: str, failure: Failure, case: Any, response: Any) -> None:
    sent = f"query={str(case.query)[:150]!r} body={str(case.body)[:150]!r}"
    report.fail(
        f"{label}: {failure.title}",
        f"{response.status_code} {response.text[:120]!r} <- {sent}; {failure.message[:400]}",
    )
