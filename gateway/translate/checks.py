"""Checks every translator applies to the JSON it forwards: what a backend or the cache cannot encode.

JSON allows integers of any size; orjson (the cache key, the upstream body) and most providers stop at 64
bits. An integer beyond that anywhere in a forwarded value is the client's error, named by its path, not a
500 deep inside the pipeline.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest

_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1


def check_json_ints(value: Any, param: str) -> None:
    """Raise InvalidRequest naming the path of the first integer outside the 64-bit range in `value`."""
    stack: list[tuple[Any, str]] = [(value, param)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, bool) or item is None or isinstance(item, str | float):
            continue
        if isinstance(item, int):
            if not _MIN_INT <= item <= _MAX_INT:
                raise InvalidRequest(
                    f"`{path}` holds an integer outside the 64-bit range; send a smaller number", param=path
                )
        elif isinstance(item, dict):
            stack.extend((v, f"{path}.{k}") for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(item))
