"""The selected ensemble as a served product: the ``mlflow.pyfunc`` model and its inference path.

Inference is the HCPL system of the paper's Fig. 4c::

    image (H, W, 4) -> segment into cells -> cut each cell exactly as the cell store does
        (ensemble.data.crops.cut_cells)
        -> every member network predicts every cell (ensemble.models.inference.predict_cells,
        the path that wrote the OOF tables the ensemble was selected on)
        -> hierarchical aggregation and per-class image x cell fusion   (selectors.apply_spec)
        -> x the cell's visual-integrity weight (VID), when the spec says so

A member is one model spec trained on K folds, so it comes with K networks; its probability for
a cell is the mean of the K networks' sigmoid outputs (its image stream: the mean over the K
networks of each one's max over the image's bags, as in training). The ensemble was selected on
out-of-fold predictions of single fold networks; averaging them is the usual K-fold ensemble and
keeps the probabilities on the same scale.

Artifacts packed into the MLflow model (written by :mod:`ensemble.serving.registry`)::

    ensemble_spec   ensemble_spec.json          EnsembleSpec.to_json
    config          config.json                 preprocessing, members' ModelSpecs, integrity hook
    members         members/{model}/fold{k}.pt  each fold network's state_dict (checkpoint/best.pt)
    segmenter       files the segmenter reads (hpacellseg weights), when its settings name any
    integrity       optional: the directory handed to the integrity loader

Integrity hook (VID): ``config.json`` names a loader as ``"module:function"`` (default
:data:`DEFAULT_INTEGRITY_LOADER`). ``loader(path_of_integrity_dir)`` returns an object with
``weights(cells, crops) -> ndarray (n,) float32`` in [0, 1], where ``cells`` is the per-cell table
of :func:`ensemble.data.features.cell_features` plus ``image_id`` (the VID morphology features)
and ``crops`` the (n, 4, S, S) uint8 crops. Without the artifact every cell's integrity is 1.

Input of :meth:`EnsembleModel.predict` (pyfunc, and ``mlflow models serve``): a DataFrame, one
image per row: ``image_id`` and its four channels ``red, green, blue, yellow`` as base64 PNG text,
bytes, paths or URLs, or ``root`` (a dataset in the Kaggle layout) and ``split``; optionally
``mask``, a given cell instance mask used instead of segmenting (:mod:`ensemble.serving.inputs`). For
in-memory images use ``load_ensemble(uri).predict_arrays({image_id: (H, W, 4) float32 in [0, 1]})``.

Output of ``predict``: one row per cell, :data:`~ensemble.serving.inputs.SERVING_COLUMNS`:
``image_id, cell_id``, the 19 class probabilities named by class (float32), ``integrity``
(float32), ``rle`` (the cell's mask, :func:`ensemble.serving.submission.encode_mask`), ``width, height``
of the image. Inside the package (:meth:`EnsembleModel.classify`, ``ensemble predict``'s tables)
the probabilities keep the OOF layout ``cell_0..cell_18`` (:data:`OUTPUT_COLUMNS`), so apply_spec,
the selectors and ``evaluate`` read them; ``predict`` renames them at the boundary. With
``member_outputs`` set, also each network's own cell probabilities,
:func:`ensemble.oof.member_columns` (to score the members beside the ensemble; times the
integrity weight where the ensemble's are).

Loading the model (``load_context``) loads every member network, so ``mlflow models serve``
answers ``/ping`` only once the model is whole: its first request waits for no loading, under
MLflow's scoring timeout. A process that only segments loads with ``load_ensemble(uri,
networks=False)``; its networks then load on first use, once however many threads ask at once.

The MLflow model carries this package as its code (``code_paths``) and is saved as "models from
code" (:mod:`ensemble.serving.from_code`): no pickle. Models pickled in the older form load when
their ``EnsembleModel`` names this module's path; those that name the flat layout's
``ensemble.registry`` must be registered again from their runs (``ensemble register``).

Serving needs no training code: it imports the models, the data preparation and the selected
spec, nothing from :mod:`ensemble.trainers`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from ensemble.data import hpa
from ensemble.data.crops import cut_cells
from ensemble.data.features import FeatureSettings
from ensemble.data.segment import create_segmenter, image_cells
from ensemble.data.store import CellStore, open_store
from ensemble.labels import CLASS_NAMES, NUM_CLASSES
from ensemble.models import load_network
from ensemble.models.inference import predict_cells
from ensemble.oof import CELL_COLUMNS, IMAGE_COLUMNS, KEYS, member_columns
from ensemble.selectors import EnsembleSpec, apply_spec
from ensemble.serving.inputs import ImageInput, dataset_inputs, frame_inputs, iter_inputs
from ensemble.serving.submission import encode_cells
from ensemble.zoo import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_INTEGRITY_LOADER = "ensemble.integrity:load_integrity"
CONFIG_VERSION = 1
OUTPUT_COLUMNS = ["image_id", "cell_id", *CELL_COLUMNS, "integrity", "rle", "width", "height"]
IMAGES_PER_BATCH = 8  # images whose cells the members see together in predict()
LOAD_NETWORKS = "load_networks"
"""``model_config`` key of :func:`mlflow.pyfunc.load_model`: False defers loading the member
networks to their first use (see :func:`load_ensemble`)."""


@dataclass(frozen=True)
class Preprocessing:
    """How cells are cut out of an image: exactly as the cell store the members trained on.

    Attributes
    ----------
    segmenter : dict
        ``{"name": ..., "settings": {...}}`` as in the store's meta.json.
    cell_size : int
        Crop side S of the store (members resize to their own ``cell_size`` as in training).
    features : dict
        :class:`~ensemble.data.features.FeatureSettings` fields (the VID intensity feature).
    """

    segmenter: dict
    cell_size: int
    features: dict = field(default_factory=lambda: dataclasses.asdict(FeatureSettings()))

    @classmethod
    def from_store(cls, store: CellStore | str | Path) -> Preprocessing:
        """The preprocessing recorded in a cell store's meta.json."""
        meta = open_store(store).meta
        return cls(segmenter=meta["segmenter"], cell_size=int(meta["cell_size"]), features=meta["features"])

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """From a model's config.json; models registered before ``cell_size`` had one name say ``crop_size``."""
        data = dict(data)
        if "crop_size" in data:
            data["cell_size"] = data.pop("crop_size")
        return cls(**data)


@dataclass
class PredictTimings:
    """Seconds spent in each stage of prediction, summed over calls (see bench/bench_predict.py).

    ``crop`` covers the cell features, the crops and the mask RLEs; ``fuse`` the aggregation,
    fusion and integrity weighting.
    """

    read: float = 0.0
    segment: float = 0.0
    crop: float = 0.0
    members: float = 0.0
    fuse: float = 0.0
    images: int = 0
    cells: int = 0

    @property
    def total(self) -> float:
        return self.read + self.segment + self.crop + self.members + self.fuse

    def shares(self) -> dict[str, float]:
        """Stage -> its share of the total time."""
        total = self.total or 1.0
        return {stage: getattr(self, stage) / total for stage in ("read", "segment", "crop", "members", "fuse")}


@dataclass
class SegmentedImage:
    """One image cut into cells, ready for the member networks.

    Attributes
    ----------
    image_id : str
    height, width : int
    cells : DataFrame
        :func:`~ensemble.data.features.cell_features` of every cell, in cell id order.
    crops : ndarray of uint8, shape (n, 4, S, S)
    rle : list of str
        Each cell's mask, encoded for the submission.
    """

    image_id: str
    height: int
    width: int
    cells: pd.DataFrame
    crops: np.ndarray
    rle: list[str]


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The HCPL ensemble as an ``mlflow.pyfunc`` model (see the module docstring for I/O).

    After loading, ``device`` (default: CUDA when available; setting it moves the networks) and
    ``batch_size`` (cells per forward pass) may be changed; ``timings`` accumulates the seconds
    of each stage and ``last_report`` lists the images the last :meth:`predict` skipped.
    ``member_outputs = True`` adds each network's own cell probabilities (:func:`member_columns`).
    The member networks are loaded with the model, unless its ``model_config`` sets
    :data:`LOAD_NETWORKS` to False (a Ray actor that only segments never needs them).
    """

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        config = json.loads(Path(artifacts["config"]).read_text())
        if config.get("version") != CONFIG_VERSION:
            raise ValueError(f"unsupported ensemble model config version {config.get('version')!r}")
        self.spec = EnsembleSpec.from_json(artifacts["ensemble_spec"])
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
        settings = dict(preprocessing.segmenter["settings"])
        for key, name in config["segmenter_files"].items():
            settings[key] = str(Path(artifacts["segmenter"]) / name)
        self.segmenter = create_segmenter(preprocessing.segmenter["name"], **settings)
        self.cell_size = preprocessing.cell_size
        self.features = FeatureSettings(**preprocessing.features)
        self.member_specs = {name: ModelSpec.from_dict(spec) for name, spec in config["members"].items()}
        self.member_folds = {name: list(folds) for name, folds in config["member_folds"].items()}
        self.members_dir = Path(artifacts["members"])
        self.integrity = None
        if "integrity" in artifacts:
            self.integrity = load_integrity_hook(config["integrity_loader"], artifacts["integrity"])
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = 128
        self.member_outputs = False
        self.timings = PredictTimings()
        self.last_report = hpa.BatchReport()
        self._networks: dict[str, list[torch.nn.Module]] | None = None
        self._loading = threading.Lock()
        if (context.model_config or {}).get(LOAD_NETWORKS, True):
            self._networks = self._load_networks()  # here, not in a served request

    # --- pyfunc entry point -------------------------------------------------------------------

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Cells of the images of ``model_input``, one image per row (see the module docstring).

        Images that cannot be read are skipped (logged, and listed in ``self.last_report``); if
        none of them can, the reasons are raised (a served request answers with them).
        """
        report = hpa.BatchReport()
        segmented = self.segment_inputs(frame_inputs(model_input), report)
        outputs = [self.classify(chunk) for chunk in batched(segmented, IMAGES_PER_BATCH)]
        self.last_report = report
        if report.skipped and not report.n_ok:
            raise hpa.DatasetError(f"no image could be read: {report.summary()}")
        cells = pd.concat(outputs, ignore_index=True) if outputs else self.classify([])
        return cells.rename(columns=dict(zip(CELL_COLUMNS, CLASS_NAMES)))

    def predict_arrays(self, images: Mapping[str, np.ndarray],
                       masks: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
        """Cells of in-memory images: ``{image_id: (H, W, 4) float in [0, 1], CHANNELS order}``,
        in the OOF layout of :meth:`classify`; ``masks`` optionally gives an image's cell mask."""
        masks = masks or {}
        return self.classify([self.segment(image_id, image, masks.get(image_id)) for image_id, image in images.items()])

    # --- the two stages -----------------------------------------------------------------------

    def iter_segmented(self, root: str | Path, ids: Iterable[str], split: str, report: hpa.BatchReport,
                       masks: str | None = None) -> Iterator[SegmentedImage]:
        """Read and segment the images of a dataset one at a time; bad ones go to ``report``.

        ``masks``: a folder of given cell masks ``{ID}.png`` used instead of segmenting; an image
        whose mask is missing or not its size is skipped and reported.
        """
        return self.segment_inputs(dataset_inputs(root, ids, split, masks), report)

    def segment_inputs(self, inputs: Iterable[ImageInput], report: hpa.BatchReport) -> Iterator[SegmentedImage]:
        """Read and segment images one at a time; those that cannot be read go to ``report``."""
        images = iter_inputs(inputs, report)
        while True:
            start = time.perf_counter()
            item = next(images, None)
            self.timings.read += time.perf_counter() - start
            if item is None:
                return
            yield self.segment(*item)

    def segment(self, image_id: str, image: np.ndarray, mask: np.ndarray | None = None) -> SegmentedImage:
        """Segment one image (or take its given ``mask``) and cut its cells out as the cell store
        does (crops.process_image)."""
        start = time.perf_counter()
        cells = image_cells(image, self.segmenter, mask).cells
        segmented = time.perf_counter()
        table, crops = cut_cells(image, cells, self.cell_size, self.features)
        rle = encode_cells(cells, table["cell_id"])
        self.timings.segment += segmented - start
        self.timings.crop += time.perf_counter() - segmented
        return SegmentedImage(str(image_id), int(image.shape[0]), int(image.shape[1]), table, crops, rle)

    def classify(self, images: Sequence[SegmentedImage]) -> pd.DataFrame:
        """Member predictions, aggregation, fusion and integrity for the cells of ``images``."""
        networks = self.networks if any(len(s.cells) for s in images) else {}  # loading is no stage's time
        start = time.perf_counter()
        counts = [len(s.cells) for s in images]
        n = sum(counts)
        index = pd.DataFrame({
            "image_id": np.repeat([s.image_id for s in images], counts).astype(object),
            "cell_id": np.concatenate([s.cells["cell_id"].to_numpy() for s in images] or [np.zeros(0)]).astype(np.int64),
        })
        crops = np.concatenate([s.crops for s in images]) if n else np.zeros((0, 4, self.cell_size, self.cell_size), np.uint8)
        integrity = np.ones(n, np.float32)
        probabilities = np.zeros((n, NUM_CLASSES), np.float32)
        if n:
            frames = {}
            for name, folds in networks.items():
                cell, image = predict_cells(self.member_specs[name], folds, crops, counts, self.device, self.batch_size)
                frames[name] = index.assign(**dict(zip(CELL_COLUMNS, cell.T)))
                if image is not None:
                    frames[name] = frames[name].assign(**dict(zip(IMAGE_COLUMNS, image.T)))
            fusing = time.perf_counter()
            self.timings.members += fusing - start
            start = fusing
            # apply_spec returns its rows sorted by (image_id, cell_id): put them back in ours.
            fused = index.merge(apply_spec(self.spec, frames), on=KEYS, how="left")
            probabilities = fused[CELL_COLUMNS].to_numpy(np.float32)
            if self.integrity is not None:
                table = pd.concat([s.cells.assign(image_id=s.image_id) for s in images], ignore_index=True)
                integrity = np.asarray(self.integrity.weights(table, crops), dtype=np.float32).reshape(-1)
                if integrity.shape != (n,):
                    raise ValueError(f"integrity model returned {integrity.shape[0]} weights for {n} cells")
            if self.spec.integrity_weighting:
                probabilities = probabilities * integrity[:, None]
        out = pd.concat([index, pd.DataFrame(probabilities, columns=CELL_COLUMNS)], axis=1)
        if self.member_outputs and n:
            # Weighted as the ensemble is: a member scored beside it then differs by networks and fusion, not VID.
            weight = integrity[:, None] if self.spec.integrity_weighting else 1.0
            out = pd.concat([out, *(pd.DataFrame(frames[name][CELL_COLUMNS].to_numpy() * weight,
                                                 columns=member_columns(name)) for name in frames)], axis=1)
        out["integrity"] = integrity
        out["rle"] = pd.Series([text for s in images for text in s.rle], dtype=object)
        out["width"] = np.repeat([s.width for s in images], counts).astype(np.int64)
        out["height"] = np.repeat([s.height for s in images], counts).astype(np.int64)
        self.timings.fuse += time.perf_counter() - start
        self.timings.images += len(images)
        self.timings.cells += n
        return out

    @property
    def device(self) -> torch.device:
        """Where the member networks run."""
        return self._device

    @device.setter
    def device(self, device: str | torch.device) -> None:
        with self._loading:
            self._device = torch.device(device)
            for networks in (self._networks or {}).values():
                for network in networks:
                    network.to(self._device)

    @property
    def networks(self) -> dict[str, list[torch.nn.Module]]:
        """Member -> its fold networks, in eval mode on ``self.device``.

        Loaded by ``load_context``, or here on first use when it was told not to: under a lock,
        so that concurrent first requests load them once.
        """
        with self._loading:
            if self._networks is None:
                self._networks = self._load_networks()
            return self._networks

    def _load_networks(self) -> dict[str, list[torch.nn.Module]]:
        """Every member's fold networks, from the model's artifacts, on ``self.device``."""
        loaded = {}
        for name, spec in self.member_specs.items():
            loaded[name] = [load_network(spec, self.members_dir / name / f"fold{fold}.pt", self._device)
                            for fold in self.member_folds[name]]
        return loaded


def load_ensemble(model_uri: str, networks: bool = True) -> EnsembleModel:
    """Load a registered (or saved) ensemble and return the :class:`EnsembleModel` itself.

    Parameters
    ----------
    model_uri : str
        Any MLflow model URI: ``models:/hpa-ensemble@champion``, ``runs:/...``, or a local
        directory written by :func:`~ensemble.serving.registry.save_ensemble`.
    networks : bool
        Load the member networks now (default); False for a process that only segments, which
        then loads them only if it classifies.
    """
    return mlflow.pyfunc.load_model(model_uri, model_config={LOAD_NETWORKS: networks}).unwrap_python_model()


def load_integrity_hook(loader: str, path: str | Path):
    """The integrity model of a ``"module:function"`` loader (see the module docstring)."""
    module, _, function = loader.partition(":")
    return getattr(importlib.import_module(module), function)(str(path))


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last may be shorter): Python 3.12's itertools.batched."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
