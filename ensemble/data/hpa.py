"""Read a dataset in the Kaggle/HPA layout: the label index, the 4-channel images, masks and truth.

Layout (the Kaggle competition's, plus the optional masks and truth)::

    ROOT/train.csv                          ID,Label   (Label: "|"-separated class ids 0..18)
    ROOT/{split}/{ID}_{red,green,blue,yellow}.png   8- or 16-bit grayscale, all four the same size
    ROOT/masks/{ID}.png                     optional given instance masks (uint16, 0 = background)
    ROOT/truth/masks/{ID}.png               optional ground-truth instance masks, evaluation only
    ROOT/truth/cell_labels.csv              ID,cell_id,Label[,captured]

Every problem with the data raises :class:`DatasetError` with a message that names the file,
and for tables the 1-based data row (the header is not counted) and the image ID.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ensemble.labels import CHANNELS, NUM_CLASSES, parse_labels, to_multi_hot
from ensemble.storage import exists, is_dir, join, list_files, name, open_file

logger = logging.getLogger(__name__)

# Pillow modes of single-channel PNGs and the integer type each is returned as. PNG stores at
# most 16 bits a sample; Pillow opens 16-bit files as "I;16" (older versions as 32-bit "I").
_GRAYSCALE_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I": np.uint16}


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and row)."""


@dataclass
class BatchReport:
    """What happened to a batch of images: how many were read, which were skipped and why.

    Attributes
    ----------
    n_ok : int
        Images read successfully.
    skipped : list of (image_id, reason)
        Images that could not be read, with the error message (which names the file).
    """

    n_ok: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: counts, then each skipped image and its reason."""
        line = f"{self.n_ok} images read, {len(self.skipped)} skipped"
        return "; ".join([line, *(f"{image_id}: {reason}" for image_id, reason in self.skipped)])


@dataclass
class Truth:
    """Ground-truth cells of an evaluation subset (``ROOT/truth``).

    Attributes
    ----------
    root : str
        The ``truth`` directory (a path or URL).
    cells : pandas.DataFrame
        One row per cell: ``ID``, ``cell_id`` (int), ``labels`` (list of int) and, when the CSV
        has it, ``captured`` (float).
    """

    root: str
    cells: pd.DataFrame
    _rows: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Row positions per image, computed once: a per-call filter of the whole table would
        # make evaluating thousands of images quadratic.
        self._rows = self.cells.groupby("ID", sort=False).indices

    @property
    def image_ids(self) -> list[str]:
        """IDs of the images that have ground-truth cells, in table order."""
        return list(self._rows)

    def mask(self, image_id: str) -> np.ndarray:
        """The (H, W) uint16 ground-truth instance mask of ``image_id`` (DatasetError if absent)."""
        return read_png(join(self.root, "masks", f"{image_id}.png")).astype(np.uint16)

    def cell_labels(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Cell ids (n,) and their (n, 19) multi-hot labels for ``image_id`` (empty if none)."""
        rows = self.cells.iloc[self._rows.get(image_id, [])]
        return rows["cell_id"].to_numpy(dtype=np.int64), label_matrix(rows["labels"])


def label_matrix(labels: Iterable[Sequence[int]]) -> np.ndarray:
    """Lists of class ids (e.g. the ``labels`` column) -> (n, 19) float32 multi-hot matrix."""
    rows = [to_multi_hot(ids) for ids in labels]
    return np.stack(rows) if rows else np.zeros((0, NUM_CLASSES), dtype=np.float32)


def channel_paths(root: str | Path, image_id: str, split: str = "train") -> list[str]:
    """Paths (or URLs) of the four channel files of one image, in :data:`CHANNELS` order."""
    return [join(root, split, f"{image_id}_{channel}.png") for channel in CHANNELS]


def read_index(root: str | Path, split: str = "train") -> pd.DataFrame:
    """Read the image index of a split.

    Parameters
    ----------
    root : str or Path
        Dataset root.
    split : str
        Split name: labels come from ``ROOT/{split}.csv``. When that file does not exist (a test
        split is often images only), the IDs are listed from ``ROOT/{split}/`` (any image that
        has at least one channel file, so a missing channel is reported when it is read) and
        every image gets an empty label list.

    Returns
    -------
    pandas.DataFrame
        Columns ``ID`` (str) and ``labels`` (sorted list of int). :func:`label_matrix` turns the
        labels into an (n, 19) multi-hot array.

    Raises
    ------
    DatasetError
        Malformed CSV, missing ``ID``/``Label`` column, a label that is not an integer or lies
        outside 0..18, an empty ID, a duplicate ID (both rows named), or neither CSV nor
        image directory present.
    """
    csv_path = join(root, f"{split}.csv")
    if not exists(csv_path):
        return _list_image_ids(join(root, split), csv_path)
    frame = _read_table(csv_path, ["ID", "Label"])
    frame["ID"] = frame["ID"].str.strip()
    for row, image_id in enumerate(frame["ID"]):
        if not image_id:
            raise _row_error(csv_path, row, image_id, "empty ID")
    _check_unique(csv_path, frame, ["ID"])
    return pd.DataFrame({"ID": frame["ID"], "labels": _parse_label_column(csv_path, frame)})


def read_png(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Decode one single-channel PNG completely and return its raw values.

    ``data``, when given, is the PNG file's bytes (a served request's), and ``path`` only names
    them in messages.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8 for 8-bit files, uint16 for 16-bit files. May be read-only.

    Raises
    ------
    DatasetError
        Missing file, unreadable or truncated PNG, or a mode other than 8/16-bit grayscale.
    """
    # Pillow rather than cv2.imread: in bench/bench_reader.py it decodes within about 10% of
    # OpenCV's speed, and it says what is wrong with a bad file, where OpenCV returns None and
    # prints libpng errors to stderr.
    try:
        with (io.BytesIO(data) if data is not None else open_file(path)) as file, Image.open(file) as image:
            image.load()  # decode every row now, so a truncated file fails here and not later
            mode = image.mode
            array = np.asarray(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow raises OSError (incl. UnidentifiedImageError) for truncated or foreign data
        # and SyntaxError for broken PNG chunks. It names a file object by its repr, whose
        # address differs from run to run: the path already says which file.
        reason = re.sub(r" <[^<>]* at 0x[0-9a-f]+>", "", str(error))
        raise DatasetError(f"{path}: unreadable or truncated PNG ({reason})") from None
    if mode not in _GRAYSCALE_MODES:
        raise DatasetError(f"{path}: image mode {mode!r} is not 8- or 16-bit grayscale")
    return array.astype(_GRAYSCALE_MODES[mode], copy=False)


def read_image(
    root: str | Path,
    image_id: str,
    split: str = "train",
    dtype: np.dtype | type | None = np.float32,
) -> np.ndarray:
    """Read the four channels of one image as an (H, W, 4) array in :data:`CHANNELS` order.

    Parameters
    ----------
    root : str or Path
        Dataset root.
    image_id : str
        Image ID (file-name stem before ``_{channel}.png``).
    split : str
        Sub-directory holding the images.
    dtype : floating dtype or None
        Output type; values are scaled to [0, 1] by the bit depth (8-bit / 255, 16-bit / 65535).
        ``None`` returns the raw integers (uint8 or uint16) unscaled.

    Raises
    ------
    DatasetError
        A channel file is missing, unreadable, truncated or not grayscale; channels differ in
        size (both sizes named) or in bit depth.
    """
    paths = channel_paths(root, image_id, split)
    return stack_channels([read_png(path) for path in paths], paths, image_id, dtype)


def stack_channels(channels: Sequence[np.ndarray], paths: Sequence[str], image_id: str,
                   dtype: np.dtype | type | None = np.float32) -> np.ndarray:
    """The four decoded channels (:func:`read_png`) of one image as :func:`read_image` returns them;
    ``paths`` name them in messages."""
    if dtype is not None and not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating type or None, not {dtype!r}")
    height, width = channels[0].shape
    for path, channel in zip(paths[1:], channels[1:]):
        if channel.shape != (height, width):
            raise DatasetError(
                f"{path}: size {channel.shape[1]}x{channel.shape[0]} (WxH) differs from "
                f"{name(paths[0])}: {width}x{height}"
            )
    if len({channel.dtype for channel in channels}) > 1:
        depths = ", ".join(f"{name(path)}: {channel.dtype}" for path, channel in zip(paths, channels))
        raise DatasetError(f"image {image_id!r} mixes 8- and 16-bit channels ({depths})")
    raw = np.stack(channels, axis=-1)
    if dtype is None:
        return raw
    # Convert then scale in place: about twice as fast as scaling channel by channel.
    image = raw.astype(dtype)
    image *= image.dtype.type(1.0 / np.iinfo(raw.dtype).max)
    return image


def iter_images(
    root: str | Path,
    ids: Iterable[str],
    split: str = "train",
    *,
    report: BatchReport,
    dtype: np.dtype | type | None = np.float32,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(image_id, image)`` for each readable image; never stop on a bad one.

    A bad image (any :class:`DatasetError` from :func:`read_image`) is logged as a warning and
    appended to ``report.skipped`` with its reason; good ones increment ``report.n_ok``. The
    report is a required argument so that a batch's skipped images cannot go unnoticed.

    Examples
    --------
    >>> report = BatchReport()
    >>> for image_id, image in iter_images(root, ids, "train", report=report):
    ...     process(image)
    >>> print(report.summary())
    """
    for image_id in ids:
        try:
            image = read_image(root, image_id, split, dtype)
        except DatasetError as error:
            logger.warning("skipping image %s: %s", image_id, error)
            report.skipped.append((image_id, str(error)))
            continue
        report.n_ok += 1
        yield image_id, image


def read_given_mask(root: str | Path, image_id: str) -> np.ndarray | None:
    """The given (H, W) uint16 instance mask ``ROOT/masks/{ID}.png``, or None if there is none."""
    path = join(root, "masks", f"{image_id}.png")
    if not exists(path):
        return None
    return read_png(path).astype(np.uint16)


def check_given_mask(mask: np.ndarray | None, image: np.ndarray, image_id: str) -> np.ndarray | None:
    """``mask`` as uint16, if it has ``image``'s height and width (else :class:`DatasetError`)."""
    if mask is None:
        return None
    if mask.shape != image.shape[:2]:
        raise DatasetError(f"mask of {image_id!r} is {mask.shape[1]}x{mask.shape[0]} (WxH), "
                           f"the image {image.shape[1]}x{image.shape[0]}")
    return mask.astype(np.uint16, copy=False)


def read_truth(root: str | Path) -> Truth | None:
    """Read ``ROOT/truth/cell_labels.csv``; None when the dataset has no ground truth.

    Raises
    ------
    DatasetError
        Malformed CSV, missing column, a ``cell_id`` that is not a positive integer, a bad
        label, a non-numeric ``captured``, or the same (ID, cell_id) twice.
    """
    truth_dir = join(root, "truth")
    csv_path = join(truth_dir, "cell_labels.csv")
    if not exists(csv_path):
        return None
    frame = _read_table(csv_path, ["ID", "cell_id", "Label"])
    cells = pd.DataFrame({"ID": frame["ID"].str.strip()})
    cell_ids = []
    for row, (image_id, text) in enumerate(zip(cells["ID"], frame["cell_id"])):
        if not text.strip().isdigit() or int(text) == 0:
            raise _row_error(csv_path, row, image_id, f"cell_id {text!r} is not a positive integer")
        cell_ids.append(int(text))
    cells["cell_id"] = cell_ids
    _check_unique(csv_path, cells, ["ID", "cell_id"])
    cells["labels"] = _parse_label_column(csv_path, frame)
    if "captured" in frame:
        captured = pd.to_numeric(frame["captured"], errors="coerce")
        bad = np.flatnonzero(captured.isna())
        if len(bad):
            row = int(bad[0])
            value = frame["captured"].iloc[row]
            raise _row_error(csv_path, row, cells["ID"].iloc[row], f"captured {value!r} is not a number")
        cells["captured"] = captured.astype(float)
    return Truth(root=truth_dir, cells=cells)


def _list_image_ids(image_dir: str, csv_path: str) -> pd.DataFrame:
    """Index of an unlabelled split: the IDs of the channel files in ``image_dir``."""
    if not is_dir(image_dir):
        raise DatasetError(f"neither {csv_path} nor the image directory {image_dir} exists")
    suffixes = tuple(f"_{channel}.png" for channel in CHANNELS)
    names = list(list_files(image_dir))
    ids = sorted({name[: -len(suffix)] for name in names for suffix in suffixes if name.endswith(suffix)})
    return pd.DataFrame({"ID": pd.Series(ids, dtype=str), "labels": [[] for _ in ids]})


def _read_table(path: str, required: list[str]) -> pd.DataFrame:
    """Read a CSV as strings (so IDs such as ``0001`` stay as written) and check its columns."""
    try:
        with open_file(path) as file:
            frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: malformed CSV ({error})") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; the header has {list(frame.columns)}")
    return frame


def _row_error(path: str, row: int, image_id: str, reason: object) -> DatasetError:
    """An error for 0-based data row ``row``, reported 1-based with the header not counted."""
    return DatasetError(f"{path}: data row {row + 1} (ID {image_id!r}): {reason}")


def _parse_label_column(path: str, frame: pd.DataFrame) -> list[list[int]]:
    """Parse every ``Label`` of ``frame``, naming the row of the first bad one."""
    labels = []
    for row, (image_id, text) in enumerate(zip(frame["ID"], frame["Label"])):
        try:
            labels.append(parse_labels(text))
        except ValueError as error:
            raise _row_error(path, row, image_id, error) from None
    return labels


def _check_unique(path: str, frame: pd.DataFrame, key: list[str]) -> None:
    """Raise on the first repeated ``key``, naming the data rows of both occurrences."""
    first_row: dict[tuple, int] = {}
    for row, values in enumerate(zip(*(frame[column] for column in key))):
        if values in first_row:
            shown = ", ".join(f"{column} {value!r}" for column, value in zip(key, values))
            rows = f"data rows {first_row[values] + 1} and {row + 1}"
            raise DatasetError(f"{path}: {shown} appears twice, in {rows}")
        first_row[values] = row
