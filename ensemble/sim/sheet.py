"""A contact sheet of a dataset's images and cell outlines. Matplotlib through its object API and
the Agg canvas, so no display is needed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage
from skimage.segmentation import find_boundaries

from ensemble.labels import CHANNELS


def _read_channels(folder: Path, image_id: str) -> np.ndarray:
    """(H, W, 4) float in [0, 1] from the four 8- or 16-bit channel PNGs."""
    planes = []
    for name in CHANNELS:
        plane = np.asarray(Image.open(folder / f"{image_id}_{name}.png"))
        planes.append(plane / (65535.0 if plane.dtype == np.uint16 else 255.0))
    return np.stack(planes, axis=-1)


def contact_sheet(
    root: str | Path,
    out_png: str | Path,
    n_images: int = 4,
    split: str = "train",
    mask_dir: str = "truth/masks",
) -> Path:
    """Draw the first images of a Kaggle-layout dataset: composite and green channel side by side.

    The composite shows red = microtubules, green = protein, blue = nucleus, with yellow (ER) added
    to red and green, as the HPA displays it. Cell outlines come from ``ROOT/{mask_dir}/{ID}.png``
    when present (``truth/masks`` for simulated data, ``masks`` for given masks), and each cell is
    annotated with its labels from ``truth/cell_labels.csv`` when present. Cells the simulator left
    out of the truth (``truth/left_out``: cut by the border) are outlined in orange, marked "x".

    Returns
    -------
    Path
        ``out_png``.
    """
    root, out_png = Path(root), Path(out_png)
    with open(root / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n_images]
    cell_labels = {}
    truth_csv = root / "truth" / "cell_labels.csv"
    if truth_csv.exists():
        with open(truth_csv, newline="") as f:
            cell_labels = {(r["ID"], int(r["cell_id"])): r["Label"] for r in csv.DictReader(f)}

    fig = Figure(figsize=(10, 5 * len(rows)), dpi=100, facecolor="black")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (ax_rgb, ax_green), row in zip(axes, rows):
        image = _read_channels(root / split, row["ID"])
        red, green, blue, yellow = np.moveaxis(image, -1, 0)
        composite = np.clip(np.stack([red + yellow, green + yellow, blue], axis=-1), 0, 1)
        dark = np.zeros_like(green)
        protein = np.stack([dark, green / max(green.max(), 1e-6), dark], axis=-1)
        mask_path = root / mask_dir / f"{row['ID']}.png"
        if mask_path.exists():
            mask = np.asarray(Image.open(mask_path))
            edge = find_boundaries(mask, mode="inner")
            composite[edge] = protein[edge] = 0.6
            ids = np.unique(mask[mask > 0])
            for cell_id, (y, x) in zip(ids, ndimage.center_of_mass(mask > 0, mask, ids)):
                text = cell_labels.get((row["ID"], int(cell_id)))
                if text is not None:
                    ax_green.text(x, y, text, color="white", fontsize=7, ha="center", va="center")
        left_out_path = root / "truth" / "left_out" / f"{row['ID']}.png"
        if left_out_path.exists():
            left_out = np.asarray(Image.open(left_out_path))
            edge = find_boundaries(left_out, mode="inner")
            composite[edge] = protein[edge] = (1.0, 0.55, 0.0)
            ids = np.unique(left_out[left_out > 0])
            for y, x in ndimage.center_of_mass(left_out > 0, left_out, ids):
                ax_green.text(x, y, "x", color="orange", fontsize=8, ha="center", va="center")
        ax_rgb.imshow(composite)
        ax_green.imshow(protein)
        ax_rgb.set_title(f"{row['ID']}  [{row['Label']}]", color="white", fontsize=9)
        ax_green.set_title("green (protein), cell labels; x: left out of the truth", color="white", fontsize=9)
        for ax in (ax_rgb, ax_green):
            ax.set_axis_off()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, facecolor="black")
    return out_png
