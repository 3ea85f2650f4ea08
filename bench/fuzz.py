"""Schema fuzzing of the whole public API: schemathesis against a live gateway, every operation it documents.

One run starts the loopback fake provider and a gateway in front of it (the API tests' config, SQLite, docs
on), makes a team key, and runs tests/support/fuzz.py: positive and negative cases per operation, team key
for team routes, admin key for admin routes, a per-request timeout. It prints operations, examples, statuses,
failed checks, 5xx other than 502/503/504, and hangs; `--write` puts them in docs/BENCHMARKS.md.
Invariant: every number printed is measured in this run.
Run: `python -m bench.fuzz [--examples 100] [--timeout-s 10] [--random] [--write]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.api_gateway import ADMIN_KEY
from tests.support.fake_provider import FakeProvider
from tests.support.fuzz import FuzzReport, docs_gateway, fuzz

ROOT = Path(__file__).resolve().parent.parent
MARK_START = "<!-- bench/fuzz:start -->"
MARK_END = "<!-- bench/fuzz:end -->"


@contextmanager
def live_gateway() -> Iterator[tuple[str, str]]:
    """(base URL, team key) of a gateway with docs on, in front of its own fake provider."""
    with tempfile.TemporaryDirectory() as tmp, FakeProvider() as fake, docs_gateway(fake, tmp) as gateway:
        yield gateway


def summary(report: FuzzReport, examples: int, timeout_s: float) -> str:
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(report.statuses.items()))
    lines = [
        f"- operations: {len(report.operations)}; examples: {report.examples} "
        f"({examples} per operation and mode, positive and negative) in {report.seconds:.0f} s",
        f"- statuses: {statuses}",
        f"- status 500 (or other 5xx than 502/503/504): {report.server_errors}; "
        f"hangs (no answer in {timeout_s:g} s): {report.hangs}; failed checks: {len(report.failures)}",
        f"- no case to generate: {', '.join(report.skipped) or 'none'}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    ]
    for where, message in sorted(report.failures.items()):
        lines.append(f"  - FAILED {where}: {message}")
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    doc = path.read_text()
    start, end = doc.index(MARK_START) + len(MARK_START), doc.index(MARK_END)
    path.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="per operation and generation mode")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="per request")
    parser.add_argument("--random", action="store_true", help="a new random seed instead of derandomized")
    parser.add_argument("--write", action="store_true", help="update the section in docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    with live_gateway() as (base_url, team_key):
        report = fuzz(
            base_url,
            team_key=team_key,
            admin_key=ADMIN_KEY,
            max_examples=args.examples,
            timeout_s=args.timeout_s,
            derandomize=not args.random,
        )
    text = summary(report, args.examples, args.timeout_s)
    print(text)
    for label, seen in report.per_operation.items():
        print(f"  {label}: {dict(sorted(seen.items()))}")
    if args.write:
        write_section(text)
    return 1 if report.failures or report.hangs or report.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
