"""Request and response bodies (Create / Update / Public variants); unknown fields are errors."""

from __future__ import annotations

import math
from datetime import UTC, date
from datetime import datetime as _datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from reconstruct.design import DesignDescriptor
from reconstruct.placement import PlacementSpec
from reconstruct.reference import ScaleReference


def _utc(d: _datetime) -> _datetime:
    # SQLite hands back naive datetimes; every time we store is UTC.
    return d if d.tzinfo else d.replace(tzinfo=UTC)


datetime = Annotated[_datetime, AfterValidator(_utc)]


# No number in a request body means anything beyond this (pixels, metres, degrees): a larger
# one is a mistake or an attack, never an input that can work.
MAX_MAGNITUDE = 1e7


def _hostile(value: Any, loc: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """The first place in a raw body where a number is not finite or out of range, or a string is
    not valid Unicode (a lone surrogate cannot be encoded, sealed or stored) or holds a NUL, and
    what is wrong."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float | int):
        if isinstance(value, float) and not math.isfinite(value):
            return loc, "must be a finite number"
        if abs(value) > MAX_MAGNITUDE:
            return loc, f"must be within +-{MAX_MAGNITUDE:g}"
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return loc, "must be valid Unicode text (it holds a lone surrogate)"
        if "\x00" in value:  # PostgreSQL's text cannot hold it: an id with one was a 500 there
            return loc, "must not contain a NUL character"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and (bad := _hostile(k, loc)):
                return loc, "field names must be valid Unicode text"
            if bad := _hostile(v, (*loc, str(k))):
                return bad
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            if bad := _hostile(v, (*loc, str(i))):
                return bad
    return None


class Strict(BaseModel):
    """A request body: unknown fields are errors (at every depth: the nested models forbid them
    too), every number is finite and within MAX_MAGNITUDE, every string valid Unicode. The walk
    covers the nested models defined elsewhere (reference, placement, design descriptor); the
    error names the field (``ctx.field``, read by api.errors)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_hostile_values(cls, data: Any) -> Any:
        if isinstance(data, dict) and (bad := _hostile(data, ())):
            loc, what = bad
            field = ".".join(loc)
            raise PydanticCustomError("hostile_value", "{field} " + what, {"field": field})
        return data


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class TenantPublic(BaseModel):
    id: str
    label: str
    created_at: datetime


class ContractCreate(Strict):
    starts_on: date | None = Field(default=None, description="Default: today.")


class ContractPublic(BaseModel):
    id: str
    starts_on: date
    ends_on: date | None
    state: Literal["active", "terminating", "ended"]
    disposition: str | None
    created_at: datetime


class ContractList(Page):
    items: list[ContractPublic]


class ContractTerminate(Strict):
    disposition: Literal["destroy", "return", "transfer"] = "destroy"
    recipient_public_key: str | None = Field(
        default=None, max_length=2000, description="For a transfer: the receiving processor's X25519 public key, PEM."
    )


class SubjectCreate(Strict):
    contract_id: str = Field(min_length=1, max_length=32)
    name: str = Field(min_length=1, max_length=200)
    address: str | None = Field(default=None, max_length=300)
    phone: str | None = Field(default=None, max_length=40)


class SubjectUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    address: str | None = Field(default=None, max_length=300)
    phone: str | None = Field(default=None, max_length=40)


class SubjectPublic(BaseModel):
    id: str
    contract_id: str
    name: str
    address: str | None
    phone: str | None
    restricted: bool
    created_at: datetime


class SubjectList(Page):
    items: list[SubjectPublic]


class ProjectCreate(Strict):
    contract_id: str = Field(min_length=1, max_length=32)
    reference: str = Field(min_length=1, max_length=64, description="The designer's own project code.")
    subject_id: str | None = Field(default=None, max_length=32)


class ProjectPublic(BaseModel):
    id: str
    contract_id: str
    subject_id: str | None
    reference: str
    created_at: datetime


class ProjectList(Page):
    items: list[ProjectPublic]


class PhotoPublic(BaseModel):
    id: str
    project_id: str
    state: Literal["uploading", "quarantined", "anonymising", "anonymised", "rejected"]
    length: int
    faces_blurred: int
    plates_blurred: int
    width: int | None = Field(description="Width of the anonymised, upright JPEG.")
    height: int | None = Field(description="Height of the anonymised, upright JPEG.")
    uploaded_width: int | None = Field(
        default=None,
        description="Width of the photo as uploaded, before orientation: the frame a reference's and a "
        "placement's pixels are given in (for a HEIC, after its clean-aperture crop).",
    )
    uploaded_height: int | None = Field(default=None, description="Height of the photo as uploaded.")
    uploaded_orientation: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="The EXIF orientation (1-8) that turns the uploaded frame upright: the EXIF tag of a JPEG, "
        "or a HEIC's irot/imir boxes (whatever its EXIF tag says).",
    )
    sha256: str | None = Field(description="SHA-256 of the anonymised JPEG.")
    error: str | None
    created_at: datetime


class PhotoList(Page):
    items: list[PhotoPublic]


class DesignCreate(Strict):
    descriptor: DesignDescriptor = Field(default_factory=DesignDescriptor)


class DesignPublic(BaseModel):
    id: str
    project_id: str
    descriptor: dict[str, Any]
    file_format: str | None
    size: int | None
    created_at: datetime


class DesignList(Page):
    items: list[DesignPublic]


class JobCreate(Strict):
    design_id: str = Field(min_length=1, max_length=32)
    reference: ScaleReference = Field(description="Scale reference; segment images are photo ids.")
    placement: PlacementSpec = Field(description="Where the design goes; `image` is a photo id.")


class JobPublic(BaseModel):
    id: str
    project_id: str
    kind: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    stage: str | None
    progress: float
    attempts: int
    pipeline_version: str
    result: dict[str, Any] | None
    timings: dict[str, Any]
    error: str | None
    created_at: datetime
    updated_at: datetime


class JobList(Page):
    items: list[JobPublic]


class PlanFilePublic(BaseModel):
    name: str
    media_type: str
    size: int
    sha256: str
    url: str


class PlanPublic(BaseModel):
    job_id: str
    files: list[PlanFilePublic]


class Health(BaseModel):
    status: Literal["ok"]
    pipeline_version: str
