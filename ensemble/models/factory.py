"""One factory for every model: ``create_model(head, backbone, ...)``, after timm's ``create_model``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.labels import NUM_CLASSES
from ensemble.models.backbones import create_backbone
from ensemble.models.heads import CLA, CLH, DSA

if TYPE_CHECKING:
    from ensemble.zoo import ModelSpec

# Head classes by the name model specs use (``head: dsa|cla|clh``).
HEADS: dict[str, type[nn.Module]] = {"dsa": DSA, "cla": CLA, "clh": CLH}


def list_heads() -> list[str]:
    """Names accepted by :func:`create_model`'s ``head``."""
    return sorted(HEADS)


def create_model(
    head: str,
    backbone: str,
    num_classes: int = NUM_CLASSES,
    in_chans: int = 4,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    img_size: int | None = None,
    backbone_kwargs: dict | None = None,
    **head_kwargs,
) -> nn.Module:
    """Build a DSA, CLA or CLH model on any timm backbone.

    Parameters
    ----------
    head : str
        ``"dsa"``, ``"cla"`` or ``"clh"`` (see :data:`HEADS`).
    backbone : str
        timm model name; CLH needs an EfficientNet.
    num_classes : int
        Output classes (19 for HPA).
    in_chans : int
        Input channels (4: red, green, blue, yellow).
    pretrained : bool
        Start from timm's pretrained weights (downloads them).
    checkpoint_path : str or Path, optional
        Local backbone weights instead of a download (see
        :func:`ensemble.models.backbones.create_backbone`).
    img_size : int, optional
        Cell size; required by CLH (its scattering filters) and fixed-size transformers unless
        the backbone is listed in :data:`ensemble.models.backbones.PAPER_BACKBONES`.
    backbone_kwargs : dict, optional
        Extra ``timm.create_model`` arguments, e.g. ``{"drop_path_rate": 0.2}``.
    **head_kwargs
        Head arguments: ``pool``, ``per_channel``, ``drop_rate``; for CLH also ``J``, ``L``,
        ``scatter_chs``, ``fusion_reductions``.

    Returns
    -------
    nn.Module
        The head module, with ``forward_features``, ``forward_head`` and ``forward``.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {list_heads()}")
    trunk = create_backbone(
        backbone,
        in_chans=in_chans,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        img_size=img_size,
        **(backbone_kwargs or {}),
    )
    return HEADS[head](trunk, num_classes=num_classes, **head_kwargs)


def build_model(spec: ModelSpec) -> nn.Module:
    """The network of a zoo's model spec (training builds it; serving rebuilds it to load weights)."""
    return create_model(spec.head, spec.backbone, pretrained=spec.pretrained, checkpoint_path=spec.checkpoint_path,
                        img_size=spec.cell_size, **spec.head_kwargs)


def load_network(spec: ModelSpec, weights: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """The network of ``spec`` for inference, in eval mode on ``device``, with the state_dict at
    ``weights`` (a checkpoint someone else wrote: read with ``weights_only``).

    Built without pretrained weights, so timm never downloads what the state_dict replaces; the
    one place serving and the preflight check (``weights=None``: the architecture only) build a
    trained member.
    """
    network = build_model(dataclasses.replace(spec, pretrained=False, checkpoint_path=None))
    if weights is not None:
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.to(device).eval()


def cell_input(crops: torch.Tensor, cell_size: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """The networks' input: integer crops (..., 4, S, S), as stored or cut -> float32 in [0, 1].

    The one path from a crop to a network, for training (:mod:`ensemble.trainers.loop`),
    prediction (:func:`~ensemble.models.inference.predict_cells`, which serving and the OOF use)
    and the VID's capture network. Crops move to ``device`` while still integers (a quarter of
    the bytes, asynchronously from pinned memory) and are scaled by their dtype's maximum (8- or
    16-bit), then resized to ``cell_size`` where it differs from theirs.
    """
    if crops.is_floating_point():
        raise TypeError(f"crops must be integers as stored or cut, got {crops.dtype}")
    if device is not None:
        crops = crops.to(device, non_blocking=True)
    x = crops.float() / float(torch.iinfo(crops.dtype).max)
    return x if cell_size is None else fit_size(x, cell_size)


def fit_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (..., C, S, S) resized to a model's cell size when it differs from the store's (e.g. in a sweep)."""
    if x.shape[-1] == size:
        return x
    lead = x.shape[:-3]
    x = F.interpolate(x.flatten(0, len(lead) - 1), size=(size, size), mode="bilinear", antialias=True)
    return x.unflatten(0, lead)
