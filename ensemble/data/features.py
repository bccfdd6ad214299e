"""Per-cell morphology and intensity features, the inputs of the Visual Integrity Detector (VID).

The HCPL paper's VID classifies a cell as well or badly captured from eight features: bounding-box
height, width, aspect ratio and area, mask area, mask perimeter, the largest dimension, and a
binary intensity feature "based on the pixel intensity and the ratio of blue and green to the
total number of pixels". Our reading of the last one is :attr:`FeatureSettings`: a cell passes
when it is bright enough on average and enough of its pixels are stained in the nucleus (blue) or
protein (green) channel; the ingredients are kept as columns too, so VID can learn from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import measure

from ensemble.labels import CHANNELS

BLUE, GREEN = CHANNELS.index("blue"), CHANNELS.index("green")

# The paper's eight VID features, as named in cells.parquet (``area`` is the mask area).
VID_FEATURES: tuple[str, ...] = (
    "bbox_height",
    "bbox_width",
    "aspect_ratio",
    "bbox_area",
    "area",
    "perimeter",
    "largest_dimension",
    "intensity_flag",
)


@dataclass(frozen=True)
class FeatureSettings:
    """Thresholds of the intensity feature (intensities in [0, 1]).

    Attributes
    ----------
    stain_threshold : float
        A pixel counts as stained in a channel above this intensity.
    min_stained_fraction : float
        Least share of the cell's pixels stained blue plus share stained green.
    min_mean_intensity : float
        Least mean intensity over the cell's pixels and all four channels.
    """

    stain_threshold: float = 0.1
    min_stained_fraction: float = 0.1
    min_mean_intensity: float = 0.03


def cell_features(image: np.ndarray, cells: np.ndarray, settings: FeatureSettings | None = None) -> pd.DataFrame:
    """Bounding box, morphology and intensity features of every cell of one image.

    Parameters
    ----------
    image : ndarray of shape (H, W, 4)
        Float intensities in [0, 1], ``CHANNELS`` order.
    cells : ndarray of shape (H, W)
        Cell instance labels, 0 = background.
    settings : FeatureSettings, optional

    Returns
    -------
    pandas.DataFrame
        One row per cell in increasing id order: ``cell_id``, the bounding box ``y0, x0, y1, x1``
        (half-open), the :data:`VID_FEATURES`, ``mean_intensity``, ``blue_fraction``,
        ``green_fraction`` and ``touches_border`` (the mask reaches the image edge, so the cell
        may be cut off).
    """
    settings = settings or FeatureSettings()
    props = measure.regionprops_table(cells, properties=("label", "bbox", "area", "perimeter"))
    ids = props["label"]
    height = props["bbox-2"] - props["bbox-0"]
    width = props["bbox-3"] - props["bbox-1"]
    # An empty id list makes ndimage.mean return a scalar; keep every column 1-D.
    mean_intensity = np.atleast_1d(ndi.mean(image.mean(axis=-1), cells, ids))
    blue_fraction = np.atleast_1d(ndi.mean(image[..., BLUE] > settings.stain_threshold, cells, ids))
    green_fraction = np.atleast_1d(ndi.mean(image[..., GREEN] > settings.stain_threshold, cells, ids))
    border = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    return pd.DataFrame(
        {
            "cell_id": ids.astype(np.int32),
            "y0": props["bbox-0"].astype(np.int32),
            "x0": props["bbox-1"].astype(np.int32),
            "y1": props["bbox-2"].astype(np.int32),
            "x1": props["bbox-3"].astype(np.int32),
            "bbox_height": height.astype(np.int32),
            "bbox_width": width.astype(np.int32),
            "aspect_ratio": (np.maximum(height, width) / np.maximum(np.minimum(height, width), 1)).astype(np.float32),
            "bbox_area": (height * width).astype(np.int64),
            "area": props["area"].astype(np.int64),
            "perimeter": props["perimeter"].astype(np.float32),
            "largest_dimension": np.maximum(height, width).astype(np.int32),
            "intensity_flag": (mean_intensity >= settings.min_mean_intensity)
            & (blue_fraction + green_fraction >= settings.min_stained_fraction),
            "mean_intensity": mean_intensity.astype(np.float32),
            "blue_fraction": blue_fraction.astype(np.float32),
            "green_fraction": green_fraction.astype(np.float32),
            "touches_border": np.isin(ids, border),
        }
    )
