"""Procedural scenes with exact ground truth.

A scene is a small RGB image (``image_size`` px, default 48) with 1–3 objects on a varied, noisy
background. Every object has a type (grouped into categories), a colour, a size and a position on a 2×2
grid of cells, and the ground truth records, per object, its pixel bounding box and its mask over the
vision tower's patch grid. Everything is a pure function of an integer seed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------
# vocabulary of the world

#: object type -> category (the two levels of words used by captions)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "food": ("apple", "banana", "cake"),
    "animal": ("fish", "cat", "bird"),
}
TYPES: tuple[str, ...] = tuple(t for ts in CATEGORIES.values() for t in ts)
TYPE_TO_CATEGORY: dict[str, str] = {t: c for c, ts in CATEGORIES.items() for t in ts}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 220, 40),
    "purple": (150, 55, 195),
    "orange": (250, 140, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
#: positions = cells of a 2×2 grid, in reading order
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
DETAIL_RGB = (25, 25, 25)


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the world. Validated at construction (one-line errors that name the fix)."""

    image_size: int = 48
    patch_size: int = 8
    min_objects: int = 1
    max_objects: int = 3
    colors: tuple[str, ...] = tuple(COLORS)
    types: tuple[str, ...] = TYPES
    small_px: int = 13
    large_px: int = 21
    noise_std: float = 7.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "colors", tuple(self.colors))
        object.__setattr__(self, "types", tuple(self.types))
        for name in ("image_size", "patch_size", "min_objects", "max_objects", "small_px", "large_px"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"WorldConfig.{name} must be an integer, got {v!r}")
        if self.min_objects < 1:
            raise ValueError(f"WorldConfig.min_objects must be >= 1 (a scene needs at least one object), got {self.min_objects}")
        if self.max_objects < self.min_objects or self.max_objects > len(POSITIONS):
            raise ValueError(f"WorldConfig.max_objects must be in [min_objects, {len(POSITIONS)}], got {self.max_objects}")
        bad = [c for c in self.colors if c not in COLORS]
        if bad or not self.colors:
            raise ValueError(f"unknown colour(s) {bad or '(none given)'}; choose from {sorted(COLORS)}")
        bad = [t for t in self.types if t not in TYPE_TO_CATEGORY]
        if bad or not self.types:
            raise ValueError(f"unknown object type(s) {bad or '(none given)'}; choose from {list(TYPES)}")
        if self.image_size % self.patch_size or self.image_size % 2:
            raise ValueError(f"WorldConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}) and of 2")
        cell = self.image_size // 2
        if not (4 <= self.small_px <= self.large_px <= cell):
            raise ValueError(f"object sizes must satisfy 4 <= small_px <= large_px <= image_size/2 = {cell}")

    @property
    def grid(self) -> int:
        """Side of the patch grid (image tokens per side)."""
        return self.image_size // self.patch_size


@dataclass
class SceneObject:
    """One object of a scene with its exact ground truth."""

    name: str  # object type, e.g. "apple"
    category: str  # e.g. "food"
    color: str
    size: str  # "small" | "large"
    position: str  # e.g. "top left"
    bbox: tuple[float, float, float, float]  # COCO convention: x, y, width, height in pixels
    mask: list[int]  # flattened row-major 0/1 over the patch grid (grid × grid)
    pixel_mask: np.ndarray = field(repr=False, default=None)  # bool [H, W]

    def to_record(self) -> dict:
        return {"name": self.name, "category": self.category, "color": self.color, "size": self.size,
                "position": self.position, "bbox": [float(v) for v in self.bbox], "mask": list(self.mask)}


@dataclass
class Scene:
    seed: int
    image: Image.Image
    objects: list[SceneObject]
    config: WorldConfig

    def patch_mask(self, index: int, grid: int | None = None, min_pixels: int = 1) -> np.ndarray:
        """Object ``index``'s mask over a ``grid × grid`` patch grid (bool), from the exact pixel mask."""
        grid = grid or self.config.grid
        s = self.config.image_size
        if s % grid:
            raise ValueError(f"grid {grid} does not divide image size {s}")
        p = s // grid
        m = self.objects[index].pixel_mask.reshape(grid, p, grid, p).sum(axis=(1, 3))
        return m >= min_pixels

    def patch_owner(self, grid: int | None = None, min_fraction: float = 0.25) -> np.ndarray:
        """The object each patch of a ``grid × grid`` grid shows, row-major (``-1``: none): the object with the
        most pixels in the patch when it covers at least ``min_fraction`` of it (later objects are drawn on top,
        so the pixel masks are exact)."""
        grid = grid or self.config.grid
        s = self.config.image_size
        if s % grid:
            raise ValueError(f"grid {grid} does not divide image size {s}")
        p = s // grid
        if not self.objects:
            return np.full(grid * grid, -1, dtype=np.int64)
        counts = np.stack([o.pixel_mask.reshape(grid, p, grid, p).sum(axis=(1, 3)).reshape(-1) for o in self.objects])
        owner = counts.argmax(0)
        return np.where(counts.max(0) >= min_fraction * p * p, owner, -1).astype(np.int64)


def check_seed(seed) -> int:
    """Seeds must be plain integers (not bool, float or str)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}; pass e.g. seed=0")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


# ----------------------------------------------------------------------------------------------------
# drawing


def _background(rng: np.random.Generator, s: int, noise_std: float) -> np.ndarray:
    base = rng.uniform(70, 165)
    tint = rng.uniform(-18, 18, size=3)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) - 0.5
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * xx + np.sin(ang) * yy)[..., None] * rng.uniform(10, 45)
    img = base + tint[None, None, :] + grad
    # a few faint blotches for texture
    for _ in range(int(rng.integers(0, 4))):
        cx, cy, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(3, s / 3)
        d = ((xx + 0.5) * (s - 1) - cx) ** 2 + ((yy + 0.5) * (s - 1) - cy) ** 2
        img = img + (d < r * r)[..., None] * rng.uniform(-14, 14)
    img = img + rng.normal(0, noise_std, size=img.shape)
    return img


def _draw_object(kind: str, x: float, y: float, s: float, im: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (body, detail) boolean masks [im, im] for an object of type ``kind`` in box (x, y, s)."""
    body = Image.new("L", (im, im), 0)
    det = Image.new("L", (im, im), 0)
    b, d = ImageDraw.Draw(body), ImageDraw.Draw(det)
    cx, cy = x + s / 2, y + s / 2
    e = s - 1
    if kind == "apple":
        b.ellipse([x, y + 0.22 * s, x + e, y + e], fill=255)
        b.rectangle([cx - 0.07 * s, y, cx + 0.07 * s, y + 0.3 * s], fill=255)
        d.rectangle([cx - 0.07 * s, y, cx + 0.07 * s, y + 0.3 * s], fill=255)
    elif kind == "banana":
        b.ellipse([x, y, x + e, y + e], fill=255)
        b.ellipse([x + 0.12 * s, y - 0.42 * s, x + 1.25 * s, y + 0.6 * s], fill=0)
        b.rectangle([x, y, x + 0.2 * s, y + 0.18 * s], fill=0)
    elif kind == "cake":
        b.rectangle([x, y + 0.38 * s, x + e, y + e], fill=255)
        b.rectangle([cx - 0.08 * s, y, cx + 0.08 * s, y + 0.38 * s], fill=255)
        d.rectangle([x, y + 0.62 * s, x + e, y + 0.72 * s], fill=255)
    elif kind == "fish":
        b.ellipse([x, y + 0.2 * s, x + 0.72 * s, y + 0.8 * s], fill=255)
        b.polygon([(x + 0.6 * s, cy), (x + e, y + 0.12 * s), (x + e, y + 0.88 * s)], fill=255)
        d.rectangle([x + 0.15 * s, y + 0.38 * s, x + 0.25 * s, y + 0.48 * s], fill=255)
    elif kind == "cat":
        b.ellipse([x + 0.08 * s, y + 0.25 * s, x + 0.92 * s, y + e], fill=255)
        b.polygon([(x + 0.1 * s, y + 0.55 * s), (x + 0.18 * s, y), (x + 0.48 * s, y + 0.32 * s)], fill=255)
        b.polygon([(x + 0.9 * s, y + 0.55 * s), (x + 0.82 * s, y), (x + 0.52 * s, y + 0.32 * s)], fill=255)
        for ex in (0.3, 0.6):
            d.rectangle([x + ex * s, y + 0.5 * s, x + (ex + 0.1) * s, y + 0.6 * s], fill=255)
    elif kind == "bird":
        w = max(2.0, 0.24 * s)
        b.line([(x, y + 0.15 * s), (cx, y + 0.7 * s), (x + e, y + 0.15 * s)], fill=255, width=int(round(w)))
        b.ellipse([cx - 0.16 * s, y + 0.52 * s, cx + 0.16 * s, y + 0.86 * s], fill=255)
    else:  # pragma: no cover - validated earlier
        raise ValueError(kind)
    bm = np.asarray(body) > 0
    dm = (np.asarray(det) > 0) & bm
    return bm, dm


def generate_scene(seed: int, config: WorldConfig | None = None) -> Scene:
    """Draw the scene of ``seed`` (deterministic: the same seed and config give the same pixels)."""
    seed = check_seed(seed)
    cfg = config or WorldConfig()
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    cell = s // 2
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    img = _background(rng, s, cfg.noise_std)
    objects: list[SceneObject] = []
    for c in cells:
        kind = cfg.types[int(rng.integers(len(cfg.types)))]
        color = cfg.colors[int(rng.integers(len(cfg.colors)))]
        size = SIZES[int(rng.integers(2))]
        px = cfg.large_px if size == "large" else cfg.small_px
        r0, c0 = divmod(c, 2)
        x = c0 * cell + int(rng.integers(0, cell - px + 1))
        y = r0 * cell + int(rng.integers(0, cell - px + 1))
        body, det = _draw_object(kind, x, y, px, s)
        rgb = np.array(COLORS[color], dtype=np.float64) + rng.uniform(-15, 15, size=3)
        shade = rng.normal(0, 5, size=(s, s, 1))
        img = np.where(body[..., None], rgb[None, None, :] + shade, img)
        img = np.where(det[..., None], np.array(DETAIL_RGB, dtype=np.float64)[None, None, :], img)
        ys, xs = np.nonzero(body)
        bbox = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
        g, p = cfg.grid, cfg.patch_size
        pm = body.reshape(g, p, g, p).any(axis=(1, 3))
        objects.append(SceneObject(kind, TYPE_TO_CATEGORY[kind], color, size, POSITIONS[c], bbox,
                                   pm.astype(np.int64).ravel().tolist(), body))
    image = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    return Scene(seed, image, objects, cfg)
