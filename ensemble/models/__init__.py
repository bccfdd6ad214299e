"""Models: timm backbones with the DSA, CLA and CLH heads of the HCPL paper."""

from ensemble.models.backbones import PAPER_BACKBONES, Backbone, create_backbone, family_of
from ensemble.models.factory import HEADS, build_model, cell_input, create_model, fit_size, list_heads, load_network
from ensemble.models.heads import CLA, CLH, DSA, DualStreamOutput, init_class_prior
from ensemble.models.losses import LOSSES, DSALoss, FocalLoss, WeightedBCELoss, class_weights
from ensemble.models.pooling import AvgPool, PowerNorm, WeibullActivation, WeibullPool

__all__ = [
    "PAPER_BACKBONES",
    "HEADS",
    "LOSSES",
    "AvgPool",
    "Backbone",
    "CLA",
    "CLH",
    "DSA",
    "DSALoss",
    "DualStreamOutput",
    "FocalLoss",
    "PowerNorm",
    "WeibullActivation",
    "WeibullPool",
    "WeightedBCELoss",
    "build_model",
    "class_weights",
    "create_backbone",
    "create_model",
    "family_of",
    "cell_input",
    "fit_size",
    "init_class_prior",
    "list_heads",
    "load_network",
]
