"""Reading a user's JSON file into a typed model, with an error a person can act on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class NonFiniteNumber(ValueError):
    """A JSON number that is NaN, an infinity, or too large for a float (1e400)."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonFiniteNumber(f"the number {text[:20]} is too large")
    return value


def _constant(name: str) -> float:
    raise NonFiniteNumber(f"{name} is not a number a measurement can use")


def loads(text: str) -> object:
    """``json.loads`` that refuses NaN, Infinity and numbers beyond a float's range: Python's json
    takes them, and a NaN placement ran a whole plan into NaN drawings."""
    return json.loads(text, parse_float=_finite, parse_constant=_constant)


def load_model(path: Path, model: type[M], error: type[Exception], what: str) -> M:
    """Parse ``path`` as ``model``; raise ``error`` naming ``what``, the file and the first problem."""
    try:
        return model.model_validate(loads(path.read_text()))
    except NonFiniteNumber as exc:
        raise error(f"the {what} {path.name} is invalid: {exc}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"the {what} {path.name} cannot be read ({type(exc).__name__})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise error(f"the {what} {path.name} is invalid at '{where}': {first['msg']}") from None
