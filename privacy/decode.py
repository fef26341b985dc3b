"""Safe decoding of phone and camera images into plain sRGB pixels.

Everything is refused before decoding when it is not a known image type, or when the header
announces more pixels than the policy allows (decompression bombs). The result is a fresh RGB
array with the EXIF orientation applied: no metadata travels with it.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps

from privacy.errors import InvalidImage

log = logging.getLogger(__name__)

pillow_heif.register_heif_opener()

# Decoders are told the pixel limit too, so Pillow's own bomb check agrees with ours.
Image.MAX_IMAGE_PIXELS = None

_EXIF_ORIENTATION = 0x0112


def sniff_format(data: bytes) -> str:
    """The image type from the file's magic bytes (the extension is never trusted)."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (
        b"heic",
        b"heix",
        b"hevc",
        b"hevx",
        b"heim",
        b"heis",
        b"mif1",
        b"msf1",
        b"avif",
    ):
        return "HEIF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    raise InvalidImage("unsupported_type", "not a supported image type (JPEG, PNG, WebP, TIFF, HEIC/HEIF)")


@dataclass
class Decoded:
    """Pixels after orientation and colour conversion, plus what the source carried."""

    rgb: np.ndarray  # H x W x 3, uint8, sRGB, orientation applied
    format: str
    original_size: tuple[int, int]  # (width, height) as stored, before orientation
    orientation: int
    exif: Image.Exif
    info_keys: set[str] = field(default_factory=set)
    frames: int = 1
    notes: list[str] = field(default_factory=list)
    # JPEG application segments as (marker, first bytes): what metadata.inventory names.
    segments: list[tuple[str, bytes]] = field(default_factory=list)


def _to_srgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """The pixels converted to sRGB when an ICC profile says they are in another space.

    Palette and grey-with-alpha images are expanded first (littleCMS converts only plain
    modes); their transparency is kept for _to_rgb8's compositing."""
    icc = im.info.get("icc_profile")
    if not icc:
        return im
    alpha = None
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode == "LA":
        alpha = im.getchannel("A")
        im = im.convert("L")
    if im.mode not in ("RGB", "RGBA", "CMYK", "L"):
        notes.append(f"colour profile not applied to {im.mode} pixels; kept as stored")
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(im, src, dst, outputMode=out_mode)
        if converted is not None:
            if alpha is not None:
                converted = converted.convert("RGBA")
                converted.putalpha(alpha)
            return converted
    except (ImageCms.PyCMSError, OSError, ValueError):
        notes.append("colour profile unreadable; pixels kept as stored")
    if alpha is not None:
        im = im.convert("RGBA")
        im.putalpha(alpha)
    return im


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Any mode (8/16/32-bit, alpha, palette, CMYK) to H x W x 3 uint8."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        finite = np.isfinite(a)
        top = float(a[finite].max()) if finite.any() else 0.0
        if im.mode.startswith("I;16"):
            hi = 65535.0
        elif im.mode == "F" and top <= 1.0:
            hi = 1.0  # floating-point samples in [0, 1] (a float TIFF): not near-black
        elif top <= 255:
            hi = 255.0
        elif top <= 65535:
            hi = 65535.0
        else:
            hi = top
        a = np.where(finite, a, 0.0)
        a = np.clip(a * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on white: hidden colour under transparent pixels must not survive.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _empty(v: object) -> bool:
    try:
        return len(v) == 0  # type: ignore[arg-type]
    except TypeError:
        return False


_DNG_VERSION = 0xC612
_NEW_SUBFILE_TYPE = 0x00FE


def _refuse_raw(im: Image.Image) -> None:
    """A raw camera file (DNG) is a TIFF whose first image is a small preview: Pillow decodes
    that preview, not the photo, and a plan built from it would be useless. Refused, saying
    what to send instead; so is any TIFF whose first image declares itself a reduced copy."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return
    try:
        dng = _DNG_VERSION in tags
        reduced = int(tags.get(_NEW_SUBFILE_TYPE, 0) or 0) & 1
    except Exception:
        return
    if dng or reduced:
        raise InvalidImage(
            "raw_image",
            "a raw camera file (DNG) or a reduced preview: only a preview could be read; "
            "export the photo as JPEG or HEIC",
        )


def _orientation_applied(im: Image.Image, orientation: int) -> bool:
    """Whether loading already turned the pixels: Pillow's TIFF plugin applies the orientation
    itself (and drops the tag) since Pillow 12, the other plugins leave it to the caller. Turning
    such an image again put it upside down or sideways, and the face detector then missed faces."""
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1) != orientation
    except Exception:
        return False


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[str, int, int]]:
    """ISO base media file format boxes in ``data[start:end]``: (type, payload start, end)."""
    i = start
    while i + 8 <= end:
        size, typ = struct.unpack_from(">I4s", data, i)
        hdr = 8
        if size == 1:
            if i + 16 > end:
                return
            size, hdr = struct.unpack_from(">Q", data, i + 8)[0], 16
        elif size == 0:
            size = end - i
        if size < hdr or i + size > end:
            return
        yield typ.decode("latin-1"), i + hdr, i + size
        i += size


def heif_transforms(data: bytes) -> list[tuple[str, int]]:
    """The primary image's transformative properties in the order they apply: ``("irot", a)``
    (a quarter turns anticlockwise), ``("imir", m)`` (libheif's reading: 0 flips top to bottom,
    1 left to right) and ``("clap", 0)`` (a clean-aperture crop). Raises ``ValueError`` (or
    ``struct.error``) on a malformed box structure."""
    top = {t: (s, e) for t, s, e in _boxes(data, 0, len(data))}
    ms, me = top["meta"]
    meta = {t: (s, e) for t, s, e in _boxes(data, ms + 4, me)}  # meta is a full box
    ps, _ = meta["pitm"]
    primary = struct.unpack_from(">H" if data[ps] == 0 else ">I", data, ps + 4)[0]
    iprp = {t: (s, e) for t, s, e in _boxes(data, *meta["iprp"])}
    props = list(_boxes(data, *iprp["ipco"]))
    s, e = iprp["ipma"]
    version, flags = data[s], int.from_bytes(data[s + 1 : s + 4], "big")
    i = s + 4
    (entries,) = struct.unpack_from(">I", data, i)
    i += 4
    chosen: list[int] = []
    for _ in range(entries):
        if i >= e:
            raise ValueError("truncated ipma")
        if version < 1:
            (item,) = struct.unpack_from(">H", data, i)
            i += 2
        else:
            (item,) = struct.unpack_from(">I", data, i)
            i += 4
        count = data[i]
        i += 1
        idx = []
        for _ in range(count):
            if flags & 1:
                idx.append(struct.unpack_from(">H", data, i)[0] & 0x7FFF)
                i += 2
            else:
                idx.append(data[i] & 0x7F)
                i += 1
        if item == primary:
            chosen = idx
    steps: list[tuple[str, int]] = []
    for k in chosen:
        if not 1 <= k <= len(props):
            continue
        typ, start, _ = props[k - 1]
        if typ == "irot":
            steps.append(("irot", data[start] & 3))
        elif typ == "imir":
            steps.append(("imir", data[start] & 1))
        elif typ == "clap":
            steps.append(("clap", 0))
    return steps


def _orientation_of(steps: list[tuple[str, int]]) -> int:
    """The EXIF orientation (1-8) that turns and mirrors as ``steps`` do (crops aside): each of
    the eight is one element of the square's symmetry group, so any sequence is one of them."""
    probe = np.arange(6, dtype=np.uint8).reshape(2, 3)
    out = probe
    for name, v in steps:
        if name == "irot":
            out = np.rot90(out, v)
        elif name == "imir":
            out = out[::-1, :] if v == 0 else out[:, ::-1]
    for k in range(1, 9):
        im = Image.fromarray(probe)
        im.getexif()[_EXIF_ORIENTATION] = k
        if np.array_equal(np.asarray(ImageOps.exif_transpose(im)), out):
            return k
    return 1  # unreachable: the eight cover the group


def _heif_frame(data: bytes, decoded: tuple[int, int], notes: list[str]) -> tuple[int, tuple[int, int]]:
    """The transform libheif applied to a HEIF/AVIF image, as (orientation, uploaded size).

    libheif turns and mirrors the image as its ``irot``/``imir`` boxes say (and crops it to its
    clean aperture), and pillow-heif then sets the EXIF orientation to 1, so the EXIF tag says
    nothing about what was done: an iPhone photo stored 4032 x 3024 with a quarter turn was
    recorded as orientation 1 of a 3024 x 4032 photo, and points given in the photo as uploaded
    were read as if it were upright. The uploaded frame is the image after its clean-aperture
    crop (the codec's padding, which no viewer shows) and before turning and mirroring."""
    try:
        steps = heif_transforms(data)
    except (KeyError, ValueError, IndexError, struct.error):
        notes.append("HEIF orientation boxes unreadable; the decoded image is taken as uploaded")
        return 1, decoded
    if any(n == "clap" for n, _ in steps) and next(n for n, _ in steps) != "clap":
        notes.append("HEIF crop after a turn: the uploaded frame is taken as the decoded image turned back")
    k = _orientation_of(steps)
    w, h = decoded
    return k, ((h, w) if k in (5, 6, 7, 8) else (w, h))


def decode(data: bytes, *, max_pixels: int) -> Decoded:
    """Decode ``data`` into oriented sRGB pixels, or raise :class:`InvalidImage`."""
    if not data:
        raise InvalidImage("empty", "the file is empty")
    fmt = sniff_format(data)
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im: Image.Image = Image.open(io.BytesIO(data))
            w, h = im.size
            if w < 1 or h < 1:
                raise InvalidImage("no_pixels", "the image has no pixels")
            if w * h > max_pixels:
                raise InvalidImage(
                    "too_many_pixels",
                    f"the image has {w * h / 1e6:.1f} megapixels; the limit is {max_pixels / 1e6:.0f}",
                )
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                im.seek(0)
                notes.append(f"{frames} frames: the first frame was used")
            try:
                exif = im.getexif()
                orientation = int(exif.get(_EXIF_ORIENTATION, 1) or 1)
            except Exception:  # malformed EXIF (loops, absurd offsets): ignore it, pixels are fine
                exif = Image.Exif()
                orientation = 1
                notes.append("EXIF unreadable; ignored")
            if orientation not in range(1, 9):
                orientation = 1
            # Keys with something in them: pillow-heif lists empty thumbnail and auxiliary-image
            # entries on every HEIF.
            info_keys = {str(k) for k, v in im.info.items() if v is not None and not _empty(v)}
            if fmt == "TIFF":
                _refuse_raw(im)
            segments = [(str(m), bytes(b[:16])) for m, b in getattr(im, "applist", [])]
            im.load()
            # pillow-heif (libheif) applies the HEIF transforms while decoding and resets the EXIF
            # tag to 1. Pillow's own AVIF plugin does not turn the pixels: it reports irot/imir as
            # the EXIF orientation, which is applied below like a JPEG's.
            by_libheif = fmt == "HEIF" and type(im).__name__ == "HeifImageFile"
            if by_libheif:
                orientation, (w, h) = _heif_frame(data, im.size, notes)
                turned = True
            else:
                turned = orientation != 1 and _orientation_applied(im, orientation)
            if not by_libheif and turned and orientation in (5, 6, 7, 8):
                w, h = h, w  # Pillow reported the turned size: keep the size as stored
            im = _to_srgb(im, notes)
            if orientation != 1 and not turned:
                # exif_transpose needs the tag on the image itself; it returns a new image.
                im.getexif()[_EXIF_ORIENTATION] = orientation
                im = ImageOps.exif_transpose(im)
            rgb = _to_rgb8(im)
    except InvalidImage:
        raise
    except Exception as exc:
        # Malformed files make Pillow and its plugins raise almost anything (TypeError, KeyError,
        # struct.error, ...). At this boundary every one of them means "not decodable".
        raise InvalidImage("undecodable", f"the {fmt} data could not be decoded ({type(exc).__name__})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImage("undecodable", "the decoded image has an unexpected shape")
    return Decoded(
        rgb=np.ascontiguousarray(rgb),
        format=fmt,
        original_size=(w, h),
        orientation=orientation,
        exif=exif,
        info_keys=info_keys,
        frames=frames,
        notes=notes,
        segments=segments,
    )
