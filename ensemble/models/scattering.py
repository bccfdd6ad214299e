"""Scattering transform and the hybrid scattering-EfficientNet behind CLH.

The hybrid follows Minskiy & Bober, "Efficient Hybrid Network: Inducing Scattering Features"
(arXiv:2203.15392, 2022), as used for CLH in HCPL (Fig. 2b): a fixed 2-D scattering transform
(cascaded Morlet wavelets, modulus, low-pass; translation invariant and stable to small
deformations) gives hand-crafted features of each cell, which are induced into an EfficientNet
at two depths by Hybrid Fusion blocks, so the network combines well-defined filters with
learnt ones and generalises from fewer examples of rare classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
# Not `kymatio.torch`: it also imports kymatio's 3-D module, which fails on scipy 1.17 (no sph_harm).
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from timm.layers import ConvNormAct
from timm.models.efficientnet import EfficientNet
from torch import nn

from ensemble.models.backbones import Backbone


class Scattering(nn.Module):
    """Fixed 2-D scattering transform of every input channel (kymatio).

    Parameters
    ----------
    img_size : int
        Input height and width S (the filters are built for one size), a multiple of 2**J.
    J : int
        Number of scales; the output is 2**J times smaller than the input.
    L : int
        Number of orientations.

    Attributes
    ----------
    num_coefficients : int
        Coefficients per input channel: 1 + J L + L^2 J (J - 1) / 2 (81 for J=2, L=8).
    """

    def __init__(self, img_size: int, J: int = 2, L: int = 8):
        super().__init__()
        if img_size % 2**J:
            raise ValueError(f"img_size {img_size} must be a multiple of 2**J = {2**J}")
        self.transform = ScatteringTorch2D(J=J, shape=(img_size, img_size), L=L)
        # The filters are fixed and rebuilt from (J, L, img_size): keep them (10 MB at 380 px) out of checkpoints.
        for name, buffer in list(self.transform.named_buffers()):
            self.transform.register_buffer(name, buffer, persistent=False)
        self.num_coefficients = 1 + J * L + L * L * J * (J - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> coefficients (B, C * num_coefficients, S / 2**J, S / 2**J), float32."""
        # The filters are fixed, so no gradient is needed; kymatio supports float32 only.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return self.transform(x.float().contiguous()).flatten(1, 2)


class HybridFusion(nn.Module):
    """Fuse scattering features into a feature map: ``x + BN(conv1x1(concat(x, resize(s))))``.

    The scattering features are average-pooled to the feature map's size, concatenated and
    mixed back to the map's channels. The residual form with the last BatchNorm's scale
    initialised to zero makes the block an identity at the start, so a pretrained EfficientNet
    keeps its behaviour and learns how much scattering information to take in.

    Parameters
    ----------
    scatter_chs : int
        Channels of the (reduced) scattering features.
    feature_chs : int
        Channels of the feature map they are fused into.
    """

    def __init__(self, scatter_chs: int, feature_chs: int):
        super().__init__()
        self.mix = nn.Conv2d(feature_chs + scatter_chs, feature_chs, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(feature_chs)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        scatter = F.adaptive_avg_pool2d(scatter, x.shape[-2:])
        return x + self.norm(self.mix(torch.cat([x, scatter], dim=1)))


class HybridEfficientNet(nn.Module):
    """An EfficientNet with scattering features fused in after two of its stages.

    ``x -> conv_stem, bn1 -> blocks[0] .. blocks[k] -> fusion -> ... -> conv_head, bn2``, with the
    scattering of ``x`` (reduced by BN + 1x1 conv + BN + SiLU, shared by both fusions) fused after
    the last stage at each reduction of ``fusion_reductions``. With J = 2 the scattering is at 1/4
    resolution, so the default (4, 8) fuses at its native size and once more, pooled, one stage
    deeper.

    Parameters
    ----------
    backbone : Backbone
        Wrapping a timm ``EfficientNet`` (``efficientnet_*``, ``tf_efficientnet_*``,
        ``test_efficientnet``); ``backbone.img_size`` must be set.
    J, L : int
        Scattering scales and orientations.
    scatter_chs : int
        Channels the 4 x 81 scattering channels are reduced to.
    fusion_reductions : sequence of int
        Output strides of the stages after which to fuse (from timm's ``feature_info``).

    Attributes
    ----------
    num_features : int
        Channels of the output feature map (the EfficientNet's ``conv_head``).
    """

    def __init__(
        self,
        backbone: Backbone,
        J: int = 2,
        L: int = 8,
        scatter_chs: int = 64,
        fusion_reductions: Sequence[int] = (4, 8),
    ):
        super().__init__()
        net = backbone.model
        if not isinstance(net, EfficientNet):
            raise ValueError(f"CLH needs a timm EfficientNet backbone, got {backbone.name!r}")
        if backbone.img_size is None:
            raise ValueError(f"CLH needs img_size for its scattering filters (backbone {backbone.name!r})")
        self.net = net
        self.num_features = backbone.num_features
        self.scattering = Scattering(backbone.img_size, J=J, L=L)
        scatter_in = net.conv_stem.in_channels * self.scattering.num_coefficients
        # Scattering orders differ in scale by orders of magnitude: standardise before mixing.
        self.reduce = nn.Sequential(
            nn.BatchNorm2d(scatter_in),
            ConvNormAct(scatter_in, scatter_chs, kernel_size=1, act_layer=nn.SiLU),
        )
        stages = {info["reduction"]: info for info in net.feature_info}  # last stage per reduction
        missing = set(fusion_reductions) - set(stages)
        if missing:
            raise ValueError(f"no EfficientNet stage at reductions {sorted(missing)}; have {sorted(stages)}")
        self.fusions = nn.ModuleDict(
            {
                stages[r]["module"].split(".")[-1]: HybridFusion(scatter_chs, stages[r]["num_chs"])
                for r in fusion_reductions
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cells (B, C, S, S) -> feature map (B, num_features, S / 32, S / 32)."""
        scatter = self.reduce(self.scattering(x))
        x = self.net.bn1(self.net.conv_stem(x))
        for index, stage in enumerate(self.net.blocks):
            x = stage(x)
            if str(index) in self.fusions:
                x = self.fusions[str(index)](x, scatter)
        return self.net.bn2(self.net.conv_head(x))
