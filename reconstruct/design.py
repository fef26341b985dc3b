"""Import a COVER design: mesh file + descriptor JSON -> parts in metres, design frame.

The design frame is X along the design's width, Y towards its front, Z up, origin at its
anchor (ground level). Units, up axis and front direction come from the descriptor; without
one, units are guessed from the bounding box (with a warning) and the glTF convention (+Y up,
+Z front) is assumed for glTF and +Z up for the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from reconstruct.errors import DesignError
from reconstruct.jsonfile import load_model

if TYPE_CHECKING:
    import trimesh  # imported where a mesh is loaded: the API imports this module for its schema

log = logging.getLogger(__name__)

UNITS = {"mm": 0.001, "cm": 0.01, "m": 1.0}
AXES = {"+X": (1, 0, 0), "-X": (-1, 0, 0), "+Y": (0, 1, 0), "-Y": (0, -1, 0), "+Z": (0, 0, 1), "-Z": (0, 0, -1)}
MAX_TRIANGLES = 2_000_000
SUFFIXES = {".glb", ".gltf", ".obj", ".stl", ".ply", ".dae", ".off"}


class DesignDescriptor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "design"
    file: str | None = None
    units: Literal["mm", "cm", "m"] | None = None
    up: Literal["+X", "-X", "+Y", "-Y", "+Z", "-Z"] | None = None
    front: Literal["+X", "-X", "+Y", "-Y", "+Z", "-Z"] | None = None
    anchor: tuple[float, float, float] = (0.0, 0.0, 0.0)
    width_axis: Literal["+X", "-X", "+Y", "-Y", "+Z", "-Z"] | None = None
    scalable: bool = Field(default=False, description="May the width stretch to the measured opening?")


@dataclass
class Part:
    vertices: np.ndarray  # N x 3, metres, design frame
    faces: np.ndarray  # M x 3
    color: tuple[float, float, float, float]
    name: str = ""
    texture: Any | None = None  # trimesh TextureVisuals (UVs per vertex + material), for plan.glb
    metallic: float = 0.0  # glTF metallic-roughness factors (the montage renderer shades with them)
    roughness: float = 0.7


@dataclass
class Design:
    name: str
    parts: list[Part]
    scalable: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def bounds(self) -> np.ndarray:
        v = np.vstack([p.vertices for p in self.parts])
        return np.array([v.min(axis=0), v.max(axis=0)])

    @property
    def width(self) -> float:
        b = self.bounds
        return float(b[1, 0] - b[0, 0])

    @property
    def num_triangles(self) -> int:
        return sum(len(p.faces) for p in self.parts)


def _inside(name: str) -> bool:
    """A relative path that stays inside the design's folder (no scheme, drive, root or '..')."""
    import posixpath

    if "://" in name or ":" in name or name.startswith(("/", "\\")):
        return False
    norm = posixpath.normpath(name.replace("\\", "/"))
    return not (norm == ".." or norm.startswith("../"))


def _folder_resolver(folder: Path) -> Any:
    """A trimesh resolver for a design's external files, only inside its own folder: no
    traversal, no URLs."""
    import trimesh

    class FolderResolver(trimesh.resolvers.FilePathResolver):
        def get(self, name: str) -> bytes:
            if not _inside(name):
                raise DesignError(f"the design references a file outside its folder ('{Path(name).name}')")
            return bytes(super().get(name))

    return FolderResolver(str(folder))


def _check_references(mesh_path: Path) -> None:
    """Refuse a design whose file names anything outside its folder (path traversal, absolute
    paths, URLs), before a loader sees it: trimesh skips a material it cannot fetch without
    telling the resolver's refusal, so the check cannot rely on the resolver alone."""
    import json
    import re
    import xml.etree.ElementTree as ET

    refs: list[str] = []
    suffix = mesh_path.suffix.lower()
    try:
        if suffix == ".obj":
            text = mesh_path.read_text(errors="replace")
            mtls = re.findall(r"^\s*mtllib\s+(.+?)\s*$", text, flags=re.M)
            refs += mtls
            for m in mtls:
                mtl = mesh_path.parent / m
                if _inside(m) and mtl.is_file():
                    refs += re.findall(
                        r"^\s*(?:map_\w+|bump|disp|decal|refl)\s+(?:-\S+\s+\S+\s+)*(\S+)\s*$",
                        mtl.read_text(errors="replace"),
                        flags=re.M,
                    )
        elif suffix == ".gltf":
            doc = json.loads(mesh_path.read_text())
            refs += [x["uri"] for k in ("buffers", "images") for x in doc.get(k, []) if "uri" in x]
            refs = [r for r in refs if not r.startswith("data:")]
        elif suffix == ".dae":
            root = ET.parse(mesh_path).getroot()
            refs += [e.text.strip() for e in root.iter() if e.tag.endswith("init_from") and e.text]
            refs = [r for r in refs if "." in r or "/" in r]  # image files, not element ids
    except (OSError, ValueError, ET.ParseError):
        return  # unreadable here: the loader will say so
    for r in refs:
        if not _inside(r):
            raise DesignError(f"the design references a file outside its folder ('{Path(r).name}')")


def _textured(geom: trimesh.Trimesh) -> Any | None:
    """The geometry's texture visual (UVs + a material with an image), kept for plan.glb."""
    vis: Any = geom.visual
    uv = getattr(vis, "uv", None)
    if getattr(vis, "kind", None) != "texture" or uv is None:
        return None
    mat = getattr(vis, "material", None)
    img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
    return vis if img is not None and len(uv) == len(geom.vertices) else None


def _texture_mean(mat: Any) -> np.ndarray | None:
    img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
    if img is None:
        return None
    try:
        small = np.asarray(img.convert("RGBA").resize((32, 32)), float) / 255.0
    except Exception:
        return None
    return np.asarray(small.reshape(-1, 4).mean(axis=0))


def _color_of(geom: trimesh.Trimesh) -> tuple[float, float, float, float]:
    """One colour per part for the montage renderer: the material's colour, times its texture's
    mean colour when it has one (plan.glb keeps the texture itself)."""
    vis = geom.visual
    try:
        mat = getattr(vis, "material", None)
        tex = _texture_mean(mat) if mat is not None else None
        if tex is not None:
            base = getattr(mat, "baseColorFactor", None)
            f = np.ones(4) if base is None else np.asarray(base, float)
            f = f / 255.0 if f.max() > 1.0 else f
            c = tex * (f if len(f) == 4 else np.append(f, 1.0))
            return (float(c[0]), float(c[1]), float(c[2]), float(c[3]))
        if mat is not None:
            base = getattr(mat, "baseColorFactor", None)
            if base is not None:
                c = np.asarray(base, float)
                c = c / 255.0 if c.max() > 1.0 else c
                return (float(c[0]), float(c[1]), float(c[2]), float(c[3]) if len(c) > 3 else 1.0)
            diff = getattr(mat, "diffuse", None)
            if diff is not None:
                c = np.asarray(diff, float)
                c = c / 255.0
                return (float(c[0]), float(c[1]), float(c[2]), float(c[3]) if len(c) > 3 else 1.0)
        c = np.asarray(getattr(vis, "main_color", (153, 153, 153, 255)), float) / 255.0
        return (float(c[0]), float(c[1]), float(c[2]), float(c[3]))
    except Exception:
        return (0.6, 0.6, 0.6, 1.0)


def _metal_rough(geom: trimesh.Trimesh) -> tuple[float, float]:
    """The part's glTF metallic and roughness factors (glTF's defaults, 1 and 1, where a PBR
    material leaves them out); a non-PBR material (OBJ, STL) is a painted dielectric."""
    mat = getattr(geom.visual, "material", None)
    if mat is None or not hasattr(mat, "metallicFactor"):
        return 0.0, 0.7
    m, r = getattr(mat, "metallicFactor", None), getattr(mat, "roughnessFactor", None)
    return (1.0 if m is None else float(m)), (1.0 if r is None else float(r))


def _frame(up: str, front: str) -> np.ndarray:
    """Rotation taking file coordinates to the design frame (X width, Y front, Z up)."""
    z = np.array(AXES[up], float)
    y = np.array(AXES[front], float)
    if abs(z @ y) > 1e-9:
        raise DesignError("the descriptor's up and front directions must be perpendicular")
    x = np.cross(y, z)
    return np.vstack([x, y, z])


def load_descriptor(path: Path) -> DesignDescriptor:
    return load_model(path, DesignDescriptor, DesignError, "design descriptor")


def load_design(path: Path) -> Design:
    """Load a design from a mesh file or a descriptor JSON naming one."""
    if not path.exists():
        raise DesignError(f"the design {path.name} does not exist")
    desc: DesignDescriptor
    if path.suffix.lower() == ".json":
        desc = load_descriptor(path)
        if not desc.file:
            raise DesignError("the design descriptor names no mesh file ('file')")
        mesh_path = path.parent / desc.file
        if ".." in Path(desc.file).parts or Path(desc.file).is_absolute():
            raise DesignError("the design descriptor's file must lie in the descriptor's folder")
    else:
        mesh_path = path
        side = path.with_suffix(".json")
        desc = load_descriptor(side) if side.is_file() else DesignDescriptor()
    if mesh_path.suffix.lower() not in SUFFIXES:
        raise DesignError(f"unsupported design format '{mesh_path.suffix}' (use GLB/glTF, OBJ, STL, PLY or DAE)")
    if not mesh_path.is_file():
        raise DesignError(f"the design file {mesh_path.name} does not exist")
    import trimesh

    warnings: list[str] = []
    try:
        _check_references(mesh_path)
        # process=False: trimesh would silently drop non-finite vertices; they are refused below.
        loaded = trimesh.load(str(mesh_path), force="scene", resolver=_folder_resolver(mesh_path.parent), process=False)
    except DesignError:
        raise
    except Exception as exc:
        raise DesignError(f"the design file {mesh_path.name} cannot be read ({type(exc).__name__})") from None
    if not isinstance(loaded, trimesh.Scene):
        raise DesignError(f"the design file {mesh_path.name} holds no mesh")
    scene = loaded
    geoms: list[tuple[str, trimesh.Trimesh]] = []
    for node in scene.graph.nodes_geometry:
        transform, gname = scene.graph[node]
        g = scene.geometry[gname]
        if not isinstance(g, trimesh.Trimesh) or len(g.faces) == 0:
            continue
        g = g.copy()
        g.apply_transform(transform)
        geoms.append((str(node), g))
    if not geoms:
        raise DesignError(f"the design file {mesh_path.name} holds no triangles")
    n_tri = sum(len(g.faces) for _, g in geoms)
    if n_tri > MAX_TRIANGLES:
        raise DesignError(f"the design has {n_tri} triangles; the limit is {MAX_TRIANGLES}")
    allv = np.vstack([g.vertices for _, g in geoms])
    if not np.isfinite(allv).all():
        raise DesignError("the design has non-finite vertex coordinates")
    ext = float((allv.max(axis=0) - allv.min(axis=0)).max())
    units = desc.units
    if units is None:
        # A gate, fence or carport is 0.5-30 m; in mm that is 500-30000.
        units = "mm" if ext > 100 else ("cm" if ext > 40 else "m")
        warnings.append(f"units not declared; guessed '{units}' from the size ({ext:.1f} units)")
    k = UNITS[units]
    if not 0.05 <= ext * k <= 100:
        raise DesignError(f"the design is {ext * k:.3g} m across; expected 0.05-100 m (check its units)")
    is_gltf = mesh_path.suffix.lower() in {".glb", ".gltf"}
    up = desc.up or ("+Y" if is_gltf else "+Z")
    front = desc.front or ("+Z" if up == "+Y" else "+Y")
    if desc.up is None:
        warnings.append(f"up axis not declared; assumed {up}")
    # trimesh keeps file coordinates as they are (no glTF Y-up conversion), so the frame is ours to set.
    Rf = _frame(up, front)
    anchor = np.asarray(desc.anchor, float)
    parts = []
    for name, g in geoms:
        v = (Rf @ ((np.asarray(g.vertices, float) - anchor) * k).T).T
        metal, rough = _metal_rough(g)
        parts.append(Part(v, np.asarray(g.faces, np.int64), _color_of(g), name, _textured(g), metal, rough))
    d = Design(desc.name, parts, desc.scalable, warnings)
    for w in warnings:
        log.warning("design: %s", w)
    return d


def design_footprint_corners(design: Design) -> np.ndarray:
    """The 8 corners of the design's bounding box, design frame."""
    b = design.bounds
    return np.array([[b[i, 0], b[j, 1], b[k, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])


def rotation_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def describe(design: Design) -> dict[str, Any]:
    b = design.bounds
    return {
        "name": design.name,
        "width_m": round(float(b[1, 0] - b[0, 0]), 4),
        "depth_m": round(float(b[1, 1] - b[0, 1]), 4),
        "height_m": round(float(b[1, 2] - b[0, 2]), 4),
        "triangles": design.num_triangles,
        "scalable": design.scalable,
        "warnings": design.warnings,
    }
