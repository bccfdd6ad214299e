"""Multi-label losses: weighted binary cross-entropy, focal loss and the DSA's two-stream loss.

All take logits (..., C) and targets of the same shape in [0, 1]: hard labels, or the soft cell
labels produced by relabelling (CRA). Optional weights:

- ``class_weights`` (C,): rare classes heavier (see :func:`class_weights`);
- ``sample_weights`` (...): e.g. a cell's visual-integrity score;
- ``mask`` (...) bool: rows to ignore, e.g. padded cells of a DSA bag.

The result is the weighted mean over rows and classes, ``sum(w_row * w_class * loss) /
(C * sum(w_row))`` with ``w_row = sample_weight * mask``, so with no weights it equals the plain
mean of ``torch.nn.functional.binary_cross_entropy_with_logits``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ensemble.models.heads import DualStreamOutput


def class_weights(positive_rates, power: float = 0.5, min_rate: float = 1e-4) -> torch.Tensor:
    """Per-class loss weights ``rate^-power``, normalised to mean 1.

    Parameters
    ----------
    positive_rates : array-like (C,)
        Fraction of training examples positive for each class.
    power : float
        0 gives equal weights, 1 inverse frequency; 0.5 (inverse square root) lifts rare classes
        without letting a handful of examples dominate.
    min_rate : float
        Floor on the rates, so a class absent from the data gets a large but finite weight.

    Returns
    -------
    torch.Tensor
        float32 (C,).
    """
    rates = np.clip(np.asarray(positive_rates, dtype=np.float64), min_rate, 1.0)
    weights = rates**-power
    return torch.as_tensor(weights / weights.mean(), dtype=torch.float32)


def _weighted_mean(
    loss: torch.Tensor,
    class_weights: torch.Tensor | None,
    sample_weights: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Elementwise loss (..., C) -> scalar: the weighted mean described in the module docstring."""
    if class_weights is not None:
        loss = loss * class_weights
    row_weights = torch.ones(loss.shape[:-1], dtype=loss.dtype, device=loss.device)
    if sample_weights is not None:
        row_weights = row_weights * sample_weights
    if mask is not None:
        row_weights = row_weights * mask
    total = (loss.sum(dim=-1) * row_weights).sum()
    return total / (row_weights.sum() * loss.shape[-1]).clamp_min(torch.finfo(loss.dtype).tiny)


def weighted_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted binary cross-entropy with logits; see the module docstring for the weights."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return _weighted_mean(loss, class_weights, sample_weights, mask)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    class_weights: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) for soft multi-label targets.

    ``BCE(p, t) * |t - p|^gamma``, optionally times ``alpha t + (1 - alpha)(1 - t)``. For hard
    targets ``|t - p| = 1 - p_t``, the usual focal modulation; for soft targets it is the
    "quality focal" form, which vanishes when the prediction matches the target. ``gamma = 0`` and
    ``alpha = None`` give :func:`weighted_bce`.
    """
    logits, targets = logits.float(), targets.float()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = loss * (targets - torch.sigmoid(logits)).abs().pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return _weighted_mean(loss, class_weights, sample_weights, mask)


class WeightedBCELoss(nn.Module):
    """:func:`weighted_bce` with fixed class weights.

    Parameters
    ----------
    class_weights : torch.Tensor, optional
        (C,) per-class weights, kept as a buffer so they follow the model's device.
    """

    def __init__(self, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits, targets, sample_weights=None, mask=None) -> torch.Tensor:
        return weighted_bce(logits, targets, self.class_weights, sample_weights, mask)


class FocalLoss(WeightedBCELoss):
    """:func:`focal_loss` with fixed ``gamma``, ``alpha`` and class weights (``gamma=0``: :class:`WeightedBCELoss`)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, class_weights: torch.Tensor | None = None):
        super().__init__(class_weights)
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits, targets, sample_weights=None, mask=None) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma, self.alpha, self.class_weights, sample_weights, mask)


class DSALoss(nn.Module):
    """The DSA's loss ``W1 * L_image + W2 * L_cell`` (HCPL Methods), ``W2 = 0.2 W1`` by default.

    Cell labels inherited from image labels are weak, hence the smaller cell weight. The cell
    term covers valid cells only.

    Parameters
    ----------
    criterion : nn.Module, optional
        Loss for both streams, called as ``criterion(logits, targets, sample_weights, mask)``;
        :class:`WeightedBCELoss` without class weights by default.
    image_weight, cell_weight : float
        W1 and W2.
    """

    def __init__(self, criterion: nn.Module | None = None, image_weight: float = 1.0, cell_weight: float = 0.2):
        super().__init__()
        self.criterion = criterion or WeightedBCELoss()
        self.image_weight = image_weight
        self.cell_weight = cell_weight

    def forward(
        self,
        output: DualStreamOutput,
        image_targets: torch.Tensor,
        cell_targets: torch.Tensor,
        valid: torch.Tensor | None = None,
        cell_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of a batch of bags.

        Parameters
        ----------
        output : DualStreamOutput
            The DSA's output.
        image_targets : torch.Tensor
            (B, C) image labels.
        cell_targets : torch.Tensor
            (B, N, C) cell labels (the image's labels, or relabelled soft ones).
        valid : torch.Tensor, optional
            (B, N) bool, False for padded cells.
        cell_weights : torch.Tensor, optional
            (B, N) per-cell weights, e.g. visual integrity.
        """
        image_loss = self.criterion(output.image_logits, image_targets)
        cell_loss = self.criterion(output.cell_logits, cell_targets, cell_weights, valid)
        return self.image_weight * image_loss + self.cell_weight * cell_loss


# Loss classes by the name a model spec uses; build with ``LOSSES[name](**kwargs)``.
LOSSES: dict[str, type[nn.Module]] = {"bce": WeightedBCELoss, "focal": FocalLoss}
