"""Augmentation of 4-channel cell crops with albumentations.

Every transform used here was checked on (H, W, 4) uint8 and float32 arrays under albumentations
2.0.8. Channels are not colours, so colour transforms are limited to per-channel gains (each
stain's brightness varies independently between images) and a global contrast change.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A


@dataclass(frozen=True)
class AugmentLimits:
    """Magnitudes at ``strength=1``; :func:`build_augment` scales them linearly.

    Attributes
    ----------
    shift : float
        Largest translation, as a fraction of the crop side.
    scale : float
        Largest relative zoom in or out.
    rotate : float
        Largest rotation in degrees (on top of the 90-degree rotations).
    gain : float
        Largest relative change of each channel's brightness.
    contrast : float
        Largest relative change of contrast.
    dropout_holes : int
        Most rectangles cut out (coarse dropout / cutout).
    dropout_size : float
        Largest side of a cut-out rectangle, as a fraction of the crop side.
    """

    shift: float = 0.1
    scale: float = 0.15
    rotate: float = 45.0
    gain: float = 0.3
    contrast: float = 0.2
    dropout_holes: int = 3
    dropout_size: float = 0.2


def build_augment(strength: float = 1.0, limits: AugmentLimits | None = None, seed: int = 0) -> A.Compose:
    """An augmentation pipeline for (H, W, 4) crops; call it as ``aug(image=crop)["image"]``.

    Parameters
    ----------
    strength : float
        0 returns the identity (an empty pipeline); 1 uses ``limits`` as they are; values in
        between scale every magnitude and the probability of the photometric transforms.
    limits : AugmentLimits, optional
    seed : int
        Seeds the pipeline's draws, so a job that augments in its own process (no loader workers,
        which reseed it: :func:`~ensemble.data.datasets.worker_init`) trains the same twice. Left to
        albumentations, the seed is drawn when the pipeline is built, and a job's scores then move
        from run to run.

    Returns
    -------
    albumentations.Compose
        Keeps the shape and dtype of its input.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if strength == 0:
        return A.Compose([], seed=seed)
    m = limits or AugmentLimits()
    p = min(1.0, strength)
    return A.Compose(
        [
            # Cells have no orientation: the eight flips/rotations of the square are free.
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(
                translate_percent=(-m.shift * strength, m.shift * strength),
                scale=(1 - m.scale * strength, 1 + m.scale * strength),
                rotate=(-m.rotate * strength, m.rotate * strength),
                p=0.7 * p,
            ),
            A.MultiplicativeNoise(
                multiplier=(1 - m.gain * strength, 1 + m.gain * strength),
                per_channel=True,  # each stain's brightness on its own
                elementwise=False,
                p=0.5 * p,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=m.contrast * strength, p=0.5 * p),
            A.CoarseDropout(
                num_holes_range=(1, max(1, round(m.dropout_holes * strength))),
                hole_height_range=(0.05, max(0.05, m.dropout_size * strength)),
                hole_width_range=(0.05, max(0.05, m.dropout_size * strength)),
                fill=0,
                p=0.5 * p,
            ),
        ],
        seed=seed,
    )
