"""Coordinates given in the photo as uploaded (DESIGN.md 3.3: before any orientation) reach the
anonymised, upright photo: the sidecar records the transform the decoder really applied.

pillow-heif decodes a HEIF upright (libheif applies its irot/imir boxes) and resets the EXIF
orientation to 1; the gate then recorded orientation 1 and the upright size, and a reference
clicked in an iPhone photo as stored (4032 x 3024, a quarter turn) was read as if upright."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageOps

from privacy.anonymize import AnonymizationPolicy, anonymize
from privacy.decode import heif_transforms
from privacy.metadata import orient_point

pillow_heif.register_heif_opener()

NO_DETECTION = AnonymizationPolicy(blur_faces=False, blur_plates=False)


def _stored() -> Image.Image:
    """A 96 x 64 image (as stored) with three coloured marks, near three of its corners."""
    a = np.full((64, 96, 3), 40, np.uint8)
    a[4:12, 6:14] = (255, 0, 0)  # near the top-left
    a[4:12, 80:88] = (0, 255, 0)  # near the top-right
    a[50:58, 6:14] = (0, 0, 255)  # near the bottom-left
    return Image.fromarray(a)


MARKS = {(0, 10.0, 8.0): "red", (1, 84.0, 8.0): "green", (2, 10.0, 54.0): "blue"}


def _save(im: Image.Image, fmt: str, k: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = k
    buf = io.BytesIO()
    if fmt == "HEIF":
        im.save(buf, "HEIF", exif=exif.tobytes(), quality=-1)  # lossless; irot/imir from the tag
    elif fmt == "AVIF":
        im.save(buf, "AVIF", exif=exif.tobytes(), quality=100)  # Pillow's own plugin: irot/imir too
    else:
        im.save(buf, fmt, exif=exif.tobytes(), quality=98)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "JPEG"])
@pytest.mark.parametrize("k", range(1, 9))
def test_a_point_in_the_uploaded_frame_lands_on_the_same_pixel_upright(fmt: str, k: int) -> None:
    """HEIF through pillow-heif (libheif turns the pixels, the EXIF tag is reset), AVIF through
    Pillow's own plugin (it does not turn them: it reports irot/imir as the EXIF orientation,
    and treating it like a HEIF left AVIF photos sideways), JPEG by its tag."""
    stored = _stored()
    data = _save(stored, fmt, k)
    if fmt in ("HEIF", "AVIF"):
        # pillow-heif / libavif wrote the orientation as HEIF boxes (and reset the tag): the case is real.
        steps = [n for n, _ in heif_transforms(data)]
        assert ("irot" in steps or "imir" in steps) == (k != 1)
    if fmt == "HEIF":
        assert Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) == 1
    photo = anonymize(data, NO_DETECTION)
    intr = photo.intrinsics
    assert (intr.original_width, intr.original_height) == stored.size, "the sidecar names the stored size"
    assert intr.orientation == k, "the sidecar names the transform the decoder applied"
    out = np.asarray(Image.open(io.BytesIO(photo.jpeg)).convert("RGB"))
    turned = stored.copy()
    turned.getexif()[0x0112] = k
    assert out.shape[:2] == np.asarray(ImageOps.exif_transpose(turned)).shape[:2]
    for (channel, u, v), _ in MARKS.items():
        x, y = orient_point(u, v, intr.original_width, intr.original_height, intr.orientation)
        px = out[int(y), int(x)]
        assert px[channel] > 180 and px.sum() - px[channel] < 150, (fmt, k, channel, (x, y), px)


@pytest.mark.parametrize(
    ("name", "stored", "orientation"),
    [
        ("mobile/iphone_13_pro_max.HEIC", (4032, 3024), 6),  # EXIF 6 and irot 3 (a quarter turn clockwise)
        ("mobile/HMD_Nokia_8.3_5G.heif", (4608, 3456), 6),  # EXIF says 1; only irot turns it
        ("mobile/HMD_Nokia_8.3_5G_hdr.heif", (4608, 3456), 1),
        ("IMG_5195.HEIC", (2566, 3313), 1),  # irot 0
    ],
)
def test_real_phone_heif_records_its_stored_frame(
    data: Path, name: str, stored: tuple[int, int], orientation: int
) -> None:
    photo = anonymize((data / "exif" / "exif-samples" / "heic" / name).read_bytes(), NO_DETECTION)
    intr = photo.intrinsics
    assert (intr.original_width, intr.original_height) == stored
    assert intr.orientation == orientation
    upright = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
    assert (intr.width, intr.height) == upright
    # The stored frame's corners land on the upright photo's corners.
    corners = {orient_point(u, v, *stored, orientation) for u, v in ((0, 0), (stored[0], 0), (0, stored[1]), stored)}
    assert corners == {(0.0, 0.0), (float(upright[0]), 0.0), (0.0, float(upright[1])), tuple(map(float, upright))}


@pytest.mark.parametrize("k", range(1, 9))
def test_real_camera_jpeg_of_every_orientation(data: Path, k: int) -> None:
    """exif-samples' landscape_1..8 (the same photo stored for each orientation)."""
    src = data / "exif" / "exif-samples" / "jpg" / "orientation" / f"landscape_{k}.jpg"
    with Image.open(src) as im:
        stored = im.size
        assert im.getexif()[0x0112] == k
    photo = anonymize(src.read_bytes(), NO_DETECTION)
    intr = photo.intrinsics
    assert (intr.original_width, intr.original_height, intr.orientation) == (*stored, k)
    ref = anonymize((src.parent / "landscape_1.jpg").read_bytes(), NO_DETECTION)
    assert (intr.width, intr.height) == (ref.intrinsics.width, ref.intrinsics.height)


@pytest.mark.slow
@pytest.mark.parametrize("k", [5, 6, 7, 8])
def test_faces_in_a_turned_heif_are_still_redacted(data: Path, k: int) -> None:
    """A dlib-pascal photo stored turned in a HEIF (orientations 5-8): the faces are found in the
    upright pixels, as in the photo stored upright (10 faces labelled)."""
    upright = Image.open(data / "faces" / "dlib-pascal" / "2008_002079.jpg").convert("RGB")
    inverse = {
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    policy = AnonymizationPolicy(blur_plates=False)
    ref = anonymize(_save(upright, "HEIF", 1), policy)
    photo = anonymize(_save(upright.transpose(inverse[k]), "HEIF", k), policy)
    assert (photo.intrinsics.width, photo.intrinsics.height) == upright.size
    assert len(photo.faces) >= len(ref.faces) - 1 >= 7


def test_the_api_states_the_uploaded_frame(data: Path, tmp_path: Path) -> None:
    """GET /v1/photos/{id} names the frame a client clicks in: the iPhone HEIC's stored size and
    its quarter turn, beside the upright JPEG's size."""
    from siteplan.db import Photo
    from tests.api.conftest import open_sqlite_api

    heic = data / "exif" / "exif-samples" / "heic" / "mobile" / "iphone_13_pro_max.HEIC"
    photo = anonymize(heic.read_bytes(), NO_DETECTION)
    with open_sqlite_api(tmp_path) as api:
        t = api.tenant()
        r = api.client.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "J"}, headers=t.auth)
        subject = r.json()["id"]
        r = api.client.post(
            "/v1/projects", json={"contract_id": t.contract_id, "reference": "P", "subject_id": subject}, headers=t.auth
        )
        assert r.status_code == 201, r.text
        obj = api.svc.vault.put(t.contract_id, photo.jpeg)
        with api.svc.factory.begin() as db:
            p = Photo(
                tenant_id=t.id,
                project_id=r.json()["id"],
                contract_id=t.contract_id,
                length=len(photo.jpeg),
                state="anonymised",
                object=obj.object_id,
                sha256=obj.sha256,
                intrinsics=photo.intrinsics.to_json(),
            )
            db.add(p)
            db.flush()
            pid = p.id
        body = api.client.get(f"/v1/photos/{pid}", headers=t.auth).json()
    assert (body["width"], body["height"]) == (3024, 4032)
    assert (body["uploaded_width"], body["uploaded_height"], body["uploaded_orientation"]) == (4032, 3024, 6)
