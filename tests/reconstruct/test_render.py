"""Montage rendering on synthetic scenes with exact answers: where the site hides the design, the
boundary follows the photo's edge, not the coarse depth; edges are anti-aliased; the design is
shaded by its own material under the photo's light, with a contact shadow under it."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from reconstruct.geometry import View
from reconstruct.render import Mesh, montage
from tests.reconstruct.synthetic import look_at

W, H, F = 800, 600, 700.0


def _view() -> View:
    R, t = look_at(np.array([0.0, -4.0, 1.0]), np.array([0.0, 5.0, 1.0]))  # level: verticals stay vertical
    K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]])
    cam = pycolmap.Camera(model="PINHOLE", width=W, height=H, params=[F, F, W / 2, H / 2], camera_id=1)
    return View("synthetic.jpg", K, R, t, W, H, cam)


def _panel(x0: float, x1: float, y: float, z0: float, z1: float, color=(0.8, 0.1, 0.1, 1.0)) -> Mesh:  # type: ignore[no-untyped-def]
    v = np.array([[x0, y, z0], [x1, y, z0], [x1, y, z1], [x0, y, z1]], float)
    return Mesh(v, np.array([[0, 1, 2], [0, 2, 3]]), color)


def _edge_column(view: View, x: float, y: float) -> float:
    uv, _ = view.project(np.array([[x, y, 1.0]]))
    return float(uv[0, 0])


def _crossings(mask: np.ndarray, rows: range) -> np.ndarray:
    """Per row, the sub-pixel column where the design's alpha rises through one half, from the
    hidden side (left) to the seen side (right)."""
    out = []
    for r in rows:
        a = mask[r].astype(float) / 255.0
        i = int(np.argmax(a > 0.5))
        lo, hi = a[i - 1], a[i]
        out.append(i - 1 + (0.5 - lo) / max(hi - lo, 1e-6) + 0.5)  # pixel centres at +0.5
    return np.array(out)


@pytest.mark.parametrize("shift_px", [4.0, -4.0])
def test_occlusion_boundary_follows_the_photos_edge(shift_px: float) -> None:
    """A wall in front (its right edge at x = -0.3, 0.5 m from the camera's axis) hides the left
    part of a red panel 2 m behind it. The photo shows the wall dark, the background light. The
    occluder mesh the renderer gets is off by 4 px either way (the dense surface's error)."""
    view = _view()
    y_wall = 0.5
    xe = -0.3
    ue = _edge_column(view, xe, y_wall)
    rng = np.random.default_rng(0)
    cols = np.arange(W) + 0.5
    photo = np.where(cols[None, :, None] < ue, 55.0, 185.0) * np.ones((H, W, 3))
    photo = np.clip(photo + rng.normal(0, 3, photo.shape), 0, 255).astype(np.uint8)
    depth = 4.0 + y_wall
    coarse = _panel(-3.0, xe + shift_px * depth / F, y_wall, -0.5, 3.0, (1, 1, 1, 1))
    design = [_panel(-1.5, 1.5, 2.0, 0.0, 2.0)]
    rows = range(200, 400)
    kw = {"shadow_strength": 0.0, "contact_strength": 0.0}
    _, coarse_mask = montage(photo, view, design, occluders=[coarse], refine_edges=False, **kw)
    _, mask = montage(photo, view, design, occluders=[coarse], **kw)
    err_coarse = np.abs(_crossings(coarse_mask, rows) - ue)
    err = np.abs(_crossings(mask, rows) - ue)
    print(f"shift {shift_px:+.0f} px: boundary error coarse {err_coarse.mean():.2f} px, refined {err.mean():.2f} px")
    assert err_coarse.mean() == pytest.approx(abs(shift_px), abs=0.6)  # the test's premise
    assert err.mean() < 1.0 and np.percentile(err, 95) < 1.5
    # Away from the boundary nothing changes: hidden stays hidden, seen stays seen.
    assert (mask[rows.start : rows.stop, : int(ue) - 12] == 0).all()
    seen = mask[rows.start : rows.stop, int(ue) + 12 : int(_edge_column(view, 1.5, 2.0)) - 3]
    assert (seen == 255).all()


def test_edges_are_antialiased_and_the_material_and_shadow_show() -> None:
    view = _view()
    photo = np.full((H, W, 3), 128, np.uint8)
    dull = Mesh(*_box(-1.6, -0.2), (0.5, 0.5, 0.5, 1.0), metallic=0.0, roughness=1.0)
    shiny = Mesh(*_box(0.2, 1.6), (0.5, 0.5, 0.5, 1.0), metallic=1.0, roughness=0.2)
    img, mask = montage(photo, view, [dull, shiny], shadow_strength=0.0, contact_strength=0.35)
    # Anti-aliased: the silhouette has partial-coverage pixels along it.
    partial = ((mask > 20) & (mask < 235)).sum()
    assert partial > 0.5 * 2 * (H // 4)  # at least about one per row along the vertical edges
    # Two parts of one colour, different glTF materials: they read differently.
    u_dull, u_shiny = _edge_column(view, -0.9, 1.0), _edge_column(view, 0.9, 1.0)
    v = int(_row(view, 0.8))
    a = img[v - 3 : v + 4, int(u_dull) - 3 : int(u_dull) + 4].astype(float).mean()
    b = img[v - 3 : v + 4, int(u_shiny) - 3 : int(u_shiny) + 4].astype(float).mean()
    assert abs(a - b) > 8, (a, b)
    # A contact shadow: the ground right in front of the design's foot is darker than the photo.
    uv, _ = view.project(np.array([[-0.9, 1.87, 0.0]]))
    foot = img[int(uv[0, 1]) + 2, int(uv[0, 0])].astype(float)
    assert foot.mean() < 128 - 10, foot


def _box(x0: float, x1: float) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    b = trimesh.creation.box(extents=(x1 - x0, 0.2, 1.6))
    b.apply_translation(((x0 + x1) / 2, 2.0, 0.8))
    return np.asarray(b.vertices), np.asarray(b.faces)


def _row(view: View, z: float) -> float:
    uv, _ = view.project(np.array([[0.0, 1.9, z]]))
    return float(uv[0, 1])


def test_the_designs_texture_is_drawn() -> None:
    """A panel textured red on its left half and blue on its right: the montage shows both, where
    the UVs put them (glTF/OBJ UVs as trimesh loads them, origin at the image's bottom)."""
    import trimesh
    from PIL import Image

    view = _view()
    tex = np.zeros((64, 64, 3), np.uint8)
    tex[:, :32] = (220, 20, 20)
    tex[:, 32:] = (20, 20, 220)
    tex[:8] = (20, 200, 20)  # the image's top rows: green, at v = 1
    panel = _panel(-1.0, 1.0, 2.0, 0.2, 1.8, (1.0, 1.0, 1.0, 1.0))
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # corners: bottom-left, ..., top-left
    vis = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(tex))
    textured = Mesh(panel.vertices, panel.faces, (1.0, 1.0, 1.0, 1.0), texture=vis)
    photo = np.full((H, W, 3), 128, np.uint8)
    img, _ = montage(photo, view, [textured], shadow_strength=0.0, contact_strength=0.0)

    def at(x: float, z: float) -> np.ndarray:
        uvp, _ = view.project(np.array([[x, 2.0, z]]))
        u, v = int(uvp[0, 0]), int(uvp[0, 1])
        return np.asarray(img[v - 2 : v + 3, u - 2 : u + 3].reshape(-1, 3).mean(axis=0))

    left, right, top = at(-0.5, 1.0), at(0.5, 1.0), at(0.0, 1.78)
    assert left[0] > left[2] + 60 and left[0] > left[1] + 60, left
    assert right[2] > right[0] + 60 and right[2] > right[1] + 60, right
    assert top[1] > top[0] + 40 and top[1] > top[2] + 40, top
