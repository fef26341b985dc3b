"""Safe decoding of phone and camera images into plain sRGB pixels.

Everything is refused before decoding when it is not a known image type, or when the header
announces more pixels than the policy allows (decompression bombs). The result is a fresh RGB
array with the EXIF orientation applied: no metadata travels with it.
"""

from __future__ import annotations

import io
import logging
import warnings
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
            turned = orientation != 1 and _orientation_applied(im, orientation)
            if turned and orientation in (5, 6, 7, 8):
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
