"""Photos: resumable uploads (tus 1.0 core + creation + termination) into the encrypted quarantine,
then the anonymised result.

An upload's id is its photo's id. Bytes are sealed chunk by chunk as they stream in (never the
whole photo in memory, never plaintext on disk). The type is sniffed from the first bytes and the
pixel count from the header, while the upload streams; the declared length caps the size.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import DB, ReadCaller, ServicesDep, UploadCaller
from api.errors import ERROR_RESPONSES, ApiError, not_found
from api.routes.common import IDEMPOTENCY_HELP, commit_or_conflict, count, fingerprint, remember, replay
from api.routes.projects import get_project, require_active
from api.schemas import PhotoList, PhotoPublic
from api.services import Services
from api.uploads import (
    Upload,
    UploadGone,
    close_guarded,
    drop_upload,
    expires,
    lock_path,
    locked,
    reread,
    staging_of,
    write_guarded,
    writing,
)
from dataprotection import register
from dataprotection.vault import CHUNK, UploadStaging
from privacy.decode import sniff_format
from privacy.errors import InvalidImage
from privacy.isolated import untrusted_size
from siteplan.db import Photo, tenant_session
from siteplan.states import PhotoState

log = logging.getLogger(__name__)
router = APIRouter(
    tags=["photos"],
    responses=ERROR_RESPONSES
    | {
        412: ERROR_RESPONSES[401] | {"description": "Tus-Resumable missing or not 1.0.0"},
        415: ERROR_RESPONSES[401] | {"description": "not an image, or the wrong content type"},
    },
)

TUS_VERSION = "1.0.0"
TUS_HEADERS = {"Tus-Resumable": TUS_VERSION}
_HEAD_BYTES = 256 * 1024  # enough for the header (and EXIF) of every phone format seen
_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/offset+octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _public(p: Photo) -> PhotoPublic:
    intr = p.intrinsics or {}
    return PhotoPublic(
        id=p.id,
        project_id=p.project_id,
        state=p.state,  # type: ignore[arg-type]
        length=p.length,
        faces_blurred=p.faces,
        plates_blurred=p.plates,
        width=intr.get("width"),
        height=intr.get("height"),
        uploaded_width=intr.get("original_width"),
        uploaded_height=intr.get("original_height"),
        uploaded_orientation=intr.get("orientation"),
        sha256=p.sha256,
        error=p.error,
        created_at=p.created_at,
    )


def _check_tus(version: str | None) -> None:
    if version != TUS_VERSION:
        raise ApiError(
            412, "precondition_failed", f"Tus-Resumable must be {TUS_VERSION}", headers={"Tus-Version": TUS_VERSION}
        )


@router.options(
    "/uploads", status_code=204, response_class=Response, responses={204: {"description": "tus capabilities"}}
)
def tus_options(svc: ServicesDep, _: UploadCaller) -> Response:
    return Response(
        status_code=204,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": "creation,termination,expiration",
            "Tus-Max-Size": str(svc.settings.max_upload_bytes),
        },
    )


@router.post(
    "/projects/{project_id}/uploads",
    status_code=201,
    response_class=Response,
    responses={
        201: {
            "description": "upload created; PATCH its Location",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        409: ERROR_RESPONSES[401] | {"description": "contract not active"},
        412: ERROR_RESPONSES[401] | {"description": "wrong tus version"},
        413: ERROR_RESPONSES[401] | {"description": "too large"},
    },
)
def create_upload(
    project_id: str,
    db: DB,
    svc: ServicesDep,
    c: UploadCaller,
    upload_length: Annotated[
        str, Header(pattern=r"^[0-9]{1,19}$", description="The photo's size in bytes (digits only, as tus says).")
    ],
    tus_resumable: Annotated[str | None, Header()] = None,
    upload_metadata: Annotated[
        str | None, Header(max_length=4096, description="Ignored: file names can be personal data.")
    ] = None,
    idempotency_key: Annotated[str | None, Header(description=IDEMPOTENCY_HELP)] = None,
) -> Response:
    _check_tus(tus_resumable)
    length = int(upload_length)
    if length < 1:
        raise ApiError(422, "invalid", "Upload-Length must be at least 1", field="Upload-Length")
    project = get_project(db, project_id)
    fp = fingerprint(svc, c.tenant_id, "POST", f"/projects/{project_id}/uploads", {"length": length})
    if (rec := replay(db, idempotency_key, fp)) is not None:
        if db.get(Photo, str((rec.body or {}).get("photo_id"))) is None:
            # The upload this key made was deleted since: its location would lead nowhere.
            raise ApiError(410, "gone", "the upload this Idempotency-Key created was deleted; use a new key")
        return Response(status_code=rec.status, headers=TUS_HEADERS | {"Location": rec.location or ""})
    require_active(db, project)
    if length > svc.settings.max_upload_bytes:
        raise ApiError(
            413,
            "too_large",
            f"a photo may be at most {svc.settings.max_upload_bytes // 2**20} MB",
            field="Upload-Length",
        )
    p = Photo(tenant_id=c.tenant_id, project_id=project.id, contract_id=project.contract_id, length=length)
    db.add(p)
    db.flush()
    loc = f"/v1/uploads/{p.id}"
    remember(db, tenant_id=c.tenant_id, key=idempotency_key, fp=fp, status=201, body={"photo_id": p.id}, location=loc)
    commit_or_conflict(db)
    return Response(
        status_code=201,
        headers=TUS_HEADERS | {"Location": loc, "Upload-Offset": "0", "Upload-Expires": expires(svc, time.time())},
    )


def _get_photo(db: DB, photo_id: str) -> Photo:
    p = db.get(Photo, photo_id)
    if p is None:
        raise not_found("photo")
    return p


def _refused(p: Photo | Upload) -> ApiError:
    # tus: an upload that is gone answers 410 and no Upload-Offset (a client must not take a
    # refused upload for a finished one).
    return ApiError(410, "upload_refused", f"this upload was refused: {p.error or 'see the photo'}; start a new one")


def _offset(db: DB, svc: Services, p: Photo) -> int:
    if p.state == PhotoState.UPLOADING:
        with locked(svc, p, exclusive=False, wait_s=10.0):
            p = reread(db, p.id)
            if p.state == PhotoState.UPLOADING:
                return _open_staging(svc, p.tenant_id, Upload(p.id, p.contract_id, p.length))[1]
    if p.state == PhotoState.REJECTED:
        raise _refused(p)
    return p.length


@router.head(
    "/uploads/{upload_id}",
    response_class=Response,
    responses={
        200: {"description": "Upload-Offset says how much arrived"},
        410: {"description": "the upload was refused (not an image, too large): start a new one"},
    },
)
def head_upload(
    upload_id: str, db: DB, svc: ServicesDep, _: UploadCaller, tus_resumable: Annotated[str | None, Header()] = None
) -> Response:
    _check_tus(tus_resumable)
    p = _get_photo(db, upload_id)
    return Response(
        status_code=200,
        headers=TUS_HEADERS
        | {"Upload-Offset": str(_offset(db, svc, p)), "Upload-Length": str(p.length), "Cache-Control": "no-store"},
    )


def _check_pixels(head: bytes, max_pixels: int) -> None:
    """Refuse a decompression bomb from its header, before the body has even finished arriving.
    The header is parsed in a sandbox child (privacy.sandbox): HEIF and WebP headers go through
    native parsers, and a hostile one must not take this server down."""
    size = untrusted_size(head)
    if size is None:
        return  # header not complete or not parseable here: the privacy gate decides at decode
    w, h = size
    if w * h > max_pixels:
        raise ApiError(
            413, "too_many_pixels", f"the image has {w * h / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:.0f}"
        )


# Exactly the types docs/api.md names (the gate's sniffer also knows GIF and BMP, to name them).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "HEIF")


def accepted_format(head: bytes) -> str:
    fmt = sniff_format(head)
    if fmt not in ACCEPTED_FORMATS:
        raise InvalidImage("unsupported_type", "not a supported image type (JPEG, PNG, WebP, TIFF, HEIC/HEIF)")
    return fmt


def _begin_patch(svc: Services, tenant_id: str, upload_id: str) -> Upload:
    # A short session of its own: no DB connection is held while the body streams in.
    with tenant_session(svc.factory, tenant_id) as db:
        p = _get_photo(db, upload_id)
        if p.state == PhotoState.REJECTED:
            raise _refused(p)
        if p.state != PhotoState.UPLOADING:
            raise ApiError(409, "offset_mismatch", "this upload is complete", headers={"Upload-Offset": str(p.length)})
        require_active(db, get_project(db, p.project_id))
        return Upload(p.id, p.contract_id, p.length, p.error)


def _open_staging(svc: Services, tenant_id: str, p: Upload) -> tuple[UploadStaging, int]:
    """The upload's staging and its offset, under the contract's data lock with the row read
    again (``writing``): an erasure or a termination that deleted the upload after the caller's
    check must not find its staging directory made again (it was, with a sealed header left in
    it), nor have its destroyed key asked for (a 500 after a termination). #24 D4."""
    with writing(svc, tenant_id, p):
        staging = staging_of(svc, p)
        return staging, staging.offset()


def _finish_patch(svc: Services, tenant_id: str, upload_id: str, actor: str, **values: object) -> None:
    with tenant_session(svc.factory, tenant_id) as db:
        p = _get_photo(db, upload_id)
        for k, v in values.items():
            setattr(p, k, v)
        if p.state == PhotoState.QUARANTINED:
            register.record(
                db,
                tenant_id=tenant_id,
                actor=actor,
                action="photo_received",
                categories=["photos"],
                purpose="site photo for a design (quarantined, encrypted)",
                ref=p.id,
            )
        db.commit()


def _publish(
    svc: Services, tenant_id: str, p: Upload, staging: UploadStaging, sealed_last: bool, offset: int, actor: str
) -> None:
    """The upload is whole: into the vault and quarantined, under the contract's lock (an
    erasure or termination either comes before, and this answers 410, or after, and takes it)."""
    with writing(svc, tenant_id, p):
        info = staging.publish(offset) if sealed_last else staging.complete()
        _finish_patch(svc, tenant_id, p.id, actor, original_object=info.object_id, state=PhotoState.QUARANTINED)


@router.patch(
    "/uploads/{upload_id}",
    status_code=204,
    response_class=Response,
    openapi_extra=_BODY,
    responses={
        204: {"description": "bytes stored; Upload-Offset is the new offset"},
        409: ERROR_RESPONSES[401] | {"description": "offset mismatch or upload busy"},
        410: ERROR_RESPONSES[401] | {"description": "the upload was refused earlier: start a new one"},
        412: ERROR_RESPONSES[401] | {"description": "wrong tus version"},
        413: ERROR_RESPONSES[401] | {"description": "too large"},
        415: ERROR_RESPONSES[401] | {"description": "not an image, or wrong content type"},
    },
)
async def patch_upload(
    upload_id: str,
    request: Request,
    svc: ServicesDep,
    c: UploadCaller,
    upload_offset: Annotated[str, Header(pattern=r"^[0-9]{1,19}$", description="Digits only, as tus says.")],
    content_type: Annotated[str | None, Header()] = None,
    content_length: Annotated[int | None, Header(ge=0)] = None,
    tus_resumable: Annotated[str | None, Header()] = None,
) -> Response:
    _check_tus(tus_resumable)
    if (content_type or "").split(";")[0].strip().lower() != "application/offset+octet-stream":
        raise ApiError(415, "unsupported_type", "upload chunks must be sent as application/offset+octet-stream")
    p = await run_in_threadpool(_begin_patch, svc, c.tenant_id, upload_id)
    max_pixels = svc.settings.max_upload_pixels
    with locked(svc, p, exclusive=True):
        # Again under the lock: a request we waited for may have finished or ended the upload.
        p = await run_in_threadpool(_begin_patch, svc, c.tenant_id, upload_id)
        staging, start = await run_in_threadpool(_open_staging, svc, c.tenant_id, p)
        if int(upload_offset) != start:
            raise ApiError(
                409,
                "offset_mismatch",
                f"the upload is at byte {start}, not {upload_offset}",
                headers={"Upload-Offset": str(start)},
            )
        if content_length is not None and start + content_length > p.length:
            # Refused before a byte is read: what arrived so far stays, the client can resume.
            raise ApiError(413, "too_large", f"this chunk goes past the declared Upload-Length ({p.length} bytes)")
        app = await run_in_threadpool(write_guarded, svc, c.tenant_id, p, partial(staging.appender, limit=p.length))
        head = bytearray() if start == 0 else None
        checked = start >= _HEAD_BYTES
        batch: list[bytes] = []  # pieces as received, handed to the sealing thread ~1 MiB at a time
        batched = 0
        refused: ApiError | None = None
        overflow: ApiError | None = None  # refuses the request, not the upload
        sniff_at = min(32, p.length)
        try:
            async for piece in request.stream():
                if head is not None and len(head) < _HEAD_BYTES:
                    head += piece[: _HEAD_BYTES - len(head)]
                    if len(head) >= sniff_at and start == 0 and len(head) - len(piece) < sniff_at:
                        try:
                            accepted_format(bytes(head))
                        except InvalidImage as exc:
                            refused = ApiError(415, "unsupported_type", str(exc))
                            break
                    if not checked and len(head) >= min(_HEAD_BYTES, p.length):
                        checked = True
                        await run_in_threadpool(_check_pixels, bytes(head), max_pixels)
                if app.offset + batched + len(piece) > p.length:
                    # Keep what arrived before this piece: HEAD tells the client where to resume.
                    overflow = ApiError(413, "too_large", "more bytes than the declared Upload-Length")
                    break
                batch.append(piece)
                batched += len(piece)
                if batched >= 4 * CHUNK:
                    await run_in_threadpool(write_guarded, svc, c.tenant_id, p, app.write_many, batch)
                    batch, batched = [], 0
            if batch and refused is None:
                await run_in_threadpool(write_guarded, svc, c.tenant_id, p, app.write_many, batch)
                batch, batched = [], 0
        except ClientDisconnect:
            log.info("upload %s: connection dropped at byte %d; it can resume", p.id[:8], app.offset + batched)
            if batch:
                await run_in_threadpool(write_guarded, svc, c.tenant_id, p, app.write_many, batch)
        except UploadGone:
            raise  # erased or ended under this request: nothing more is written (finally: no tail)
        except ApiError as exc:
            refused = exc
        finally:
            # The whole upload in and its head checked (in this request or, when it started past
            # the head, in an earlier one): seal the last chunk in place and publish it below
            # (3 fsyncs instead of 8: no tail file to write, read back and shred).
            whole = refused is None and overflow is None and checked and app.offset == p.length
            await run_in_threadpool(close_guarded, svc, c.tenant_id, p, app, whole)
        offset = app.offset
        if overflow is not None and refused is None:
            raise ApiError(overflow.status, overflow.code, overflow.message, headers={"Upload-Offset": str(offset)})
        if refused is None and head is None and not checked and offset >= min(_HEAD_BYTES, p.length):
            first = await run_in_threadpool(write_guarded, svc, c.tenant_id, p, staging.head, _HEAD_BYTES)
            try:
                accepted_format(first)
                _check_pixels(first, max_pixels)
            except InvalidImage as exc:
                refused = ApiError(415, "unsupported_type", str(exc))
            except ApiError as exc:
                refused = exc
        if refused is not None:
            await run_in_threadpool(staging.discard)
            await run_in_threadpool(
                _finish_patch, svc, c.tenant_id, p.id, c.token_id, state=PhotoState.REJECTED, error=refused.message
            )
            lock_path(svc, p).unlink(missing_ok=True)
            raise refused
        if offset == p.length:
            await run_in_threadpool(_publish, svc, c.tenant_id, p, staging, app.sealed_last, offset, c.token_id)
            lock_path(svc, p).unlink(missing_ok=True)  # still held: a waiter reads the new state
            runner = svc.runner
            if runner is not None:
                runner.submit_ingest(p.id, c.tenant_id)
    headers = TUS_HEADERS | {"Upload-Offset": str(offset)}
    if offset < p.length:
        headers["Upload-Expires"] = expires(svc, time.time())
    return Response(status_code=204, headers=headers)


@router.delete("/uploads/{upload_id}", status_code=204, response_class=Response)
def delete_upload(
    upload_id: str, db: DB, svc: ServicesDep, _: UploadCaller, tus_resumable: Annotated[str | None, Header()] = None
) -> Response:
    """tus termination: drop an unfinished upload and what arrived of it."""
    _check_tus(tus_resumable)
    p = _get_photo(db, upload_id)
    if p.state != PhotoState.UPLOADING:
        raise ApiError(409, "conflict", "this upload is complete; delete the photo instead")
    drop_upload(db, svc, p)
    return Response(status_code=204, headers=TUS_HEADERS)


@router.get("/projects/{project_id}/photos", response_model=PhotoList)
def list_photos(
    project_id: str,
    db: DB,
    _: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> PhotoList:
    get_project(db, project_id)
    stmt = select(Photo).where(Photo.project_id == project_id).order_by(Photo.created_at, Photo.id)
    rows = db.scalars(stmt.limit(limit).offset(offset)).all()
    return PhotoList(items=[_public(r) for r in rows], total=count(db, stmt), limit=limit, offset=offset)


@router.get("/photos/{photo_id}", response_model=PhotoPublic)
def get_photo(photo_id: str, db: DB, _: ReadCaller) -> PhotoPublic:
    return _public(_get_photo(db, photo_id))


@router.get(
    "/photos/{photo_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "the anonymised JPEG"},
        409: ERROR_RESPONSES[401] | {"description": "not anonymised yet"},
    },
)
def get_photo_content(photo_id: str, db: DB, svc: ServicesDep, _: ReadCaller) -> StreamingResponse:
    p = _get_photo(db, photo_id)
    if p.state != PhotoState.ANONYMISED or p.object is None:
        raise ApiError(409, "not_ready", f"the photo is {p.state}; only anonymised photos can be downloaded")
    return StreamingResponse(
        svc.vault.open(p.contract_id, p.object),
        media_type="image/jpeg",
        headers={"Cache-Control": "private, no-store"},
    )


@router.delete("/photos/{photo_id}", status_code=204, response_class=Response)
def delete_photo(photo_id: str, db: DB, svc: ServicesDep, _: UploadCaller) -> Response:
    """Erase one photo: its anonymised copy and any kept original are shredded."""
    p = _get_photo(db, photo_id)
    if p.state == PhotoState.UPLOADING:
        drop_upload(db, svc, p)
        return Response(status_code=204)
    for obj in (p.object, p.original_object):
        if obj:
            svc.vault.delete(p.contract_id, obj)
    db.delete(p)
    db.commit()
    return Response(status_code=204)
