"""Inputs off the usual path are still redacted: grayscale photos, a long panorama."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from privacy.anonymize import anonymize
from privacy.boxes import Box
from tests.privacy.face_crops import face_crops
from tests.privacy.face_paste import paste_faces
from tests.privacy.hidden import HIDDEN_BELOW, highpass_correlation
from tests.privacy.plate_crops import paste_plate, plate_crops
from tests.privacy.test_faces_plates import covered


def _jpeg(a: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.slow
def test_a_grayscale_photo_has_its_faces_and_plate_redacted(data: Path) -> None:
    """A one-channel JPEG (mode L): faces and a plate pasted into a Sceaux photo are found in
    the grey pixels and hidden in the output."""
    site = np.asarray(Image.open(data / "sfm" / "sceaux-castle" / "images" / "100_7101.JPG").convert("RGB")).copy()
    faces = paste_faces(site[:1200], face_crops(data / "faces" / "dlib-pascal")[:12], 32)
    crop, plate = plate_crops(data / "plates" / "eu")[5]
    placed = paste_plate(site, crop, plate, 24, 300, 1400)
    data_l = _jpeg(site, "L")
    original = np.asarray(Image.open(io.BytesIO(data_l)).convert("RGB"))
    photo = anonymize(data_l)
    out = np.asarray(Image.open(io.BytesIO(photo.jpeg)).convert("RGB"))
    hidden = sum(highpass_correlation(original, out, f) < HIDDEN_BELOW for f in faces)
    assert hidden >= len(faces) - 1, f"{hidden}/{len(faces)}"
    assert covered(placed, photo.plates, grow=1.1)


@pytest.mark.slow
def test_a_long_panorama_is_redacted_end_to_end(data: Path) -> None:
    """A 12000 x 1200 panorama (10:1, as a phone stitches one): faces at both ends and a plate
    near the right end are found and hidden; tiles of the fine level cover its whole length."""
    strip = np.asarray(Image.open(data / "sfm" / "sceaux-castle" / "images" / "100_7104.JPG").convert("RGB"))
    strip = cv2.resize(strip, (1600, 1200), interpolation=cv2.INTER_AREA)
    pano = np.ascontiguousarray(np.tile(strip, (1, 8, 1))[:, :12000])
    crops = face_crops(data / "faces" / "dlib-pascal")
    left = paste_faces(pano[:, :1500], crops[:6], 20)
    right_view = pano[:, 10400:]
    right = [Box(b.x + 10400, b.y, b.w, b.h) for b in paste_faces(right_view, crops[6:12], 40)]
    # A plate the detector finds at this size in a plain photo: this test is about the shape.
    crop, plate = plate_crops(data / "plates" / "eu")[6]
    placed = paste_plate(pano, crop, plate, 20, 11000, 700)
    src = _jpeg(pano)
    original = np.asarray(Image.open(io.BytesIO(src)).convert("RGB"))
    photo = anonymize(src)
    out = np.asarray(Image.open(io.BytesIO(photo.jpeg)).convert("RGB"))
    faces = left + right
    hidden = sum(highpass_correlation(original, out, f) < HIDDEN_BELOW for f in faces)
    assert hidden >= len(faces) - 1, f"{hidden}/{len(faces)}"
    assert covered(placed, photo.plates, grow=1.1)
