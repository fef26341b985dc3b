"""Reading a user's JSON file into a typed model, with an error a person can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def load_model(path: Path, model: type[M], error: type[Exception], what: str) -> M:
    """Parse ``path`` as ``model``; raise ``error`` naming ``what``, the file and the first problem."""
    try:
        return model.model_validate(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"the {what} {path.name} cannot be read ({type(exc).__name__})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise error(f"the {what} {path.name} is invalid at '{where}': {first['msg']}") from None
