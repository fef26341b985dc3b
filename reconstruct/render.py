"""Headless rendering of a placed design into a photo (photomontage).

Renderer: moderngl on an EGL context (Mesa llvmpipe on CPU, the NVIDIA driver on a GPU node).
Chosen over pyrender/OSMesa and open3d's renderer because it is the fastest measured here
(FIELD_NOTES: 0.06 s at 1600x1200), returns alpha and depth, and lets us write the projection
straight from the photo's intrinsics with COLMAP's pixel convention, with no half-pixel error:
pixel (0,0)'s centre is at (0.5, 0.5), which is also where OpenGL samples it.

The montage is: photo, darkened by a soft projected shadow of the design on the ground
(z = 0) from one directional light, then the design shaded with ambient + that light,
multisampled for clean edges, composited by alpha. An optional occluder mesh (the site's
surface) is drawn into the depth buffer first, so site surfaces in front hide the design.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from reconstruct.geometry import View

log = logging.getLogger(__name__)

_VS = """
#version 330
uniform mat3 R;
uniform vec3 t;
uniform vec4 intr;   // fx, fy, cx, cy (pixels, corner origin)
uniform vec2 size;   // width, height
uniform vec2 nf;     // near, far
in vec3 in_pos;
in vec3 in_normal;
in vec4 in_color;
out vec3 v_normal;
out vec4 v_color;
void main() {
    vec3 pc = R * in_pos + t;
    float n = nf.x, f = nf.y;
    gl_Position = vec4(2.0 * (intr.x * pc.x + intr.z * pc.z) / size.x - pc.z,
                       pc.z - 2.0 * (intr.y * pc.y + intr.w * pc.z) / size.y,
                       (f + n) / (f - n) * pc.z - 2.0 * f * n / (f - n),
                       pc.z);
    v_normal = in_normal;
    v_color = in_color;
}
"""

_FS = """
#version 330
uniform vec3 light;
uniform float ambient;
in vec3 v_normal;
in vec4 v_color;
out vec4 frag;
void main() {
    float diff = abs(dot(normalize(v_normal), light));
    vec3 lin = v_color.rgb * (ambient + (1.0 - ambient) * diff);
    frag = vec4(pow(clamp(lin, 0.0, 1.0), vec3(1.0 / 2.2)), v_color.a);
}
"""

_lock = threading.Lock()
_ctx: Any = None


def _context() -> Any:
    global _ctx
    with _lock:
        if _ctx is None:
            import moderngl

            _ctx = moderngl.create_standalone_context(backend="egl")  # type: ignore[arg-type]
            log.info("renderer: %s", _ctx.info.get("GL_RENDERER"))
        return _ctx


@dataclass
class Mesh:
    vertices: np.ndarray  # N x 3 world
    faces: np.ndarray  # M x 3
    color: tuple[float, float, float, float]
    texture: Any | None = None  # the design's texture visual, carried to plan.glb (not rendered)


def _flat(meshes: list[Mesh]) -> np.ndarray:
    """Interleaved per-corner pos, face normal, colour (float32)."""
    chunks = []
    for m in meshes:
        tri = np.asarray(m.vertices, np.float64)[np.asarray(m.faces)]  # M x 3 x 3
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        nn = np.repeat(n[:, None, :], 3, axis=1)
        col = np.broadcast_to(np.asarray(m.color, np.float64), (len(tri), 3, 4))
        chunks.append(np.concatenate([tri, nn, col], axis=2).reshape(-1, 10))
    if not chunks:
        return np.zeros((0, 10), np.float32)
    return np.ascontiguousarray(np.concatenate(chunks).astype(np.float32))


def _near_far(view: View, meshes: list[Mesh]) -> tuple[float, float]:
    allv = np.vstack([m.vertices for m in meshes]) if meshes else np.zeros((1, 3))
    z = (view.R @ allv.T).T[:, 2] + view.t[2]
    far = float(max(z.max(), 1.0) * 1.5)
    near = float(max(0.05, min(1.0, far * 1e-4)))
    return near, far


def render(
    view: View,
    meshes: list[Mesh],
    *,
    light: np.ndarray,
    ambient: float = 0.45,
    occluders: list[Mesh] | None = None,
    samples: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``meshes`` with ``view``'s camera: RGBA uint8 (H x W x 4), premultiplied alpha."""
    import moderngl

    ctx = _context()
    w, h = view.width, view.height
    occ = occluders or []
    near, far = _near_far(view, meshes + occ)
    with _lock:
        prog = ctx.program(vertex_shader=_VS, fragment_shader=_FS)
        prog["R"].write(np.ascontiguousarray(view.R.T, dtype=np.float32).tobytes())
        prog["t"].value = tuple(float(x) for x in view.t)
        K = view.K
        prog["intr"].value = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
        prog["size"].value = (float(w), float(h))
        prog["nf"].value = (near, far)
        L = np.asarray(light, float)
        prog["light"].value = tuple(float(x) for x in L / np.linalg.norm(L))
        prog["ambient"].value = ambient
        s = min(samples, ctx.max_samples)
        ms = ctx.framebuffer(
            color_attachments=[ctx.renderbuffer((w, h), 4, samples=s)],
            depth_attachment=ctx.depth_renderbuffer((w, h), samples=s),
        )
        out = ctx.framebuffer(color_attachments=[ctx.renderbuffer((w, h), 4)])
        try:
            ms.use()
            ctx.viewport = (0, 0, w, h)
            ms.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
            ctx.enable(moderngl.DEPTH_TEST)
            ctx.disable(moderngl.CULL_FACE)
            # Occluders are drawn in transparent black, the clear colour: they fill the depth
            # buffer and leave the photo visible (no colour mask state to get wrong).
            hidden = [Mesh(m.vertices, m.faces, (0.0, 0.0, 0.0, 0.0)) for m in occ]
            for group in (hidden, meshes):
                data = _flat(group)
                if not len(data):
                    continue
                vbo = ctx.buffer(data.tobytes())
                vao = ctx.vertex_array(prog, [(vbo, "3f 3f 4f", "in_pos", "in_normal", "in_color")])
                vao.render(moderngl.TRIANGLES)
                vao.release()
                vbo.release()
            ctx.copy_framebuffer(out, ms)
            rgba = np.frombuffer(out.read(components=4, dtype="f1"), np.uint8).reshape(h, w, 4)
        finally:
            ms.release()
            out.release()
            prog.release()
    return np.flipud(rgba).copy(), np.array([near, far])


def shadow_meshes(meshes: list[Mesh], light: np.ndarray, ground_z: float = 0.0) -> list[Mesh]:
    """The design flattened onto the ground along the light direction (planar projected shadow)."""
    L = np.asarray(light, float)
    L = L / np.linalg.norm(L)
    if L[2] <= 0.05:
        return []
    out = []
    for m in meshes:
        v = np.asarray(m.vertices, float)
        s = (v[:, 2] - ground_z) / L[2]
        p = v - s[:, None] * L
        p[:, 2] = ground_z + 0.002
        out.append(Mesh(p, m.faces, (0.0, 0.0, 0.0, 1.0)))
    return out


def default_light(view: View) -> np.ndarray:
    """A high sun from behind the photographer's left shoulder: readable shading on the front."""
    fwd = view.R[2].copy()
    fwd[2] = 0
    fwd = fwd / (np.linalg.norm(fwd) + 1e-12)
    side = np.cross([0.0, 0.0, 1.0], fwd)
    L = -0.55 * fwd + 0.35 * side + np.array([0.0, 0.0, 1.0])
    return np.asarray(L / np.linalg.norm(L))


def montage(
    photo: np.ndarray,
    view: View,
    meshes: list[Mesh],
    *,
    occluders: list[Mesh] | None = None,
    shadow_strength: float = 0.45,
    ground_z: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite the design into ``photo`` (H x W x 3 uint8). Returns (image, design alpha mask).
    The shadow falls on the level ground at ``ground_z`` (the design's base)."""
    if photo.shape[:2] != (view.height, view.width):
        raise ValueError("the photo's size differs from its camera's")
    light = default_light(view)
    sh = shadow_meshes(meshes, light, ground_z) if shadow_strength > 0 else []
    k = max(3, int(0.006 * max(view.width, view.height)) | 1)  # shadow softness
    # Render only the window the design and its shadow can reach: a 12 MP frame costs memory and
    # time the design (often a few % of the photo) does not need.
    win = _window(view, meshes + sh, pad=k + 8)
    mask = np.zeros((view.height, view.width), np.uint8)
    if win is None:
        return photo.copy(), mask
    x0, y0, x1, y1 = win
    sub = _cropped(view, x0, y0, x1 - x0, y1 - y0)
    img = photo[y0:y1, x0:x1].astype(np.float32)
    if sh:
        srgba, _ = render(sub, sh, light=light, ambient=1.0, occluders=occluders, samples=1)
        soft = np.asarray(cv2.GaussianBlur(srgba[:, :, 3].astype(np.float32) / 255.0, (k, k), 0))
        img *= (1.0 - shadow_strength * soft)[:, :, None]
    rgba, _ = render(sub, meshes, light=light, occluders=occluders)
    # The multisample resolve averages (rgb, 1) with the cleared (0, 0): colour is premultiplied.
    a = rgba[:, :, 3:4].astype(np.float32) / 255.0
    img = img * (1.0 - a) + rgba[:, :, :3].astype(np.float32)
    out = photo.copy()
    out[y0:y1, x0:x1] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    mask[y0:y1, x0:x1] = rgba[:, :, 3]
    return out, mask


def _window(view: View, meshes: list[Mesh], *, pad: int) -> tuple[int, int, int, int] | None:
    """Pixel window (x0, y0, x1, y1) holding every projected vertex, or the whole photo when a
    vertex is behind the camera (its projection is meaningless); None if nothing is in view."""
    if not meshes:
        return None
    allv = np.vstack([m.vertices for m in meshes])
    uv, z = view.project(allv)
    if (z <= 0.05).any():
        return 0, 0, view.width, view.height
    x0 = int(np.floor(uv[:, 0].min())) - pad
    y0 = int(np.floor(uv[:, 1].min())) - pad
    x1 = int(np.ceil(uv[:, 0].max())) + pad
    y1 = int(np.ceil(uv[:, 1].max())) + pad
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(view.width, x1), min(view.height, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return x0, y0, x1, y1


def _cropped(view: View, x0: int, y0: int, w: int, h: int) -> View:
    """The same camera, seeing only the window starting at (x0, y0): shift the principal point."""
    K = view.K.astype(np.float64).copy()
    K[0, 2] -= x0
    K[1, 2] -= y0
    return View(view.name, K, view.R, view.t, w, h, view.camera)
