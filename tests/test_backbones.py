"""Every backbone family of the paper builds with 4 channels; local checkpoints load into 4-channel models.

Affordable on 2 CPU cores: every listed name is built (pretrained=False, no forward), and one
representative per family runs one forward pass at its configured cell size, batch 1, no grad.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import adapt_input_conv

from ensemble.models import PAPER_BACKBONES, create_backbone, create_model, family_of
from ensemble.models.backbones import family_representatives

PAPER_FAMILIES = {"efficientnet", "nfnet", "regnet", "densenet", "swin", "resnet", "resnest"}


@pytest.mark.parametrize(
    "name, family",
    [
        ("efficientnet_b4", "efficientnet"),
        ("tf_efficientnet_b4_ns", "efficientnet"),
        ("tf_efficientnet_b7.ns_jft_in1k", "efficientnet"),
        ("eca_nfnet_l1", "nfnet"),
        ("dm_nfnet_f0", "nfnet"),
        ("regnety_032", "regnet"),
        ("densenet161", "densenet"),
        ("swin_small_patch4_window7_224", "swin"),
        ("resnet200d", "resnet"),
        ("resnest50d", "resnest"),
        ("test_efficientnet", "test"),
        ("convnext_tiny", "convnext"),
    ],
)
def test_family_of(name, family):
    assert family_of(name) == family


def test_table_covers_the_papers_families():
    assert set(family_representatives()) == PAPER_FAMILIES
    assert all(isinstance(size, int) and size > 0 for size in PAPER_BACKBONES.values())


@pytest.mark.parametrize("name", list(PAPER_BACKBONES))
def test_every_listed_backbone_builds_with_four_channels(name):
    model = timm.create_model(name, pretrained=False, in_chans=4, num_classes=0, global_pool="")
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert first_conv.in_channels == 4


@pytest.mark.parametrize("family, name", sorted(family_representatives().items()))
def test_family_representative_forward_at_cell_size(family, name):
    backbone = create_backbone(name).eval()
    size = PAPER_BACKBONES[name]
    assert backbone.img_size == size and backbone.family == family
    with torch.no_grad():
        features = backbone(torch.rand(1, 4, size, size))
    assert features.ndim == 4 and features.shape[:2] == (1, backbone.num_features)
    assert torch.isfinite(features).all()


def test_swin_runs_at_a_smaller_cell_size():
    model = create_model("dsa", "swin_tiny_patch4_window7_224", img_size=112).eval()
    with torch.no_grad():
        output = model(torch.rand(1, 2, 4, 112, 112))
    assert output.cell_logits.shape == (1, 2, 19)


def test_local_three_channel_checkpoint_loads_into_four_channel_backbone(tmp_path):
    """An ImageNet-style checkpoint (3-channel stem, 1000-class classifier) loads without a download."""
    source = timm.create_model("test_efficientnet", pretrained=False, in_chans=3)
    state = source.state_dict()
    path = tmp_path / "test_efficientnet.pth"
    torch.save({"state_dict": state}, path)

    backbone = create_backbone("test_efficientnet", checkpoint_path=path)

    loaded = backbone.model.state_dict()
    torch.testing.assert_close(loaded["conv_stem.weight"], adapt_input_conv(4, state["conv_stem.weight"]))
    assert loaded["conv_stem.weight"].shape[1] == 4
    for key, value in loaded.items():
        if key != "conv_stem.weight":
            torch.testing.assert_close(value, state[key], msg=key)
    assert "classifier.weight" not in loaded


def test_checkpoint_reaches_the_hybrid_clh(tmp_path):
    source = timm.create_model("test_efficientnet", pretrained=False, in_chans=3)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = create_model("clh", "test_efficientnet", checkpoint_path=path, img_size=32)
    torch.testing.assert_close(model.backbone.net.conv_head.weight, source.conv_head.weight)
