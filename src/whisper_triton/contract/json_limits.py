"""Limits on JSON from callers, one definition for both sides of the boundary: the proxy's JSON body
and the `transcribe` model's OPTIONS input (gRPC clients reach it without the proxy).

Python's JSON decoder recurses once per nesting level and raises RecursionError past about a
thousand, so depth is refused here as a 400 whatever it is; after decoding, anything deeper than
MAX_JSON_DEPTH (options are flat: a list of temperatures is the deepest thing they hold) is refused.
Sizes: the proxy's body is capped by `Settings.body_limit`; OPTIONS by MAX_OPTIONS_BYTES.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import invalid_parameter

MAX_JSON_DEPTH = 8
MAX_OPTIONS_BYTES = 64 * 1024  # far above every option at its longest (two prompts of 8,192 characters)
MAX_KEY_CHARS = 64  # an option name longer than this is not one; messages echo at most this much
# names in one JSON document, all objects together: options are ~40 names, so 256 is far above any
# real body; 400,000 unknown keys would cost the options model about a second each to refuse
MAX_JSON_KEYS = 256
# every name is followed by a colon, so more colons than this (strings hold a few: two prompts of
# 8,192 characters at most) means more names than MAX_JSON_KEYS without decoding anything
MAX_JSON_COLONS = 32 * 1024


def load_object(data: bytes | str, param: str, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object from `data`, or a 400 naming `param` (size, syntax, depth, not an object)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise invalid_parameter(param, f"{param} is {len(data)} bytes; the limit is {max_bytes} bytes.")
    if data.count(":" if isinstance(data, str) else b":") > MAX_JSON_COLONS:  # a C-speed count, before decoding
        raise invalid_parameter(param, f"{param} holds more than {MAX_JSON_COLONS} ':', so more names than an options "
                                f"object has ({MAX_JSON_KEYS} at most; options are a flat object of a few dozen).")
    try:
        payload = json.loads(data, object_pairs_hook=_key_counter())
    except _TooManyKeys:
        raise _too_many_keys(param) from None
    except RecursionError:
        raise invalid_parameter(param, f"{param} is nested too deeply; the limit is {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid_parameter(param, f"{param} is not valid JSON ({_short(str(exc))}).") from None
    if not isinstance(payload, dict):
        raise invalid_parameter(param, f"{param} must be a JSON object of name: value.")
    if depth(payload) > MAX_JSON_DEPTH:
        raise invalid_parameter(param, f"{param} is nested too deeply; the limit is {MAX_JSON_DEPTH} levels.")
    return payload


def _too_many_keys(param: str):
    return invalid_parameter(param, f"{param} has more than {MAX_JSON_KEYS} names; options are a flat object "
                             "of a few dozen (see the README's option list).")


class _TooManyKeys(Exception):
    pass


def _key_counter():
    """json's object hook, counting names over the whole document (stops the decode past the bound)."""
    seen = [0]

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen[0] += len(pairs)
        if seen[0] > MAX_JSON_KEYS:
            raise _TooManyKeys()
        return dict(pairs)

    return hook


def depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest


def shown_name(name: str) -> str:
    """An option name as an error message may repeat it (callers choose the names)."""
    return name if len(name) <= MAX_KEY_CHARS else name[:MAX_KEY_CHARS] + "..."


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
