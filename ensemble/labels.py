"""The 19 HPA single-cell localisation classes and the `|`-separated label strings of train.csv."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES = len(CLASS_NAMES)
NEGATIVE = 18

# In-memory channel order everywhere: microtubules, protein, nucleus, ER.
CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")


def parse_labels(text: str) -> list[int]:
    """Parse a label string such as ``"0|16"`` into sorted class ids.

    Raises
    ------
    ValueError
        If a token is not an integer or lies outside 0..18; the message names the token.
    """
    text = str(text).strip()
    if not text:
        raise ValueError("empty label string")
    ids = []
    for token in text.split("|"):
        token = token.strip()
        try:
            value = int(token)
        except ValueError:
            raise ValueError(f"label {token!r} is not an integer class id") from None
        if not 0 <= value < NUM_CLASSES:
            raise ValueError(f"label id {value} is outside 0..{NUM_CLASSES - 1}")
        ids.append(value)
    return sorted(set(ids))


def format_labels(ids: Iterable[int]) -> str:
    """Format class ids as a ``|``-separated string, the inverse of :func:`parse_labels`."""
    return "|".join(str(i) for i in sorted(set(int(i) for i in ids)))


def to_multi_hot(ids: Iterable[int]) -> np.ndarray:
    """Class ids -> float32 vector of length 19."""
    vector = np.zeros(NUM_CLASSES, dtype=np.float32)
    vector[list(ids)] = 1.0
    return vector


def from_multi_hot(vector: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Float or bool vector of length 19 -> class ids where it exceeds ``threshold``."""
    return [int(i) for i in np.flatnonzero(np.asarray(vector) > threshold)]
