"""The gate rebuilds every image: checked with exiftool, an independent reader."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privacy.anonymize import AnonymizationPolicy, anonymize, anonymize_dir, anonymize_file
from privacy.errors import InvalidImage
from privacy.metadata import orient_point

# Everything exiftool may report on an output: the container, and the four tags we write.
ALLOWED_GROUPS = {"ExifTool", "System", "File", "JFIF", "Composite"}
ALLOWED_TAGS = {
    "IFD0:Orientation",
    "ExifIFD:FocalLength",
    "ExifIFD:FocalLengthIn35mmFormat",
    "ExifIFD:ExifImageWidth",
    "ExifIFD:ExifImageHeight",
}


# exiftool's group names (prefixes) for what the report's `removed` must then list.
REPORTED_GROUPS = {
    "GPS": ("GPS",),
    "Thumbnail": ("IFD1",),
    "XMP": ("XMP-",),
    "IPTC": ("IPTC",),
    "ICC": ("ICC_Profile",),
    "MultiPicture": ("MPF",),
    "JUMBF": ("JUMBF",),
}


def exiftool(paths: list[Path]) -> list[dict[str, object]]:
    exe = shutil.which("exiftool")
    assert exe, "exiftool (Debian libimage-exiftool-perl) is needed; `make test` installs it"
    out = subprocess.run([exe, "-j", "-a", "-G1", "-s", *map(str, paths)], capture_output=True, check=False)
    return list(json.loads(out.stdout))


@pytest.mark.slow
def test_every_shared_camera_file_leaves_nothing_identifying(data: Path, tmp_path: Path) -> None:
    files = sorted(p for p in (data / "exif").rglob("*") if p.is_file())
    outputs: list[Path] = []
    reported: dict[str, list[str]] = {}
    for i, p in enumerate(files):
        e = anonymize_file(p, tmp_path / str(i))
        if e["error"] is None:
            outputs.append(tmp_path / str(i) / e["output"])
            reported[str(p)] = e["removed"]
        else:
            assert e["output"] is None
            assert not list((tmp_path / str(i)).glob("*.jpg")) if (tmp_path / str(i)).exists() else True
    assert len(outputs) >= 140, "most camera files must decode"
    # The report names what each source carried: what exiftool finds in the source is listed.
    missed: dict[str, list[str]] = {}
    for rec in exiftool([Path(f) for f in reported]):
        groups = {k.split(":")[0] for k in rec if ":" in k}
        expected = {name for name, prefixes in REPORTED_GROUPS.items() if any(g.startswith(prefixes) for g in groups)}
        lost = sorted(expected - set(reported[str(rec["SourceFile"])]))
        if lost:
            missed[Path(str(rec["SourceFile"])).name] = lost
    assert not missed, missed
    assert sum("GPS" in r for r in reported.values()) >= 15, "the GPS-tagged samples were read and recognised"
    leaks: dict[str, list[str]] = {}
    for rec in exiftool(outputs):
        extra = [
            k for k in rec if k != "SourceFile" and k.split(":")[0] not in ALLOWED_GROUPS and k not in ALLOWED_TAGS
        ]
        if extra:
            leaks[str(rec["SourceFile"])] = extra
    assert not leaks, leaks
    # No partial files anywhere.
    assert not list(tmp_path.rglob(".tmp-*"))


def test_heic_with_gps_thumbnail_and_gain_map(data: Path, tmp_path: Path) -> None:
    src = data / "exif" / "exif-samples" / "heic" / "mobile" / "iphone_13_pro_max.HEIC"
    e = anonymize_file(src, tmp_path)
    assert e["error"] is None
    out = tmp_path / e["output"]
    rec = exiftool([out])[0]
    assert not any(k.startswith(("GPS", "XMP", "ICC", "MakerNotes", "Apple")) for k in rec)
    with Image.open(out) as im:
        assert im.format == "JPEG"
        assert getattr(im, "n_frames", 1) == 1
    # The output holds exactly one image: no embedded thumbnail or gain map.
    assert out.read_bytes().count(b"\xff\xd8\xff") == 1


def test_focal_length_is_kept_for_geometry(data: Path) -> None:
    src = data / "exif" / "exif-samples" / "jpg" / "gps" / "DSCN0012.jpg"
    photo = anonymize(src.read_bytes())
    assert photo.intrinsics.focal_35mm == 28.0
    assert photo.intrinsics.focal_px is not None
    with Image.open(io.BytesIO(photo.jpeg)) as im:
        sub = im.getexif().get_ifd(0x8769)
        assert float(sub[0x920A]) == pytest.approx(6.0)
        assert sub[0xA405] == 28
        assert 0x8825 not in im.getexif()


def test_orientation_is_applied_to_pixels(data: Path) -> None:
    d = data / "exif" / "exif-samples" / "jpg" / "orientation"
    ref = None
    for k in range(1, 9):
        photo = anonymize((d / f"landscape_{k}.jpg").read_bytes(), AnonymizationPolicy(blur_plates=False))
        img = np.asarray(Image.open(io.BytesIO(photo.jpeg)).convert("L"), float)
        if ref is None:
            ref = img
        assert img.shape == ref.shape, f"orientation {k}"
        assert np.abs(img - ref).mean() < 12, f"orientation {k} not upright"
        assert Image.open(io.BytesIO(photo.jpeg)).getexif()[0x0112] == 1


@pytest.mark.parametrize("o", range(1, 9))
def test_orient_point_matches_pillow(o: int) -> None:
    """A marked pixel lands where Pillow's own transpose puts it."""
    from PIL import ImageOps

    w, h = 7, 4
    a = np.zeros((h, w), np.uint8)
    a[1, 5] = 255  # pixel centre (5.5, 1.5)
    im = Image.fromarray(a)
    im.getexif()[0x0112] = o
    out = np.asarray(ImageOps.exif_transpose(im))
    ys, xs = np.nonzero(out)
    u, v = orient_point(5.5, 1.5, w, h, o)
    assert (xs[0] + 0.5, ys[0] + 0.5) == (u, v)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 130, 140)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_inputs_get_clear_errors_and_no_output(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(good, "JPEG")
    (src / "empty.jpg").write_bytes(b"")
    (src / "truncated.jpg").write_bytes(good.getvalue()[:40])
    (src / "text.jpg").write_bytes(b"hello, this is not an image at all" * 10)
    (src / "png_named.jpg").write_bytes(_png(40, 30))  # the extension lies, the content is fine
    (src / "tiny.png").write_bytes(_png(1, 1))
    # A PNG header announcing 100000 x 100000 pixels: refused before any decoding.
    bomb = bytearray(_png(1, 1))
    bomb[16:24] = (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big")
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # a valid IHDR chunk
    (src / "bomb.png").write_bytes(bytes(bomb))
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    # A second file whose output would be anim.jpg too: refused, never written over the first.
    Image.new("RGB", (32, 32), (0, 0, 255)).save(src / "anim.webp")
    # A non-image with a photo's stem takes no name from it: the photo was refused as a duplicate.
    (src / "site.dat").write_bytes(b"not an image" * 10)
    Image.new("RGB", (32, 32), (0, 200, 0)).save(src / "site.jpg")
    # Strips: a plate pass shrank them to 0 pixels and the whole batch crashed (cv2.error).
    (src / "wide.png").write_bytes(_png(3000, 1))
    (src / "tall.png").write_bytes(_png(1, 3000))
    out = tmp_path / "out"
    entries = {e["input"]: e for e in anonymize_dir(src, out, workers=1)}
    assert "empty" in entries["empty.jpg"]["error"]
    assert "could not be decoded" in entries["truncated.jpg"]["error"]
    assert "not a supported image type" in entries["text.jpg"]["error"]
    assert entries["png_named.jpg"]["error"] is None
    assert entries["tiny.png"]["error"] is None
    assert "megapixels" in entries["bomb.png"]["error"]
    assert entries["anim.gif"]["error"] is None and "first frame" in entries["anim.gif"]["notes"][0]
    assert "duplicate_name" in entries["anim.webp"]["error"]
    assert entries["wide.png"]["error"] is None and entries["tall.png"]["error"] is None
    assert "not a supported image type" in entries["site.dat"]["error"]
    assert entries["site.jpg"]["error"] is None
    for e in entries.values():
        if e["error"]:
            assert e["output"] is None
    written = sorted(p.name for p in out.iterdir())
    assert written == ["anim.jpg", "png_named.jpg", "report.json", "site.jpg", "tall.jpg", "tiny.jpg", "wide.jpg"]
    assert np.asarray(Image.open(out / "anim.jpg"))[16, 16, 0] > 200  # the GIF's red frame, not the WebP
    report = json.loads((out / "report.json").read_text())
    assert [e["input"] for e in report["files"]] == sorted(entries)
    assert len(report["files"]) == 12


def test_cli_refuses_to_write_over_its_inputs_and_fails_when_nothing_passes(tmp_path: Path) -> None:
    import sys

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"not an image" * 10)
    cli = [sys.executable, "-m", "cli.main", "anonymize"]
    same = subprocess.run([*cli, str(src), str(src)], capture_output=True, text=True, check=False)
    assert same.returncode != 0 and "must not be IN_DIR" in same.stderr
    assert (src / "a.jpg").read_bytes().startswith(b"not an image")
    bad = subprocess.run([*cli, str(src), str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert bad.returncode == 1, bad.stderr
    assert "[1/1] a.jpg: error: " in bad.stdout and "wrote 0 photos" in bad.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["files"][0]["error"]
    policy = subprocess.run(
        [*cli, str(src), str(tmp_path / "out2"), "--policy", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert policy.returncode != 0 and "policy file cannot be read" in policy.stderr
    assert "Traceback" not in policy.stderr


def test_no_metadata_value_reaches_a_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    """Pillow logs each tag's value at DEBUG while parsing; the header check parses in process."""
    import logging

    from privacy.isolated import untrusted_size

    exif = Image.Exif()
    exif[0x013B] = "Marie Janssens"  # Artist
    exif[0x0110] = "SerialCam 12345"  # Model
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "JPEG", exif=exif.tobytes())
    with caplog.at_level(logging.DEBUG):
        assert untrusted_size(buf.getvalue()) == (64, 48)
        anonymize(buf.getvalue(), AnonymizationPolicy(blur_faces=False, blur_plates=False))
    assert "Janssens" not in caplog.text and "SerialCam" not in caplog.text


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(InvalidImage) as exc:
        anonymize(_png(3000, 3000), AnonymizationPolicy(max_pixels=1_000_000))
    assert exc.value.code == "too_many_pixels"


def test_16_bit_and_alpha_images() -> None:
    a16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, "PNG")
    photo = anonymize(buf.getvalue())
    im = Image.open(io.BytesIO(photo.jpeg))
    assert im.mode == "RGB" and im.size == (64, 48)
    assert np.asarray(im)[-1, -1].mean() > 200  # scaled, not clipped to black or white
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red: hidden colour
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    px = np.asarray(Image.open(io.BytesIO(anonymize(buf.getvalue()).jpeg)))
    assert px.mean() > 245  # composited on white; the hidden red is gone


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP"])
def test_orientation_is_applied_once_in_every_container(data: Path, fmt: str) -> None:
    """An upright photo stored turned, with the EXIF orientation that undoes it, in each container
    comes out as the upright photo did (Pillow's TIFF plugin turns the pixels itself while
    loading; turning them again left faces upside down and unfound)."""
    from PIL import ImageOps

    upright = Image.fromarray(np.asarray(Image.open(data / "faces" / "dlib-pascal" / "2008_002079.jpg").convert("RGB")))
    # What a camera stores for each orientation: the inverse of the turn the tag asks for.
    stored_as = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }
    policy = AnonymizationPolicy(blur_plates=False)

    def run(k: int) -> tuple[np.ndarray, tuple[int, int], int]:
        stored = upright if k == 1 else upright.transpose(stored_as[k])
        exif = Image.Exif()
        exif[0x0112] = k
        buf = io.BytesIO()
        stored.save(buf, format=fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
        check = Image.open(io.BytesIO(buf.getvalue()))
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(check)), np.asarray(upright))  # the case is right
        photo = anonymize(buf.getvalue(), policy)
        assert photo.intrinsics is not None
        size = (photo.intrinsics.original_width, photo.intrinsics.original_height)
        assert size == stored.size, f"{fmt} orientation {k}: the sidecar's original size is the stored one"
        return np.asarray(Image.open(io.BytesIO(photo.jpeg)).convert("L"), float), size, len(photo.faces)

    ref, _, faces = run(1)
    assert faces >= 8
    for k in stored_as:
        img, _, n = run(k)
        assert img.shape == ref.shape, f"{fmt} orientation {k}"
        assert np.abs(img - ref).mean() < 3, f"{fmt} orientation {k} not upright"
        assert n >= faces - 1, f"{fmt} orientation {k}: faces missed"


def test_raw_camera_files_are_refused_not_reduced_to_their_preview() -> None:
    """A DNG's first image is a small preview: a plan built from it would be useless."""
    for tags in ({0xC612: b"\x01\x04\x00\x00"}, {0x00FE: 1}):  # DNGVersion; a reduced image
        buf = io.BytesIO()
        Image.new("RGB", (256, 171), (90, 90, 90)).save(buf, "TIFF", tiffinfo=tags)
        with pytest.raises(InvalidImage) as exc:
            anonymize(buf.getvalue())
        assert exc.value.code == "raw_image" and "JPEG or HEIC" in str(exc.value)


def test_float_tiff_keeps_its_brightness() -> None:
    """Floating-point samples run from 0 to 1: they came out black."""
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (48, 1))
    ramp[0, 0] = np.nan  # a hole in the data decodes as black, not as an error
    buf = io.BytesIO()
    Image.fromarray(ramp, mode="F").save(buf, "TIFF")
    px = np.asarray(Image.open(io.BytesIO(anonymize(buf.getvalue()).jpeg)).convert("L"), float)
    assert abs(px[24, 32] - 128) < 8 and px[24, -1] > 245 and px[24, 0] < 10


def test_colour_profile_applies_to_palette_images(data: Path) -> None:
    """A palette image with a Display P3 profile decodes as its RGB version does (it was left
    unconverted); both differ from the stored numbers."""
    from privacy.decode import decode

    heic = Image.open(data / "exif" / "exif-samples" / "heic" / "mobile" / "iphone_13_pro_max.HEIC")
    p3 = heic.info["icc_profile"]
    colours = [(200, 60, 60), (40, 160, 70), (30, 60, 200), (230, 200, 40)]
    rgb = Image.new("RGB", (40, 10))
    for i, c in enumerate(colours):
        rgb.paste(c, (10 * i, 0, 10 * i + 10, 10))
    pal = rgb.quantize(len(colours))
    decoded = {}
    opaque = {"transparency": bytes([255] * len(colours))}  # a tRNS chunk: the alpha path
    for name, im, extra in (("rgb", rgb, {}), ("palette", pal, {}), ("palette+alpha", pal, opaque)):
        buf = io.BytesIO()
        im.save(buf, "PNG", icc_profile=p3, **extra)
        decoded[name] = decode(buf.getvalue(), max_pixels=10**6).rgb.astype(int)
    assert np.abs(decoded["rgb"] - np.asarray(rgb, int)).max() > 10, "the profile converts"
    assert np.abs(decoded["palette"] - decoded["rgb"]).max() <= 1
    assert np.abs(decoded["palette+alpha"] - decoded["rgb"]).max() <= 1


def test_absurd_focal_lengths_give_no_prior() -> None:
    def intrinsics(focal: float, focal35: int) -> tuple[float | None, float | None]:
        exif = Image.Exif()
        sub = exif.get_ifd(0x8769)
        sub[0x920A] = focal
        sub[0xA405] = focal35
        buf = io.BytesIO()
        Image.new("RGB", (64, 48)).save(buf, "JPEG", exif=exif.tobytes())
        intr = anonymize(buf.getvalue(), AnonymizationPolicy(blur_faces=False, blur_plates=False)).intrinsics
        assert intr is not None
        return intr.focal_mm, intr.focal_35mm

    assert intrinsics(4.2, 26) == (4.2, 26)
    assert intrinsics(9999.0, 9999) == (None, None)
    assert intrinsics(0.01, 1) == (None, None)
