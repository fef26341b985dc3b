"""What a source file carried (for the report), what geometry keeps, and the minimal new EXIF.

The gate never strips metadata in place: it writes a new image, so everything in the source is
dropped by construction. This module only names what was there, and writes back the few tags
that geometry needs (focal length, 35 mm-equivalent focal length, size, orientation = 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image, TiffImagePlugin

log = logging.getLogger(__name__)

IFD_EXIF = 0x8769
IFD_GPS = 0x8825
IFD_INTEROP = 0xA005
TAG_ORIENTATION = 0x0112
TAG_FOCAL = 0x920A
TAG_FOCAL_35 = 0xA405
TAG_PIXEL_X = 0xA002
TAG_PIXEL_Y = 0xA003
TAG_MAKERNOTE = 0x927C
TAG_SUBIFDS = 0x014A
TAG_IPTC = 0x83BB  # IPTC-NAA records in a TIFF
TAG_PHOTOSHOP = 0x8649  # Photoshop image resources (IPTC among them)
IFD1 = -1  # Pillow's key for the EXIF thumbnail's directory (ExifTags.IFD.IFD1)

_IDENTIFYING_0TH = {
    0x010F: "Make",
    0x0110: "Model",
    0x013B: "Artist",
    0x8298: "Copyright",
    0x0132: "DateTime",
    0x010E: "ImageDescription",
    0x0131: "Software",
    0x9C9B: "XPTitle",
    0x9C9C: "XPComment",
    0x9C9D: "XPAuthor",
}
_IDENTIFYING_EXIF = {
    0xA430: "OwnerName",
    0xA431: "SerialNumber",
    0xA435: "LensSerialNumber",
    0xA433: "LensMake",
    0xA434: "LensModel",
    0x9003: "DateTimeOriginal",
    0x9004: "DateTimeDigitized",
    0x9286: "UserComment",
    0xA420: "ImageUniqueID",
}


@dataclass(frozen=True)
class Intrinsics:
    """The geometry sidecar: what reconstruction may know about the camera, nothing more."""

    width: int  # of the output image (after orientation)
    height: int
    focal_mm: float | None
    focal_35mm: float | None
    original_width: int
    original_height: int
    orientation: int

    @property
    def focal_px(self) -> float | None:
        """A focal-length prior in pixels, from the 35 mm-equivalent focal length.

        The 35 mm equivalent refers to a 36 x 24 mm frame, so it scales with the long side.
        """
        if self.focal_35mm and self.focal_35mm > 0:
            return self.focal_35mm / 36.0 * max(self.width, self.height)
        return None

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "focal_mm": self.focal_mm,
            "focal_35mm": self.focal_35mm,
            "width": self.width,
            "height": self.height,
            "original_width": self.original_width,
            "original_height": self.original_height,
            "orientation": self.orientation,
        }


def _safe_ifd(exif: Image.Exif, tag: int) -> dict[int, object]:
    try:
        return dict(exif.get_ifd(tag))
    except Exception:  # malformed sub-IFD: treat as absent
        return {}


def _as_float(v: object, lo: float, hi: float) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return f if lo <= f <= hi else None  # NaN fails both comparisons


# Focal lengths a real camera can report, in mm. Outside them the tag is a writer's error and
# would hand reconstruction a wrong prior (9999 mm is a field of view of 0.2 degrees), so the
# prior is dropped and the focal length estimated from the photos alone. The 35 mm equivalent
# reaches 3000 mm on superzoom bridge cameras; 4 mm is below any fisheye's.
_FOCAL_MM = (0.5, 2000.0)
_FOCAL_35_MM = (4.0, 3000.0)


def focal_lengths(exif: Image.Exif) -> tuple[float | None, float | None]:
    sub = _safe_ifd(exif, IFD_EXIF)
    return _as_float(sub.get(TAG_FOCAL), *_FOCAL_MM), _as_float(sub.get(TAG_FOCAL_35), *_FOCAL_35_MM)


def _segment_groups(segments: list[tuple[str, bytes]]) -> set[str]:
    """Metadata groups named by a JPEG's application segments (marker, first bytes)."""
    found: set[str] = set()
    for marker, head in segments:
        if marker == "COM":
            found.add("Comment")
        elif marker == "APP0":
            if head.startswith(b"JFXX"):
                found.add("Thumbnail")  # JFIF extension: an embedded thumbnail
            elif not head.startswith(b"JFIF"):
                found.add("VendorSegments")
        elif marker == "APP1":
            if head.startswith(b"http://ns.adobe.com/"):
                found.add("XMP")
            elif not head.startswith(b"Exif"):
                found.add("VendorSegments")
        elif marker == "APP2":
            if head.startswith(b"ICC_PROFILE"):
                found.add("ICC")
            elif head.startswith(b"MPF"):
                found.add("MultiPicture")  # further images: previews, depth or gain maps
            elif head.startswith(b"FPXR"):
                found.add("FlashPix")
            else:
                found.add("VendorSegments")
        elif marker == "APP11" and head.startswith(b"JP"):
            found.add("JUMBF")  # content credentials (C2PA) and other JPEG universal metadata boxes
        elif marker == "APP13" and head.startswith(b"Photoshop 3.0"):
            found.add("IPTC")
        elif marker == "APP14" and head.startswith(b"Adobe"):
            continue  # the colour transform flag: not metadata about anyone
        else:
            found.add("VendorSegments")
    return found


# The order groups are listed in the report.
_GROUPS = (
    "EXIF",
    "GPS",
    "MakerNotes",
    "CameraIdentity",
    "Thumbnail",
    "XMP",
    "IPTC",
    "ICC",
    "Comment",
    "PNGText",
    "HEIFAuxiliary",
    "MultiPicture",
    "FlashPix",
    "JUMBF",
    "VendorSegments",
    "SubImages",
    "ExtraFrames",
    "Trailer",
)


def inventory(
    exif: Image.Exif,
    info_keys: set[str],
    data: bytes,
    fmt: str,
    *,
    frames: int = 1,
    segments: list[tuple[str, bytes]] | None = None,
) -> list[str]:
    """Names of the metadata groups the source carried (all of which the output drops).

    ``info_keys``: the decoder's info keys that hold something; ``segments``: a JPEG's
    application segments (marker, first bytes); ``frames``: images in the file."""
    found: set[str] = set()
    try:
        base = dict(exif)
    except Exception:
        base = {}
    sub = _safe_ifd(exif, IFD_EXIF)
    if base or sub:
        found.add("EXIF")
    if IFD_GPS in base or _safe_ifd(exif, IFD_GPS):
        found.add("GPS")
    if TAG_MAKERNOTE in sub:
        found.add("MakerNotes")
    if any(t in base for t in _IDENTIFYING_0TH) or any(t in sub for t in _IDENTIFYING_EXIF):
        found.add("CameraIdentity")
    if _safe_ifd(exif, IFD1) or (fmt == "JPEG" and b"\xff\xd8\xff" in data[4:65536]):
        found.add("Thumbnail")  # the EXIF thumbnail's directory, or a JPEG inside the headers
    found |= _segment_groups(segments or [])
    # An XMP packet anywhere (a HEIF keeps its gain map's in the media data).
    if {"xmp", "XML:com.adobe.xmp"} & info_keys or b"<x:xmpmeta" in data:
        found.add("XMP")
    if "photoshop" in info_keys or b"Photoshop 3.0" in data[:262144]:
        found.add("IPTC")
    if fmt == "TIFF" and (TAG_IPTC in base or TAG_PHOTOSHOP in base):
        found.add("IPTC")
    if "icc_profile" in info_keys:
        found.add("ICC")
    if "comment" in info_keys or "COM" in info_keys:
        found.add("Comment")
    if fmt == "GIF":  # application extensions Pillow does not surface
        if b"XMP DataXMP" in data:
            found.add("XMP")
        if b"ICCRGBG1012" in data:
            found.add("ICC")
    if fmt == "PNG" and (
        {"Description", "Comment", "Author", "Software", "parameters"} & info_keys
        or any(
            k not in {"dpi", "gamma", "transparency", "srgb", "icc_profile", "exif", "aspect", "chromaticity"}
            for k in info_keys
        )
    ):
        found.add("PNGText")
    if fmt == "HEIF" and ({"thumbnails", "depth_images", "aux"} & info_keys):
        found.add("HEIFAuxiliary")
    if fmt == "TIFF" and TAG_SUBIFDS in base:
        found.add("SubImages")
    if frames > 1 and "MultiPicture" not in found:
        found.add("ExtraFrames")
    if fmt == "JPEG":
        eoi = data.rfind(b"\xff\xd9")
        if eoi != -1 and len(data) - (eoi + 2) > 16:
            found.add("Trailer")
        # Trailers that carry IPTC records: AFCP (ends "AXS!") and FotoStation's.
        tail = data[-16:]
        if b"AXS!" in tail or b"\xa1\xb2\xc3\xd4" in tail:
            found.add("IPTC")
    return [g for g in _GROUPS if g in found]


def _rational(v: float) -> TiffImagePlugin.IFDRational:
    return TiffImagePlugin.IFDRational(round(v * 1000), 1000)


def minimal_exif(intr: Intrinsics) -> bytes:
    """A brand-new EXIF block holding only orientation, size and focal lengths."""
    exif = Image.Exif()
    exif[TAG_ORIENTATION] = 1
    sub = exif.get_ifd(IFD_EXIF)
    sub[TAG_PIXEL_X] = intr.width
    sub[TAG_PIXEL_Y] = intr.height
    if intr.focal_mm is not None:
        sub[TAG_FOCAL] = _rational(intr.focal_mm)
    if intr.focal_35mm is not None:
        sub[TAG_FOCAL_35] = round(intr.focal_35mm)
    return exif.tobytes()


def orient_point(u: float, v: float, width: int, height: int, orientation: int) -> tuple[float, float]:
    """Map a pixel position in the stored image (before EXIF orientation) to the upright image.

    ``width`` and ``height`` are the stored image's; coordinates use the corner origin, so the
    mapping is exact.
    """
    w, h = float(width), float(height)
    return {
        1: (u, v),
        2: (w - u, v),
        3: (w - u, h - v),
        4: (u, h - v),
        5: (v, u),
        6: (h - v, u),
        7: (h - v, w - u),
        8: (v, w - u),
    }.get(orientation, (u, v))
