"""JSON from outside (a registry's answer, a registration, a KV value), read with its nesting bounded.

Python's decoder recurses once per level: a value nested a hundred thousand levels deep raises
`RecursionError`, which is not a `ValueError` and would escape every handler written for bad
JSON (a watch died of it, a template's `parse_json` crash-looped the daemon). Here both too deep
for the decoder and deeper than the caller allows are a `JSONTooDeep`, a `ValueError` that says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Deeper than any registration or template value needs, well below Python's recursion limit, so
# what is read here can be compared, rendered and written back without recursing too deep.
MAX_DEPTH = 64


class JSONTooDeep(ValueError):
    """A JSON value nested deeper than allowed."""


def loads(text: str | bytes, max_depth: int | None = MAX_DEPTH) -> Any:
    """`json.loads`, except that nesting deeper than `max_depth` (None: only what the decoder can
    read) is a `JSONTooDeep` instead of a `RecursionError` (or a value too deep to use)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONTooDeep("JSON nested too deep to read") from None
    if max_depth is not None and depth_exceeds(value, max_depth):
        raise JSONTooDeep(f"JSON nested deeper than {max_depth} levels")
    return value


def depth_exceeds(value: object, max_depth: int) -> bool:
    """Whether `value` (decoded JSON) nests lists and objects deeper than `max_depth` (iteratively:
    the check itself never recurses)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
