"""Cell segmentation: one image (H, W, 4) in, nucleus and cell instance labels out.

Two segmenters share one interface, ``segmenter(image) -> Segmentation``:

- :class:`ClassicalSegmenter` (the default, no weights needed): nuclei from the blue channel by
  Otsu thresholding and a distance-transform watershed; cells grown from the nuclei over the
  microtubule and ER channels by a marker watershed. It works at a down-scaled resolution
  (``work_size``), so a 2048 px image costs about what a 512 px one does.
- :class:`HPACellSegmenter`: an adapter around the HPA Cell Segmentator (the U-Nets the HCPL paper
  uses), with its post-processing re-written for current scikit-image and optionally run at a
  reduced resolution (the paper's 2x speed-up).

Given masks (``ROOT/masks/{ID}.png``) bypass both: :func:`from_given_mask`.
:func:`match_cells` pairs predicted with true cells by mask IoU; the quality benchmark, the tests
and the cell store (to attach truth labels) use it.
"""

from __future__ import annotations

import dataclasses
import os
import types
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation

from ensemble.labels import CHANNELS

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


def _to_shape(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize instance labels to ``shape`` by nearest neighbour (no new ids appear)."""
    if labels.shape == shape:
        return labels
    return cv2.resize(labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def _relabel(nuclei: np.ndarray, cells: np.ndarray) -> Segmentation:
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
        seg = _relabel(nuclei, cells)
        shape = image.shape[:2]
        return Segmentation(nuclei=_to_shape(seg.nuclei, shape), cells=_to_shape(seg.cells, shape))

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


HPACELLSEG_INSTALL = (
    "The 'hpacellseg' segmenter needs the HPA Cell Segmentator, which is not on PyPI. Install it with\n"
    "    pip install pytorch_zoo https://github.com/CellProfiling/HPA-Cell-Segmentation/archive/master.zip\n"
    "and download its weights from Zenodo (https://zenodo.org/record/4665863): "
    "dpn_unet_nuclei_v1.pth (nuclei) and dpn_unet_cell_3ch_v1.pth (cells, 3 channels); pass their paths as "
    "nuclei_model_path and cell_model_path. Or use the default segmenter='classical'."
)


class HPACellSegmenterUnavailable(ImportError):
    """The HPA Cell Segmentator package (``hpacellseg``) or one of its dependencies is missing."""


def _import_hpacellseg():
    """Import hpacellseg's CellSegmentator, making its one call removed from scikit-image work.

    hpacellseg calls ``skimage.transform.rescale(..., multichannel=True)``; current scikit-image
    spells that ``channel_axis=-1``. Rather than patching scikit-image for everyone, the name
    ``transform`` inside hpacellseg's own module is pointed at a translating stand-in.
    """
    try:
        from hpacellseg import cellsegmentator
        import pytorch_zoo  # noqa: F401  (the pickled U-Nets unpickle into its classes)
    except ImportError as error:
        raise HPACellSegmenterUnavailable(f"{HPACELLSEG_INSTALL}\n(import failed: {error})") from error
    from skimage import transform

    def rescale(image, scale, multichannel=False, **kwargs):
        return transform.rescale(image, scale, channel_axis=-1 if multichannel else None, **kwargs)

    cellsegmentator.transform = types.SimpleNamespace(rescale=rescale)
    return cellsegmentator.CellSegmentator


class HPACellSegmenter:
    """Adapter for the HPA Cell Segmentator (``hpacellseg``): its U-Nets, our post-processing.

    The U-Net predictions come from ``CellSegmentator.pred_nuclei`` and ``pred_cells``. The
    post-processing is :func:`label_cell_predictions`, a re-write of ``hpacellseg.utils.label_cell``
    for current NumPy and scikit-image (the original uses ``np.bool``, absent from NumPy 1.24 to
    1.26; the ``min_size`` argument, deprecated in scikit-image 0.26; and casts cell labels to
    uint8, so ids above 255 wrap), with its pixel sizes scaled to the resolution it runs at:
    running it at half resolution (``downscale=0.5``) is the HCPL paper's 2x speed-up.

    Parameters
    ----------
    nuclei_model_path, cell_model_path : str
        Local files ``dpn_unet_nuclei_v1.pth`` and ``dpn_unet_cell_3ch_v1.pth`` (Zenodo). They are
        never downloaded from here.
    scale_factor : float
        Scale at which the U-Nets see the image (hpacellseg's own setting; 0.25 for 2048 px).
    device : str
        "cpu" or "cuda".
    downscale : float
        Scale at which post-processing runs (1.0 = full resolution as in hpacellseg; the paper
        uses 0.5); labels are scaled back up by nearest neighbour.

    Raises
    ------
    HPACellSegmenterUnavailable
        If hpacellseg or pytorch_zoo is not installed (the message says how to install them).
    FileNotFoundError
        If a weight file is missing (the message says where to get it).
    """

    name = "hpacellseg"

    def __init__(
        self,
        nuclei_model_path: str,
        cell_model_path: str,
        scale_factor: float = 0.25,
        device: str = "cpu",
        downscale: float = 0.5,
    ):
        import torch

        CellSegmentator = _import_hpacellseg()
        for path in (nuclei_model_path, cell_model_path):
            if not path or not os.path.exists(path):
                raise FileNotFoundError(f"hpacellseg weights not found: {path!r}. {HPACELLSEG_INSTALL}")
        # The weight files are pickled whole models: torch>=2.6 loads weights only by default, and
        # hpacellseg's own loader would try to download missing files, so load them here.
        models = [
            torch.load(path, map_location=device, weights_only=False)
            for path in (nuclei_model_path, cell_model_path)
        ]
        models = [getattr(m, "module", m) for m in models]  # unwrap DataParallel on CPU
        self._segmentator = CellSegmentator(
            models[0], models[1], scale_factor=scale_factor, device=device, multi_channel_model=True
        )
        self.settings = {
            "nuclei_model_path": nuclei_model_path,
            "cell_model_path": cell_model_path,
            "scale_factor": scale_factor,
            "device": device,
            "downscale": downscale,
        }

    def describe(self) -> dict:
        """Name and settings, as recorded in a cell store's meta.json."""
        return {"name": self.name, "settings": dict(self.settings)}

    def __call__(self, image: np.ndarray) -> Segmentation:
        """Segment one image (H, W, 4) float in [0, 1]; returns labels at the input resolution."""
        image = np.asarray(image, dtype=np.float32)
        if image.shape[0] != image.shape[1]:
            # hpacellseg resizes its predictions back with (height, width) where cv2 takes
            # (width, height): right only for square images, which HPA's are.
            raise ValueError(f"hpacellseg segments square images only, got {image.shape[1]}x{image.shape[0]}")
        red, blue, yellow = image[..., RED], image[..., BLUE], image[..., YELLOW]
        nuclei_pred = self._segmentator.pred_nuclei([blue])[0]
        cell_pred = self._segmentator.pred_cells([[red], [yellow], [blue]])[0]
        seg = label_cell_predictions(nuclei_pred, cell_pred, downscale=self.settings["downscale"])
        return Segmentation(nuclei=_to_shape(seg.nuclei, image.shape[:2]), cells=_to_shape(seg.cells, image.shape[:2]))


def label_cell_predictions(
    nuclei_pred: np.ndarray, cell_pred: np.ndarray, downscale: float = 1.0, reference_size: int = 2048
) -> Segmentation:
    """hpacellseg's ``label_cell`` post-processing, in current scikit-image, at a chosen scale.

    Parameters
    ----------
    nuclei_pred, cell_pred : ndarray of uint8, shape (H, W, 3)
        U-Net outputs of ``pred_nuclei`` and ``pred_cells`` (channel 1: borders, 2: interiors).
    downscale : float
        The predictions are shrunk by this factor before post-processing.
    reference_size : int
        Image side for which hpacellseg's pixel sizes were set (nuclei >= 2500 px, cells >= 5500 px,
        a closing disk of radius 6): an HPA field of view at 2048 px. The sizes scale with the
        side of the shrunk predictions relative to it.

    Returns
    -------
    Segmentation
        Labels at the shrunk resolution (the caller scales them to the image).
    """
    shape = nuclei_pred.shape[:2]
    size = (max(1, round(shape[1] * downscale)), max(1, round(shape[0] * downscale)))
    nuc = cv2.resize(nuclei_pred, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    cel = cv2.resize(cell_pred, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    pixel = max(size) / reference_size  # length of a reference pixel in post-processing pixels
    area = pixel**2

    def small(pixels: float) -> int:
        # hpacellseg removes objects *smaller than* min_size; max_size removes those <= it.
        return max(0, int(pixels * area) - 1)

    # Nuclei: seeds are confident interiors away from predicted borders, flooded over the mask.
    seeds = (nuc[..., 2] * ((1 - (nuc[..., 1] + cel[..., 1])) > 0.05)) > 0.4 - 0.25
    seeds = morphology.remove_small_objects(seeds, max_size=small(500))
    mask = morphology.remove_small_holes(nuc[..., 2] > 0.4, max_size=small(1000))
    mask = morphology.remove_small_objects(mask, max_size=small(8))
    nuclei = segmentation.watershed(mask, ndi.label(seeds)[0], mask=mask, watershed_line=True)
    nuclei = measure.label(morphology.remove_small_objects(nuclei, max_size=small(2500)))

    # Cells: the interior score flooded from the nuclei.
    threshold = max(0.22, filters.threshold_otsu(cel[..., 2]) * 0.5)
    # hpacellseg means to cut predicted borders out here, but its np.invert of an int8 0/1 array
    # gives -1/-2, so the cut is a no-op; its weights were tuned with that, so we keep it a no-op.
    interior = cel[..., 2] > threshold
    height = np.clip(cel[..., 2], threshold, None)
    cells = segmentation.watershed(-height, nuclei, mask=interior)
    cells = morphology.remove_small_objects(cells, max_size=small(5500))
    cells = morphology.closing(cells, morphology.disk(max(1, round(6 * pixel))))
    cells = _fill_label_holes(cells)
    # Extend cells over the border predictions, so cells on the image edge keep their rims.
    cells = segmentation.watershed(-height, cells, mask=(cells > 0) | (cel[..., 1] > 0.05))
    cells = measure.label(_fill_label_holes(cells) > 0)
    cells = measure.label(morphology.remove_small_objects(cells, max_size=small(5500)))

    nuclei = measure.label((cells > 0) & (nuclei > 0))
    nuclei = morphology.remove_small_objects(nuclei, max_size=small(2500))
    return _relabel(np.where(nuclei > 0, cells, 0), cells)


def _fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Fill holes of a label image, cutting touching objects apart at their shared boundary."""
    inner = np.where(segmentation.find_boundaries(labels), 0, labels)
    return ndi.label(ndi.binary_fill_holes(inner > 0))[0]


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
    """Match predicted to true cell masks by IoU, counting overlaps with one ``np.bincount``.

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
    overlap = np.bincount(
        pred.ravel().astype(np.int64) * (n_true + 1) + true.ravel(), minlength=(n_pred + 1) * (n_true + 1)
    ).reshape(n_pred + 1, n_true + 1)
    pred_area, true_area = overlap[1:].sum(axis=1), overlap.sum(axis=0)
    overlap = overlap[1:]  # rows: predicted cells 1..n; columns: background, true cells 1..m
    ious = overlap / (pred_area[:, None] + true_area[None, :] - overlap)
    ious[:, 0] = 0.0  # background is no cell: a cell overlapping none gets column 0, IoU 0
    best = ious.argmax(axis=1)
    rows = np.arange(n_pred)
    return CellMatches(
        pred_id=np.asarray(pred_ids)[1:].astype(np.int64),
        true_id=np.asarray(true_ids)[best].astype(np.int64),
        iou=ious[rows, best],
        true_share=np.where(best > 0, overlap[rows, best] / true_area[best], 0.0),
        n_true=n_true,
        threshold=iou,
    )
