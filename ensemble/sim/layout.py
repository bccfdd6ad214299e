"""Where the cells of a simulated image lie: their shapes, the pixels each owns, which divide.

Steps 2 and 3 of :mod:`ensemble.sim.images` (whose docstring tells how an image is made). Seeds
are thrown on a canvas larger than the image, so the border cuts some cells; every seed is an
ellipse with a wavy outline, and a pixel belongs to the cell whose normalised elliptic distance is
smallest and below 1 -- a weighted Voronoi diagram limited by a maximum radius, so neighbours touch
along curved borders and lone cells keep free edges. A dividing cell rounds up to a disc.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.measure import label as label_regions

BASE_SIZE = 512  # lengths below are in pixels of a 512-px image
WOBBLE = 0.12  # amplitude of the wavy cell outline, in cell radii
MITOTIC_RADIUS = 0.6  # a dividing cell rounds up to this fraction of its radius
MITOTIC_RATE = 0.05  # share of the cells in a mitotic-spindle image that divide


@dataclass
class Cell:
    """One cell's shape in canvas pixels (the canvas is the image with a margin on every side)."""

    y: float
    x: float
    radius: float  # geometric mean of the body ellipse's semi-axes
    aspect: float  # minor / major axis
    angle: float  # direction of the major axis
    nucleus_y: float  # nucleus centre, offset from the cell centre
    nucleus_x: float
    nucleus_radius: float  # in cell radii
    nucleus_aspect: float
    nucleus_angle: float
    shift: tuple[int, int]  # where the cell reads the shared wobble field
    dividing: bool = False


def elliptic(dy, dx, radius, aspect, angle):
    """Normalised elliptic distance: 1 on the ellipse with semi-axes radius / sqrt(aspect) along
    ``angle`` and radius * sqrt(aspect) across it."""
    c, s, root = float(np.cos(angle)), float(np.sin(angle)), float(np.sqrt(aspect))
    along = (dx * c + dy * s) * (root / radius)
    across = (dy * c - dx * s) / (root * radius)
    return np.sqrt(along * along + across * across)


def polar(angle: float, radius: float) -> tuple[float, float]:
    """(x, y) offset of the point ``radius`` away in direction ``angle``."""
    return float(radius * np.cos(angle)), float(radius * np.sin(angle))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    """Random field with unit standard deviation and features about ``spacing`` pixels apart.

    White noise on a coarse grid, upsampled bicubically by Pillow: far cheaper than filtering a
    full-size array, and the cost does not grow with the feature size.
    """
    h, w = shape
    spacing = max(float(spacing), 1.0)
    coarse = rng.standard_normal((int(h / spacing) + 3, int(w / spacing) + 3)).astype(np.float32)
    fine = Image.fromarray(coarse).resize(
        (round(coarse.shape[1] * spacing), round(coarse.shape[0] * spacing)), Image.Resampling.BICUBIC
    )
    field = np.asarray(fine)[:h, :w]
    return field / field[::4, ::4].std()


def layout(rng: np.random.Generator, render: int) -> tuple[list[Cell], int, float]:
    """Throw cell seeds on the canvas; returns the cells, the canvas margin and the mean radius."""
    scale = render / BASE_SIZE
    n_target = rng.integers(8, 18)  # cells whose seed lies in the image
    cover = rng.uniform(0.45, 0.8)
    mean_radius = float(np.clip(np.sqrt(cover * render**2 / (np.pi * n_target)), 38 * scale, 62 * scale))
    max_radius, min_aspect = 1.2 * mean_radius, 0.55
    margin = int(np.ceil(max_radius / np.sqrt(min_aspect) * (1 + 2.5 * WOBBLE)))
    canvas = render + 2 * margin
    n_seeds = round(n_target * (canvas / render) ** 2)
    # Dart throwing: seeds at least 1.3 mean radii apart, so neighbours overlap and compete.
    seeds = np.empty((0, 2))
    for point in rng.uniform(0, canvas, size=(40 * n_seeds, 2)):
        if len(seeds) == n_seeds:
            break
        if len(seeds) == 0 or np.min(np.hypot(*(seeds - point).T)) >= 1.3 * mean_radius:
            seeds = np.vstack([seeds, point])
    cells = []
    for y, x in seeds.tolist():
        angle = rng.uniform(0, np.pi)
        offset, direction = rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi)
        radius = mean_radius * rng.uniform(0.8, 1.2)
        nucleus_x, nucleus_y = polar(direction, offset * radius)
        cells.append(Cell(
            y=y, x=x, radius=radius, aspect=rng.uniform(min_aspect, 1.0), angle=angle,
            nucleus_y=nucleus_y, nucleus_x=nucleus_x,
            nucleus_radius=rng.uniform(0.36, 0.48), nucleus_aspect=rng.uniform(0.7, 1.0),
            nucleus_angle=angle + rng.normal(0, 0.3),
            shift=(int(rng.integers(0, 2.5 * mean_radius)), int(rng.integers(0, 2.5 * mean_radius))),
        ))
    return cells, margin, mean_radius


def _half_extent(cell: Cell) -> tuple[float, float]:
    """Half height and width of the box holding the cell's wavy ellipse."""
    major, minor = cell.radius / np.sqrt(cell.aspect), cell.radius * np.sqrt(cell.aspect)
    c, s = np.cos(cell.angle), np.sin(cell.angle)
    grow = 1 + 2.5 * WOBBLE
    return grow * np.hypot(major * s, minor * c), grow * np.hypot(major * c, minor * s)


def territories(cells: list[Cell], canvas: int, mean_radius: float, rng: np.random.Generator):
    """Assign canvas pixels to cells; returns owner index (-1 background) and depth.

    Depth is the gap between a pixel's smallest and second-smallest normalised distance (the free
    edge counts as distance 1): 0 on any border, about 1 at a cell's centre.
    """
    reach = int(2.5 * mean_radius)
    wobble = np.clip(smooth_field(rng, (canvas + reach, canvas + reach), 0.5 * mean_radius), -2.5, 2.5)
    best = np.ones((canvas, canvas), np.float32)
    second = np.ones((canvas, canvas), np.float32)
    owner = np.full((canvas, canvas), -1, np.int32)
    for i, cell in enumerate(cells):
        half_y, half_x = _half_extent(cell)
        y0, y1 = max(int(cell.y - half_y), 0), min(int(cell.y + half_y) + 2, canvas)
        x0, x1 = max(int(cell.x - half_x), 0), min(int(cell.x + half_x) + 2, canvas)
        if y0 >= y1 or x0 >= x1:
            continue
        box = (slice(y0, y1), slice(x0, x1))
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cell.y
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cell.x
        sy, sx = cell.shift
        d = elliptic(dy, dx, cell.radius, cell.aspect, cell.angle)
        d += WOBBLE * wobble[y0 + sy:y1 + sy, x0 + sx:x1 + sx]
        b = best[box]
        closer = d < b
        second[box] = np.where(closer, b, np.minimum(second[box], d))
        best[box] = np.where(closer, d, b)
        owner[box] = np.where(closer, i, owner[box])
    return owner, second - best


def keep_largest_piece(owner: np.ndarray) -> None:
    """Each cell keeps the largest connected piece of its territory; the wavy outline or a
    neighbour can pinch off small pieces, which become background."""
    pieces = label_regions(owner + 1, background=0, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    piece_owner = np.full(len(sizes), -1)
    piece_owner[pieces.ravel()] = owner.ravel()
    largest = {}
    for piece in np.argsort(sizes)[::-1]:
        largest.setdefault(piece_owner[piece], piece)
    keep = np.zeros(len(sizes), bool)
    keep[[p for cell, p in largest.items() if cell >= 0]] = True
    owner[(owner >= 0) & ~keep[pieces]] = -1


def round_up(owner: np.ndarray, cells: list[Cell], dividing: list[int]) -> None:
    """A dividing cell rounds up: it keeps a disc of its territory, the rest turns background."""
    yy, xx = np.ogrid[:owner.shape[0], :owner.shape[1]]
    for i in dividing:
        cell = cells[i]
        cell.dividing = True
        cell.nucleus_y = cell.nucleus_x = 0.0
        far = (yy - cell.y) ** 2 + (xx - cell.x) ** 2 > (MITOTIC_RADIUS * cell.radius) ** 2
        owner[(owner == i) & far] = -1


def choose_dividing(rng, cells, margin, render, spindle: bool) -> list[int]:
    """Indices of dividing cells: only in spindle images, cells whose rounded body is in the image."""
    if not spindle:
        return []
    room = np.array([
        min(c.y - margin, c.x - margin, margin + render - c.y, margin + render - c.x)
        - MITOTIC_RADIUS * c.radius for c in cells
    ])
    inside = np.flatnonzero(room >= 0)
    if len(inside) == 0:
        return [int(np.argmax(room))]
    k = max(1, rng.binomial(len(inside), MITOTIC_RATE))
    return sorted(int(i) for i in rng.choice(inside, size=k, replace=False))
