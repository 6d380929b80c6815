"""Deterministic synthetic datasets in the MVTec AD folder layout.

Lets the demo, the tests and the benchmarks run offline without the real
MVTec AD download. Each category is a different scene (woven texture, tile
grid, screw on a plate, round cap on felt); normal images vary in position,
rotation, lighting and noise so detection is not trivial, and defects are
drawn with hard edges and clear contrast so a good detector separates them.

Every image gets its own random generator seeded by (seed, category, split,
index), so a category's images do not depend on which other categories or
how many images were requested. Masks are exact: a mask pixel is set where
the defective image differs from the same image rendered without the defect.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from moleflow_edge.atomic import OutputError
from moleflow_edge.errors import InputError

__all__ = ["CATEGORIES", "DEFECT_KINDS", "generate"]

CATEGORIES = ("weave", "tiles", "screw", "cap")
DEFECT_KINDS = ("scratch", "stain", "missing", "color")

MIN_IMAGE_SIZE = 32
MIN_DEFECT_AREA = 0.015  # fraction of the image a defect must change
MIN_DEFECT_CONTRAST = 30.0  # mean change in grey levels over the mask; noise sigma is ~3
NOISE_SIGMA = (2.0, 4.0)  # per-image range of pixel noise, grey levels
MAX_DEFECT_TRIES = 50
MARKER = ".moleflow-synth"  # hidden, so the MVTec loader ignores it


@dataclass
class _Scene:
    """An unlit rendering (H,W,3) float32 BGR, what shows through a missing piece, and the part's pixels."""

    image: np.ndarray
    background: np.ndarray
    part: np.ndarray  # (H,W) bool: where defects may land


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (size, size) float32."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)


def _rotated(size: int, angle: float, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) in a frame rotated by ``angle`` radians about (cx, cy)."""
    x, y = _grid(size)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise (size, size) with blobs about ``scale`` pixels wide."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), scale)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _jitter_color(rng: np.random.Generator, bgr: tuple[float, float, float], spread: float) -> np.ndarray:
    return np.asarray(bgr, np.float32) * (1.0 + rng.uniform(-spread, spread, 3)).astype(np.float32)


def _render_weave(rng: np.random.Generator, size: int) -> _Scene:
    """Plain weave: warp and weft threads alternate over and under, with dark gaps between."""
    period = size / rng.uniform(9.0, 11.0)
    u, v = _rotated(size, np.deg2rad(rng.uniform(-4, 4)), size / 2, size / 2)
    u = u / period + rng.uniform(0, 2)
    v = v / period + rng.uniform(0, 2)
    width = 0.8  # thread width as a fraction of the period
    fu, fv = u % 1.0 - 0.5, v % 1.0 - 0.5
    in_weft, in_warp = np.abs(fv) < width / 2, np.abs(fu) < width / 2
    weft_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    # Round thread cross-section, with fibres running along each thread.
    weft_shade = np.cos(np.pi * fv / width) * (1 + 0.07 * np.sin(2 * np.pi * (3 * v + 0.4 * u)))
    warp_shade = np.cos(np.pi * fu / width) * (1 + 0.07 * np.sin(2 * np.pi * (3 * u + 0.4 * v)))
    show_weft = in_weft & (weft_on_top | ~in_warp)
    show_warp = in_warp & ~show_weft
    weft_color = _jitter_color(rng, (150, 185, 205), 0.06)
    warp_color = _jitter_color(rng, (125, 160, 185), 0.06)
    gap = np.asarray((40, 50, 60), np.float32)
    image = np.broadcast_to(gap, (size, size, 3)).copy()
    image[show_weft] = weft_color * (0.55 + 0.45 * weft_shade[show_weft, None])
    image[show_warp] = warp_color * (0.55 + 0.45 * warp_shade[show_warp, None])
    backing = np.asarray((25, 30, 35), np.float32) * (1 + 0.15 * _smooth_noise(rng, size, 2.0))[..., None]
    return _Scene(image, backing, np.ones((size, size), bool))


def _render_tiles(rng: np.random.Generator, size: int) -> _Scene:
    """Glazed tiles in a grid with light grout, each tile a slightly different shade."""
    period = size / rng.uniform(3.6, 4.4)
    u, v = _rotated(size, np.deg2rad(rng.uniform(-3, 3)), size / 2, size / 2)
    u = u + rng.uniform(0, period)
    v = v + rng.uniform(0, period)
    grout = max(2.0, 0.09 * period)
    du, dv = u % period, v % period
    edge = np.minimum(np.minimum(du, period - du), np.minimum(dv, period - dv)) - grout / 2
    is_grout = edge < 0
    tile_shades = rng.uniform(0.88, 1.08, (16, 16)).astype(np.float32)
    shade = tile_shades[np.floor(u / period).astype(int) % 16, np.floor(v / period).astype(int) % 16]
    bevel = 1.0 - 0.25 * np.exp(-np.maximum(edge, 0) / 1.5)
    speckle = 1.0 + 0.04 * _smooth_noise(rng, size, 1.0)
    tile_color = _jitter_color(rng, (70, 110, 185), 0.05)
    grout_color = _jitter_color(rng, (175, 180, 180), 0.04)
    image = tile_color * (shade * bevel * speckle)[..., None]
    image[is_grout] = grout_color
    substrate = np.asarray((45, 48, 55), np.float32) * (1 + 0.15 * _smooth_noise(rng, size, 2.0))[..., None]
    return _Scene(image, substrate, np.ones((size, size), bool))


def _with_shadow(background: np.ndarray, part: np.ndarray, size: int) -> np.ndarray:
    """Darken the background where the part casts a soft shadow down and to the right."""
    shift = max(1, round(size / 40))
    shadow = np.zeros_like(part, np.float32)
    shadow[shift:, shift:] = part[:-shift, :-shift]
    shadow = cv2.GaussianBlur(shadow, (0, 0), size / 60)
    return background * (1.0 - 0.45 * shadow)[..., None]


def _render_screw(rng: np.random.Generator, size: int) -> _Scene:
    """A slotted metal screw on a matte plate, at a slightly varying place and angle."""
    cx, cy = size * (0.5 + rng.uniform(-0.04, 0.04, 2))
    a, b = _rotated(size, np.deg2rad(30 + rng.uniform(-8, 8)), cx, cy)
    length, radius, pitch = 0.62 * size, 0.07 * size, 0.045 * size
    tip = 0.12 * size
    a = a + 0.05 * size  # shift along the axis so shaft plus head sit centred
    threads = np.sin(2 * np.pi * (a + 0.35 * b) / pitch)
    shaft_radius = radius * np.clip((length / 2 - a) / tip, 0, 1) * (0.94 + 0.06 * threads)
    shaft = (np.abs(a) <= length / 2) & (np.abs(b) < shaft_radius)
    n = np.clip(b / np.maximum(shaft_radius, 1e-3), -1, 1)
    shaft_shade = (0.45 + 0.55 * np.sqrt(1 - n**2) + 0.35 * np.exp(-(((n + 0.35) / 0.2) ** 2))) * (
        0.85 + 0.15 * threads
    )
    head_radius = 0.13 * size
    ha, hb = a + length / 2, b
    head_r = np.hypot(ha, hb)
    head = head_r < head_radius
    slot_angle = rng.uniform(0, np.pi)
    slot = head & (np.abs(np.cos(slot_angle) * hb - np.sin(slot_angle) * ha) < 0.022 * size)
    head_shade = 0.55 + 0.5 * np.sqrt(np.clip(1 - (head_r / head_radius) ** 2, 0, 1))
    head_shade = np.where(slot, 0.25, head_shade)
    metal = _jitter_color(rng, (170, 172, 178), 0.04)
    plate = _jitter_color(rng, (120, 112, 100), 0.05)
    texture = 1 + 0.05 * _smooth_noise(rng, size, 3.0)
    part = shaft | head
    background = _with_shadow(plate * texture[..., None], part, size)
    image = background.copy()
    image[shaft] = metal * shaft_shade[shaft, None]
    image[head] = metal * head_shade[head, None]
    return _Scene(image, background, part)


def _render_cap(rng: np.random.Generator, size: int) -> _Scene:
    """A red bottle cap with a knurled rim and a moulded ring, lying on green felt."""
    cx, cy = size * (0.5 + rng.uniform(-0.04, 0.04, 2))
    x, y = _grid(size)
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    cap_radius = 0.33 * size * rng.uniform(0.97, 1.03)
    part = r < cap_radius
    rim = r > 0.86 * cap_radius
    knurl = 0.78 + 0.17 * np.sin(48 * theta + rng.uniform(0, 2 * np.pi))
    groove = np.abs(r - 0.58 * cap_radius) < 0.025 * size
    hx, hy = rng.uniform(-0.45, -0.25, 2) * cap_radius
    highlight = 0.35 * np.exp(-((dx - hx) ** 2 + (dy - hy) ** 2) / (2 * (0.18 * cap_radius) ** 2))
    face = 1.0 - 0.12 * r / cap_radius + highlight
    shade = np.where(rim, knurl, np.where(groove, 0.6, face))
    red = _jitter_color(rng, (45, 45, 190), 0.06)
    felt = _jitter_color(rng, (60, 95, 65), 0.06)
    texture = 1 + 0.08 * _smooth_noise(rng, size, 1.0)
    background = _with_shadow(felt * texture[..., None], part, size)
    image = background.copy()
    image[part] = red * shade[part, None]
    return _Scene(image, background, part)


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "weave": _render_weave,
    "tiles": _render_tiles,
    "screw": _render_screw,
    "cap": _render_cap,
}


def _random_part_point(rng: np.random.Generator, part: np.ndarray, margin: int) -> np.ndarray:
    """A random (x, y) pixel of the part, away from the image border when possible."""
    inner = np.zeros_like(part)
    inner[margin:-margin, margin:-margin] = part[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(inner if inner.any() else part)
    k = rng.integers(len(xs))
    return np.array([xs[k], ys[k]], np.int32)


def _blob(rng: np.random.Generator, center: np.ndarray, radius: float, size: int) -> np.ndarray:
    """An irregular hard-edged blob: a union of a few ellipses around ``center``."""
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(3, 6)):
        offset = rng.normal(0, 0.35 * radius, 2)
        c = tuple(int(round(t)) for t in center + offset)
        axes = tuple(int(round(t)) for t in radius * rng.uniform(0.5, 1.0, 2))
        cv2.ellipse(canvas, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    return canvas.astype(bool)


def _scratch(scene: _Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin dark or bright line across the part, kinked once."""
    margin = size // 10
    start = _random_part_point(rng, scene.part, margin)
    end = _random_part_point(rng, scene.part, margin)
    mid = (start + end) / 2 + rng.normal(0, 0.06 * size, 2)
    points = np.array([start, mid, end], np.int32).reshape(-1, 1, 2)
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [points], False, 1, max(2, round(size / 32)), cv2.LINE_8)
    stamp = canvas.astype(bool) & scene.part
    image = scene.image.copy()
    brightness = float(scene.image[stamp].mean()) if stamp.any() else 128.0
    value = rng.uniform(15, 45) if brightness > 110 else rng.uniform(215, 245)
    image[stamp] = value
    return image


def _stain(scene: _Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """A blotch of dark oil or light residue, semi-transparent so the texture shows through."""
    stamp = _blob(rng, _random_part_point(rng, scene.part, size // 8), size * rng.uniform(0.08, 0.12), size)
    stamp &= scene.part
    image = scene.image.copy()
    brightness = float(scene.image[stamp].mean()) if stamp.any() else 128.0
    color = np.array((20, 40, 60) if brightness > 100 else (200, 215, 225), np.float32)
    alpha = rng.uniform(0.6, 0.8) * (0.85 + 0.15 * _smooth_noise(rng, size, 2.0))[stamp, None]
    image[stamp] = (1 - alpha) * image[stamp] + alpha * color
    return image


def _missing(scene: _Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """A broken-off piece: part pixels replaced by what lies behind the part."""
    if scene.part.all():
        center = _random_part_point(rng, scene.part, size // 8).astype(np.float64)
        radius = size * rng.uniform(0.08, 0.12)
    else:  # bite out of the outline, as a chipped edge would be
        kernel = np.ones((3, 3), np.uint8)
        outline = scene.part & ~cv2.erode(scene.part.astype(np.uint8), kernel).astype(bool)
        center = _random_part_point(rng, outline, size // 10).astype(np.float64)
        radius = size * rng.uniform(0.11, 0.16)
    stamp = _blob(rng, center, radius, size) & scene.part
    image = scene.image.copy()
    image[stamp] = scene.background[stamp]
    return image


def _color(scene: _Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """A patch of the part in the wrong colour, texture kept (paint or material deviation)."""
    stamp = _blob(rng, _random_part_point(rng, scene.part, size // 8), size * rng.uniform(0.09, 0.13), size)
    stamp &= scene.part
    direction = rng.standard_normal(3)
    direction -= direction.mean()
    gains = 1.0 + 0.7 * direction / (np.abs(direction).max() + 1e-6)
    image = scene.image.copy()
    image[stamp] = image[stamp] * gains.astype(np.float32)
    return image


_DEFECTS: dict[str, Callable[[_Scene, np.random.Generator, int], np.ndarray]] = {
    "scratch": _scratch,
    "stain": _stain,
    "missing": _missing,
    "color": _color,
}


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative light field (H,W,3): overall gain, a gentle gradient and a colour cast."""
    x, y = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (float(np.cos(angle)) * (x - size / 2) + float(np.sin(angle)) * (y - size / 2)) / size
    field = rng.uniform(0.9, 1.1) * (1 + rng.uniform(0, 0.16) * ramp)
    return field[..., None] * (1 + rng.uniform(-0.03, 0.03, 3)).astype(np.float32)


def _finish(image: np.ndarray, light: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Apply light and sensor noise and quantise to uint8 BGR."""
    return np.clip(np.rint(image * light + noise), 0, 255).astype(np.uint8)


def _make_image(
    category: str, rng: np.random.Generator, size: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """One uint8 BGR image and, for a defect, its exact uint8 0/255 mask."""
    scene = _RENDERERS[category](rng, size)
    light = _lighting(rng, size)
    noise = rng.uniform(*NOISE_SIGMA) * rng.standard_normal((size, size, 3), dtype=np.float32)
    clean = _finish(scene.image, light, noise)
    if defect is None:
        return clean, None
    for _ in range(MAX_DEFECT_TRIES):
        raw = _DEFECTS[defect](scene, rng, size)
        image = _finish(raw, light, noise)
        change = np.abs(image.astype(np.int16) - clean).max(axis=-1)
        mask = change > 0
        if mask.mean() >= MIN_DEFECT_AREA and change[mask].mean() >= MIN_DEFECT_CONTRAST:
            return image, mask.astype(np.uint8) * 255
    raise InputError(
        f"could not draw a visible {defect!r} defect on {category!r} at image_size={size} "
        f"in {MAX_DEFECT_TRIES} tries; use a larger image_size"
    )


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    data.tofile(path)


def _prepare_category_dir(folder: Path) -> None:
    """Empty a folder this generator wrote before; refuse to overwrite anything else.

    Real MVTec AD has a "screw" category too, so writing into a folder that
    is not ours could destroy a real dataset.
    """
    if folder.exists():
        if not (folder / MARKER).is_file() and any(folder.iterdir()):
            raise OutputError(
                f"{folder} exists and was not written by the synthetic generator; choose another --out folder"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("written by moleflow_edge.data.synth; safe to regenerate\n")


def generate(
    out: str | Path,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 4,
) -> list[str]:
    """Write a synthetic MVTec-layout dataset under ``out``; returns the categories written.

    ``n_test_defect`` images are written per defect kind. The same arguments
    always give byte-identical files.
    """
    names = list(CATEGORIES if categories is None else categories)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown:
        raise InputError(f"unknown synthetic categories {unknown}; valid ones are {', '.join(CATEGORIES)}")
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise InputError(f"seed must be non-negative, got {seed}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise InputError("n_train must be >= 1, and n_test_good and n_test_defect >= 0")

    root = Path(out)
    for name in names:
        category_dir = root / name
        _prepare_category_dir(category_dir)
        # (folder, defect kind or None, count); the position in the plan seeds the split
        plan: list[tuple[str, str | None, int]] = [("train/good", None, n_train), ("test/good", None, n_test_good)]
        plan += [(f"test/{kind}", kind, n_test_defect) for kind in DEFECT_KINDS]
        for split_id, (folder, defect, count) in enumerate(plan):
            image_dir = category_dir / folder
            image_dir.mkdir(parents=True)
            if defect is not None:
                (category_dir / "ground_truth" / defect).mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([seed, CATEGORIES.index(name), split_id, index])
                image, mask = _make_image(name, rng, image_size, defect)
                _write_png(image_dir / f"{index:03d}.png", image)
                if mask is not None:
                    _write_png(category_dir / "ground_truth" / defect / f"{index:03d}_mask.png", mask)
    return names
