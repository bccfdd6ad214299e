"""Weibull activation pooling (HCPL eq. 2-4, after ACTNET, Husain, Ong & Bober, IJCV 2021).

A feature map R (B, D, h, w) is turned into a descriptor (B, D) by

    T = (R / lambda)^(zeta - 1) * exp(-(R / gamma)^eta)      eq. 2, elementwise
    s = mean over h, w of T                                   eq. 3, global average pooling
    out = alpha * s^beta                                      eq. 4, power normalisation

with all six parameters learnt. Weak responses are damped by the power term, strong ones
levelled by the exponential, and the power normalisation evens out the scale that results.

Parameterisation (so that training can never leave the valid range):

- ``lambda, gamma, eta, alpha = softplus(raw) + 1e-4`` (strictly positive);
- ``zeta = 1 + softplus(raw) + 1e-4``: zeta > 1, so the power term (R/lambda)^(zeta-1) stays bounded as
  R -> 0; with zeta < 1 it diverges there, and most responses of a ReLU/SiLU network are ~0;
- ``beta = sigmoid(raw)`` in (0, 1): a compressing power, as in signed-sqrt normalisation.

R must be non-negative (the Weibull function is defined on R >= 0): it is clamped at 1e-6, i.e.
a ReLU. The paper's backbones end in ReLU/SiLU-type activations whose negative part is small
(SiLU >= -0.28); a backbone ending in LayerNorm (swin) loses its negative half here.

Numerics: everything is computed in float32 with autocast off (under bf16/fp16 autocast the
powers overflow), in log form, ``T = exp((zeta-1)(log R - log lambda) - exp(eta (log R - log gamma)))``,
with both exponents clamped below float32's overflow, so negative, zero and huge (1e4) inputs give
finite values and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MIN_POSITIVE = 1e-4  # floor of the positive parameters
MIN_INPUT = 1e-6  # R and s are clamped here before their logarithm
MAX_EXPONENT = 80.0  # exp(80) ~ 5.5e34 < float32 max 3.4e38


def _inverse_softplus(value: float) -> float:
    """The raw value whose ``softplus(raw) + MIN_POSITIVE`` equals ``value``."""
    value = value - MIN_POSITIVE
    return value + math.log(-math.expm1(-value))


def _positive(raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(raw) + MIN_POSITIVE


class WeibullActivation(nn.Module):
    """Learnable Weibull function applied elementwise to a feature map (eq. 2).

    Parameters
    ----------
    num_channels : int
        1 for four shared scalars; D for one set per feature channel.
    lambda_, zeta, gamma, eta : float
        Initial values. The defaults make T ~ R for small R (zeta = 2, lambda = 1), peaking at
        R = gamma ((zeta - 1) / eta)^(1 / eta) = 8 and falling gently beyond: a ReLU that levels
        off the largest responses, so pretrained features pass almost unchanged at the start.
    """

    def __init__(
        self,
        num_channels: int = 1,
        lambda_: float = 1.0,
        zeta: float = 2.0,
        gamma: float = 8.0,
        eta: float = 1.0,
    ):
        super().__init__()

        def parameter(raw: float) -> nn.Parameter:
            return nn.Parameter(torch.full((num_channels,), raw))

        self.raw_lambda = parameter(_inverse_softplus(lambda_))
        self.raw_zeta = parameter(_inverse_softplus(zeta - 1.0))
        self.raw_gamma = parameter(_inverse_softplus(gamma))
        self.raw_eta = parameter(_inverse_softplus(eta))

    @property
    def lambda_(self) -> torch.Tensor:
        return _positive(self.raw_lambda)

    @property
    def zeta(self) -> torch.Tensor:
        return 1.0 + _positive(self.raw_zeta)

    @property
    def gamma(self) -> torch.Tensor:
        return _positive(self.raw_gamma)

    @property
    def eta(self) -> torch.Tensor:
        return _positive(self.raw_eta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (B, D, h, w), any float dtype -> T, same shape, float32."""
        with torch.autocast(x.device.type, enabled=False):
            log_r = x.float().clamp_min(MIN_INPUT).log()

            def per_channel(param: torch.Tensor) -> torch.Tensor:
                return param.view(-1, 1, 1)  # broadcasts over (B, D, h, w); a scalar over all

            power = (per_channel(self.zeta) - 1.0) * (log_r - per_channel(self.lambda_).log())
            decay = (per_channel(self.eta) * (log_r - per_channel(self.gamma).log())).clamp(max=MAX_EXPONENT).exp()
            return (power - decay).clamp(max=MAX_EXPONENT).exp()


class PowerNorm(nn.Module):
    """Learnable power normalisation ``alpha * s^beta`` of non-negative descriptors (eq. 4).

    Parameters
    ----------
    num_channels : int
        1 for shared scalars; D for one (alpha, beta) per channel.
    alpha : float
        Initial scale, > 0.
    beta : float
        Initial power, in (0, 1).
    """

    def __init__(self, num_channels: int = 1, alpha: float = 1.0, beta: float = 0.5):
        super().__init__()
        self.raw_alpha = nn.Parameter(torch.full((num_channels,), _inverse_softplus(alpha)))
        self.raw_beta = nn.Parameter(torch.full((num_channels,), math.log(beta / (1.0 - beta))))

    @property
    def alpha(self) -> torch.Tensor:
        return _positive(self.raw_alpha)

    @property
    def beta(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_beta)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Descriptors (..., D) -> (..., D), float32."""
        with torch.autocast(s.device.type, enabled=False):
            # s^beta via exp(beta log s): s is clamped so its gradient beta s^(beta-1) stays finite at 0.
            return self.alpha * (self.beta * s.float().clamp_min(MIN_INPUT).log()).exp()


class WeibullPool(nn.Module):
    """Weibull activation -> global average pooling -> power normalisation (eq. 2-4).

    Parameters
    ----------
    num_channels : int
        1 for shared scalar parameters (the paper); D for per-channel parameters.
    """

    def __init__(self, num_channels: int = 1):
        super().__init__()
        self.activation = WeibullActivation(num_channels)
        self.norm = PowerNorm(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (B, D, h, w) -> descriptors (B, D), float32."""
        return self.norm(self.activation(x).mean(dim=(-2, -1)))


class AvgPool(nn.Module):
    """Plain global average pooling (B, D, h, w) -> (B, D): CLH's pooling and the ablation baseline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


def create_pool(name: str, num_channels: int = 1) -> nn.Module:
    """Pooling by name: ``"weibull"`` (:class:`WeibullPool` with ``num_channels`` parameter sets) or ``"avg"``."""
    if name == "weibull":
        return WeibullPool(num_channels)
    if name == "avg":
        return AvgPool()
    raise ValueError(f"unknown pool {name!r}; choose 'weibull' or 'avg'")
