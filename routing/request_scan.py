"""Sensitive-data detection over a whole chat request: every string it carries, normalised and decoded.

`detect_request(messages, extras)` walks every string in every message (content and its parts, `name`,
tool-call arguments as text or object, legacy `function_call`, `refusal`, `image_url.url`, unknown fields,
dict keys, and numbers) and in `extras` (stop strings, tools, `response_format`: any JSON-like value), and
JSON inside strings. It scans all of them joined by newlines, then the seams between adjacent text pieces
joined with and without a space, so a value split across parts or messages is found. Each scanned text is
normalised (`routing.normalize`) and its decoded views scanned too. Invariant: only kinds come back, never
text or offsets; a field is never skipped, whatever its name or type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from routing.detectors import DetectorKind, detect
from routing.normalize import decoded_views, normalize

# Values of these keys are closed sets (role names, part types) or ids: scanned, but not glued to neighbours.
_NOT_PROSE = frozenset({"role", "type", "id", "tool_call_id", "detail", "format"})
SEAM_CHARS = 160  # each side of a seam: longer than any value a detector knows but a PEM body
_JSON_MAX_CHARS = 1 << 20
# What a value spanning a seam must contain somewhere near it: a digit (numbers, keys, IBANs), an `@`, a PEM
# fence, or an encoding's marker. A seam window without any of them is not scanned again.
_SEAM_WORTH_SCANNING = re.compile(r"[0-9@%&\\]|-----|[^\x00-\x7f]")


@dataclass(slots=True)
class _Collected:
    every: list[str] = field(default_factory=list)  # every string, in order
    prose: list[str] = field(default_factory=list)  # the pieces a value could be split across, in order


def _parse_json(text: str) -> object:
    """The value of a string that holds a JSON object or array (tool arguments), else None."""
    head = text.lstrip()[:1]
    if head not in ("{", "[") or len(text) > _JSON_MAX_CHARS:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None


_Pending = list[tuple[object, str | None, bool]]  # (value, its key, found inside a JSON string)


def _add_string(out: _Collected, value: str, key: str | None, inside_json: bool, stack: _Pending) -> None:
    out.every.append(value)
    if key not in _NOT_PROSE and not inside_json and value:
        out.prose.append(value)
    parsed = _parse_json(value)
    if parsed is not None:
        stack.append((parsed, key, True))


def _collect(values: Iterable[object]) -> _Collected:
    """Walk nested mappings and sequences without recursion (a hostile body may nest deeply)."""
    out = _Collected()
    stack: _Pending = [(v, None, False) for v in reversed(list(values))]
    while stack:
        value, key, inside_json = stack.pop()
        kind = type(value)  # exact types first: isinstance against the ABCs is slow on the hot path
        if kind is str or isinstance(value, str):
            _add_string(out, value, key, inside_json, stack)  # type: ignore[arg-type]
        elif kind is dict or isinstance(value, Mapping):
            children = list(value.items())  # type: ignore[attr-defined]
            out.every += [k for k, _ in children if isinstance(k, str)]
            stack += [(v, k if isinstance(k, str) else None, inside_json) for k, v in reversed(children)]
        elif kind is list or (isinstance(value, Sequence | set | frozenset) and not isinstance(value, bytes)):
            stack += [(v, key, inside_json) for v in reversed(list(value))]  # type: ignore[call-overload]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.every.append(repr(value))  # {"card": 4111111111111111}
        elif isinstance(value, bytes | bytearray):
            out.every.append(bytes(value).decode("utf-8", "replace"))
    return out


def _widen_to_space(text: str, start: int, end: int) -> tuple[int, int]:
    """Move a window's cut points to whitespace, so no token is cut into a shorter look-alike."""
    if start > 0:
        space = text.find(" ", start, start + SEAM_CHARS // 2)
        start = space + 1 if space >= 0 else start
    if end < len(text):
        space = text.rfind(" ", end - SEAM_CHARS // 2, end)
        end = space if space >= 0 else end
    return start, end


def _seam_windows(pieces: Sequence[str], sep: str) -> list[str]:
    """The text around each seam of `sep.join(pieces)`; windows that overlap are merged, so a value spread
    over several short pieces is seen whole."""
    joined = sep.join(pieces)
    windows: list[tuple[int, int]] = []
    at = 0
    for piece in pieces[:-1]:
        at += len(piece)
        start, end = max(0, at - SEAM_CHARS), min(len(joined), at + len(sep) + SEAM_CHARS)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
        at += len(sep)
    return [joined[slice(*_widen_to_space(joined, s, e))] for s, e in windows]


def detect_kinds(text: str) -> set[DetectorKind]:
    """The kinds found in `text` once normalised, and in each of its decoded views."""
    normal = normalize(text)
    kinds = {d.kind for d in detect(normal)}
    for view in decoded_views(normal):
        kinds.update(d.kind for d in detect(view))
    return kinds


def detect_request(
    messages: Sequence[Mapping[str, Any]], extras: Iterable[object] = ()
) -> tuple[DetectorKind, ...]:
    """The distinct kinds of sensitive data anywhere in a chat request, sorted.

    `extras`: request-level values that reach a backend besides the messages (stop strings, tools,
    tool_choice, response_format, user, unknown body fields), each any JSON-like value.
    """
    collected = _collect([*messages, *extras])
    kinds = detect_kinds("\n".join(collected.every))
    if len(collected.prose) > 1:
        for sep in ("", " "):
            for window in _seam_windows(collected.prose, sep):
                if _SEAM_WORTH_SCANNING.search(window):
                    kinds |= detect_kinds(window)
    return tuple(sorted(kinds))
