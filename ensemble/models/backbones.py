"""timm backbones cut before pooling: 4-channel cell images -> last feature map (B, D, h, w).

Any timm model name works. :data:`PAPER_BACKBONES` lists the families the HCPL paper ensembles
with the cell size each is configured for, and :func:`family_of` names a backbone's family for
reports (MLflow tags, plots); the ensemble selector never reads it.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from torch import nn

# Cell size (pixels, square) per backbone. The paper does not state its input sizes, so each is
# the resolution timm's pretrained weights were trained at: weights transfer best there.
PAPER_BACKBONES: dict[str, int] = {
    **{f"efficientnet_b{i}": size for i, size in enumerate((224, 240, 256, 288, 320, 448, 528, 600))},
    # Noisy-student weights; the paper's `tf_efficientnet_b*_ns` are these (timm maps the old names).
    **{f"tf_efficientnet_b{i}.ns_jft_in1k": size for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))},
    "eca_nfnet_l0": 224,
    "eca_nfnet_l1": 256,
    "dm_nfnet_f0": 192,
    "regnety_016": 224,
    "regnety_032": 224,
    "regnety_040": 224,
    "densenet121": 224,
    "densenet161": 224,
    "swin_tiny_patch4_window7_224": 224,
    "swin_small_patch4_window7_224": 224,
    "resnet50d": 224,
    "resnet200d": 256,
    "resnest50d": 224,
}

# First match wins: `resnest` before `resnet`, timm's tiny `test_*` models before everything.
_FAMILY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("test", r"^test_"),
    ("efficientnet", r"efficientnet"),
    ("nfnet", r"nfnet"),
    ("regnet", r"^regnet"),
    ("densenet", r"^densenet"),
    ("swin", r"^swin"),
    ("resnest", r"^resnest"),
    ("resnet", r"^resnet"),
)


def family_of(backbone_name: str) -> str:
    """Architecture family of a timm model name, e.g. ``"tf_efficientnet_b4_ns"`` -> ``"efficientnet"``.

    Names outside the paper's families fall back to their first word (``"convnext_tiny"`` ->
    ``"convnext"``), so every model gets a family.
    """
    name = backbone_name.split(".")[0].lower()
    for family, pattern in _FAMILY_PATTERNS:
        if re.search(pattern, name):
            return family
    return name.removeprefix("tf_").split("_")[0]


def family_representatives() -> dict[str, str]:
    """The first (smallest) backbone of each family in :data:`PAPER_BACKBONES`, for tests and benchmarks."""
    representatives: dict[str, str] = {}
    for name in PAPER_BACKBONES:
        representatives.setdefault(family_of(name), name)
    return representatives


class Backbone(nn.Module):
    """A timm model without pooling and classifier, always returning an NCHW feature map.

    Parameters
    ----------
    model : nn.Module
        A timm model built with ``num_classes=0, global_pool=''``.
    name : str
        Its timm name.
    img_size : int or None
        The cell size it is configured for (needed by CLH's scattering and by fixed-size
        transformers); None when unknown.

    Attributes
    ----------
    num_features : int
        Channels D of the feature map.
    family : str
        :func:`family_of` the name.
    """

    def __init__(self, model: nn.Module, name: str, img_size: int | None = None):
        super().__init__()
        self.model = model
        self.name = name
        self.family = family_of(name)
        self.img_size = img_size
        self.num_features: int = model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> feature map (B, D, h, w)."""
        features = self.model.forward_features(x)
        if features.ndim == 3:
            # ViT-style tokens (B, L, D): drop class/register tokens and restore the patch grid.
            height, width = self.model.patch_embed.grid_size
            tokens = features[:, self.model.num_prefix_tokens :]
            return tokens.transpose(1, 2).reshape(features.shape[0], -1, height, width)
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # swin and other channels-last stages
            return features.permute(0, 3, 1, 2)
        return features


def create_backbone(
    name: str,
    in_chans: int = 4,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    img_size: int | None = None,
    **timm_kwargs,
) -> Backbone:
    """Build a timm model as a feature-map :class:`Backbone`.

    Parameters
    ----------
    name : str
        Any timm model name (``timm.list_models()``), optionally with a pretrained tag.
    in_chans : int
        Input channels; 4 for HPA (red, green, blue, yellow).
    pretrained : bool
        Download timm's pretrained weights (needs internet). timm adapts the 3-channel first
        convolution to ``in_chans`` itself.
    checkpoint_path : str or Path, optional
        Local weights file (timm/torch state dict, ``.pth`` or ``.safetensors``) to load instead of
        downloading. It goes through timm's own pretrained loader, so it is read with
        ``torch.load(weights_only=True)``, a 3-channel first conv is adapted to ``in_chans`` with
        timm's ``adapt_input_conv`` (channels repeated and rescaled by 3/in_chans), the ImageNet
        classifier is dropped and model-specific remapping (e.g. swin's position tables for a
        new ``img_size``) is applied.
    img_size : int, optional
        Cell size. Passed to timm only for models with a fixed input size (swin, ViT); recorded
        on the backbone for all. Defaults to the :data:`PAPER_BACKBONES` size when listed.
    **timm_kwargs
        Forwarded to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns
    -------
    Backbone
    """
    img_size = img_size or PAPER_BACKBONES.get(name)
    kwargs = dict(in_chans=in_chans, num_classes=0, global_pool="", pretrained=pretrained, **timm_kwargs)
    if checkpoint_path is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint_path)})
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if img_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    return Backbone(timm.create_model(name, **kwargs), name=name, img_size=img_size)
