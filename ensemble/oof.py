"""The OOF and label table contract: column names, loading, validation and alignment.

Every part that writes or reads per-cell predictions or labels (training jobs, selection,
serving, evaluation) takes its column names from here, so they cannot drift apart.

Contract: per model one table with columns ``image_id, cell_id,
fold, cell_0..cell_18`` (probabilities) and, for heads with an image stream (DSA),
``image_0..image_18``. Every cell of every training image appears exactly once. Predictions on
new images follow the same layout without ``fold``.

Labels for selection: a table with ``image_id, cell_id, label_0..label_18`` (0/1) and optionally
``fold`` (checked against the OOF folds) and ``cell_truth`` (bool: True where the row holds
cell-level ground truth, False where it holds the image's labels copied to its cells; without
the column every row counts as cell-level truth). Or an array (n_cells, 19) in the row order of
:attr:`OOFSet.index`.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from ensemble.labels import NUM_CLASSES
from ensemble.tracking import TAG_BACKBONE, TAG_FAMILY, TAG_FOLD, TAG_HEAD, TAG_MODEL

KEYS = ["image_id", "cell_id"]
CELL_COLUMNS = [f"cell_{k}" for k in range(NUM_CLASSES)]
"""Cell-stream probabilities of a model (or of the fused ensemble)."""
IMAGE_COLUMNS = [f"image_{k}" for k in range(NUM_CLASSES)]
"""Image-stream probabilities (DSA heads), the same for every cell of an image."""
LABEL_COLUMNS = [f"label_{k}" for k in range(NUM_CLASSES)]
"""Cell labels (0/1 or soft) in a label table."""
TAG_KEYS = (TAG_HEAD, TAG_BACKBONE, TAG_FAMILY)

OOF_ARTIFACT = "oof/oof.parquet"
"""Where a (model, fold) training run logs its part of the model's OOF table."""
VALIDATION_ARTIFACT = "oof/validation.parquet"
"""Where an outer-fold training run logs its predictions of its inner validation split."""



def member_columns(name: str) -> list[str]:
    """Columns of one member network's own cell probabilities in a prediction table."""
    return [f"{name}.{column}" for column in CELL_COLUMNS]


FrameSource = pd.DataFrame | Callable[[], pd.DataFrame]


@dataclass(frozen=True, eq=False)
class OOFSet:
    """Predictions of several models on the same cells, aligned row by row.

    Rows are sorted by fold, image and cell, so every fold is one contiguous slice and the order
    does not depend on how the tables were written. Arrays are class-major, ``(n_classes,
    n_cells)`` float32: one class of one model is contiguous, which is what sorting for AP and
    streaming the correlation want.

    Attributes
    ----------
    index : DataFrame
        ``image_id, cell_id`` and, for OOF, ``fold``: row ``i`` describes column ``i`` of every array.
    cell : dict of str to ndarray, shape (n_classes, n_cells)
        Cell-stream probabilities of every model, in model order.
    image : dict of str to ndarray, shape (n_classes, n_cells)
        Image-stream probabilities of the models that have one (DSA heads).
    tags : dict of str to dict
        Metadata per model (``head``, ``backbone``, ``family``); for reports only.
    """

    index: pd.DataFrame
    cell: dict[str, np.ndarray]
    image: dict[str, np.ndarray] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.cell)

    @property
    def n_cells(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        """Bytes held by the prediction arrays."""
        return sum(a.nbytes for a in self.cell.values()) + sum(a.nbytes for a in self.image.values())

    def fold_slices(self) -> dict[int, slice]:
        """Fold -> its rows; ``{}`` for predictions without folds."""
        if "fold" not in self.index:
            return {}
        folds = self.index["fold"].to_numpy()
        starts = np.flatnonzero(np.r_[True, folds[1:] != folds[:-1]])
        stops = np.r_[starts[1:], folds.size]
        return {int(folds[a]): slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True)}

    @classmethod
    def from_frames(
        cls,
        frames: Mapping[str, FrameSource] | Iterable[tuple[str, FrameSource]],
        tags: Mapping[str, Mapping[str, str]] | None = None,
        *,
        require_fold: bool = True,
    ) -> OOFSet:
        """Validate and align per-model tables (the contract in this module's docstring).

        Parameters
        ----------
        frames : mapping or iterable of (name, table)
            A table may be a zero-argument callable returning it; it is then read when its turn
            comes, so only one model's table is in memory at a time.
        tags : mapping, optional
            Model name -> ``{"head": ..., "backbone": ..., "family": ...}``.
        require_fold : bool
            True for OOF tables; False for predictions on new images.

        Raises
        ------
        ValueError
            On a missing column, NaN or a value outside [0, 1] (naming model, column and count),
            duplicated cells, a model without rows for a fold that another model has, different
            cell sets between models (naming both models, the counts and an example cell) or a
            cell whose fold differs between models.
        """
        items = frames.items() if isinstance(frames, Mapping) else frames
        aligner: _Aligner | None = None
        cell: dict[str, np.ndarray] = {}
        image: dict[str, np.ndarray] = {}
        for name, source in items:
            frame = source() if callable(source) else source
            has_image = _check_columns(name, frame, require_fold)
            if aligner is None:
                aligner = _Aligner(name, frame, require_fold)
            positions = aligner.positions(name, frame)
            cell[name] = _class_major(name, frame, CELL_COLUMNS, positions)
            if has_image:
                image[name] = _class_major(name, frame, IMAGE_COLUMNS, positions)
            del frame  # before the next table is read
        if aligner is None:
            raise ValueError("no OOF tables given")
        tags = {name: dict(tags.get(name, {})) for name in cell} if tags else {name: {} for name in cell}
        return cls(index=aligner.index, cell=cell, image=image, tags=tags)

    def to_frames(self) -> dict[str, pd.DataFrame]:
        """The per-model tables of the contract (the inverse of :meth:`from_frames`)."""
        frames = {}
        for name, values in self.cell.items():
            columns = dict(zip(CELL_COLUMNS, values, strict=True))
            if name in self.image:
                columns |= dict(zip(IMAGE_COLUMNS, self.image[name], strict=True))
            frames[name] = pd.concat([self.index, pd.DataFrame(columns)], axis=1)
        return frames


@dataclass(frozen=True, eq=False)
class Targets:
    """Labels aligned with an :class:`OOFSet`.

    Attributes
    ----------
    truth : ndarray of bool, shape (n_classes, n_cells)
    cell_level : ndarray of bool, shape (n_cells,)
        True where ``truth`` is cell-level ground truth rather than image labels copied to cells.
    """

    truth: np.ndarray
    cell_level: np.ndarray


def align_labels(labels: pd.DataFrame | np.ndarray, oof: OOFSet) -> Targets:
    """Put labels in the row order of ``oof`` and check they cover every cell.

    Parameters
    ----------
    labels : DataFrame or ndarray
        See the module docstring. Rows for cells without predictions are ignored.
    oof : OOFSet

    Raises
    ------
    ValueError
        If labels miss cells of the OOF (count and an example), repeat a cell, disagree on a
        cell's fold, or hold values other than 0/1.
    """
    if isinstance(labels, np.ndarray):
        if labels.shape != (oof.n_cells, NUM_CLASSES):
            raise ValueError(
                f"labels array has shape {labels.shape}; expected ({oof.n_cells}, {NUM_CLASSES}) "
                "in the row order of oof.index"
            )
        return Targets(truth=_binary(labels, "labels").T.copy(), cell_level=np.ones(oof.n_cells, dtype=bool))
    missing = [c for c in (*KEYS, *LABEL_COLUMNS) if c not in labels]
    if missing:
        raise ValueError(f"labels lack columns {missing}")
    keys = pd.MultiIndex.from_frame(labels[KEYS])
    if not keys.is_unique:
        dup = keys[keys.duplicated()]
        raise ValueError(f"labels repeat {len(dup)} cells (e.g. {_cell_name(dup[0])})")
    if _same_keys(labels, oof.index):
        positions = np.arange(oof.n_cells)
    else:
        positions = keys.get_indexer(pd.MultiIndex.from_frame(oof.index[KEYS]))
        absent = np.flatnonzero(positions < 0)
        if absent.size:
            example = tuple(oof.index.iloc[absent[0]][KEYS])
            raise ValueError(
                f"labels are not aligned with the OOF: they lack {absent.size} of the {oof.n_cells} "
                f"OOF cells (e.g. {_cell_name(example)})"
            )
    if "fold" in labels and "fold" in oof.index:
        differ = labels["fold"].to_numpy()[positions] != oof.index["fold"].to_numpy()
        if differ.any():
            raise ValueError(f"labels give a different fold than the OOF for {int(differ.sum())} cells")
    truth = _binary(labels[LABEL_COLUMNS].to_numpy()[positions], "labels").T.copy()
    if "cell_truth" in labels:
        cell_level = labels["cell_truth"].to_numpy(dtype=bool)[positions]
    else:
        cell_level = np.ones(oof.n_cells, dtype=bool)
    return Targets(truth=truth, cell_level=cell_level)


def load_oof_dir(path: str | Path, *, require_fold: bool = True, models: Iterable[str] | None = None) -> OOFSet:
    """Read every ``*.parquet`` of a directory (local path or fsspec URI) as one model's OOF.

    The model name is the file stem. An optional ``models.json`` beside them maps model names to
    tags: ``{"dsa_effnet": {"head": "dsa", "backbone": "efficientnet_b0", "family": "effnet"}}``.
    Files are read one at a time, so memory peaks at the aligned arrays plus one table.
    ``models``: read only these (e.g. a zoo's, where the directory also holds tables of models an
    earlier zoo trained); each must have its table.
    """
    fs, root = fsspec.core.url_to_fs(str(path))
    files = sorted(fs.glob(f"{root.rstrip('/')}/*.parquet"))
    if models is not None:
        wanted, found = set(models), {Path(f).stem for f in files}
        if wanted - found:
            raise FileNotFoundError(f"{path}: no OOF table of {sorted(wanted - found)}")
        files = [f for f in files if Path(f).stem in wanted]
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {path}")
    tags_file = f"{root.rstrip('/')}/models.json"
    tags = json.loads(fs.cat_file(tags_file)) if fs.exists(tags_file) else None
    sources = {Path(f).stem: partial(pd.read_parquet, f, filesystem=fs) for f in files}
    return OOFSet.from_frames(sources, tags, require_fold=require_fold)


def load_oof_mlflow(experiment_name: str, tracking_uri: str | None = None) -> OOFSet:
    """Gather the OOF of every model trained in an MLflow experiment.

    Contract with training: each (model, fold) run ends FINISHED with tags ``model`` (the model
    name), ``fold``, ``head``, ``backbone``, ``family`` and logs that fold's part of the model's
    OOF table as the artifact ``oof/oof.parquet``. Runs without the ``model`` tag or without the
    artifact (sweep trials, failed runs) are skipped; when a (model, fold) was run more than once
    the latest finished run wins. A model's parts are concatenated and validated like any OOF.

    Parameters
    ----------
    experiment_name : str
    tracking_uri : str, optional
        Defaults to MLflow's current tracking URI.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment named {experiment_name!r}")
    runs = latest_oof_runs(client, experiment.experiment_id)
    if not runs:
        raise ValueError(
            f"experiment {experiment_name!r} has no finished run with a {TAG_MODEL!r} tag and {OOF_ARTIFACT}"
        )
    tags = {m: {k: parts[0].data.tags[k] for k in TAG_KEYS if k in parts[0].data.tags} for m, parts in runs.items()}
    return OOFSet.from_frames({m: partial(_read_oof_parts, parts, tracking_uri) for m, parts in runs.items()}, tags)


def latest_oof_runs(client: MlflowClient, experiment_id: str) -> dict[str, list]:
    """Model -> its finished runs holding an OOF part, the latest one per fold."""
    latest: dict[tuple[str, str], object] = {}
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        for run in page:
            tags = run.data.tags
            if TAG_MODEL not in tags:
                continue
            artifacts = client.list_artifacts(run.info.run_id, posixpath.dirname(OOF_ARTIFACT))
            if any(a.path == OOF_ARTIFACT for a in artifacts):
                latest.setdefault((tags[TAG_MODEL], tags.get(TAG_FOLD, "")), run)  # newest first
        token = page.token
        if not token:
            break
    runs: dict[str, list] = {}
    for (model, _), run in sorted(latest.items()):
        runs.setdefault(model, []).append(run)
    return runs


def _read_oof_parts(runs: list, tracking_uri: str | None) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        parts = [
            pd.read_parquet(
                download_artifacts(
                    run_id=run.info.run_id, artifact_path=OOF_ARTIFACT, dst_path=f"{tmp}/{i}", tracking_uri=tracking_uri
                )
            )
            for i, run in enumerate(runs)
        ]
    return pd.concat(parts, ignore_index=True)


class _Aligner:
    """Row positions of each model's table in the canonical order (fold, image, cell).

    The first table sets the cells and folds; every later one must match them.
    """

    def __init__(self, name: str, frame: pd.DataFrame, require_fold: bool):
        self.first = name
        self.keys = frame[KEYS].reset_index(drop=True)
        self.folds = set(frame["fold"].unique().tolist()) if require_fold else None
        sort_by = ["fold", *KEYS] if require_fold else KEYS
        order = frame[sort_by].reset_index(drop=True).sort_values(sort_by).index.to_numpy()
        kept = [*KEYS, "fold"] if require_fold else KEYS
        self.index = frame[kept].iloc[order].reset_index(drop=True)
        self.first_positions = np.empty(len(frame), dtype=np.intp)
        self.first_positions[order] = np.arange(len(frame))
        self.multi_index = pd.MultiIndex.from_frame(self.index[KEYS])
        _check_unique(name, self.multi_index)

    def positions(self, name: str, frame: pd.DataFrame) -> np.ndarray:
        if self.folds is not None:
            self._check_folds(name, frame)
        if _same_keys(frame, self.keys):
            positions = self.first_positions
        else:
            keys = pd.MultiIndex.from_frame(frame[KEYS])
            _check_unique(name, keys)
            positions = self.multi_index.get_indexer(keys)
            self._check_same_cells(name, frame, positions)
        if self.folds is not None:
            differ = frame["fold"].to_numpy() != self.index["fold"].to_numpy()[positions]
            if differ.any():
                raise ValueError(
                    f"model {name!r} puts {int(differ.sum())} cells in a different fold than model {self.first!r}"
                )
        return positions

    def _check_folds(self, name: str, frame: pd.DataFrame) -> None:
        folds = set(frame["fold"].unique().tolist())
        for lacking, other, absent in ((name, self.first, self.folds - folds), (self.first, name, folds - self.folds)):
            if absent:
                raise ValueError(
                    f"model {lacking!r} has no rows for fold(s) {sorted(absent)}, which model {other!r} has: "
                    "every model needs the OOF of every fold"
                )

    def _check_same_cells(self, name: str, frame: pd.DataFrame, positions: np.ndarray) -> None:
        extra = np.flatnonzero(positions < 0)
        covered = np.zeros(len(self.index), dtype=bool)
        covered[positions[positions >= 0]] = True
        lacking = np.flatnonzero(~covered)
        if extra.size or lacking.size:
            examples = []
            if lacking.size:
                examples.append(f"lacks e.g. {_cell_name(tuple(self.index.iloc[lacking[0]][KEYS]))}")
            if extra.size:
                examples.append(f"has e.g. {_cell_name(tuple(frame.iloc[extra[0]][KEYS]))}")
            raise ValueError(
                f"OOF tables are misaligned: model {name!r} lacks {lacking.size} of the {len(self.index)} cells "
                f"of model {self.first!r} and has {extra.size} cells that {self.first!r} lacks "
                f"({'; '.join(examples)}). Every model must predict every cell exactly once."
            )


def _check_columns(name: str, frame: pd.DataFrame, require_fold: bool) -> bool:
    """Check the contract's columns; return whether the table has an image stream."""
    required = [*KEYS, *(["fold"] if require_fold else []), *CELL_COLUMNS]
    missing = [c for c in required if c not in frame]
    if missing:
        raise ValueError(f"model {name!r} lacks columns {missing}")
    image = [c for c in IMAGE_COLUMNS if c in frame]
    if image and len(image) < NUM_CLASSES:
        raise ValueError(
            f"model {name!r} has an incomplete image stream: lacks {sorted(set(IMAGE_COLUMNS) - set(image))}"
        )
    return bool(image)


def _class_major(name: str, frame: pd.DataFrame, columns: list[str], positions: np.ndarray) -> np.ndarray:
    """Columns -> (n_classes, n_rows) float32 with table row ``i`` at column ``positions[i]``.

    Raises if a value is NaN or outside [0, 1], counting them per column.
    """
    values = np.empty((len(columns), len(frame)), dtype=np.float32)
    for k, c in enumerate(columns):
        values[k, positions] = frame[c].to_numpy(dtype=np.float32)
    for problem, bad in (("NaN", np.isnan(values)), ("values outside [0, 1]", (values < 0) | (values > 1))):
        counts = bad.sum(axis=1)
        if counts.any():
            listing = ", ".join(f"{columns[k]}: {counts[k]}" for k in np.flatnonzero(counts))
            raise ValueError(f"model {name!r} has {problem} in {listing} (of {values.shape[1]} rows)")
    return values


def _binary(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"{what} must be 0/1; found {int(bad.sum())} other values (e.g. {values[bad][0]:g})")
    return values.astype(bool)


def _same_keys(frame: pd.DataFrame, keys: pd.DataFrame) -> bool:
    return len(frame) == len(keys) and all(
        frame[c].reset_index(drop=True).equals(keys[c].reset_index(drop=True)) for c in KEYS
    )


def _check_unique(name: str, keys: pd.MultiIndex) -> None:
    if not keys.is_unique:
        dup = keys[keys.duplicated()]
        raise ValueError(f"model {name!r} has {len(dup)} duplicated cells (e.g. {_cell_name(dup[0])})")


def _cell_name(key: tuple) -> str:
    return f"image {key[0]!r} cell {key[1]!r}"
