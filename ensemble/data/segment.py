"""Cell segmentation: one image (H, W, 4) in, nucleus and cell instance labels out.

Two segmenters share one interface, ``segmenter(image) -> Segmentation``:

- :class:`ClassicalSegmenter` (the default, no weights needed): nuclei from the blue channel by
  Otsu thresholding and a distance-transform watershed; cells grown from the nuclei over the
  microtubule and ER channels by a marker watershed. It works at a down-scaled resolution
  (``work_size``), so a 2048 px image costs about what a 512 px one does.
- ``HPACellSegmenter`` (:mod:`ensemble.data.hpacellseg`): an adapter around the HPA Cell
  Segmentator (the U-Nets the HCPL paper uses), with its post-processing re-written for current
  scikit-image and optionally run at a reduced resolution (the paper's 2x speed-up).

Given masks (``ROOT/masks/{ID}.png``) bypass both: :func:`from_given_mask`.
:func:`match_cells` pairs predicted with true cells by mask IoU; the quality benchmark, the tests
and the cell store (to attach truth labels) use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation

from ensemble.labels import CHANNELS
from ensemble.metrics import overlap_counts, overlap_iou

RED, GREEN, BLUE, YELLOW = (CHANNELS.index(c) for c in ("red", "green", "blue", "yellow"))


@dataclass
class Segmentation:
    """Instance labels of one image; a cell and its nucleus carry the same id (0 = background).

    Attributes
    ----------
    nuclei : ndarray of uint16, shape (H, W)
    cells : ndarray of uint16, shape (H, W)
    """

    nuclei: np.ndarray
    cells: np.ndarray


def _to_work_size(image: np.ndarray, work_size: int | None) -> np.ndarray:
    """Resize ``image`` so its longest side is ``work_size`` (None: leave it as it is)."""
    height, width = image.shape[:2]
    if work_size is None or max(height, width) == work_size:
        return image
    scale = work_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def to_shape(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize instance labels to ``shape`` by nearest neighbour (no new ids appear)."""
    if labels.shape == shape:
        return labels
    return cv2.resize(labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def relabel(nuclei: np.ndarray, cells: np.ndarray) -> Segmentation:
    """Renumber cells 1..n (in order of their old ids) and give each nucleus its cell's id."""
    cells, forward, _ = segmentation.relabel_sequential(cells)
    nuclei = np.where(nuclei > 0, forward[nuclei], 0)
    return Segmentation(nuclei=nuclei.astype(np.uint16), cells=cells.astype(np.uint16))


@dataclass(frozen=True)
class ClassicalSettings:
    """Settings of :class:`ClassicalSegmenter`; every size is relative to ``nucleus_diameter``.

    Attributes
    ----------
    work_size : int or None
        Longest image side, in pixels, at which segmentation runs: images are resized to it
        (so a 2048 px image costs about what a 512 px one does, and a field of view drawn at
        any size looks the same) and the labels are resized back by nearest neighbour.
        None: segment at the native resolution.
    nucleus_diameter : float
        Typical nucleus diameter in pixels at the working resolution: about 48 for the
        simulator at 512 px, and for HPA's 2048 px images (nuclei of about 190 px) shrunk to 512.
    smoothing : float
        Gaussian sigma of the fine smoothing of each channel.
    peak_separation : float
        Least distance between two nucleus centres; smaller splits touching nuclei more eagerly
        (and over-splits elongated ones).
    min_nucleus_area : float
        Smallest nucleus kept, as a fraction of a typical nucleus's area.
    cell_threshold : float
        Cell foreground: microtubule + ER signal above this fraction of its Otsu threshold.
    compactness : float
        Compactness of the cell watershed: 0 follows the intensity valleys between cells only;
        larger values pull boundaries towards the Voronoi split between nuclei.
    edge_seed_distance : float or None
        Cells whose nucleus lies outside the image are seeded where the coarsely smoothed
        microtubule + ER signal (densest around a nucleus) peaks on the image edge at least this
        far from every nucleus. None: only cells with a nucleus in view are found.
    edge_smoothing : float
        Gaussian sigma of the coarse smoothing used to find those edge peaks.
    min_cell_area : float
        Smallest cell kept, as a fraction of a typical nucleus's area (smaller are fragments).

    Lengths (``smoothing``, ``peak_separation``, ``edge_seed_distance``, ``edge_smoothing``) are
    fractions of ``nucleus_diameter``.
    """

    work_size: int | None = 512
    nucleus_diameter: float = 48.0
    smoothing: float = 0.04
    peak_separation: float = 0.25
    min_nucleus_area: float = 0.05
    cell_threshold: float = 0.5
    compactness: float = 0.01
    edge_seed_distance: float | None = 1.0
    edge_smoothing: float = 0.3
    min_cell_area: float = 0.125


class ClassicalSegmenter:
    """Nuclei by Otsu + distance-transform watershed; cells by a watershed grown from the nuclei.

    Parameters
    ----------
    settings : ClassicalSettings, optional
    """

    name = "classical"

    def __init__(self, settings: ClassicalSettings | None = None):
        self.settings = settings or ClassicalSettings()

    def describe(self) -> dict:
        """Name and settings, as recorded in a cell store's meta.json."""
        return {"name": self.name, "settings": dataclasses.asdict(self.settings)}

    def __call__(self, image: np.ndarray) -> Segmentation:
        """Segment one image.

        Parameters
        ----------
        image : ndarray of shape (H, W, 4)
            Float intensities in [0, 1], channels in ``CHANNELS`` order.

        Returns
        -------
        Segmentation
            Labels at the input's resolution, ids 1..n.
        """
        work = _to_work_size(np.asarray(image, dtype=np.float32), self.settings.work_size)
        nuclei = self._nuclei(work[..., BLUE])
        cells = self._cells(work[..., RED] + work[..., YELLOW], nuclei)
        nuclei = np.where(cells == nuclei, nuclei, 0)  # drop nuclei whose cell was a fragment
        seg = relabel(nuclei, cells)
        shape = image.shape[:2]
        return Segmentation(nuclei=to_shape(seg.nuclei, shape), cells=to_shape(seg.cells, shape))

    def _length(self, fraction: float) -> float:
        return fraction * self.settings.nucleus_diameter

    def _area(self, fraction: float) -> int:
        return int(fraction * np.pi * (self.settings.nucleus_diameter / 2) ** 2)

    def _nuclei(self, blue: np.ndarray) -> np.ndarray:
        s = self.settings
        blue = filters.gaussian(blue, sigma=self._length(s.smoothing))
        if blue.max() <= blue.min():
            return np.zeros(blue.shape, np.int32)
        foreground = ndi.binary_fill_holes(blue > filters.threshold_otsu(blue))
        foreground = morphology.remove_small_objects(foreground, max_size=self._area(s.min_nucleus_area))
        # Touching nuclei form one blob with a waist: the distance transform has one peak per
        # nucleus; smoothing it first keeps plateaus from seeding several markers.
        distance = filters.gaussian(ndi.distance_transform_edt(foreground), sigma=self._length(s.smoothing))
        peaks = feature.peak_local_max(
            distance,
            min_distance=max(1, round(self._length(s.peak_separation))),
            labels=measure.label(foreground),
            exclude_border=False,
        )
        markers = np.zeros(blue.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        nuclei = segmentation.watershed(-distance, markers, mask=foreground)
        return morphology.remove_small_objects(nuclei, max_size=self._area(s.min_nucleus_area))

    def _cells(self, cytoplasm: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
        s = self.settings
        fine = filters.gaussian(cytoplasm, sigma=self._length(s.smoothing))
        threshold = filters.threshold_otsu(fine) if fine.max() > fine.min() else np.inf
        foreground = ndi.binary_fill_holes((fine > s.cell_threshold * threshold) | (nuclei > 0))
        markers = nuclei.copy()
        if s.edge_seed_distance is not None:
            coarse = filters.gaussian(cytoplasm, sigma=self._length(s.edge_smoothing))
            seeds = self._edge_seeds(coarse, nuclei, foreground)
            markers[tuple(seeds.T)] = nuclei.max() + 1 + np.arange(len(seeds))
        # Flooding the inverted signal from the seeds meets at the dim gaps between cells.
        cells = segmentation.watershed(-fine, markers, mask=foreground, compactness=s.compactness)
        return morphology.remove_small_objects(cells, max_size=self._area(s.min_cell_area))

    def _edge_seeds(self, coarse: np.ndarray, nuclei: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """(k, 2) positions on the image edge that seed cells whose nucleus is out of view."""
        peaks = feature.peak_local_max(
            coarse,
            min_distance=max(1, round(self._length(self.settings.peak_separation))),
            labels=foreground.astype(np.int32),
            exclude_border=False,
        )
        height, width = coarse.shape
        on_edge = (peaks.min(axis=1) == 0) | (peaks[:, 0] == height - 1) | (peaks[:, 1] == width - 1)
        far = ndi.distance_transform_edt(nuclei == 0)[tuple(peaks.T)] >= self._length(self.settings.edge_seed_distance)
        return peaks[on_edge & far].reshape(-1, 2)


def image_cells(image: np.ndarray, segmenter, mask: np.ndarray | None = None) -> Segmentation:
    """An image's cells: its given instance ``mask`` where it has one, else what ``segmenter`` finds.

    The cell store (:func:`ensemble.data.crops.process_image`) and serving both take cells from
    here, so a given mask means the same to both.
    """
    return segmenter(image) if mask is None else from_given_mask(image, mask)


def from_given_mask(image: np.ndarray, cells: np.ndarray) -> Segmentation:
    """Use given cell masks as they are; nuclei are each cell's blue-channel foreground.

    The cell ids are kept (they may be referred to elsewhere, e.g. by a truth table). A nucleus is
    the part of its cell where the blue channel exceeds its Otsu threshold over the image, so
    it carries its cell's id; with a flat blue channel the nuclei are empty.

    Parameters
    ----------
    image : ndarray of shape (H, W, 4)
    cells : ndarray of shape (H, W)
        Integer instance labels, 0 = background.
    """
    blue = np.asarray(image)[..., BLUE]
    nucleus = blue > filters.threshold_otsu(blue) if blue.max() > blue.min() else np.zeros(blue.shape, bool)
    cells = np.asarray(cells).astype(np.uint16)
    return Segmentation(nuclei=np.where(nucleus, cells, 0).astype(np.uint16), cells=cells)


def create_segmenter(name: str = "classical", **settings):
    """Build a segmenter by name.

    Parameters
    ----------
    name : {"classical", "hpacellseg"}
    **settings
        ``ClassicalSettings`` fields for "classical"; ``HPACellSegmenter`` arguments for
        "hpacellseg".

    Returns
    -------
    ClassicalSegmenter or HPACellSegmenter
        A callable ``image -> Segmentation`` with ``describe()`` for the store's meta.json.
    """
    if name == "classical":
        return ClassicalSegmenter(ClassicalSettings(**settings))
    if name == "hpacellseg":
        from ensemble.data.hpacellseg import HPACellSegmenter  # it imports this module

        return HPACellSegmenter(**settings)
    raise ValueError(f"unknown segmenter {name!r}; choose 'classical' or 'hpacellseg'")


@dataclass
class CellMatches:
    """Each predicted cell's best-overlapping true cell (by IoU).

    Attributes
    ----------
    pred_id, true_id : ndarray of int64
        One entry per predicted cell; ``true_id`` 0 where it overlaps no true cell.
    iou : ndarray of float64
        IoU with that true cell.
    true_share : ndarray of float64
        Share of the true cell's area that the predicted cell covers.
    n_true : int
        Number of true cells.
    threshold : float
        IoU at or above which a pair counts as matched; at >= 0.5 each true cell matches at most
        one predicted cell.
    """

    pred_id: np.ndarray
    true_id: np.ndarray
    iou: np.ndarray
    true_share: np.ndarray
    n_true: int
    threshold: float

    @property
    def matched(self) -> np.ndarray:
        """Boolean per predicted cell: matched to a true cell at the threshold."""
        return self.iou >= self.threshold

    @property
    def recall(self) -> float:
        """Share of true cells matched (1.0 when there are none)."""
        return float(self.matched.sum() / self.n_true) if self.n_true else 1.0

    @property
    def false_cells(self) -> int:
        """Predicted cells without a match."""
        return int((~self.matched).sum())


def match_cells(pred_cells: np.ndarray, true_cells: np.ndarray, iou: float = 0.6) -> CellMatches:
    """Match predicted to true cell masks by IoU (:func:`ensemble.metrics.overlap_counts`).

    Parameters
    ----------
    pred_cells, true_cells : ndarray of shape (H, W)
        Integer instance labels (0 = background); any ids.
    iou : float
        Matching threshold, at least 0.5 so that matches are one-to-one.

    Returns
    -------
    CellMatches
    """
    if iou < 0.5:
        raise ValueError(f"iou must be >= 0.5 for one-to-one matches, got {iou}")
    pred, _, pred_ids = segmentation.relabel_sequential(np.asarray(pred_cells))
    true, _, true_ids = segmentation.relabel_sequential(np.asarray(true_cells))
    n_pred, n_true = int(pred.max()), int(true.max())
    counts = overlap_counts(pred, np.arange(1, n_pred + 1), true, np.arange(1, n_true + 1))
    # Column 0 stands for no true cell: a cell overlapping none gets it, with IoU 0.
    ious = np.pad(overlap_iou(counts), ((0, 0), (1, 0)))
    best = ious.argmax(axis=1)
    rows = np.arange(n_pred)
    true_area = counts.sum(axis=0)
    return CellMatches(
        pred_id=np.asarray(pred_ids)[1:].astype(np.int64),
        true_id=np.asarray(true_ids)[best].astype(np.int64),
        iou=ious[rows, best],
        true_share=np.where(best > 0, counts[1:][rows, best] / true_area[best], 0.0),
        n_true=n_true,
        threshold=iou,
    )
