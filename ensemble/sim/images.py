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
5. optics: blur, upsampling to the final size, background, shot and read noise;
6. annotation: cells cut by the image border are left out of the truth, as HPA's annotators left
   them out of the competition's ground truth (:meth:`SimulatedImage.annotated`).

Steps 2 and 3 (but for the cells' classes) are in :mod:`ensemble.sim.layout`, steps 4 and 5 in
:mod:`ensemble.sim.render`; this module holds the labels and puts the steps together.

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

from ensemble.sim.layout import choose_dividing, keep_largest_piece, layout, round_up, territories
from ensemble.sim.render import SPINDLE, Difficulty, Textures, draw_cell, make_view, optics, upsample_labels
from ensemble.labels import CHANNELS, NEGATIVE, NUM_CLASSES, format_labels

SIMULATOR_VERSION = "1.1"  # 1.1: border-cut cells left out of the truth

# Share of HPA training images carrying each class, and of images with 1..5 labels.
CLASS_SHARE = np.array(
    [.403, .050, .112, .058, .065, .082, .036, .085, .044, .046,
     .038, .004, .080, .148, .092, .012, .261, .029, .002]
)
COUNT_SHARE = np.array([0.48, 0.41, 0.10, 0.01, 0.0005])
RARE_SHARE = 0.05  # classes rarer than this are the ones `rare_oversample` boosts

# Range of the per-image share of cells carrying a class; the spindle goes to the dividing cells.
CELL_SHARE = {15: (0.3, 0.6)}
DEFAULT_CELL_SHARE = (0.7, 1.0)

# A cell with less than this share of its body inside the image is left out of the truth: no labels,
# not in the truth masks, as in the competition's ground truth ("at least 50 % of a cell has to be
# captured" for a meaningful label). A prediction made for it is a false positive when scored, which
# is what the visual-integrity weighting is for. Badly segmented cells need no rule here: a
# segmented cell that matches no true cell at IoU >= 0.5 has no truth either.
ANNOTATE_MIN_CAPTURED = 0.5

# Structures are drawn at most at this size and upsampled: at 2048 px and beyond the optical blur
# is wider than the upsampling step, and drawing costs grow with the pixel count.
RENDER_MAX = 1024
# Fixed encoder settings and no metadata, so a PNG's bytes depend only on its pixels. Level 1:
# noisy microscopy barely compresses, and higher levels cost 3x the time for 10 % smaller files.
PNG_OPTIONS = {"format": "PNG", "compress_level": 1}

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

    ``cell_mask`` and ``cell_labels`` hold every cell drawn; :meth:`annotated` is the truth an
    annotator gives, without the cells the border cuts.
    """

    image: np.ndarray
    cell_mask: np.ndarray
    nucleus_mask: np.ndarray
    cell_labels: dict[int, list[int]]
    image_labels: list[int]
    captured: dict[int, float]

    def annotated(self, min_captured: float = ANNOTATE_MIN_CAPTURED) -> tuple[np.ndarray, dict[int, list[int]]]:
        """The annotators' truth: cell mask and labels of the cells at least ``min_captured`` inside the image.

        Cells left out keep their pixels in :attr:`cell_mask` but are 0 in the returned mask and
        absent from the returned labels; kept cells keep their ids.
        """
        kept = np.array([0] + [self.captured[i] >= min_captured for i in range(1, len(self.captured) + 1)])
        mask = np.where(kept[self.cell_mask], self.cell_mask, 0).astype(self.cell_mask.dtype)
        return mask, {i: labels for i, labels in self.cell_labels.items() if kept[i]}


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


# --------------------------------------------------------------------------- labels


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

    cells, margin, mean_radius = layout(rng, render)
    owner, depth = territories(cells, render + 2 * margin, mean_radius, rng)
    round_up(owner, cells, choose_dividing(rng, cells, margin, render, SPINDLE in labels))
    keep_largest_piece(owner)
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

    tex = Textures(rng, (render, render), mean_radius)
    amplitude = (difficulty.signal * rng.uniform(0.6, 1.4, NUM_CLASSES)).tolist()
    channels = np.zeros((4, render, render), np.float32)
    nucleus_mask = np.zeros_like(cell_mask)
    for cell_id, box in enumerate(ndimage.find_objects(cell_mask), start=1):
        mask = cell_mask[box] == cell_id
        view = make_view(rng, box, mask, depth[box], cells[visible[cell_id - 1]], margin)
        nucleus_mask[box][view.nucleus] = cell_id
        draw_cell(channels, view, truth[cell_id - 1], tex, rng, difficulty, amplitude)

    return SimulatedImage(
        image=optics(rng, channels, int(size), difficulty),
        cell_mask=upsample_labels(cell_mask, int(size)),
        nucleus_mask=upsample_labels(nucleus_mask, int(size)),
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
                split: str = "train", min_captured: float = ANNOTATE_MIN_CAPTURED,
                truth: bool = True) -> dict[int, list[int]]:
    """Write one image's channel PNGs (``{split}/{ID}_{channel}.png``) and, with ``truth``, its truth masks.

    ``truth/masks`` and ``truth/nuclei`` hold the annotated cells (:meth:`SimulatedImage.annotated`),
    ``truth/left_out`` the cells left out (for the contact sheet). Returns the annotated cells' labels.
    """
    root = Path(root)
    channels = to_uint(sim.image, bit_depth)
    for k, name in enumerate(CHANNELS):
        _save_png(np.ascontiguousarray(channels[..., k]), root / split / f"{image_id}_{name}.png")
    mask, labels = sim.annotated(min_captured)
    if not truth:
        return labels
    _save_png(mask, root / "truth" / "masks" / f"{image_id}.png")
    _save_png(np.where(mask > 0, sim.nucleus_mask, 0).astype(mask.dtype), root / "truth" / "nuclei" / f"{image_id}.png")
    _save_png(np.where(mask > 0, 0, sim.cell_mask).astype(mask.dtype), root / "truth" / "left_out" / f"{image_id}.png")
    return labels


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
    min_captured: float = ANNOTATE_MIN_CAPTURED,
    truth: bool = True,
) -> SimulationResult:
    """Write a simulated dataset in the Kaggle layout, with its truth beside it.

    Writes ``{split}.csv`` (``ID,Label``), ``{split}/{ID}_{red,green,blue,yellow}.png``,
    ``truth/masks/{ID}.png`` and ``truth/nuclei/{ID}.png`` (uint16 cell ids),
    ``truth/cell_labels.csv`` (``ID,cell_id,Label,captured``) and ``simulation.json``. Never
    ``masks/``: simulated images are segmented like real ones. Use one ``out`` per split.

    The truth holds the cells at least ``min_captured`` inside the image (0 keeps every cell);
    ``truth/left_out/{ID}.png`` has the others.

    With ``truth=False`` only what the Kaggle competition gives is written: ``{split}.csv`` and
    the channel PNGs, no ``truth/`` and no ``simulation.json`` (the settings are in the result),
    the shape of the data users bring.

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
    if not 0.0 <= min_captured <= 1.0:
        raise ValueError(f"min_captured must be in [0, 1], got {min_captured}")
    truth_folders = [root / "truth" / name for name in ("masks", "nuclei", "left_out")] if truth else []
    for folder in (root / split, *truth_folders):
        folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prefix = f"sim{seed}-" if id_prefix is None else id_prefix
    ids = [f"{prefix}{i:05d}" for i in range(n_images)]
    image_rows, cell_rows = ["ID,Label"], ["ID,cell_id,Label,captured"]
    for index, image_id in enumerate(ids):
        sim = simulate_image([seed, index], size, difficulty, rare_oversample=rare_oversample)
        annotated = write_image(root, image_id, sim, bit_depth, split, min_captured, truth)
        image_rows.append(f"{image_id},{format_labels(sim.image_labels)}")
        cell_rows += [f"{image_id},{cell},{format_labels(labels)},{sim.captured[cell]:.4f}"
                      for cell, labels in annotated.items()]
    (root / f"{split}.csv").write_text("\n".join(image_rows) + "\n")
    settings = dict(simulator_version=SIMULATOR_VERSION, seed=seed, n_images=n_images, size=size,
                    difficulty=difficulty, difficulty_settings=asdict(DIFFICULTIES[difficulty]),
                    bit_depth=bit_depth, rare_oversample=rare_oversample, split=split,
                    id_prefix=prefix, render_max=RENDER_MAX, min_captured=min_captured)
    if truth:
        (root / "truth" / "cell_labels.csv").write_text("\n".join(cell_rows) + "\n")
        (root / "simulation.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return SimulationResult(root=root, image_ids=ids, n_cells=len(cell_rows) - 1,
                            seconds=time.perf_counter() - start, settings=settings)
