"""VID module (ii): a CNN that predicts how much of a cell its crop captures, in four classes.

The paper trains an EfficientNet-B2 on whole cells with part of their border area cut away:
captured fractions below 30 %, 30-50 %, 50-80 % and 80-100 % are classes 0-3, learnt with
cross-entropy. :class:`BorderCutDataset` makes such examples from whole-cell crops of the store:
it zeroes a band on one side of the cell so that a drawn fraction of its mask area remains, then
frames what is left the way the store frames every cell (:func:`ensemble.data.crops.crop_cells`:
bounding box, centred square padding, resize), so a cut example looks like a cell that the image
border or the segmentation really cut.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ensemble.models import cell_input
from ensemble.models.backbones import create_backbone

# Upper edges of the classes below 80-100 %: fraction f falls in class np.digitize(f, EDGES).
CAPTURE_EDGES = (0.3, 0.5, 0.8)
CAPTURE_CLASSES = ("<30%", "30-50%", "50-80%", "80-100%")
# Fractions drawn per class; below 5 % a crop is a few pixels of membrane, not a cell.
_CLASS_RANGES = ((0.05, 0.3), (0.3, 0.5), (0.5, 0.8), (0.8, 1.0))
# Half the 80-100 % examples are left uncut: most cells at inference are whole.
_UNCUT_SHARE = 0.5


def capture_class(fraction) -> np.ndarray:
    """Class 0-3 of captured fractions (see :data:`CAPTURE_CLASSES`)."""
    return np.digitize(np.asarray(fraction, dtype=np.float64), CAPTURE_EDGES)


def frame(crop: np.ndarray) -> np.ndarray:
    """Re-frame a (4, S, S) crop on its non-zero pixels: bounding box, centred square, resize to S."""
    size = crop.shape[-1]
    ys, xs = np.nonzero(crop.any(axis=0))
    patch = crop[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1].transpose(1, 2, 0)
    height, width = patch.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    patch = cv2.copyMakeBorder(patch, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0)
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA).reshape(size, size, -1).transpose(2, 0, 1)


def border_cut(crop: np.ndarray, keep: float, side: int) -> tuple[np.ndarray, float]:
    """Cut a band off one side of a cell crop so that about ``keep`` of its mask area remains.

    Parameters
    ----------
    crop : ndarray (4, S, S)
        A whole cell as the store holds it (zero outside the cell's mask).
    keep : float
        Share of the mask area to keep, in (0, 1]; 1 returns the crop unchanged.
    side : int
        0 top, 1 left, 2 bottom, 3 right (the number of quarter turns that bring it to the top).

    Returns
    -------
    crop : ndarray (4, S, S)
        The cut cell, re-framed by :func:`frame`.
    kept : float
        The share of the mask area actually kept (the band is a whole number of pixel rows).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    rotated = np.rot90(crop, k=side, axes=(1, 2))
    rows = rotated.any(axis=0).sum(axis=1)
    area = rows.sum()
    if area == 0:
        raise ValueError("the crop is empty: nothing to cut")
    if keep == 1:
        return crop.copy(), 1.0
    # remaining[t]: mask pixels left after zeroing the first t rows; never cut the cell away.
    remaining = area - np.concatenate([[0], np.cumsum(rows)])
    remaining = remaining[remaining > 0]
    t = int(np.argmin(np.abs(remaining / area - keep)))
    cut = rotated.copy()
    cut[:, :t] = 0
    return frame(np.rot90(cut, k=-side, axes=(1, 2))), float(remaining[t] / area)


class BorderCutDataset(Dataset):
    """Whole-cell crops, each drawn with a random border cut: training examples of the capture network.

    Each item draws a class uniformly, a kept fraction uniformly within the class (or, for half
    of the 80-100 % draws, no cut), a side, and a flip and quarter turn. Draws depend on
    ``(seed, epoch, item)`` only: an epoch is reproducible, and :meth:`set_epoch` gives new cuts.

    Parameters
    ----------
    crops : ndarray (n, 4, S, S) uint8
        Whole cells.
    cuts_per_cell : int
        Items per cell and epoch.
    seed : int

    Items are dicts: ``image`` (4, S, S) float32 in [0, 1], ``target`` (the class, int64) and
    ``kept`` (the fraction, float32).
    """

    def __init__(self, crops: np.ndarray, cuts_per_cell: int = 1, seed: int = 0):
        if len(crops) == 0:
            raise ValueError("no crops to cut")
        if cuts_per_cell < 1:
            raise ValueError(f"cuts_per_cell must be >= 1, got {cuts_per_cell}")
        self.crops, self.cuts_per_cell, self.seed, self.epoch = crops, cuts_per_cell, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.crops) * self.cuts_per_cell

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        label = int(rng.integers(len(CAPTURE_CLASSES)))
        uncut = label == len(CAPTURE_CLASSES) - 1 and rng.random() < _UNCUT_SHARE
        keep = 1.0 if uncut else rng.uniform(*_CLASS_RANGES[label])
        crop, kept = border_cut(self.crops[i % len(self.crops)], keep, side=int(rng.integers(4)))
        crop = np.rot90(crop[:, :, ::-1] if rng.random() < 0.5 else crop, k=int(rng.integers(4)), axes=(1, 2))
        return {"image": to_tensor(crop), "target": int(capture_class(kept)), "kept": np.float32(kept)}


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """Integer crops (..., 4, S, S) -> the networks' input (:func:`~ensemble.models.cell_input`)."""
    return cell_input(torch.from_numpy(np.ascontiguousarray(crops)))


class CaptureNet(nn.Module):
    """A timm backbone, global average pooling and a linear layer to the four capture classes.

    Parameters
    ----------
    backbone : str
        timm model name (the paper: ``efficientnet_b2``).
    cell_size : int
        Side of the cells it takes; other sizes are resized to it.
    pretrained : bool
        Start from timm's pretrained weights (downloads them).
    """

    def __init__(self, backbone: str, cell_size: int, pretrained: bool = False):
        super().__init__()
        self.cell_size = cell_size
        self.backbone = create_backbone(backbone, pretrained=pretrained, img_size=cell_size)
        self.fc = nn.Linear(self.backbone.num_features, len(CAPTURE_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cells (B, 4, S, S) float in [0, 1] -> class logits (B, 4)."""
        if x.shape[-1] != self.cell_size:
            x = F.interpolate(x, size=(self.cell_size, self.cell_size), mode="bilinear", antialias=True)
        return self.fc(self.backbone(x).mean(dim=(2, 3)))


def train_capture(net: CaptureNet, crops: np.ndarray, epochs: int = 10, batch_size: int = 64, lr: float = 1e-3,
                  cuts_per_cell: int = 2, seed: int = 0, device: str | torch.device | None = None) -> list[float]:
    """Train ``net`` in place on border cuts of whole-cell crops (Adam, cosine schedule, cross-entropy).

    ``device``: where it trains, by default the GPU where there is one (a VID task placed on one,
    :func:`ensemble.integrity.remote.fit_integrity`). The trained network is handed back on the
    CPU, where it is saved and predicts from.

    Returns
    -------
    list of float
        Mean training loss of each epoch.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device)
    torch.manual_seed(seed)
    dataset = BorderCutDataset(crops, cuts_per_cell=cuts_per_cell, seed=seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    generator = torch.Generator().manual_seed(seed)
    history = []
    net.train()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                                drop_last=len(dataset) > batch_size):
            loss = F.cross_entropy(net(batch["image"].to(device)), batch["target"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(batch["target"]), count + len(batch["target"])
        scheduler.step()
        history.append(total / count)
    net.cpu().eval()
    return history


@torch.no_grad()
def predict_capture(net: CaptureNet, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probabilities (n, 4) of the capture classes of uint8 crops (n, 4, S, S)."""
    net.eval()
    out = [torch.softmax(net(to_tensor(crops[i:i + batch_size])), dim=1).numpy()
           for i in range(0, len(crops), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CAPTURE_CLASSES)), np.float32)
