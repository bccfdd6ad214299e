"""The three HCPL heads on top of a backbone: DSA (bags of cells), CLA and CLH (single cells).

Each follows timm's split: ``forward_features`` returns the last feature map(s),
``forward_head`` pools and classifies (``pre_logits=True`` stops at the pooled descriptors, e.g.
for UMAP plots), ``forward`` chains the two. Logits are returned; probabilities are their sigmoid
(multi-label).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ensemble.labels import NUM_CLASSES
from ensemble.models.backbones import Backbone
from ensemble.models.pooling import create_pool
from ensemble.models.scattering import HybridEfficientNet


class DualStreamOutput(NamedTuple):
    """Logits of the DSA's two streams.

    Attributes
    ----------
    image_logits : torch.Tensor
        (B, num_classes), one row per bag (image).
    cell_logits : torch.Tensor
        (B, N, num_classes); rows of padded cells are meaningless and must be masked with ``valid``.
    """

    image_logits: torch.Tensor
    cell_logits: torch.Tensor


def init_class_prior(model: nn.Module, positive_rates: Sequence[float] | np.ndarray, min_rate: float = 1e-3) -> None:
    """Start every classifier of ``model`` at the classes' prior: bias = log-odds of the positive rate.

    With the default init every class starts at p = 0.5. Rare classes sit near 1 %, and Adam at
    1e-3 moves a bias by about 1e-3 per step, so a short run from scratch spends its few thousand
    steps walking the biases down instead of learning features (Lin et al. 2017, "Focal loss for
    dense object detection", sec. 4.1). Small classifier weights keep the start at the prior.

    Parameters
    ----------
    model : DSA, CLA or CLH
        Its ``classifiers()`` are reset in place.
    positive_rates : array-like (num_classes,)
        Fraction of training cells positive for each class.
    min_rate : float
        Rates are clipped to ``[min_rate, 1 - min_rate]`` so an absent class gets a finite bias.
    """
    rates = np.clip(np.asarray(positive_rates, dtype=np.float64), min_rate, 1.0 - min_rate)
    if rates.shape != (model.num_classes,):
        raise ValueError(f"positive_rates must have shape ({model.num_classes},); got {rates.shape}")
    bias = torch.as_tensor(np.log(rates / (1.0 - rates)), dtype=torch.float32)
    with torch.no_grad():
        for fc in model.classifiers():
            fc.weight.normal_(std=0.01)
            fc.bias.copy_(bias)


def _all_valid(cells: torch.Tensor) -> torch.Tensor:
    return torch.ones(cells.shape[:2], dtype=torch.bool, device=cells.device)


class DSA(nn.Module):
    """Dual-stream Actnet: one image's bag of cells -> image logits and per-cell logits (HCPL Fig. 2a).

    A shared backbone maps each cell to a feature map; Weibull activation pooling turns it into a
    descriptor. The image stream max-pools the descriptors of the bag's cells and classifies the
    result with FC1; the cell stream classifies each descriptor with FC2. Trained with
    :class:`ensemble.models.losses.DSALoss`.

    Padded cells (``valid`` False) never reach the backbone, so they cost nothing, cannot touch
    BatchNorm statistics and are excluded from the max: a bag's outputs do not depend on them.

    Parameters
    ----------
    backbone : Backbone
        Feature-map backbone.
    num_classes : int
        Output classes.
    pool : str
        ``"weibull"`` (the paper) or ``"avg"`` (ablation).
    per_channel : bool
        One set of Weibull parameters per feature channel instead of shared scalars.
    drop_rate : float
        Dropout on the descriptors before both classifiers.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = NUM_CLASSES,
        pool: str = "weibull",
        per_channel: bool = False,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.pool = create_pool(pool, self.num_features if per_channel else 1)
        self.head_drop = nn.Dropout(drop_rate)
        self.image_fc = nn.Linear(self.num_features, num_classes)  # FC1
        self.cell_fc = nn.Linear(self.num_features, num_classes)  # FC2

    def classifiers(self) -> tuple[nn.Linear, ...]:
        return self.image_fc, self.cell_fc

    def forward_features(self, cells: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Bags (B, N, C, S, S) and mask (B, N) -> feature maps (B, N, D, h, w), zero for padded cells."""
        valid = _all_valid(cells) if valid is None else valid
        maps = self.backbone(cells[valid])
        features = maps.new_zeros(cells.shape[:2] + maps.shape[1:])
        features[valid] = maps
        return features

    def forward_head(
        self, features: torch.Tensor, valid: torch.Tensor | None = None, pre_logits: bool = False
    ) -> DualStreamOutput | torch.Tensor:
        """Feature maps (B, N, D, h, w) -> :class:`DualStreamOutput`, or descriptors (B, N, D) if ``pre_logits``."""
        valid = _all_valid(features) if valid is None else valid
        descriptors = self.pool(features.flatten(0, 1)).unflatten(0, features.shape[:2])
        if pre_logits:
            return descriptors
        descriptors = self.head_drop(descriptors)
        bag = descriptors.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
        bag = torch.where(valid.any(dim=1, keepdim=True), bag, 0.0)  # a bag without cells stays finite
        return DualStreamOutput(self.image_fc(bag), self.cell_fc(descriptors))

    def forward(self, cells: torch.Tensor, valid: torch.Tensor | None = None) -> DualStreamOutput:
        """Bags (B, N, C, S, S), optional mask (B, N) of real cells -> :class:`DualStreamOutput`."""
        return self.forward_head(self.forward_features(cells, valid), valid)


class CLA(nn.Module):
    """Cell-level Actnet: one cell -> backbone -> Weibull pooling + power norm -> FC (HCPL Fig. 2c).

    Parameters
    ----------
    backbone : nn.Module
        Maps cells (B, C, S, S) to a feature map (B, D, h, w) and has ``num_features`` = D.
    num_classes : int
        Output classes.
    pool : str
        ``"weibull"`` (the paper) or ``"avg"``.
    per_channel : bool
        One set of Weibull parameters per feature channel instead of shared scalars.
    drop_rate : float
        Dropout before the classifier.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = NUM_CLASSES,
        pool: str = "weibull",
        per_channel: bool = False,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_features = backbone.num_features
        self.pool = create_pool(pool, self.num_features if per_channel else 1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)

    def classifiers(self) -> tuple[nn.Linear, ...]:
        return (self.fc,)

    def forward_features(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells (B, C, S, S) -> feature map (B, D, h, w)."""
        return self.backbone(cells)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map (B, D, h, w) -> logits (B, num_classes), or descriptors (B, D) if ``pre_logits``."""
        descriptors = self.pool(features)
        return descriptors if pre_logits else self.fc(self.head_drop(descriptors))

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        """Cells (B, C, S, S) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(cells))


class CLH(CLA):
    """Cell-level Hybrid: a scattering-EfficientNet hybrid, average pooling, FC (HCPL Fig. 2b).

    The backbone is wrapped in :class:`ensemble.models.scattering.HybridEfficientNet`, which
    fuses a scattering transform of the cell into the EfficientNet after two stages (Minskiy &
    Bober 2022, "Efficient Hybrid Network: Inducing Scattering Features"). As in the paper the
    feature map is average-pooled; ``pool="weibull"`` is available for ablations.

    Parameters
    ----------
    backbone : Backbone
        A timm EfficientNet with ``img_size`` set.
    num_classes, pool, per_channel, drop_rate
        As for :class:`CLA`.
    **hybrid_kwargs
        ``J``, ``L``, ``scatter_chs``, ``fusion_reductions`` of :class:`HybridEfficientNet`.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = NUM_CLASSES,
        pool: str = "avg",
        per_channel: bool = False,
        drop_rate: float = 0.0,
        **hybrid_kwargs,
    ):
        super().__init__(HybridEfficientNet(backbone, **hybrid_kwargs), num_classes, pool, per_channel, drop_rate)
