"""Headless rendering of a placed design into a photo (photomontage).

Renderer: moderngl on an EGL context (Mesa llvmpipe on CPU, the NVIDIA driver on a GPU node).
Chosen over pyrender/OSMesa and open3d's renderer because it is the fastest measured here
(FIELD_NOTES: 0.06 s at 1600x1200), returns alpha and depth, and lets us write the projection
straight from the photo's intrinsics with COLMAP's pixel convention, with no half-pixel error:
pixel (0,0)'s centre is at (0.5, 0.5), which is also where OpenGL samples it.

The montage is: the photo, darkened by a soft projected shadow of the design from the sun and by
a soft contact shadow right under it (both on the ground at the design's base); then the design
shaded with its own glTF metallic-roughness material under an ambient light taken from the photo
(sky and ground colours) plus the sun, multisampled for anti-aliased edges, composited by alpha.
An optional occluder mesh (the site's surface) hides the design where the site is in front; that
visibility mask follows the coarse dense depth, so its boundary is refined to the photo's own
edges in a band around it (a local two-colour split, :func:`refine_visibility`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
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
in vec4 in_color;
in vec2 in_mr;       // metallic, roughness
in vec2 in_uv;
out vec3 v_pos;
out vec4 v_color;
out vec2 v_mr;
out vec2 v_uv;
void main() {
    vec3 pc = R * in_pos + t;
    float n = nf.x, f = nf.y;
    gl_Position = vec4(2.0 * (intr.x * pc.x + intr.z * pc.z) / size.x - pc.z,
                       pc.z - 2.0 * (intr.y * pc.y + intr.w * pc.z) / size.y,
                       (f + n) / (f - n) * pc.z - 2.0 * f * n / (f - n),
                       pc.z);
    v_pos = in_pos;
    v_color = in_color;
    v_mr = in_mr;
    v_uv = in_uv;
}
"""

# Metallic-roughness shading (glTF's model, Schlick Fresnel, GGX highlight) lit by the sun and a
# hemisphere ambient (sky above, ground below). Linear in, sRGB out.
_FS = """
#version 330
uniform vec3 light;      // towards the sun, unit
uniform vec3 sun;        // sun radiance (linear RGB)
uniform vec3 sky;        // ambient from above (linear RGB)
uniform vec3 ground;     // ambient from below
uniform vec3 eye;        // camera centre, world
uniform float ambient;   // 1: unlit (shadow masks)
uniform sampler2D tex;   // the part's base colour texture (sRGB), white where it has none
in vec3 v_pos;
in vec4 v_color;
in vec2 v_mr;
in vec2 v_uv;
out vec4 frag;
void main() {
    if (ambient >= 1.0) { frag = v_color; return; }
    vec3 V = normalize(eye - v_pos);
    // The face's own normal, from the screen-space derivatives of its world position: flat
    // shading with shared (indexed) vertices.
    vec3 N = normalize(cross(dFdx(v_pos), dFdy(v_pos)));
    if (dot(N, V) < 0.0) N = -N;  // double-sided: the face the camera sees
    vec3 base = v_color.rgb * pow(texture(tex, v_uv).rgb, vec3(2.2));
    float metal = v_mr.x, rough = clamp(v_mr.y, 0.04, 1.0);
    vec3 F0 = mix(vec3(0.04), base, metal);
    vec3 diff = base * (1.0 - metal);
    float ndl = max(dot(N, light), 0.0);
    vec3 H = normalize(light + V);
    float a2 = rough * rough * rough * rough;
    float ndh = max(dot(N, H), 0.0);
    float d = ndh * ndh * (a2 - 1.0) + 1.0;
    float D = a2 / (3.14159 * d * d);
    vec3 F = F0 + (1.0 - F0) * pow(1.0 - max(dot(H, V), 0.0), 5.0);
    float k = (rough + 1.0) * (rough + 1.0) / 8.0;
    float ndv = max(dot(N, V), 1e-3);
    float G = ndv / (ndv * (1.0 - k) + k) * ndl / (ndl * (1.0 - k) + k);
    vec3 spec = D * F * G / max(4.0 * ndv * ndl, 1e-3);
    vec3 amb = mix(ground, sky, 0.5 + 0.5 * N.z);
    vec3 lin = (diff / 3.14159 + spec) * sun * ndl * 3.14159 + amb * (diff + F0 * (1.0 - rough) * 0.5);
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
    metallic: float = 0.0  # glTF metallic-roughness factors
    roughness: float = 0.7
    buffer: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)  # _packed's


def _texture_image(m: Mesh) -> Any | None:
    """The part's base colour image (PIL) where it has a texture with UVs for every vertex."""
    vis = m.texture
    uv = getattr(vis, "uv", None)
    mat = getattr(vis, "material", None)
    img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
    return img if img is not None and uv is not None and len(uv) == len(m.vertices) else None


def _base_factor(m: Mesh) -> tuple[float, float, float, float]:
    """A textured part's colour factor (the texture is sampled on top of it); else its colour."""
    if _texture_image(m) is None:
        return m.color
    mat = getattr(m.texture, "material", None)
    f = getattr(mat, "baseColorFactor", None)
    if f is None:
        f = getattr(mat, "diffuse", None)
    if f is None:
        return (1.0, 1.0, 1.0, 1.0)
    c = np.asarray(f, float)
    c = c / 255.0 if c.max() > 1.0 else c
    return (float(c[0]), float(c[1]), float(c[2]), float(c[3]) if len(c) > 3 else 1.0)


def _packed_one(m: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex pos, linear colour, metallic-roughness, UV (float32) and the faces (uint32)."""
    v = np.asarray(m.vertices, np.float32)
    out = np.zeros((len(v), 11), np.float32)
    out[:, 0:3] = v
    out[:, 3:7] = np.asarray(_base_factor(m), np.float32)
    out[:, 7:9] = (m.metallic, m.roughness)
    if _texture_image(m) is not None:
        out[:, 9:11] = np.asarray(m.texture.uv, np.float32)  # type: ignore[union-attr]
    return out, np.ascontiguousarray(np.asarray(m.faces, np.uint32))


def _packed(meshes: list[Mesh]) -> tuple[np.ndarray, np.ndarray]:
    """One vertex and one index buffer for the meshes, indexed (each vertex shaded once, not once
    per face corner); a mesh keeps its buffers, so a design drawn into several photos is packed
    once."""
    verts, faces, base = [], [], 0
    for m in meshes:
        if m.buffer is None:
            m.buffer = _packed_one(m)
        v, f = m.buffer
        verts.append(v)
        faces.append(f + np.uint32(base) if base else f)
        base += len(v)
    if not verts:
        return np.zeros((0, 11), np.float32), np.zeros((0, 3), np.uint32)
    if len(verts) == 1:
        return verts[0], faces[0]
    return np.concatenate(verts), np.concatenate(faces)


@dataclass
class Lighting:
    """The light a montage is drawn in: the sun's direction and radiance, and a hemisphere
    ambient (sky above, ground below), linear RGB."""

    light: np.ndarray
    sun: tuple[float, float, float] = (2.2, 2.1, 1.95)
    sky: tuple[float, float, float] = (0.35, 0.38, 0.42)
    ground: tuple[float, float, float] = (0.18, 0.17, 0.15)


def _linear(c: np.ndarray) -> np.ndarray:
    return np.asarray(np.power(np.clip(c, 0.0, 1.0), 2.2))


def photo_lighting(photo: np.ndarray, view: View) -> Lighting:
    """Ambient from the photo itself: the mean colour of its upper third (sky, facades) and of
    its lower third (the ground), in linear RGB; the sun from the site's gravity (default_light),
    its strength from the photo's brightness (a dull photo gets a dimmer sun)."""
    small = np.asarray(cv2.resize(photo, (64, 48), interpolation=cv2.INTER_AREA), float) / 255.0

    def tint(c: np.ndarray) -> np.ndarray:  # the photo's colour cast, desaturated: a hint, not a dye
        return np.asarray(0.7 * c.mean() + 0.3 * c)

    top = tint(_linear(small[:16].reshape(-1, 3).mean(axis=0)))
    bottom = tint(_linear(small[-16:].reshape(-1, 3).mean(axis=0)))
    key = float(_linear(small.reshape(-1, 3).mean(axis=0)).mean())
    sun_k = float(np.clip(4.0 * key, 0.8, 2.4))
    return Lighting(
        default_light(view),
        sun=(sun_k, sun_k * 0.96, sun_k * 0.9),
        sky=tuple(float(x) for x in np.clip(top * 1.4, 0.08, 0.8)),  # type: ignore[arg-type]
        ground=tuple(float(x) for x in np.clip(bottom * 1.2, 0.05, 0.6)),  # type: ignore[arg-type]
    )


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
    light: np.ndarray | None = None,
    lighting: Lighting | None = None,
    ambient: float = 0.0,
    occluders: list[Mesh] | None = None,
    samples: int = 4,
    additive: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``meshes`` with ``view``'s camera: RGBA uint8 (H x W x 4), premultiplied alpha.
    ``ambient`` = 1 draws the meshes' colours unlit (masks); ``additive`` sums them (clamped)."""
    import moderngl

    ctx = _context()
    w, h = view.width, view.height
    occ = occluders or []
    near, far = _near_far(view, meshes + occ)
    if lighting is None:
        lighting = Lighting(default_light(view) if light is None else np.asarray(light, float))
    with _lock:
        prog = ctx.program(vertex_shader=_VS, fragment_shader=_FS)
        prog["R"].write(np.ascontiguousarray(view.R.T, dtype=np.float32).tobytes())
        prog["t"].value = tuple(float(x) for x in view.t)
        K = view.K
        prog["intr"].value = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
        prog["size"].value = (float(w), float(h))
        prog["nf"].value = (near, far)
        L = np.asarray(lighting.light, float)
        prog["ambient"].value = float(ambient)
        if ambient < 1.0:  # the unlit program optimises the lighting uniforms away
            prog["light"].value = tuple(float(x) for x in L / np.linalg.norm(L))
            prog["sun"].value = lighting.sun
            prog["sky"].value = lighting.sky
            prog["ground"].value = lighting.ground
            prog["eye"].value = tuple(float(x) for x in view.centre)
        s = min(samples, ctx.max_samples)
        s = s if s > 1 else 0  # one sample: a plain renderbuffer, read directly
        ms = ctx.framebuffer(
            color_attachments=[ctx.renderbuffer((w, h), 4, samples=s)],
            depth_attachment=ctx.depth_renderbuffer((w, h), samples=s),
        )
        out = ctx.framebuffer(color_attachments=[ctx.renderbuffer((w, h), 4)]) if s > 1 else ms
        try:
            ms.use()
            ctx.viewport = (0, 0, w, h)
            ms.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
            ctx.enable(moderngl.DEPTH_TEST)
            ctx.disable(moderngl.CULL_FACE)
            ctx.disable(moderngl.BLEND)
            # Occluders are drawn in transparent black, the clear colour: they fill the depth
            # buffer and leave the photo visible (no colour mask state to get wrong).
            hidden = [
                m if tuple(m.color) == (0, 0, 0, 0) else Mesh(m.vertices, m.faces, (0.0, 0.0, 0.0, 0.0)) for m in occ
            ]
            white = ctx.texture((1, 1), 4, bytes([255, 255, 255, 255]))
            textured = ambient < 1.0 and any(_texture_image(m) is not None for m in meshes)
            # Untextured meshes go in one draw; a textured one is drawn alone with its image.
            draws: list[tuple[list[Mesh], Any]] = [(hidden, None)]
            if textured:
                draws += [([m], _texture_image(m)) for m in meshes]
            else:
                draws.append((meshes, None))
            for i, (group, image) in enumerate(draws):
                data, idx = _packed(group)
                if not len(idx):
                    continue
                if i >= 1 and additive:
                    ctx.enable(moderngl.BLEND)
                    ctx.blend_func = moderngl.ONE, moderngl.ONE
                    ctx.depth_func = "<="
                tex = white
                if image is not None:
                    rgba_img = np.ascontiguousarray(
                        np.flipud(np.asarray(image.convert("RGBA")))
                    )  # GL rows: bottom first
                    tex = ctx.texture((rgba_img.shape[1], rgba_img.shape[0]), 4, rgba_img.tobytes())
                    tex.build_mipmaps()
                    tex.repeat_x = tex.repeat_y = True
                tex.use(location=0)
                if "tex" in prog:
                    prog["tex"].value = 0
                vbo = ctx.buffer(data.tobytes())
                ibo = ctx.buffer(idx.tobytes())
                vao = ctx.vertex_array(
                    prog,
                    [(vbo, "3f 4f 2f 2f", "in_pos", "in_color", "in_mr", "in_uv")],
                    index_buffer=ibo,
                    index_element_size=4,
                )
                vao.render(moderngl.TRIANGLES)
                vao.release()
                vbo.release()
                ibo.release()
                if tex is not white:
                    tex.release()
            white.release()
            ctx.disable(moderngl.BLEND)
            ctx.depth_func = "<"
            if s > 1:
                ctx.copy_framebuffer(out, ms)
            rgba = np.frombuffer(out.read(components=4, dtype="f1"), np.uint8).reshape(h, w, 4)
        finally:
            ms.release()
            if s > 1:
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


def _window_sums(x: np.ndarray, win: tuple[np.ndarray, ...]) -> np.ndarray:
    """Sums of ``x`` over the windows [ya, yb) x [xa, xb) (one per row of the index arrays), from
    an integral image: a (n, channels) array."""
    ya, yb, xa, xb = win
    ii = cv2.integral(x, sdepth=cv2.CV_64F)
    ii = ii.reshape(ii.shape[0], ii.shape[1], -1)
    return np.asarray(ii[yb, xb] - ii[ya, xb] - ii[yb, xa] + ii[ya, xa])


def refine_visibility(photo: np.ndarray, vis: np.ndarray, cover: np.ndarray, *, radius: int) -> np.ndarray:
    """The design's visibility (0 hidden by the site, 1 seen), moved onto the photo's own edges.

    The mask from the dense depth is right away from its boundary and off by a few pixels at it.
    In a band of ``radius`` px around that boundary (inside the design's silhouette), each pixel
    is given to the side whose colour it has: the local mean colours of the surely hidden and the
    surely seen pixels beside it (box-filtered over twice the band) are the two candidates, and the
    pixel's share between them is its visibility (a joint-bilateral-style two-colour split; mixed
    pixels on the edge come out partial, i.e. anti-aliased), smoothed over 3 x 3 px against the
    photo's noise. Where one side has no sure pixels near, or the two colours are alike, the
    coarse mask stays. (A guided filter of the coarse mask, tried first, moved a 4 px error by
    only 0.2 px: with the photo's edge and the mask's a few pixels apart, the local linear model
    has nothing to follow.)"""
    inside = cover > 0.02
    hard = ((vis > 0.5) & inside).astype(np.uint8)
    hidden = ((vis <= 0.5) & inside).astype(np.uint8)
    k = (2 * radius + 1, 2 * radius + 1)
    # The band: pixels with both sides within the radius (box filters: O(1) a pixel).
    near_v = cv2.boxFilter(hard, cv2.CV_32F, k, normalize=False, borderType=cv2.BORDER_CONSTANT) > 0.5
    near_h = cv2.boxFilter(hidden, cv2.CV_32F, k, normalize=False, borderType=cv2.BORDER_CONSTANT) > 0.5
    band = near_v & near_h & inside
    if not band.any():
        return vis
    # The sure pixels: each side, farther than the radius from the other.
    sure_v = (hard.astype(bool) & ~near_h).astype(np.float32)
    sure_h = (hidden.astype(bool) & ~near_v).astype(np.float32)
    out = vis.astype(np.float32).copy()
    R = 2 * radius  # the neighbourhood the two colours are taken from
    H, W = band.shape
    T = 256  # tiles: only those the band crosses are worked on (the band is a thin line)
    for ty in range(0, H, T):
        for tx in range(0, W, T):
            tile = band[ty : ty + T, tx : tx + T]
            if not tile.any():
                continue
            ys, xs = np.nonzero(tile)
            ys, xs = ys + ty, xs + tx
            r0, r1 = max(0, ty - R - 1), min(H, ty + T + R + 1)
            c0, c1 = max(0, tx - R - 1), min(W, tx + T + R + 1)
            img = photo[r0:r1, c0:c1].astype(np.float32) * (1.0 / 255.0)
            sv, sh = sure_v[r0:r1, c0:c1], sure_h[r0:r1, c0:c1]
            yy, xx = ys - r0, xs - c0
            h, w = img.shape[:2]
            ya, yb = np.clip(yy - R, 0, h), np.clip(yy + R + 1, 0, h)
            xa, xb = np.clip(xx - R, 0, w), np.clip(xx + R + 1, 0, w)
            win = (ya, yb, xa, xb)
            nv, nh = _window_sums(sv, win)[:, 0], _window_sums(sh, win)[:, 0]
            mv = _window_sums(img * sv[:, :, None], win) / np.maximum(nv, 1.0)[:, None]
            mh = _window_sums(img * sh[:, :, None], win) / np.maximum(nh, 1.0)[:, None]
            px = img[yy, xx]
            dv = ((px - mv) ** 2).sum(axis=1)
            dh = ((px - mh) ** 2).sum(axis=1)
            apart = ((mv - mh) ** 2).sum(axis=1)
            t = np.clip((dh / np.maximum(dh + dv, 1e-6) - 0.5) * 2.0 + 0.5, 0.0, 1.0)
            ok = (nv > 3) & (nh > 3) & (apart > 0.01)  # both sides known, told apart (>~0.06 a channel)
            out[ys[ok], xs[ok]] = t[ok]
    # Against the photo's noise: 3 x 3 smoothing, on the band only.
    ys, xs = np.nonzero(band)
    r0, r1, c0, c1 = max(0, ys.min() - 1), ys.max() + 2, max(0, xs.min() - 1), xs.max() + 2
    sm = np.asarray(cv2.blur(out[r0:r1, c0:c1], (3, 3)))
    out[ys, xs] = sm[ys - r0, xs - c0]
    return out


def montage(
    photo: np.ndarray,
    view: View,
    meshes: list[Mesh],
    *,
    occluders: list[Mesh] | None = None,
    shadow_strength: float = 0.45,
    contact_strength: float = 0.35,
    ground_z: float = 0.0,
    refine_edges: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite the design into ``photo`` (H x W x 3 uint8). Returns (image, design alpha mask).
    Shadows fall on the level ground at ``ground_z`` (the design's base)."""
    if photo.shape[:2] != (view.height, view.width):
        raise ValueError("the photo's size differs from its camera's")
    lighting = photo_lighting(photo, view)
    light = lighting.light
    sh = shadow_meshes(meshes, light, ground_z) if shadow_strength > 0 else []
    contact = contact_meshes(meshes, ground_z) if contact_strength > 0 else []
    k = max(3, int(0.006 * max(view.width, view.height)) | 1)  # sun shadow softness
    # Render only the window the design and its shadow can reach: a 12 MP frame costs memory and
    # time the design (often a few % of the photo) does not need.
    win = _window(view, meshes + sh, pad=k + 8)
    mask = np.zeros((view.height, view.width), np.uint8)
    if win is None:
        return photo.copy(), mask
    x0, y0, x1, y1 = win
    sub = _cropped(view, x0, y0, x1 - x0, y1 - y0)
    crop = photo[y0:y1, x0:x1]
    if occluders:
        occluders = [o for o in (_cull(view, m, meshes + sh, win) for m in occluders) if len(o.faces)]
    img = crop.astype(np.float32)
    if sh or contact:
        # One pass, two channels: the sun's shadow in red, the contact shadow in green.
        tinted = [Mesh(m.vertices, m.faces, (1.0, 0.0, 0.0, 1.0)) for m in sh]
        tinted += [Mesh(m.vertices, m.faces, (0.0, 1.0, 0.0, 1.0)) for m in contact]
        # Shadows are soft: drawn at a quarter of the resolution (1/16 of the pixels), blurred
        # there, then scaled up.
        q = 0.25 if max(sub.width, sub.height) > 800 else 1.0
        low = _scaled(sub, q)
        srgba, _ = render(low, tinted, ambient=1.0, occluders=occluders, samples=1, additive=True)
        dark = np.zeros(srgba.shape[:2], np.float32)
        if sh:
            kq = max(3, int(k * q) | 1)
            dark += shadow_strength * np.asarray(
                cv2.GaussianBlur(srgba[:, :, 0].astype(np.float32) / 255.0, (kq, kq), 0)
            )
        if contact:
            kc = max(3, int(_contact_kernel(sub, meshes, ground_z) * q) | 1)
            soft = np.asarray(cv2.GaussianBlur(srgba[:, :, 1].astype(np.float32) / 255.0, (kc, kc), 0))
            dark += contact_strength * np.clip(soft * 2.0, 0.0, 1.0)
        if q != 1.0:
            dark = np.asarray(cv2.resize(dark, (sub.width, sub.height), interpolation=cv2.INTER_LINEAR))
        img *= (1.0 - np.clip(dark, 0.0, 0.8))[:, :, None]
    rgba, _ = render(sub, meshes, lighting=lighting)  # the design whole: colour and coverage
    cover = rgba[:, :, 3].astype(np.float32) / 255.0
    vis = np.ones_like(cover)
    if occluders:
        # The design's own buffers, unlit, one sample: a hard visibility mask whose boundary is
        # refined to the photo's edges below.
        # Half the resolution on a large window (a 12 MP photo): the band refinement below puts
        # the boundary back on the photo's edges anyway.
        hq = 0.5 if max(sub.width, sub.height) > 1600 else 1.0
        seen, _ = render(_scaled(sub, hq), meshes, ambient=1.0, occluders=occluders, samples=1)
        vis = (seen[:, :, 3] > 0).astype(np.float32)
        if hq != 1.0:
            vis = np.asarray(cv2.resize(vis, (sub.width, sub.height), interpolation=cv2.INTER_NEAREST))
        vis[cover <= 0.0] = 0.0
        if refine_edges:
            vis = refine_visibility(crop, vis, cover, radius=max(6, int(0.005 * max(view.width, view.height))))
    # The multisample resolve averages (rgb, 1) with the cleared (0, 0): colour is premultiplied.
    a = (cover * vis)[:, :, None]
    img = img * (1.0 - a) + rgba[:, :, :3].astype(np.float32) * vis[:, :, None]
    out = photo.copy()
    out[y0:y1, x0:x1] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    mask[y0:y1, x0:x1] = np.clip(a[:, :, 0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out, mask


def contact_meshes(meshes: list[Mesh], ground_z: float = 0.0, reach_m: float = 0.25) -> list[Mesh]:
    """The design's parts within ``reach_m`` of the ground, flattened straight down onto it: the
    dark where it meets the ground (ambient occlusion), blurred over about 30 cm."""
    out = []
    for m in meshes:
        v = np.asarray(m.vertices, float)
        low = v[:, 2] - ground_z < reach_m
        f = np.asarray(m.faces)
        keep = low[f].all(axis=1)
        if not keep.any():
            continue
        p = v.copy()
        p[:, 2] = ground_z + 0.003
        out.append(Mesh(p, f[keep], (0.0, 0.0, 0.0, 1.0)))
    return out


def _contact_kernel(view: View, meshes: list[Mesh], ground_z: float) -> int:
    """About 30 cm on the ground at the design's distance, in pixels (odd, 3-151): a soft dark a few
    centimetres wide beside the foot."""
    allv = np.vstack([m.vertices for m in meshes])
    c = allv.mean(axis=0)
    c[2] = ground_z
    z = float((view.R @ c + view.t)[2])
    px = 0.30 * float(view.K[0, 0]) / max(z, 0.1)
    return int(np.clip(px, 3, 151)) | 1


def _cull(view: View, occ: Mesh, meshes: list[Mesh], win: tuple[int, int, int, int]) -> Mesh:
    """The occluder's triangles that can hide something in the pixel window ``win`` of
    ``view`` (full-photo pixels): a corner in the window (with a margin) and nearer than the
    farthest of ``meshes``. A site surface of 400k triangles is mostly elsewhere; drawing all of
    it twice per photo cost more than the design."""
    v = np.asarray(occ.vertices, float)
    if len(v) < 5000 or not meshes:
        return occ
    far = float(max(((view.R @ np.asarray(m.vertices, float).T).T[:, 2] + view.t[2]).max() for m in meshes))
    uv, z = view.project(v)
    x0, y0, x1, y1 = win
    m = 0.05 * max(x1 - x0, y1 - y0) + 8
    near = (z > 0.0) & (z < far + 0.5)
    inside = (uv[:, 0] > x0 - m) & (uv[:, 0] < x1 + m) & (uv[:, 1] > y0 - m) & (uv[:, 1] < y1 + m)
    f = np.asarray(occ.faces)
    keep = (near & inside)[f].any(axis=1) & near[f].all(axis=1) | (z[f] <= 0.0).any(axis=1) & near[f].any(axis=1)
    return Mesh(v, f[keep], occ.color)


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


def _scaled(view: View, q: float) -> View:
    """The same camera on a grid ``q`` times as fine (corner-origin pixel coordinates scale)."""
    if q == 1.0:
        return view
    K = view.K.astype(np.float64).copy()
    K[:2] *= q
    return View(
        view.name, K, view.R, view.t, max(1, round(view.width * q)), max(1, round(view.height * q)), view.camera
    )


def _cropped(view: View, x0: int, y0: int, w: int, h: int) -> View:
    """The same camera, seeing only the window starting at (x0, y0): shift the principal point."""
    K = view.K.astype(np.float64).copy()
    K[0, 2] -= x0
    K[1, 2] -= y0
    return View(view.name, K, view.R, view.t, w, h, view.camera)
