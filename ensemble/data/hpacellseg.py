"""Adapter for the HPA Cell Segmentator (``hpacellseg``), the U-Nets the HCPL paper segments with.

:func:`ensemble.data.segment.create_segmenter` builds :class:`HPACellSegmenter` for the name
``"hpacellseg"``. The package is not on PyPI, so it is imported only when a segmenter is built;
:func:`label_cell_predictions`, its post-processing re-written, needs only scikit-image.
"""

from __future__ import annotations

import pickle
import types
import warnings

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

from ensemble.data.segment import BLUE, RED, YELLOW, Segmentation, relabel, to_shape
from ensemble.storage import exists, local_path


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


def _load_model(path: str, device: str):
    """Load a U-Net weight file: weights only where the file allows it, else the pickled model.

    HPA's files are whole pickled models (a DataParallel around pytorch_zoo's U-Net), which
    ``torch.load(weights_only=True)`` refuses; unpickling them in full can run any code a file
    holds, so that fallback warns and names the file.
    """
    import torch

    try:
        model = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(
            f"{path} holds a pickled model, which torch.load(weights_only=True) refuses; loading it with "
            "weights_only=False, which runs any code the file holds: use only weight files from a source "
            "you trust, such as HPA's Zenodo record.",
            stacklevel=3,
        )
        model = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{path} holds {type(model).__name__}, not a model: hpacellseg needs whole models")
    return getattr(model, "module", model)  # unwrap DataParallel on CPU


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
    TypeError
        If a weight file holds no whole model (a state dict, say).
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
        CellSegmentator = _import_hpacellseg()
        for path in (nuclei_model_path, cell_model_path):
            if not path or not exists(path):
                raise FileNotFoundError(f"hpacellseg weights not found: {path!r}. {HPACELLSEG_INSTALL}")
        # hpacellseg's own loader would try to download missing files, so the models are loaded
        # here (from a path or a URL, e.g. the bucket of a cluster run) and handed to it.
        self._segmentator = CellSegmentator(
            _load_model(local_path(nuclei_model_path), device), _load_model(local_path(cell_model_path), device),
            scale_factor=scale_factor, device=device, multi_channel_model=True,
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
        return Segmentation(nuclei=to_shape(seg.nuclei, image.shape[:2]), cells=to_shape(seg.cells, image.shape[:2]))


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
    return relabel(np.where(nuclei > 0, cells, 0), cells)


def _fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Fill holes of a label image, cutting touching objects apart at their shared boundary."""
    inner = np.where(segmentation.find_boundaries(labels), 0, labels)
    return ndi.label(ndi.binary_fill_holes(inner > 0))[0]
