"""Detectors on real labelled photos, redaction strength, and small faces in big photos."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pytest
from PIL import Image

from privacy.anonymize import AnonymizationPolicy, anonymize
from privacy.blur import redact
from privacy.boxes import Box, iou
from privacy.faces import CenterFaceConfig, CenterFaceDetector
from privacy.plates import ClassicalPlateDetector
from tests.privacy.face_crops import face_crops
from tests.privacy.face_paste import paste_faces
from tests.privacy.hidden import HIDDEN_BELOW, highpass_correlation, laplacian_variance
from tests.privacy.plate_crops import paste_plate, plate_crops, plate_split


def covered(label: Box, boxes: list[Box], *, grow: float) -> bool:
    """Blurred-box IoU >= 0.3 with the label, or the label 90 % covered."""
    for b in boxes:
        g = Box(b.x - b.w * (grow - 1) / 2, b.y - b.h * (grow - 1) / 2, b.w * grow, b.h * grow)
        ix = max(0.0, min(g.x + g.w, label.x + label.w) - max(g.x, label.x))
        iy = max(0.0, min(g.y + g.h, label.y + label.h) - max(g.y, label.y))
        if iou(label, g) >= 0.3 or ix * iy >= 0.9 * label.w * label.h:
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_face_recall_on_labelled_photos(data: Path, precision: Literal["fp32", "int8"]) -> None:
    """Both precisions (int8 is the CPU default; the int8 model is calibrated on sample_data
    site photos and synthetic images, never on these faces). Measured: 43/43 each."""
    d = data / "faces" / "dlib-pascal"
    ann = json.loads((d / "annotations_xywh.json").read_text())
    det = CenterFaceDetector(CenterFaceConfig(precision=precision))
    found = total = 0
    for name, a in ann.items():
        rgb = np.asarray(Image.open(d / name).convert("RGB"))
        boxes = det.detect(rgb)
        for x, y, w, h in a["boxes_xywh"]:
            total += 1
            found += covered(Box(x, y, w, h), boxes, grow=1.45)
    assert total == 43
    assert found / total >= 0.95
    # The negative: no faces on a photo of dogs.
    dogs = np.asarray(Image.open(d / "dogs.jpg").convert("RGB"))
    assert len(det.detect(dogs)) <= 1


# Held-out recall claimed per set (docs/privacy.md): measured 19/19 on EU, 100/114 on US (97
# before dim rows were stretched); the tune halves (what the character-row cue was tuned on) gave
# 34/35 and 100/108.
HELD_OUT_RECALL = {"eu": 0.95, "us": 0.86}


@pytest.mark.slow
@pytest.mark.parametrize("country", ["eu", "us"])
def test_plate_recall_on_the_held_out_half(data: Path, country: str) -> None:
    """Each plate set is split by a hash of the file name (plate_split); the detector was tuned
    on the other half only. US plates are 2:1, white with coloured art, a state name, stickers."""
    det = ClassicalPlateDetector()
    held_out = plate_split(data / "plates" / country)["held_out"]
    assert len(held_out) == {"eu": 19, "us": 114}[country]
    found = 0
    for txt in held_out:
        name, x, y, w, h = txt.read_text().split()[:5]
        rgb = np.asarray(Image.open(txt.parent / name).convert("RGB"))
        found += covered(Box(float(x), float(y), float(w), float(h)), det.detect(rgb), grow=1.1)
    assert found / len(held_out) >= HELD_OUT_RECALL[country], f"{found}/{len(held_out)}"


@pytest.mark.slow
def test_a_plate_cut_by_the_border_is_still_redacted(data: Path) -> None:
    """EU photos cropped so that the plate's last quarter lies outside the photo: what is left of
    it is still found and redacted (a plate's glyph row is what makes it legible)."""
    det = ClassicalPlateDetector()
    found = tried = 0
    for txt in plate_split(data / "plates" / "eu")["held_out"][:8]:
        name, *xywh = txt.read_text().split()[:5]
        x, y, w, h = map(float, xywh)
        rgb = np.asarray(Image.open(txt.parent / name).convert("RGB"))
        cut = np.ascontiguousarray(rgb[:, : int(x + 0.75 * w)])
        if not covered(Box(x, y, w, h), det.detect(rgb), grow=1.1):
            continue  # not found whole: not this test's case
        tried += 1
        found += covered(Box(x, y, 0.75 * w, h), det.detect(cut), grow=1.1)
    assert tried >= 6 and found >= tried - 1, f"{found}/{tried}"


@pytest.mark.slow
def test_distant_plates_in_a_full_size_photo(data: Path) -> None:
    """Plates 15-25 m away: glyphs of 10-14 px in a 12 MP photo (legible there). Nine labelled
    plates, with their cars, pasted at those sizes into a site photo at 4000 x 2667 (measured:
    9/9, and 1/9 with one threshold per photo and no native pass; bench/plates.py has the curve)."""
    im = Image.open(data / "sfm" / "strecha-fountain-P11" / "images" / "0004.jpg").convert("RGB")
    site = np.asarray(im.resize((4000, 2667), Image.Resampling.LANCZOS)).copy()
    crops = plate_crops(data / "plates" / "eu")[3::6][:9]
    placed = [
        paste_plate(site, crop, plate, 10 + 2 * (i % 3), 200 + (i % 3) * 1300, 300 + (i // 3) * 850)
        for i, (crop, plate) in enumerate(crops)
    ]
    buf = io.BytesIO()
    Image.fromarray(site).save(buf, "JPEG", quality=92)
    boxes = ClassicalPlateDetector().detect(np.asarray(Image.open(buf).convert("RGB")))
    hits = sum(covered(b, boxes, grow=1.1) for b in placed)
    assert hits >= 7, f"{hits}/9 distant plates found"


@pytest.mark.slow
def test_plate_detector_stays_quiet_on_plate_free_photos(data: Path) -> None:
    """Precision: stone, windows, arches and foliage are not plates. Measured: 21 boxes on 44
    (fountain 0, Sceaux 7, Sacre-Coeur 13 (signs and shop fronts), dlib-pascal 1); 20 before dim
    rows were stretched, 7 before the character-row cue, 15 with its clear-plate pass alone."""
    sfm = data / "sfm"
    photos = [
        *sorted((sfm / "strecha-fountain-P11" / "images").glob("*.jpg")),
        *sorted((sfm / "sceaux-castle" / "images").glob("*.JPG")),
        *sorted((sfm / "sacre-coeur").rglob("*.jpg")),
        *sorted((data / "faces" / "dlib-pascal").glob("*.jpg")),
    ]
    assert len(photos) == 44
    det = ClassicalPlateDetector()
    boxes = sum(len(det.detect(np.asarray(Image.open(p).convert("RGB")))) for p in photos)
    assert boxes <= 21


def test_redaction_in_place_touches_only_the_boxes(data: Path) -> None:
    rgb = np.asarray(Image.open(data / "faces" / "dlib-pascal" / "bald_guys.jpg").convert("RGB")).copy()
    before = rgb.copy()
    out = redact(rgb, [Box(600, 400, 300, 300)], ellipse=False, grow=1.0, inplace=True)
    assert out is rgb
    assert not np.array_equal(rgb[400:700, 600:900], before[400:700, 600:900])
    rgb[400:700, 600:900] = before[400:700, 600:900]
    assert np.array_equal(rgb, before)


FACE_SIZES = (12, 16, 24, 40, 64, 128)


@pytest.mark.slow
def test_redaction_leaves_nothing_of_real_faces_at_every_size(data: Path) -> None:
    """The gate as a whole (detection and redaction, default policy): the 43 dlib-pascal faces
    pasted at 12-128 px into a fountain and a Sceaux photo (alternately), each output read back
    from its JPEG. A face is hidden when the high-pass correlation test says so (hidden.py).
    Measured: 43/43 at every size but 12 px (42/43; all 43 found); the old smoothed
    mosaic hid 72-84 % even at the true boxes. The plate pass is off (it could only blur more)."""
    crops = face_crops(data / "faces" / "dlib-pascal")
    sites = [
        data / "sfm" / "strecha-fountain-P11" / "images" / "0004.jpg",
        data / "sfm" / "sceaux-castle" / "images" / "100_7103.JPG",
    ]
    hidden = total = 0
    per_size: dict[int, str] = {}
    for i, px in enumerate(FACE_SIZES):
        site = np.asarray(Image.open(sites[i % 2]).convert("RGB")).copy()
        faces = paste_faces(site, crops, px)
        assert len(faces) == 43
        buf = io.BytesIO()
        Image.fromarray(site).save(buf, "JPEG", quality=95)
        original = np.asarray(Image.open(buf).convert("RGB"))
        photo = anonymize(buf.getvalue(), AnonymizationPolicy(blur_plates=False))
        out = np.asarray(Image.open(io.BytesIO(photo.jpeg)).convert("RGB"))
        ok = sum(highpass_correlation(original, out, f) < HIDDEN_BELOW for f in faces)
        per_size[px] = f"{ok}/{len(faces)}"
        hidden += ok
        total += len(faces)
        # The blur stays local: the photo as a whole keeps its sharpness.
        assert laplacian_variance(out) >= 0.8 * laplacian_variance(original), px
    assert hidden / total >= 0.98, per_size
    small = [int(per_size[px].split("/")[0]) for px in (12, 16, 24)]
    assert sum(small) / (3 * 43) >= 0.95, per_size


def test_redaction_hides_at_the_true_boxes_for_any_strength(data: Path) -> None:
    """The redaction alone, at the faces' true boxes: every strength the policy allows passes
    the correlation test, from 12 px to 400 px faces (the floor); only the grown ellipse changes."""
    crops = face_crops(data / "faces" / "dlib-pascal")[::4]
    site = np.asarray(Image.open(data / "sfm" / "sceaux-castle" / "images" / "100_7105.JPG").convert("RGB"))
    for px, blocks in ((12, 6), (24, 32), (64, 2), (128, 6), (400, 32)):
        pasted = site.copy()
        faces = paste_faces(pasted, crops, px)
        assert faces
        out = redact(pasted, faces, blocks=blocks, grow=1.45)
        corr = [highpass_correlation(pasted, out, f) for f in faces]
        assert max(corr) < HIDDEN_BELOW, (px, blocks, corr)
        grown = np.zeros(pasted.shape[:2], bool)
        for f in faces:
            g = f.grown(1.45, 1.45, pasted.shape[1], pasted.shape[0])
            grown[int(g.y) : int(np.ceil(g.y + g.h)) + 1, int(g.x) : int(np.ceil(g.x + g.w)) + 1] = True
        assert np.array_equal(out[~grown], pasted[~grown])


def test_a_face_cut_by_the_border_is_hidden_whole(data: Path) -> None:
    """A face half outside the photo: the detector's box is clipped there, and the redaction
    covers the clipped box as a rectangle (an inscribed ellipse would leave its cut corners)."""
    crops = face_crops(data / "faces" / "dlib-pascal")
    c, (fx, fy, fw, fh) = max(crops, key=lambda c: c[1][3])
    site = np.asarray(Image.open(data / "sfm" / "sceaux-castle" / "images" / "100_7105.JPG").convert("RGB")).copy()
    s = 160 / fh
    big = cv2.resize(c, (round(c.shape[1] * s), round(c.shape[0] * s)), interpolation=cv2.INTER_CUBIC)
    # Pasted so that the left 40 % of the face lies outside the photo, the top 30 % above it.
    X, Y = round(-fx * s - 0.4 * fw * s), round(-fy * s - 0.3 * fh * s)
    part = big[-Y:, -X:]
    site[: part.shape[0], : part.shape[1]] = part
    face = Box(0, 0, fw * s * 0.6, fh * s * 0.7)  # the visible part
    buf = io.BytesIO()
    Image.fromarray(site).save(buf, "JPEG", quality=95)
    original = np.asarray(Image.open(buf).convert("RGB"))
    photo = anonymize(buf.getvalue(), AnonymizationPolicy(blur_plates=False))
    out = np.asarray(Image.open(io.BytesIO(photo.jpeg)).convert("RGB"))
    assert covered(face, photo.faces, grow=1.45)
    assert highpass_correlation(original, out, face) < HIDDEN_BELOW
    # The corner itself, where an inscribed ellipse leaves pixels untouched.
    corner = Box(0, 0, face.w / 3, face.h / 3)
    assert highpass_correlation(original, out, corner) < HIDDEN_BELOW


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_small_faces_in_a_full_size_site_photo(data: Path, precision: Literal["fp32", "int8"]) -> None:
    """Faces of 20-40 px pasted into a 3072 x 2048 photo are found and blurred (12/12 measured
    at either precision)."""
    site = np.asarray(Image.open(data / "sfm" / "strecha-fountain-P11" / "images" / "0004.jpg").convert("RGB")).copy()
    rng = np.random.default_rng(7)
    crops = face_crops(data / "faces" / "dlib-pascal")
    rng.shuffle(crops)
    placed = []
    for i, (c, (fx, fy, fw, fh)) in enumerate(crops[:12]):
        target = 20 + 20 * (i % 5) / 4  # 20..40 px faces
        s = target / fh
        cw, ch = max(1, round(c.shape[1] * s)), max(1, round(c.shape[0] * s))
        small = cv2.resize(c, (cw, ch), interpolation=cv2.INTER_AREA)
        X, Y = 150 + (i % 6) * 480, 400 + (i // 6) * 900
        site[Y : Y + ch, X : X + cw] = small
        placed.append(Box(X + fx * s, Y + fy * s, fw * s, fh * s))
    buf = io.BytesIO()
    Image.fromarray(site).save(buf, "JPEG", quality=95)
    photo = anonymize(buf.getvalue(), face_detector=CenterFaceDetector(CenterFaceConfig(precision=precision)))
    hits = sum(covered(b, photo.faces, grow=1.45) for b in placed)
    assert hits / len(placed) >= 0.9, f"{hits}/{len(placed)} small faces found"


@pytest.mark.slow
def test_the_fine_level_at_hints_finds_what_it_found_everywhere(data: Path) -> None:
    """Faces of 12-19 px are looked for in the enlarged photo only around hints from the photo's
    own scale (CenterFaceConfig.hint_threshold, hint_margin_px). The 43 dlib-pascal faces pasted
    at 12 and 16 px into a Sceaux photo held out from those settings' choice (docs/privacy.md):
    at most 2 fewer found than with the fine level everywhere (measured at 12 px: 38 against 39),
    for fewer model pixels (measured 60 %: 43 faces packed in rows make large windows; the bench's
    sparse photos save more, docs/privacy.md). On the 5 held-out photos of docs/privacy.md: 102/108
    at 12 px against 103/108 everywhere, 107 and 108 at 14 and 16 px, as everywhere."""
    site = np.asarray(Image.open(data / "sfm" / "sceaux-castle" / "images" / "100_7101.JPG").convert("RGB"))
    crops = face_crops(data / "faces" / "dlib-pascal")
    dets = {t: CenterFaceDetector(CenterFaceConfig(hint_threshold=t)) for t in (0.0, 0.05)}
    model_px = dict.fromkeys(dets, 0)
    for t, d in dets.items():
        run = d._run

        def counted(img: np.ndarray, *, _t: float = t, _run: object = run, **kw: object) -> list[Box]:
            model_px[_t] += img.shape[0] * img.shape[1]
            return _run(img, **kw)  # type: ignore[operator]

        d._run = counted  # type: ignore[method-assign]
    for px in (12, 16):
        pasted = site.copy()
        faces = paste_faces(pasted, crops, px)
        buf = io.BytesIO()
        Image.fromarray(pasted).save(buf, "JPEG", quality=92)
        img = np.asarray(Image.open(buf).convert("RGB"))
        boxes = {t: d.detect(img) for t, d in dets.items()}
        found = {t: sum(covered(f, b, grow=1.45) for f in faces) for t, b in boxes.items()}
        assert found[0.05] >= found[0.0] - 2, f"{px} px: {found[0.05]} at hints, {found[0.0]} everywhere"
        assert found[0.05] >= 0.85 * len(faces), f"{px} px: {found[0.05]}/{len(faces)}"
    assert model_px[0.05] < 0.7 * model_px[0.0], model_px


@pytest.mark.slow
@pytest.mark.parametrize("face_px", [250, 1300])
def test_large_faces_are_found(data: Path, face_px: int) -> None:
    """A face across the fine level's tile border, and a close-up face larger than its tiles."""
    from privacy.faces import tiles

    site = np.asarray(Image.open(data / "sfm" / "strecha-fountain-P11" / "images" / "0004.jpg").convert("RGB")).copy()
    crops = face_crops(data / "faces" / "dlib-pascal")
    c, (fx, fy, fw, fh) = max(crops, key=lambda c: c[1][3])  # the largest labelled face
    s = face_px / fh
    big = cv2.resize(c, (round(c.shape[1] * s), round(c.shape[0] * s)), interpolation=cv2.INTER_CUBIC)
    # The face's box starts 60 px left of the first overlap between fine tiles, and ends right of it.
    border = sorted({x for _, x, _, _ in tiles(2048, 3072, 2_400_000, 128, 2400)})[1]
    X, Y = round(border - 60 - fx * s), max(0, round(1024 - (fy + fh / 2) * s))
    big = big[: 2048 - Y, : 3072 - X]
    site[Y : Y + big.shape[0], X : X + big.shape[1]] = big
    face = Box(X + fx * s, Y + fy * s, fw * s, fh * s)
    assert face.x < border and face.x + face.w > border + 128
    assert covered(face, CenterFaceDetector().detect(site), grow=1.45)


def test_space_to_depth_stem_computes_the_same_function() -> None:
    """The int8 graph's stem takes the image as 12 half-size planes; in fp32 the rewritten graph
    gives the shipped graph's outputs."""
    import onnx
    import onnxruntime as ort

    from privacy.faces import _dynamic_model_bytes, _input_blob, _space_to_depth_stem, centerface_weights

    fp32 = _dynamic_model_bytes(centerface_weights())
    model = onnx.load_from_string(fp32)
    _space_to_depth_stem(model)
    rgb = np.random.default_rng(1).integers(0, 256, (70, 101, 3), dtype=np.uint8)  # padded to 96 x 128
    outs = []
    for graph, s2d in ((fp32, False), (model.SerializeToString(), True)):
        sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        outs.append(sess.run(["537", "538", "539"], {"input.1": _input_blob(rgb, s2d=s2d)}))
    for a, b in zip(*outs, strict=True):
        assert a.shape == b.shape
        assert np.allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_int8_model_is_built_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built from the shipped weights at first use (no download), then read from the cache."""
    from privacy import faces

    monkeypatch.setenv("SITEPLAN_CACHE_DIR", str(tmp_path))
    built = faces._int8_model()
    assert isinstance(built, bytes)
    cached = list(tmp_path.glob("centerface-int8-*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == built
    assert faces._int8_model() == str(cached[0])
    assert not list(tmp_path.glob(".*part"))
    # A damaged cache file is rebuilt, not run around forever.
    cached[0].write_bytes(built[:1000])
    det = faces.CenterFaceDetector(faces.CenterFaceConfig(intra_threads=1))
    monkeypatch.setattr(faces.CenterFaceDetector, "_sessions", {})
    session = det._session()
    assert session.get_inputs()[0].shape[1] == 12  # the int8 graph's space-to-depth input
    assert cached[0].read_bytes() == built


@pytest.mark.parametrize(("h", "w"), [(2048, 3072), (3024, 4032), (6000, 8000), (1, 1), (500, 2401)])
def test_tiles_cover_the_image_with_bounded_overlapping_tiles(h: int, w: int) -> None:
    from privacy.faces import tiles

    cover = np.zeros((h, w), np.uint8)
    grid = tiles(h, w, 2_400_000, 128, 2400)
    for y, x, th, tw in grid:
        assert th <= 2400 and tw <= 2400 and th * tw <= 2_400_000
        assert y >= 0 and x >= 0 and y + th <= h and x + tw <= w
        cover[y : y + th, x : x + tw] += 1
    assert cover.min() >= 1
    # Neighbouring tiles overlap by at least 128 px, so any face up to 128 px lies whole in one.
    for starts, n in (({y for y, _, _, _ in grid}, h), ({x for _, x, _, _ in grid}, w)):
        s = sorted(starts)
        side = grid[0][2] if n == h else grid[0][3]
        assert all(b - a <= side - 128 for a, b in itertools.pairwise(s))
    # Little waste: under 20 % of the pixels are scanned twice.
    assert sum(th * tw for _, _, th, tw in grid) <= 1.2 * h * w


@pytest.mark.slow
def test_parallel_batch_matches_one_by_one(data: Path, tmp_path: Path) -> None:
    """anonymize_dir runs photos side by side (one-thread detectors, a pixel budget): the same
    report, in the same order, as one photo at a time. The face tiles differ (1.6 MP in a
    batch, 2.4 MP alone), and with the fine level enlarged for 12 px faces one weak box in a
    crowd of 25 came and went between the two (26 vs 25): one face either way is allowed."""
    import shutil

    from privacy.anonymize import anonymize_dir

    src = tmp_path / "in"
    src.mkdir()
    for name in ("bald_guys.jpg", "2008_002470.jpg", "dogs.jpg"):
        shutil.copy(data / "faces" / "dlib-pascal" / name, src / name)
    shutil.copy(sorted((data / "plates" / "eu").glob("*.jpg"))[0], src / "car.jpg")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    one = anonymize_dir(src, tmp_path / "one", workers=1)
    par = anonymize_dir(src, tmp_path / "par", workers=2, max_pixels_in_flight=2_000_000)
    assert [e["input"] for e in par] == [e["input"] for e in one] == sorted(p.name for p in src.iterdir())
    for a, b in zip(one, par, strict=True):
        assert (a["error"] is None) == (b["error"] is None)
        assert abs(len(a["faces"]) - len(b["faces"])) <= 1 and len(a["plates"]) == len(b["plates"])
    assert sum(len(e["faces"]) for e in par) >= 5
