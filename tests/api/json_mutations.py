"""Building blocks for hostile JSON bodies, shared by tests/api/test_hostile_inputs.py and the
adversarial rerun (scripts/adversarial.py): number tokens Python's json cannot write, a writer
that emits them (and NaN/Infinity as JavaScript-style literals), and the walk over a body's
leaves with a copy that replaces one of them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any


class RawNumber:
    """A JSON number token Python's json cannot write (1e400 parses to inf)."""

    def __init__(self, token: str) -> None:
        self.token = token


def dumps(body: Any) -> str:
    """``body`` as JSON text, with each :class:`RawNumber` written as its token."""
    raws: list[str] = []

    def enc(o: Any) -> Any:
        if isinstance(o, RawNumber):
            raws.append(o.token)
            return f"__raw{len(raws) - 1}__"
        raise TypeError(type(o).__name__)

    text = json.dumps(body, default=enc)  # NaN and Infinity as JavaScript-style literals
    return re.sub(r'"__raw(\d+)__"', lambda m: raws[int(m.group(1))], text)


def leaves(v: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every value in ``v`` (itself first), with the path of keys and indices to it."""
    yield path, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from leaves(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from leaves(x, (*path, i))


def replaced(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of ``body`` with the value at ``path`` replaced by ``value``."""
    if not path:
        return value
    out = json.loads(json.dumps(body))
    cur = out
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return out


# Numbers no field of a request can take: not finite, or beyond any coordinate or length.
NOT_FINITE_OR_HUGE: list[Any] = [
    float("nan"),
    float("inf"),
    float("-inf"),
    RawNumber("1e400"),
    RawNumber("-1e400"),
    1e300,
    -1e300,
]
