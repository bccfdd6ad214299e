"""Simulator of HPA-like four-channel microscopy images with per-cell ground truth.

An image is a field of touching cells. Each has a nucleus (blue), a filamentous microtubule
network (red) and a reticular endoplasmic reticulum (yellow); the green channel draws the protein:
every localisation class has its own pattern at its real place in the cell. Image labels follow the
class and label-count statistics of the HPA Kaggle training set; each cell carries its own subset
of them, and the image label is their union (weak labelling).

How one image is made (all lengths scale with the image size, so the same layout is drawn bigger):

1. labels: :func:`sample_image_labels`, or given;
2. cells: seeds thrown on a canvas larger than the image (so the border cuts some cells); every
   seed is an ellipse with a wavy outline, and a pixel belongs to the cell whose normalised elliptic
   distance is smallest and below 1 -- a weighted Voronoi diagram limited by a maximum radius, so
   neighbours touch along curved borders and lone cells keep free edges;
3. truth: which cells divide (only in mitotic-spindle images), which classes each cell carries,
   which fraction of each cell the image captures;
4. channels: drawn cell by cell inside bounding boxes, from image-wide random textures;
5. optics: blur, upsampling to the final size, background, shot and read noise.

Weak-label semantics (the competition's): a cell of a positive image carries each image class with
a per-image probability (most classes 70-100 % of cells, aggresome 30-60 %, mitotic spindle only
the dividing cells, about 1 in 20). Every image class lies in at least one cell, preferably one
that is at least half inside the image. A cell that ends up with none of its image's classes shows
only background green and its truth label is Negative (18). So an image's label is the union of
its cells' labels without Negative; a Negative image's cells are all Negative.

Every random draw for an image comes from one ``numpy.random.Generator`` seeded with
``[seed, index]``, so images can be made alone, in any order or in parallel, and the same settings
give byte-identical files.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.measure import label as label_regions

from ensemble.labels import CHANNELS, NEGATIVE, NUM_CLASSES, format_labels

SIMULATOR_VERSION = "1.0"

# Share of HPA training images carrying each class, and of images with 1..5 labels.
CLASS_SHARE = np.array(
    [.403, .050, .112, .058, .065, .082, .036, .085, .044, .046,
     .038, .004, .080, .148, .092, .012, .261, .029, .002]
)
COUNT_SHARE = np.array([0.48, 0.41, 0.10, 0.01, 0.0005])
RARE_SHARE = 0.05  # classes rarer than this are the ones `rare_oversample` boosts

SPINDLE = 11
NUCLEAR_CLASSES = frozenset(range(6))
# Range of the per-image share of cells carrying a class; the spindle is set by MITOTIC_RATE.
CELL_SHARE = {15: (0.3, 0.6)}
DEFAULT_CELL_SHARE = (0.7, 1.0)
MITOTIC_RATE = 0.05
# Classes real models confuse (paper, Fig. 5e, 6b): with difficulty, a pattern borrows its partner's.
LOOKALIKE = {0: 5, 5: 0, 4: 5, 2: 12, 12: 2, 3: 2, 6: 16, 16: 6, 13: 16,
             7: 17, 17: 7, 8: 9, 9: 8, 10: 8, 14: 17, 15: 7, 1: 13}

BASE_SIZE = 512  # lengths below are in pixels of a 512-px image
# Structures are drawn at most at this size and upsampled: at 2048 px and beyond the optical blur
# is wider than the upsampling step, and drawing costs grow with the pixel count.
RENDER_MAX = 1024
WOBBLE = 0.12  # amplitude of the wavy cell outline, in cell radii
MITOTIC_RADIUS = 0.6  # a dividing cell rounds up to this fraction of its radius
# Fixed encoder settings and no metadata, so a PNG's bytes depend only on its pixels. Level 1:
# noisy microscopy barely compresses, and higher levels cost 3x the time for 10 % smaller files.
PNG_OPTIONS = {"format": "PNG", "compress_level": 1}


@dataclass(frozen=True)
class Difficulty:
    """How separable the green patterns are.

    Attributes
    ----------
    signal : float
        Mean green pattern amplitude, as a fraction of full scale.
    noise : float
        Read-noise standard deviation of every channel (shot noise grows with it).
    blur : tuple of float
        Range of the optical blur sigma, in pixels of a 512-px image.
    contrast : float
        1 keeps a pattern's structure; 0 flattens it into a uniform fill of its compartment.
    mixing : float
        Largest weight of the look-alike class's pattern blended into a pattern.
    cell_spread : float
        Log-normal sigma of the cell-to-cell green intensity.
    """

    signal: float
    noise: float
    blur: tuple[float, float]
    contrast: float
    mixing: float
    cell_spread: float


DIFFICULTIES = {
    "easy": Difficulty(signal=0.6, noise=0.008, blur=(0.5, 0.9), contrast=1.0, mixing=0.0,
                       cell_spread=0.15),
    "medium": Difficulty(signal=0.45, noise=0.02, blur=(0.8, 1.4), contrast=0.85, mixing=0.2,
                         cell_spread=0.3),
    "hard": Difficulty(signal=0.3, noise=0.045, blur=(1.2, 2.2), contrast=0.6, mixing=0.45,
                       cell_spread=0.5),
}


@dataclass
class SimulatedImage:
    """One simulated image and its truth.

    Attributes
    ----------
    image : np.ndarray
        (H, W, 4) float32 in [0, 1], channels red, green, blue, yellow.
    cell_mask, nucleus_mask : np.ndarray
        (H, W) uint16 instance labels, 0 background, cells 1..n; a nucleus has its cell's id.
    cell_labels : dict[int, list[int]]
        Cell id -> its true classes.
    image_labels : list[int]
        The image's (weak) label.
    captured : dict[int, float]
        Cell id -> fraction of the whole cell's body inside the image (1.0 when uncut).
    """

    image: np.ndarray
    cell_mask: np.ndarray
    nucleus_mask: np.ndarray
    cell_labels: dict[int, list[int]]
    image_labels: list[int]
    captured: dict[int, float]


@dataclass
class SimulationResult:
    """What :func:`simulate` wrote."""

    root: Path
    image_ids: list[str]
    n_cells: int
    seconds: float
    settings: dict

    @property
    def images_per_second(self) -> float:
        return len(self.image_ids) / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------- image labels


@functools.lru_cache(maxsize=8)
def _label_model(rare_oversample: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Fit the label sampler: P(Negative), count probabilities, class weights.

    A positive image draws its label count k, then k distinct classes by successive weighted
    sampling (an exponential race: the k smallest of E_c / w_c, E_c ~ Exp(1)). The weights w are
    fitted by fixed-point iteration so that each class's share of images equals CLASS_SHARE.
    """
    p_negative = CLASS_SHARE[NEGATIVE]
    counts = COUNT_SHARE / COUNT_SHARE.sum()
    counts[0] -= p_negative  # Negative images are single-label
    counts /= counts.sum()
    beyond = np.concatenate([[1.0], 1.0 - np.cumsum(counts)[:-1]])  # P(k > n), n = 0..4
    target = CLASS_SHARE[:NEGATIVE] / CLASS_SHARE[:NEGATIVE].sum() * beyond.sum()
    weights = target / target.sum()
    for _ in range(30):
        reached = _label_shares(weights, beyond)
        if np.abs(reached - target).max() < 1e-5:
            break
        weights = weights * target / reached
        weights /= weights.sum()
    boost = np.where(CLASS_SHARE < RARE_SHARE, rare_oversample, 1.0)
    return min(p_negative * boost[NEGATIVE], 0.5), counts, weights * boost[:NEGATIVE]


def _label_shares(weights: np.ndarray, beyond: np.ndarray) -> np.ndarray:
    """Share of positive images carrying each class under the exponential race.

    Class c is among the first k arrivals iff fewer than k other classes arrived before it, so
    P(c chosen) = integral over t of its arrival density times sum_n P(n others before t) P(k > n).
    The count of others is Poisson-binomial, built by dynamic programming on a log-spaced t grid.
    """
    t = np.geomspace(1e-5, 1e6, 1500)
    arrived = -np.expm1(-np.outer(weights, t))  # (class, t)
    n = len(weights)
    others = np.zeros((n, len(beyond), len(t)))  # P(n others arrived), for each class c
    others[:, 0] = 1.0
    for j in range(n):
        p = np.where(np.arange(n)[:, None] == j, 0.0, arrived[j])[:, None]
        others = np.concatenate([others[:, :1] * (1 - p),
                                 others[:, 1:] * (1 - p) + others[:, :-1] * p], axis=1)
    density = weights[:, None] * np.exp(-np.outer(weights, t))
    return np.trapezoid(density * np.einsum("n,cnt->ct", beyond, others), t, axis=1)


def sample_image_labels(rng: np.random.Generator, rare_oversample: float = 1.0) -> list[int]:
    """Draw one image's label: class shares and label counts follow the HPA training set.

    Parameters
    ----------
    rng : numpy.random.Generator
    rare_oversample : float
        Multiplies the sampling weight of classes with an image share below 5 % (1.0 = real rates).

    Returns
    -------
    list of int
        Sorted class ids; ``[18]`` (Negative) never comes with another class.
    """
    p_negative, counts, weights = _label_model(float(rare_oversample))
    if rng.random() < p_negative:
        return [NEGATIVE]
    k = rng.choice(len(counts), p=counts) + 1
    race = rng.exponential(size=len(weights)) / weights
    return sorted(int(c) for c in np.argsort(race)[:k])


# --------------------------------------------------------------------------- cell layout


@dataclass
class _Cell:
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


def _elliptic(dy, dx, radius, aspect, angle):
    """Normalised elliptic distance: 1 on the ellipse with semi-axes radius / sqrt(aspect) along
    ``angle`` and radius * sqrt(aspect) across it."""
    c, s, root = float(np.cos(angle)), float(np.sin(angle)), float(np.sqrt(aspect))
    along = (dx * c + dy * s) * (root / radius)
    across = (dy * c - dx * s) / (root * radius)
    return np.sqrt(along * along + across * across)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
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


def _layout(rng: np.random.Generator, render: int) -> tuple[list[_Cell], int, float]:
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
        nucleus_x, nucleus_y = _polar(direction, offset * radius)
        cells.append(_Cell(
            y=y, x=x, radius=radius, aspect=rng.uniform(min_aspect, 1.0), angle=angle,
            nucleus_y=nucleus_y, nucleus_x=nucleus_x,
            nucleus_radius=rng.uniform(0.36, 0.48), nucleus_aspect=rng.uniform(0.7, 1.0),
            nucleus_angle=angle + rng.normal(0, 0.3),
            shift=(int(rng.integers(0, 2.5 * mean_radius)), int(rng.integers(0, 2.5 * mean_radius))),
        ))
    return cells, margin, mean_radius


def _half_extent(cell: _Cell) -> tuple[float, float]:
    """Half height and width of the box holding the cell's wavy ellipse."""
    major, minor = cell.radius / np.sqrt(cell.aspect), cell.radius * np.sqrt(cell.aspect)
    c, s = np.cos(cell.angle), np.sin(cell.angle)
    grow = 1 + 2.5 * WOBBLE
    return grow * np.hypot(major * s, minor * c), grow * np.hypot(major * c, minor * s)


def _territories(cells: list[_Cell], canvas: int, mean_radius: float, rng: np.random.Generator):
    """Assign canvas pixels to cells; returns owner index (-1 background) and depth.

    Depth is the gap between a pixel's smallest and second-smallest normalised distance (the free
    edge counts as distance 1): 0 on any border, about 1 at a cell's centre.
    """
    reach = int(2.5 * mean_radius)
    wobble = np.clip(_smooth_field(rng, (canvas + reach, canvas + reach), 0.5 * mean_radius), -2.5, 2.5)
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
        d = _elliptic(dy, dx, cell.radius, cell.aspect, cell.angle)
        d += WOBBLE * wobble[y0 + sy:y1 + sy, x0 + sx:x1 + sx]
        b = best[box]
        closer = d < b
        second[box] = np.where(closer, b, np.minimum(second[box], d))
        best[box] = np.where(closer, d, b)
        owner[box] = np.where(closer, i, owner[box])
    return owner, second - best


def _keep_largest_piece(owner: np.ndarray) -> None:
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


def _round_up(owner: np.ndarray, cells: list[_Cell], dividing: list[int]) -> None:
    """A dividing cell rounds up: it keeps a disc of its territory, the rest turns background."""
    yy, xx = np.ogrid[:owner.shape[0], :owner.shape[1]]
    for i in dividing:
        cell = cells[i]
        cell.dividing = True
        cell.nucleus_y = cell.nucleus_x = 0.0
        far = (yy - cell.y) ** 2 + (xx - cell.x) ** 2 > (MITOTIC_RADIUS * cell.radius) ** 2
        owner[(owner == i) & far] = -1


def _choose_dividing(rng, cells, margin, render, spindle: bool) -> list[int]:
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


def _assign_cell_labels(rng, image_labels, captured, dividing) -> list[list[int]]:
    """Each cell's true classes, following the weak-label rules of the module docstring."""
    n = len(captured)
    if image_labels == [NEGATIVE]:
        return [[NEGATIVE] for _ in range(n)]
    carries = np.zeros((n, NUM_CLASSES), bool)
    interphase = ~dividing
    whole = captured >= 0.5
    for c in image_labels:
        if c == SPINDLE:
            carries[:, c] = dividing
            continue
        share = rng.uniform(*CELL_SHARE.get(c, DEFAULT_CELL_SHARE))
        carries[:, c] = interphase & (rng.random(n) < share)
        if not (carries[:, c] & whole).any():
            for pool in (interphase & whole, interphase, np.ones(n, bool)):
                if pool.any():
                    best = np.flatnonzero(pool & (captured == captured[pool].max()))
                    carries[rng.choice(best), c] = True
                    break
    return [np.flatnonzero(row).tolist() or [NEGATIVE] for row in carries]


# --------------------------------------------------------------------------- drawing


class _Textures:
    """Image-wide random textures, made on first use so an image pays only for what it shows."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], unit: float):
        self.rng, self.shape, self.unit = rng, shape, unit

    def _field(self, spacing: float) -> np.ndarray:
        return _smooth_field(self.rng, self.shape, spacing * self.unit)

    @functools.cached_property
    def reticulum(self) -> np.ndarray:
        """ER network: thin ridges along the zero set of a smooth field."""
        return np.exp(-(self._field(0.07) / 0.3) ** 2)

    @functools.cached_property
    def mitochondria(self) -> np.ndarray:
        """Short worms: pieces of a coarser network, kept where a second field is high."""
        worms = np.exp(-(self._field(0.09) / 0.5) ** 2)
        return worms * (self._field(0.12) > 0.4)

    @functools.cached_property
    def speckles(self) -> np.ndarray:
        """Many small spots: the peaks of a fine field."""
        return np.clip(self._field(0.045) - 1.0, 0, None)

    @functools.cached_property
    def puncta(self) -> np.ndarray:
        """Sparse bright dots (vesicles, Golgi elements)."""
        return np.clip(self._field(0.05) - 1.5, 0, None) * 2

    @functools.cached_property
    def haze(self) -> np.ndarray:
        """Slow intensity modulation in [0, 1]."""
        return np.clip(0.5 + 0.25 * self._field(0.25), 0, 1)

    @functools.cached_property
    def chromatin(self) -> np.ndarray:
        return self._field(0.06)


@dataclass
class _CellView:
    """A visible cell inside its bounding box of the rendered image; lengths in cell radii."""

    box: tuple[slice, slice]
    mask: np.ndarray  # bool, the cell body
    nucleus: np.ndarray  # bool
    depth: np.ndarray  # distance to the cell's border: 0 there, about 1 at the centre
    dn: np.ndarray  # normalised elliptic distance from the nucleus centre, < 1 inside
    u: np.ndarray  # offset from the nucleus centre, x then y
    v: np.ndarray
    rho: np.ndarray
    theta: np.ndarray
    cell: _Cell
    side: float  # direction of the centrosome, Golgi and aggresome from the nucleus
    mtoc: tuple[float, float]  # centrosome position
    nucleoli: np.ndarray  # (k, 2) u, v of nucleoli
    nucleolar: np.ndarray  # their blobs, peak 1
    tubules: np.ndarray  # this cell's microtubule texture (red, and green for class 10)

    @property
    def cytoplasm(self) -> np.ndarray:
        return self.mask & ~self.nucleus

    def reach(self, angle: float) -> float:
        """Distance from the nucleus centre to its (unperturbed) border along ``angle``."""
        c = self.cell
        a = angle - c.nucleus_angle
        squeeze = c.nucleus_aspect * np.cos(a) ** 2 + np.sin(a) ** 2 / c.nucleus_aspect
        return c.nucleus_radius / float(np.sqrt(squeeze))

    def spots(self, points, sigma: float) -> np.ndarray:
        """Sum of Gaussian spots of width ``sigma`` at ``points`` (u, v)."""
        out = np.zeros(self.mask.shape, np.float32)
        for pu, pv in np.reshape(points, (-1, 2)).tolist():
            out += np.exp(-((self.u - pu) ** 2 + (self.v - pv) ** 2) / (2 * sigma**2))
        return out

    def axis(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates along and across the direction ``angle``."""
        c, s = float(np.cos(angle)), float(np.sin(angle))
        return self.u * c + self.v * s, self.v * c - self.u * s


def _make_view(rng, box, mask, depth, cell: _Cell, margin: int) -> _CellView:
    """Geometry of a visible cell in its ``box`` of the image, and its nucleus, nucleoli, centrosome
    and microtubules (a dividing cell: chromosome plate and spindle instead)."""
    dy = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + margin - cell.y - cell.nucleus_y
    dx = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + margin - cell.x - cell.nucleus_x
    u, v = np.broadcast_arrays(dx / cell.radius, dy / cell.radius)
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    if cell.dividing:
        depth = np.minimum(depth, 1 - rho / MITOTIC_RADIUS)
    lobes = 1 + 0.05 * np.cos(2 * theta + rng.uniform(0, 6.3))
    lobes += 0.03 * np.cos(3 * theta + rng.uniform(0, 6.3))
    dn = _elliptic(v, u, cell.nucleus_radius, cell.nucleus_aspect, cell.nucleus_angle) * lobes
    view = _CellView(
        box=box, mask=mask, nucleus=np.zeros_like(mask), depth=depth, dn=dn, u=u, v=v, rho=rho,
        theta=theta, cell=cell, side=rng.uniform(-np.pi, np.pi), mtoc=(0.0, 0.0),
        nucleoli=np.zeros((0, 2)), nucleolar=np.zeros(mask.shape, np.float32), tubules=np.zeros(0),
    )
    if cell.dividing:
        along, across = view.axis(view.side)
        view.nucleus = mask & (np.abs(along) < 0.06 + 0.025 * np.cos(across * 40)) & (np.abs(across) < 0.36)
        view.tubules = _spindle(view)
        return view
    view.nucleus = mask & (dn < 1) & (depth > 0.08)
    view.mtoc = _polar(view.side, view.reach(view.side) + 0.1)
    k = rng.integers(2, 6)
    angles, radii = rng.uniform(-np.pi, np.pi, k), rng.uniform(0, 0.6, k)
    view.nucleoli = np.array([_polar(a, r * view.reach(a)) for a, r in zip(angles, radii)])
    view.nucleolar = np.minimum(view.spots(view.nucleoli, 0.08), 1)
    view.tubules = _fibres(view, rng, view.mtoc, rng.integers(70, 110), curl=0.25, width=0.018, reach=1.6)
    return view


def _polar(angle: float, radius: float) -> tuple[float, float]:
    return float(radius * np.cos(angle)), float(radius * np.sin(angle))


def _fibres(view: _CellView, rng, centre, n: int, curl: float, width: float, reach: float) -> np.ndarray:
    """``n`` filaments of constant ``width`` radiating from ``centre`` and bent by ``curl``.

    Angle slot k holds fibre k; a pixel's distance to it is its radius times its angular offset
    from the fibre, so lines stay thin far from the centre. Each fibre has its own start, end and
    brightness; ``reach`` is the longest end, in cell radii.
    """
    n, curl = int(n), float(curl)
    du, dv = view.u - centre[0], view.v - centre[1]
    rho = np.hypot(du, dv)
    bent = np.arctan2(dv, du) + curl * np.sin(rho * rng.uniform(3, 6) + rng.uniform(0, 6.3))
    slot = (bent + np.pi) * (n / (2 * np.pi))
    k = np.floor(slot).astype(np.intp) % n
    middle = rng.uniform(0.2, 0.8, n).astype(np.float32)[k]
    lateral = (slot - np.floor(slot) - middle) * (2 * np.pi / n) * rho
    start = rng.uniform(0, 0.3, n).astype(np.float32)[k]
    end = rng.uniform(0.4, reach, n).astype(np.float32)[k]
    bright = rng.uniform(0.3, 1.0, n).astype(np.float32)[k]
    return bright * np.exp(-(lateral / width) ** 2) * ((rho > start) & (rho < end))


def _spindle(view: _CellView) -> np.ndarray:
    """Bipolar spindle of a dividing cell: fibres between two poles, bright poles."""
    along, across = view.axis(view.side + np.pi / 2)  # perpendicular to the chromosome plate
    pole = 0.4
    width = 0.3 * np.clip(1 - (along / pole) ** 2, 0, None)
    fibres = 0.5 + 0.5 * np.cos(across / np.maximum(width, 1e-3) * 3 * np.pi) ** 2
    lens = (np.abs(across) < width) * fibres
    return lens + view.spots([_polar(view.side + np.pi / 2, pole), _polar(view.side - np.pi / 2, pole)], 0.05)


def _er(view: _CellView, tex: _Textures) -> np.ndarray:
    """ER: the reticular network, densest around the nucleus, faint over it."""
    density = np.clip(1.3 - 0.8 * view.rho, 0.25, 1)
    density[view.nucleus] *= 0.25
    return tex.reticulum[view.box] * density


def _pattern(c: int, view: _CellView, tex: _Textures, rng) -> np.ndarray:
    """Green pattern of class ``c`` in one cell, before masking; peak about 1."""
    nuc, cyto = view.nucleus, view.cytoplasm
    haze = tex.haze[view.box]
    if c == 0:  # nucleoplasm: the nucleus, nucleoli left dark
        return nuc * (0.7 + 0.3 * haze) * (1 - 0.6 * view.nucleolar)
    if c == 1:  # nuclear membrane: the nucleus rim
        return np.exp(-((view.dn - 1) / 0.08) ** 2) * view.mask
    if c == 2:  # nucleoli: a few blobs in the nucleus
        return view.nucleolar * (0.7 + 0.3 * haze) * nuc
    if c == 3:  # fibrillar centres: tiny dots inside the nucleoli
        dots = [q for p in view.nucleoli for q in p + rng.normal(0, 0.04, (rng.integers(3, 7), 2))]
        return view.spots(dots, 0.025) * nuc
    if c == 4:  # speckles: many small spots over a faint nucleoplasm
        return nuc * (0.15 + tex.speckles[view.box])
    if c == 5:  # nuclear bodies: few, larger, dimmer dots on nucleoplasm haze
        k = rng.integers(2, 7)
        angles, radii = rng.uniform(-np.pi, np.pi, k), rng.uniform(0, 0.8, k)
        dots = [_polar(a, r * view.reach(a)) for a, r in zip(angles, radii)]
        return nuc * (0.25 * haze + 0.7 * np.minimum(view.spots(dots, 0.04), 1))
    if c == 6:
        return _er(view, tex)
    if c == 7:  # Golgi: a perinuclear cluster on the centrosome side
        gap = np.angle(np.exp(1j * (view.theta - view.side)))
        ring = np.exp(-((view.rho - view.reach(view.side) - 0.15) / 0.15) ** 2)
        return cyto * np.exp(-(gap / 0.7) ** 2) * ring * (0.5 + tex.puncta[view.box] + 0.5 * haze)
    if c == 8:  # intermediate filaments: a few families of curved fibres around the nucleus
        families = [
            _fibres(view, rng, _polar(a, 0.2), rng.integers(6, 12),
                    curl=rng.choice([-1, 1]) * rng.uniform(0.6, 1.2), width=0.02, reach=1.3)
            for a in rng.uniform(-np.pi, np.pi, 3)
        ]
        return cyto * sum(families)
    if c == 9:  # actin: straight parallel fibres, strongest near the edge, and the cortex
        along, across = view.axis(rng.uniform(0, np.pi))
        stripes = np.clip(ndimage.gaussian_filter1d(rng.standard_normal(160, np.float32), 0.7) - 0.6, 0, None)
        fibres = stripes[np.clip(((across + 2) * 40).astype(np.intp), 0, 159)] * 1.5
        cortex = 0.5 * np.exp(-(view.depth / 0.05) ** 2)
        return view.mask * (fibres * (1 - 0.6 * np.clip(view.depth * 2, 0, 1)) + cortex)
    if c == 10:  # microtubules: the red network, fainter over the nucleus
        tubules = view.tubules * view.mask
        tubules[nuc] *= 0.5
        return tubules
    if c == SPINDLE:
        return view.tubules * view.mask
    if c == 12:  # centrosome: one or two dots beside the nucleus
        dots = [view.mtoc] + ([np.add(view.mtoc, rng.normal(0, 0.04, 2))] if rng.random() < 0.5 else [])
        return view.spots(dots, 0.03) * view.mask
    if c == 13:  # plasma membrane: the cell rim over a faint cytosol
        rim = np.exp(-(view.depth / 0.06) ** 2)
        return view.mask * np.where(cyto, rim + 0.12, rim)
    if c == 14:  # mitochondria: short worms, denser near the nucleus
        return cyto * tex.mitochondria[view.box] * np.clip(1.4 - view.rho, 0.3, 1)
    if c == 15:  # aggresome: one large perinuclear blob
        spot = _polar(view.side, view.reach(view.side) + 0.12)
        return view.spots(spot, 0.13 * rng.uniform(0.8, 1.2)) * (0.6 + 0.4 * haze) * view.mask
    if c == 16:  # cytosol: fills the cytoplasm; faint reticular modulation, brighter rim
        return cyto * (0.6 + 0.15 * tex.reticulum[view.box] + 0.3 * np.exp(-(view.depth / 0.08) ** 2))
    if c == 17:  # vesicles: many puncta across the cytoplasm
        return cyto * (0.05 + tex.puncta[view.box] + 0.5 * tex.speckles[view.box])
    return np.zeros(view.mask.shape, np.float32)  # Negative: background green only


def _green(view: _CellView, classes: list[int], tex, rng, difficulty: Difficulty, amplitude) -> np.ndarray:
    """The protein channel of one cell: its classes' patterns, degraded by the difficulty."""
    green = view.mask * np.float32(0.03)  # unspecific background staining, what Negative cells show
    for c in classes:
        pattern = _pattern(c, view, tex, rng)
        if difficulty.mixing and c in LOOKALIKE:
            weight = difficulty.mixing * rng.uniform(0.5, 1.0)
            pattern = (1 - weight) * pattern + weight * _pattern(LOOKALIKE[c], view, tex, rng)
        peak = pattern.max()
        if peak <= 0:
            continue
        pattern = pattern / peak
        region = view.nucleus if c in NUCLEAR_CLASSES else view.cytoplasm
        if difficulty.contrast < 1 and region.any():
            flat = pattern[region].mean() * region
            pattern = difficulty.contrast * pattern + (1 - difficulty.contrast) * flat
        green = green + amplitude[c] * pattern
    return green * rng.lognormal(0, difficulty.cell_spread)


def _draw_cell(channels, view: _CellView, classes, tex, rng, difficulty, amplitude) -> None:
    """Add one cell's four channels into ``channels`` (4, H, W) at its box."""
    nuc, mask = view.nucleus, view.mask
    if view.cell.dividing:
        red = 0.3 + 0.8 * view.tubules
        blue = 1.1 * nuc * (0.8 + 0.2 * tex.chromatin[view.box])
        yellow = 0.35 + 0.3 * tex.reticulum[view.box]
    else:
        red = 0.15 + 0.85 * view.tubules
        red[nuc] *= 0.45
        blue = nuc * (0.5 + 0.12 * tex.chromatin[view.box] + 0.25 * (1 - view.dn**2))
        blue *= 1 - 0.35 * view.nucleolar
        yellow = 0.12 + 0.8 * _er(view, tex) + 0.35 * np.exp(-((view.dn - 1) / 0.1) ** 2)
    gains = rng.lognormal(0, 0.2, 3).tolist()
    green = _green(view, classes, tex, rng, difficulty, amplitude)
    for ch, value in enumerate((red * gains[0], green, blue * gains[1], yellow * gains[2])):
        channels[ch][view.box] += np.where(mask, value, 0)


def _optics(rng, channels: np.ndarray, size: int, difficulty: Difficulty) -> np.ndarray:
    """Blur, upsample to ``size``, add background and noise; (H, W, 4) float32 in [0, 1].

    ``channels`` (4, h, w) is scaled in place. The result is a channel-last view of channel-first
    planes, so each channel is contiguous in memory.
    """
    render = channels.shape[1]
    sigma = rng.uniform(*difficulty.blur) * render / BASE_SIZE
    gains = rng.uniform([0.5, 1.0, 0.45, 0.25], [0.9, 1.0, 0.85, 0.5]).astype(np.float32)
    offsets = rng.uniform(0.004, 0.03, 4).astype(np.float32)
    planes = np.empty((4, size, size), np.float32)
    for ch in range(4):
        channels[ch] *= gains[ch]
        plane = ndimage.gaussian_filter(channels[ch], sigma)
        if render != size:
            plane = np.asarray(Image.fromarray(plane).resize((size, size), Image.Resampling.BILINEAR))
        plane = plane + offsets[ch]
        # Read noise plus shot noise growing with the square root of the signal, in place: at
        # 2048 px and beyond every pass over the planes counts.
        std = plane * 4
        std += 0.25
        np.sqrt(std, out=std)
        std *= difficulty.noise
        noise = rng.standard_normal(plane.shape, dtype=np.float32)
        noise *= std
        np.add(plane, noise, out=planes[ch])
    np.clip(planes, 0, 1, out=planes)
    return np.moveaxis(planes, 0, -1)


def _upsample_labels(labels: np.ndarray, size: int) -> np.ndarray:
    if labels.shape[0] == size:
        return labels
    image = Image.fromarray(labels.astype(np.int32)).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image).astype(np.uint16)


# --------------------------------------------------------------------------- public API


def simulate_image(
    rng_or_seed,
    size: int = 512,
    difficulty: str | Difficulty = "medium",
    labels: list[int] | None = None,
    rare_oversample: float = 1.0,
) -> SimulatedImage:
    """Simulate one image in memory.

    Parameters
    ----------
    rng_or_seed : numpy.random.Generator or seed
        Anything ``numpy.random.default_rng`` accepts, e.g. ``[seed, index]``.
    size : int
        Height and width in pixels; cells scale with it (about 80-140 px wide at 512).
    difficulty : {"easy", "medium", "hard"} or Difficulty
    labels : list of int, optional
        The image label; sampled from the training-set statistics when None.
    rare_oversample : float
        Passed to :func:`sample_image_labels` when ``labels`` is None.

    Returns
    -------
    SimulatedImage
    """
    rng = np.random.default_rng(rng_or_seed)
    difficulty = DIFFICULTIES[difficulty] if isinstance(difficulty, str) else difficulty
    if labels is None:
        labels = sample_image_labels(rng, rare_oversample)
    labels = sorted(set(int(c) for c in labels))
    if not labels or labels[0] < 0 or labels[-1] >= NUM_CLASSES or (NEGATIVE in labels and len(labels) > 1):
        raise ValueError(f"invalid image label {labels}: class ids 0..18, Negative (18) alone")
    render = min(int(size), RENDER_MAX)

    cells, margin, mean_radius = _layout(rng, render)
    owner, depth = _territories(cells, render + 2 * margin, mean_radius, rng)
    _round_up(owner, cells, _choose_dividing(rng, cells, margin, render, SPINDLE in labels))
    _keep_largest_piece(owner)
    full_area = np.bincount(owner.ravel() + 1, minlength=len(cells) + 1)[1:]
    inner = (slice(margin, margin + render),) * 2
    owner, depth = owner[inner], depth[inner]
    seen_area = np.bincount(owner.ravel() + 1, minlength=len(cells) + 1)[1:]
    # Slivers too small to be a cell are dropped and their pixels left as background.
    visible = np.flatnonzero(seen_area >= 0.05 * np.pi * mean_radius**2)
    lookup = np.zeros(len(cells) + 1, np.uint16)
    lookup[visible + 1] = np.arange(1, len(visible) + 1)
    cell_mask = lookup[owner + 1]

    captured = seen_area[visible] / full_area[visible]
    dividing = np.array([cells[i].dividing for i in visible], bool)
    truth = _assign_cell_labels(rng, labels, captured, dividing)

    tex = _Textures(rng, (render, render), mean_radius)
    amplitude = (difficulty.signal * rng.uniform(0.6, 1.4, NUM_CLASSES)).tolist()
    channels = np.zeros((4, render, render), np.float32)
    nucleus_mask = np.zeros_like(cell_mask)
    for cell_id, box in enumerate(ndimage.find_objects(cell_mask), start=1):
        mask = cell_mask[box] == cell_id
        view = _make_view(rng, box, mask, depth[box], cells[visible[cell_id - 1]], margin)
        nucleus_mask[box][view.nucleus] = cell_id
        _draw_cell(channels, view, truth[cell_id - 1], tex, rng, difficulty, amplitude)

    return SimulatedImage(
        image=_optics(rng, channels, int(size), difficulty),
        cell_mask=_upsample_labels(cell_mask, int(size)),
        nucleus_mask=_upsample_labels(nucleus_mask, int(size)),
        cell_labels={i + 1: t for i, t in enumerate(truth)},
        image_labels=labels,
        captured={i + 1: float(c) for i, c in enumerate(captured)},
    )


def to_uint(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """Quantise a [0, 1] float image to uint8 (bit_depth 8) or uint16 (16)."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    top = 255 if bit_depth == 8 else 65535
    return np.round(np.clip(image, 0, 1) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, **PNG_OPTIONS)


def write_image(root: str | Path, image_id: str, sim: SimulatedImage, bit_depth: int = 8,
                split: str = "train") -> None:
    """Write one image's channel PNGs (``{split}/{ID}_{channel}.png``) and its truth masks."""
    root = Path(root)
    channels = to_uint(sim.image, bit_depth)
    for k, name in enumerate(CHANNELS):
        _save_png(np.ascontiguousarray(channels[..., k]), root / split / f"{image_id}_{name}.png")
    _save_png(sim.cell_mask, root / "truth" / "masks" / f"{image_id}.png")
    _save_png(sim.nucleus_mask, root / "truth" / "nuclei" / f"{image_id}.png")


def simulate(
    out: str | Path,
    n_images: int,
    seed: int = 0,
    size: int = 512,
    difficulty: str = "medium",
    bit_depth: int = 8,
    rare_oversample: float = 1.0,
    split: str = "train",
    id_prefix: str | None = None,
) -> SimulationResult:
    """Write a simulated dataset in the Kaggle layout, with its truth beside it.

    Writes ``{split}.csv`` (``ID,Label``), ``{split}/{ID}_{red,green,blue,yellow}.png``,
    ``truth/masks/{ID}.png`` and ``truth/nuclei/{ID}.png`` (uint16 cell ids),
    ``truth/cell_labels.csv`` (``ID,cell_id,Label,captured``) and ``simulation.json``. Never
    ``masks/``: simulated images are segmented like real ones. Use one ``out`` per split.

    Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``.

    Returns
    -------
    SimulationResult
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    root = Path(out)
    for folder in (root / split, root / "truth" / "masks", root / "truth" / "nuclei"):
        folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prefix = f"sim{seed}-" if id_prefix is None else id_prefix
    ids = [f"{prefix}{i:05d}" for i in range(n_images)]
    image_rows, cell_rows = ["ID,Label"], ["ID,cell_id,Label,captured"]
    for index, image_id in enumerate(ids):
        sim = simulate_image([seed, index], size, difficulty, rare_oversample=rare_oversample)
        write_image(root, image_id, sim, bit_depth, split)
        image_rows.append(f"{image_id},{format_labels(sim.image_labels)}")
        cell_rows += [f"{image_id},{cell},{format_labels(sim.cell_labels[cell])},{sim.captured[cell]:.4f}"
                      for cell in sim.cell_labels]
    (root / f"{split}.csv").write_text("\n".join(image_rows) + "\n")
    (root / "truth" / "cell_labels.csv").write_text("\n".join(cell_rows) + "\n")
    settings = dict(simulator_version=SIMULATOR_VERSION, seed=seed, n_images=n_images, size=size,
                    difficulty=difficulty, difficulty_settings=asdict(DIFFICULTIES[difficulty]),
                    bit_depth=bit_depth, rare_oversample=rare_oversample, split=split,
                    id_prefix=prefix, render_max=RENDER_MAX)
    (root / "simulation.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return SimulationResult(root=root, image_ids=ids, n_cells=len(cell_rows) - 1,
                            seconds=time.perf_counter() - start, settings=settings)
