"""What the served ensemble reads: one image per input row, and the signature that says so.

A row of :meth:`ensemble.serving.model.EnsembleModel.predict`'s input (:data:`SIGNATURE`)::

    image_id                    required
    red, green, blue, yellow    the four channels, each a PNG (8- or 16-bit grayscale) given as
                                base64 text (what a JSON request carries), a ``data:`` URI, raw
                                bytes (Python callers), or a path or URL read where the model runs
    root [, split]              or: a dataset in the Kaggle layout, ``{root}/{split}/{ID}_{channel}.png``
                                (split default ``"test"``), as before the channels could be sent
    mask                        optional: the cell instance mask (uint16 PNG, 0 = background), sent
                                like a channel; it is used instead of segmenting

Paths and URLs are opened on the machine that serves the model (through fsspec, so ``s3://``
works where its package is installed); a client that shares no disk with the server sends bytes.
An image that cannot be read, or whose mask is not its size, is skipped and reported
(:class:`ensemble.data.hpa.BatchReport`), never fatal to the rest of the request.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from ensemble.data import hpa
from ensemble.sim.images import simulate_image, to_uint
from ensemble.labels import CHANNELS, CLASS_NAMES
from ensemble.storage import is_dir, join

logger = logging.getLogger(__name__)

SERVING_COLUMNS = ["image_id", "cell_id", *CLASS_NAMES, "integrity", "rle", "width", "height"]
"""Columns of the served output: one row per cell, the 19 probabilities named by class."""

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image_id"),
                   *(ColSpec("string", column, required=False) for column in (*CHANNELS, "mask", "root", "split"))]),
    outputs=Schema([ColSpec("string", "image_id"), ColSpec("long", "cell_id"),
                    *(ColSpec("float", name) for name in CLASS_NAMES), ColSpec("float", "integrity"),
                    ColSpec("string", "rle"), ColSpec("long", "width"), ColSpec("long", "height")]),
)

# Every PNG file starts with the same 8 bytes, so its base64 text starts with the same 11
# characters: a value starting so is a file's contents, anything else a path or URL.
PNG_BASE64_PREFIX = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()[:11]


@dataclass(frozen=True)
class ImageInput:
    """One image to predict and where its pixels (and, optionally, its cell mask) come from.

    Attributes
    ----------
    image_id : str
    channels : tuple, optional
        Four sources in :data:`~ensemble.labels.CHANNELS` order (see :func:`read_png_source`).
    root, split : str
        Or a dataset in the Kaggle layout.
    mask : object, optional
        Source of the cell instance mask.
    error : str, optional
        Why the row cannot be read, found before reading (:meth:`load` raises it).
    """

    image_id: str
    channels: tuple | None = None
    root: str | None = None
    split: str = "test"
    mask: object = None
    error: str | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(image (H, W, 4) float32 in [0, 1], mask (H, W) uint16 or None)``.

        Raises
        ------
        DatasetError
            A source cannot be read or is not an 8/16-bit grayscale PNG, the channels differ,
            the mask is not the image's size, or the row names neither channels nor a root.
        """
        if self.error is not None:
            raise hpa.DatasetError(self.error)
        if self.channels is not None:
            names = [f"{self.image_id} {channel}" for channel in CHANNELS]
            image = hpa.stack_channels([read_png_source(s, n) for s, n in zip(self.channels, names)], names,
                                       self.image_id)
        elif self.root is not None:
            image = hpa.read_image(self.root, self.image_id, self.split)
        else:
            raise hpa.DatasetError(f"image {self.image_id!r}: the row has neither the four channels nor a root")
        if self.mask is None:
            return image, None
        return image, hpa.check_given_mask(read_png_source(self.mask, f"{self.image_id} mask"), image, self.image_id)


def read_png_source(source, name: str) -> np.ndarray:
    """Decode one PNG given as bytes, base64 text, a ``data:`` URI, or a path or URL.

    ``name`` names it in error messages (a path names itself).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hpa.read_png(name, data=bytes(source))
    text = str(source).strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    elif not text.startswith(PNG_BASE64_PREFIX):
        return hpa.read_png(text)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise hpa.DatasetError(f"{name}: not valid base64 ({error})") from None
    return hpa.read_png(name, data=data)


def frame_inputs(frame: pd.DataFrame) -> list[ImageInput]:
    """The images of a served request, one per row (see the module docstring)."""
    frame = pd.DataFrame(frame)
    if "image_id" not in frame:
        raise ValueError("the input has no image_id column")

    def value(row, column):
        found = row.get(column)
        return None if found is None or (np.isscalar(found) and pd.isna(found)) else found

    inputs = []
    for row in frame.to_dict("records"):
        channels = tuple(value(row, c) for c in CHANNELS)
        given = [c for c, v in zip(CHANNELS, channels) if v is not None]
        image_id = str(row["image_id"])
        absent = [c for c in CHANNELS if c not in given]
        error = f"image {image_id!r}: no {', '.join(absent)} channel" if given and absent else None
        inputs.append(ImageInput(image_id, channels if given else None, value(row, "root"),
                                 value(row, "split") or "test", value(row, "mask"), error))
    return inputs


def dataset_inputs(root: str, ids: Iterable[str], split: str = "test", masks: str | None = None) -> list[ImageInput]:
    """Images of a dataset in the Kaggle layout; with ``masks``, each takes ``{masks}/{ID}.png``."""
    return [ImageInput(str(i), root=str(root), split=split, mask=None if masks is None else join(masks, f"{i}.png"))
            for i in ids]


def given_masks(masks: str | Path | None, data_root: str | Path) -> str | None:
    """The folder of given masks: ``"auto"`` is ``{data_root}/masks`` when it exists (else none).

    Raises
    ------
    ValueError
        ``masks`` names a folder that does not exist.
    """
    if masks is None:
        return None
    if str(masks) == "auto":
        found = join(str(data_root), "masks")
        return found if is_dir(found) else None
    if not is_dir(str(masks)):
        raise ValueError(f"mask folder {masks} does not exist")
    return str(masks)


def iter_inputs(inputs: Iterable[ImageInput], report: hpa.BatchReport) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """``(image_id, image, mask)`` of each input that loads; the others go to ``report`` with the reason."""
    for item in inputs:
        try:
            image, mask = item.load()
        except hpa.DatasetError as error:
            logger.warning("skipping image %s: %s", item.image_id, error)
            report.skipped.append((item.image_id, str(error)))
            continue
        report.n_ok += 1
        yield item.image_id, image, mask


def png_base64(channel: np.ndarray) -> str:
    """A 2-D uint8/uint16 array as base64 PNG text (what a JSON request carries)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(channel)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_row(image_id: str, channels: Sequence[np.ndarray], mask: np.ndarray | None = None) -> dict:
    """One input row of an image held in memory: its channels (and mask) as base64 PNG text."""
    row = {"image_id": image_id, **{c: png_base64(a) for c, a in zip(CHANNELS, channels)}}
    if mask is not None:
        row["mask"] = png_base64(mask.astype(np.uint16))
    return row


def example_input(size: int = 128, seed: int = 0) -> pd.DataFrame:
    """The registered model's input example: one small simulated image, its channels as base64
    PNGs, so the example (and ``serving_input_example.json``) carries everything a server needs."""
    image = to_uint(simulate_image(seed, size=size).image, 8)
    return pd.DataFrame([image_row("example", [image[..., k] for k in range(len(CHANNELS))])])
