"""What the privacy gate reads from an untrusted file, run in a sandbox child (privacy.sandbox).

Everything that parses the file's bytes happens here: decoding, the EXIF focal lengths, the
inventory of the metadata removed. The parent gets plain facts and pixels back.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from privacy.decode import decode, sniff_format
from privacy.errors import InvalidImage
from privacy.metadata import focal_lengths, inventory
from privacy.sandbox import run_isolated

# Address space a decode may use beyond the child's start, per pixel the policy allows: the
# decoder's image (up to 4 bytes a pixel, 8 at 16 bits), a colour-converted and a rotated copy,
# the RGB array. Measured: a 48 MP JPEG's child peaked at 487 MB (bench/anonymize.py).
_BYTES_PER_PIXEL = 16
_SLACK = 512 * 2**20


@dataclass(frozen=True)
class SourceFacts:
    """Everything the gate keeps from an input file besides its pixels."""

    format: str
    original_size: tuple[int, int]  # (width, height) as stored, before orientation
    orientation: int
    frames: int
    notes: list[str]
    focal_mm: float | None
    focal_35mm: float | None
    removed: list[str]  # metadata groups found in the file (none is copied to the output)


def read_source(data: bytes, max_pixels: int) -> tuple[SourceFacts, np.ndarray]:
    """Decode ``data`` and read its facts, in this process (the sandbox child's work)."""
    dec = decode(data, max_pixels=max_pixels)
    focal_mm, focal_35 = focal_lengths(dec.exif)
    facts = SourceFacts(
        format=dec.format,
        original_size=dec.original_size,
        orientation=dec.orientation,
        frames=dec.frames,
        notes=list(dec.notes),
        focal_mm=focal_mm,
        focal_35mm=focal_35,
        removed=inventory(dec.exif, dec.info_keys, data, dec.format, frames=dec.frames, segments=dec.segments),
    )
    return facts, dec.rgb


def read_untrusted(data: bytes, *, max_pixels: int, timeout_s: float) -> tuple[SourceFacts, np.ndarray]:
    """:func:`read_source` in a sandbox child; raises ``InvalidImage`` for any bad input,
    including one that crashes or hangs a decoder."""
    facts, rgb = run_isolated(
        partial(read_source, max_pixels=max_pixels),
        data,
        timeout_s=timeout_s,
        memory_bytes=_BYTES_PER_PIXEL * max_pixels + _SLACK,
    )
    if not isinstance(facts, SourceFacts) or rgb is None or rgb.dtype != np.uint8 or rgb.ndim != 3:
        raise InvalidImage("undecodable", "the decoder returned something that is not a photo")
    return facts, rgb


def header_size(data: bytes, formats: tuple[str, ...] | None = None) -> tuple[tuple[int, int] | None, None]:
    """The (width, height) an image's header announces, or None when it cannot tell.
    ``formats``: the only Pillow plugins to try (None: all)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=formats) as im:
                return (int(im.size[0]), int(im.size[1])), None
    except Exception:
        return None, None


# Formats whose header Pillow parses in Python (JpegImagePlugin, PngImagePlugin, the TIFF IFD
# reader, ...): no native code touches the bytes before decoding, which runs in the sandbox, so
# their size is read in this process (0.4 ms instead of a sandbox child's ~20 ms and ~25 MB per
# concurrent upload). WebP and HEIF headers go through libwebp and libheif: sandboxed.
_PYTHON_HEADER_PARSERS = frozenset({"JPEG", "PNG", "TIFF", "GIF", "BMP"})


def untrusted_size(head: bytes, *, timeout_s: float = 10.0) -> tuple[int, int] | None:
    """The size an untrusted file's header announces; None when the header cannot tell (or the
    parser failed in any way: decoding proper will say why). Native parsers run in a sandbox
    child; Pillow's pure-Python ones here, restricted to the sniffed format's plugin."""
    try:
        fmt = sniff_format(head)
    except InvalidImage:
        return None
    if fmt in _PYTHON_HEADER_PARSERS:
        return header_size(head, (fmt,))[0]
    try:
        size, _ = run_isolated(header_size, head, timeout_s=timeout_s, memory_bytes=_SLACK)
    except Exception:
        return None
    return size
