"""Drawing of simulated cells: their four channels, the protein patterns, the microscope optics.

Steps 4 and 5 of :mod:`ensemble.sim.images` (whose docstring tells how an image is made). The
channels are drawn cell by cell inside bounding boxes, from image-wide random textures; every
localisation class has its own green pattern at its real place in the cell, and a
:class:`Difficulty` sets how far apart the patterns are. :func:`optics` then blurs, upsamples and
adds background and noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from ensemble.sim.layout import BASE_SIZE, MITOTIC_RADIUS, Cell, elliptic, polar, smooth_field

SPINDLE = 11  # mitotic spindle: the class of the dividing cells
NUCLEAR_CLASSES = frozenset(range(6))
# Classes real models confuse (paper, Fig. 5e, 6b): with difficulty, a pattern borrows its partner's.
LOOKALIKE = {0: 5, 5: 0, 4: 5, 2: 12, 12: 2, 3: 2, 6: 16, 16: 6, 13: 16,
             7: 17, 17: 7, 8: 9, 9: 8, 10: 8, 14: 17, 15: 7, 1: 13}


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


class Textures:
    """Image-wide random textures, made on first use so an image pays only for what it shows."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], unit: float):
        self.rng, self.shape, self.unit = rng, shape, unit

    def _field(self, spacing: float) -> np.ndarray:
        return smooth_field(self.rng, self.shape, spacing * self.unit)

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
class CellView:
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
    cell: Cell
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


def make_view(rng, box, mask, depth, cell: Cell, margin: int) -> CellView:
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
    dn = elliptic(v, u, cell.nucleus_radius, cell.nucleus_aspect, cell.nucleus_angle) * lobes
    view = CellView(
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
    view.mtoc = polar(view.side, view.reach(view.side) + 0.1)
    k = rng.integers(2, 6)
    angles, radii = rng.uniform(-np.pi, np.pi, k), rng.uniform(0, 0.6, k)
    view.nucleoli = np.array([polar(a, r * view.reach(a)) for a, r in zip(angles, radii)])
    view.nucleolar = np.minimum(view.spots(view.nucleoli, 0.08), 1)
    view.tubules = _fibres(view, rng, view.mtoc, rng.integers(70, 110), curl=0.25, width=0.018, reach=1.6)
    return view


def _fibres(view: CellView, rng, centre, n: int, curl: float, width: float, reach: float) -> np.ndarray:
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


def _spindle(view: CellView) -> np.ndarray:
    """Bipolar spindle of a dividing cell: fibres between two poles, bright poles."""
    along, across = view.axis(view.side + np.pi / 2)  # perpendicular to the chromosome plate
    pole = 0.4
    width = 0.3 * np.clip(1 - (along / pole) ** 2, 0, None)
    fibres = 0.5 + 0.5 * np.cos(across / np.maximum(width, 1e-3) * 3 * np.pi) ** 2
    lens = (np.abs(across) < width) * fibres
    return lens + view.spots([polar(view.side + np.pi / 2, pole), polar(view.side - np.pi / 2, pole)], 0.05)


def _er(view: CellView, tex: Textures) -> np.ndarray:
    """ER: the reticular network, densest around the nucleus, faint over it."""
    density = np.clip(1.3 - 0.8 * view.rho, 0.25, 1)
    density[view.nucleus] *= 0.25
    return tex.reticulum[view.box] * density


def _pattern(c: int, view: CellView, tex: Textures, rng) -> np.ndarray:
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
        dots = [polar(a, r * view.reach(a)) for a, r in zip(angles, radii)]
        return nuc * (0.25 * haze + 0.7 * np.minimum(view.spots(dots, 0.04), 1))
    if c == 6:
        return _er(view, tex)
    if c == 7:  # Golgi: a perinuclear cluster on the centrosome side
        gap = np.angle(np.exp(1j * (view.theta - view.side)))
        ring = np.exp(-((view.rho - view.reach(view.side) - 0.15) / 0.15) ** 2)
        return cyto * np.exp(-(gap / 0.7) ** 2) * ring * (0.5 + tex.puncta[view.box] + 0.5 * haze)
    if c == 8:  # intermediate filaments: a few families of curved fibres around the nucleus
        families = [
            _fibres(view, rng, polar(a, 0.2), rng.integers(6, 12),
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
        spot = polar(view.side, view.reach(view.side) + 0.12)
        return view.spots(spot, 0.13 * rng.uniform(0.8, 1.2)) * (0.6 + 0.4 * haze) * view.mask
    if c == 16:  # cytosol: fills the cytoplasm; faint reticular modulation, brighter rim
        return cyto * (0.6 + 0.15 * tex.reticulum[view.box] + 0.3 * np.exp(-(view.depth / 0.08) ** 2))
    if c == 17:  # vesicles: many puncta across the cytoplasm
        return cyto * (0.05 + tex.puncta[view.box] + 0.5 * tex.speckles[view.box])
    return np.zeros(view.mask.shape, np.float32)  # Negative: background green only


def _green(view: CellView, classes: list[int], tex, rng, difficulty: Difficulty, amplitude) -> np.ndarray:
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


def draw_cell(channels, view: CellView, classes, tex, rng, difficulty, amplitude) -> None:
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


def optics(rng, channels: np.ndarray, size: int, difficulty: Difficulty) -> np.ndarray:
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


def upsample_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Instance labels drawn at the render size, resized to ``size`` by nearest neighbour."""
    if labels.shape[0] == size:
        return labels
    image = Image.fromarray(labels.astype(np.int32)).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image).astype(np.uint16)
