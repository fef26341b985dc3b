"""The scale reference (REF.json) and measurement segments: DESIGN.md §3.3.

Pixel coordinates are in the photo as uploaded, before orientation; (0,0) is the top-left
corner of the top-left pixel (COLMAP uses the same convention, so no half-pixel shift).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from reconstruct.errors import ScaleReferenceError
from reconstruct.jsonfile import NonFiniteNumber, load_model, loads

MAX_LENGTH_M = 10_000.0  # no measured length on a site is longer


class Segment(BaseModel):
    # Unknown fields are errors: a free-text "note" would otherwise be stored with the job's
    # inputs in clear (it may name the client or their street).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field(min_length=1, max_length=256)
    a: tuple[float, float]
    b: tuple[float, float]
    length_m: float | None = None

    @field_validator("length_m")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 < v <= MAX_LENGTH_M):
            raise ValueError(f"a segment needs a positive length_m, in metres, up to {MAX_LENGTH_M:g}")
        return v

    @field_validator("a", "b")
    @classmethod
    def _finite(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(c) for c in v):
            raise ValueError("pixel coordinates must be finite numbers")
        return v


class Marker(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dictionary: str = "DICT_4X4_50"
    id: int = Field(ge=0)
    size_m: float = Field(gt=0)


class ScaleReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segments: list[Segment] = Field(default_factory=list)
    markers: list[Marker] = Field(default_factory=list)


def load_reference(path: Path) -> ScaleReference:
    return load_model(path, ScaleReference, ScaleReferenceError, "scale reference")


def check_reference(
    ref: ScaleReference, image_names: set[str], sizes: dict[str, tuple[int, int]] | None = None
) -> None:
    """Fail before any compute when the reference cannot give a scale. ``sizes``: each photo's
    (width, height) as the reference's pixels are given, when known."""
    if not ref.segments and not ref.markers:
        raise ScaleReferenceError("the scale reference has no segments and no markers")
    for i, s in enumerate(ref.segments):
        if s.image not in image_names:
            raise ScaleReferenceError(f"reference segment {i} names image '{s.image}', which is not among the photos")
        if s.length_m is None or not math.isfinite(s.length_m) or s.length_m <= 0:
            raise ScaleReferenceError(f"reference segment {i} needs a positive length_m (got {s.length_m})")
        if math.dist(s.a, s.b) < 5.0:
            raise ScaleReferenceError(f"reference segment {i} is shorter than 5 pixels in its photo")
        size = (sizes or {}).get(s.image)
        if size is not None:
            for end, (u, v) in (("a", s.a), ("b", s.b)):
                if not (0 <= u <= size[0] and 0 <= v <= size[1]):
                    raise ScaleReferenceError(
                        f"reference segment {i}: point {end} {[u, v]} lies outside its photo "
                        f"({size[0]} x {size[1]} pixels, upright)"
                    )
    import cv2

    for i, m in enumerate(ref.markers):
        if not isinstance(getattr(cv2.aruco, m.dictionary, None), int) or not m.dictionary.startswith("DICT_"):
            raise ScaleReferenceError(f"marker {i}: unknown ArUco dictionary '{m.dictionary}' (e.g. DICT_4X4_50)")


def load_segments(path: Path) -> list[Segment]:
    try:
        raw = loads(path.read_text())
        return [Segment.model_validate(s) for s in raw["segments"]]  # type: ignore[index]
    except NonFiniteNumber as exc:
        raise ValueError(f"the segments file {path.name} is invalid: {exc}") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"the segments file {path.name} cannot be read: {type(exc).__name__}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"the segments file {path.name} is invalid: {first['msg']}") from None
