"""The log scan, a pytest plugin (tests/conftest.py loads it): the run fails when a team key, an enrollment
token, an admin or upstream key, or planted prompt text reaches a log line or an error message.

Secrets are registered as they are made: every `new_secret` (team keys, enrollment tokens) in this process,
plus what the rigs register (`register`: admin keys, subprocess-made secrets). `PROMPT_MARKER` is a
per-session string the rigs put in the prompts they send. Any full `sk-sb-`/`sbe_` shape counts, registered
or not. Scanned: every log record this process creates (root at DEBUG, messages and exception text), every
`SwitchboardError` message and detail (what error bodies render), texts the rigs pass to `observe` (error
bodies they received), and `*.log` files under the test's tmp_path and the session's base temp (subprocess
logs). A test that leaks fails at teardown; what session fixtures leak fails the session. Reports name the
place and a hash of the secret, never the secret.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PROMPT_MARKER = "planted-prompt-" + uuid.uuid4().hex[:16]
# A whole key or token (the 12-character display prefix is allowed; 24+ random characters are not).
SHAPES = re.compile(r"sk-sb-[A-Za-z0-9_-]{24,}|sbe_[A-Za-z0-9_-]{24,}")
LOG_SUFFIXES = (".log",)
_FORMATTER = logging.Formatter()


def fingerprint(secret: str) -> str:
    """What a report shows of a secret: its kind-revealing start and a short hash."""
    head = secret[:6] if secret.startswith(("sk-sb-", "sbe_", "admin-")) else secret[:3]
    return f"{head}... sha256:{hashlib.sha256(secret.encode()).hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class Finding:
    where: str
    kind: str
    secret_fingerprint: str

    def describe(self) -> str:
        return f"{self.kind} ({self.secret_fingerprint}) in {self.where}"


@dataclass
class Scan:
    """The session's registry of secrets and the texts not yet scanned."""

    shaped: dict[str, str] = field(default_factory=dict)  # secrets SHAPES matches -> kind
    others: dict[str, str] = field(default_factory=lambda: {PROMPT_MARKER: "planted prompt text"})
    pending: list[tuple[Callable[[], str], Callable[[], str]]] = field(default_factory=list)  # (where, text)
    findings: list[Finding] = field(default_factory=list)
    reported: set[Finding] = field(default_factory=set)  # failed a test already
    scanned_files: dict[Path, int] = field(default_factory=dict)  # path -> bytes scanned
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("records", "errors", "texts", "files"), 0)
    )
    # Re-entrant: a finalizer that logs (asyncio's "Task was destroyed", say) can run on a thread that holds
    # the lock, when the garbage collector wakes inside `add`; a plain lock deadlocked that thread, then every
    # thread that logged after it (a CI run hung in tests/api/test_openai_sdk.py until its 90 minutes ran).
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def registered(self) -> int:
        return len(self.shaped) + len(self.others)

    def register(self, secret: str, kind: str) -> None:
        if len(secret) < 8:
            raise ValueError("too short to scan for without false alarms")
        with self._lock:
            (self.shaped if SHAPES.fullmatch(secret) else self.others).setdefault(secret, kind)

    def add(self, where: Callable[[], str], text: Callable[[], str], counter: str) -> None:
        with self._lock:
            self.pending.append((where, text))
            self.counts[counter] += 1

    def find(self, text: str) -> list[tuple[str, str]]:
        """(kind, fingerprint) of each secret in `text`. Whole keys and tokens are found by their shape (one
        regex pass however many were registered), the rest one by one (a few)."""
        with self._lock:
            others = list(self.others.items())
        hits = []
        for match in SHAPES.findall(text):
            prefix = "sk-sb-" if match.startswith("sk-sb-") else "sbe_"
            kind = self.shaped.get(match[: len(prefix) + 43], "unregistered " + prefix + "... secret")
            hits.append((kind, fingerprint(match)))
        hits += [(kind, fingerprint(secret)) for secret, kind in others if secret in text]
        return hits

    def drain(self) -> list[Finding]:
        """Scan what was added since the last drain; the new findings."""
        with self._lock:
            batch, self.pending = self.pending, []
        texts = [(where, _safe(text)) for where, text in batch]
        if not texts or not self.find("\n".join(t for _, t in texts)):
            return []
        found = [Finding(where(), kind, fp) for where, text in texts for kind, fp in self.find(text)]
        self.findings.extend(found)
        return found

    def scan_files(self, root: Path) -> list[Finding]:
        found: list[Finding] = []
        paths = sorted(p for p in root.rglob("*") if p.suffix in LOG_SUFFIXES and p.is_file())
        for path in paths:
            size = path.stat().st_size
            if self.scanned_files.get(path) == size:
                continue
            self.scanned_files[path] = size
            self.counts["files"] += 1
            text = path.read_text(errors="replace")
            if not self.find(text):
                continue
            for number, line in enumerate(text.splitlines(), 1):
                found += [Finding(f"{path}:{number}", kind, fp) for kind, fp in self.find(line)]
        self.findings.extend(found)
        return found


SCAN = Scan()


def register(secret: str, kind: str) -> None:
    """Count `secret` as one that must never be logged (e.g. a key a subprocess made, an admin key)."""
    SCAN.register(secret, kind)


def observe(where: str, text: str) -> None:
    """Scan `text` too (e.g. an error body a rig received); `where` names it in a report."""
    SCAN.add(lambda: where, lambda: text, "texts")


def planted_messages(text: str = "Summarise this") -> list[dict[str, str]]:
    """Chat messages carrying the session's planted prompt text."""
    return [{"role": "user", "content": f"{text}: {PROMPT_MARKER}"}]


def _safe(text: Callable[[], str]) -> str:
    try:
        return text()
    except Exception as exc:  # noqa: BLE001 - a record whose message cannot be formatted is still scanned
        return f"<unformattable: {type(exc).__name__}>"


def _record_text(record: logging.LogRecord) -> str:
    parts = [record.getMessage()]
    if record.exc_info:
        parts.append(_FORMATTER.formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts)


def _record_where(record: logging.LogRecord, test: str) -> str:
    return f"log record {record.name} {record.levelname} ({record.pathname}:{record.lineno}) during {test}"


# ---- hooks into the code under test --------------------------------------------------------------------


class _Hooks:
    """What `install` changed, so `uninstall` puts it back."""

    def __init__(self) -> None:
        self.undo: list[Callable[[], None]] = []
        self.test = "collection"

    def install(self) -> None:
        from backends.errors import SwitchboardError
        from gateway.edge import tokens
        from gateway.store import keys

        old_factory = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = old_factory(*args, **kwargs)
            test = self.test
            SCAN.add(lambda: _record_where(record, test), lambda: _record_text(record), "records")
            return record

        logging.setLogRecordFactory(factory)
        self.undo.append(lambda: logging.setLogRecordFactory(old_factory))
        root = logging.getLogger()
        old_level = root.level
        root.setLevel(logging.DEBUG)
        self.undo.append(lambda: root.setLevel(old_level))

        old_init = SwitchboardError.__init__

        def init(exc: SwitchboardError, message: str, *args: Any, **kwargs: Any) -> None:
            old_init(exc, message, *args, **kwargs)
            test, name = self.test, type(exc).__name__
            SCAN.add(
                lambda: f"message of {name} (error body) during {test}",
                lambda: f"{exc.message}\n{getattr(exc, 'detail', None) or ''}",
                "errors",
            )

        SwitchboardError.__init__ = init  # type: ignore[method-assign]
        self.undo.append(lambda: setattr(SwitchboardError, "__init__", old_init))

        old_new_secret = keys.new_secret

        def new_secret(prefix: str) -> str:
            secret = old_new_secret(prefix)
            SCAN.register(secret, "enrollment token" if prefix.startswith("sbe") else "API key")
            return secret

        for module in (keys, tokens):
            module.new_secret = new_secret  # type: ignore[attr-defined]
            self.undo.append(lambda m=module: setattr(m, "new_secret", old_new_secret))

    def uninstall(self) -> None:
        while self.undo:
            self.undo.pop()()


HOOKS = _Hooks()


def _report(findings: list[Finding], limit: int = 20) -> str:
    lines = [f"log scan: {len(findings)} secret(s) or planted prompt text found:"]
    lines += [f"  - {f.describe()}" for f in findings[:limit]]
    if len(findings) > limit:
        lines.append(f"  ... and {len(findings) - limit} more")
    return "\n".join(lines)


# ---- pytest hooks -------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    HOOKS.install()
    config.stash[_ACTIVE] = True


def pytest_unconfigure(config: pytest.Config) -> None:
    HOOKS.uninstall()


_ACTIVE = pytest.StashKey[bool]()


def is_active(config: pytest.Config) -> bool:
    return config.stash.get(_ACTIVE, False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    SCAN.drain()  # what happened between tests belongs to the session (reported at its end), not to this test
    HOOKS.test = item.nodeid
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        result = yield
    finally:
        HOOKS.test = f"between tests (after {item.nodeid})"
    findings = SCAN.drain()
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if isinstance(tmp, Path) and tmp.is_dir():
        findings += SCAN.scan_files(tmp)
    if findings:
        SCAN.reported.update(findings)
        pytest.fail(_report(findings), pytrace=False)
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    HOOKS.test = "session teardown"
    SCAN.drain()
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        SCAN.scan_files(factory.getbasetemp())
    if [f for f in SCAN.findings if f not in SCAN.reported]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    unreported = [f for f in SCAN.findings if f not in SCAN.reported]
    c = SCAN.counts
    summary = (
        f"log scan: {c['records']} log records, {c['errors']} error messages, {c['texts']} received bodies, "
        f"{c['files']} log files; {SCAN.registered} secrets registered"
    )
    if SCAN.findings:
        terminalreporter.write_sep("=", "log scan failed", red=True)
        terminalreporter.write_line(_report(SCAN.findings, limit=50))
        if unreported:
            terminalreporter.write_line(f"({len(unreported)} outside any test: the session fails)")
    terminalreporter.write_line(summary + ("" if SCAN.findings else ": clean"))
