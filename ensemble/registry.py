"""The selected ensemble as a product: an MLflow pyfunc model, registered under an alias.

Inference is the HCPL system of the paper's Fig. 4c::

    image (H, W, 4) -> segment into cells -> crop each cell exactly as the cell store does
        -> every member network predicts every cell
        -> hierarchical aggregation and per-class image x cell fusion   (selectors.apply_spec)
        -> x the cell's visual-integrity weight (VID), when the spec says so

A member is one model spec trained on K folds, so it comes with K networks; its probability for
a cell is the mean of the K networks' sigmoid outputs (its image stream: the mean over the K
networks of each one's max over the image's bags, as in training). The ensemble was selected on
out-of-fold predictions of single fold networks; averaging them is the usual K-fold ensemble and
keeps the probabilities on the same scale.

Artifacts packed into the MLflow model::

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

Input of :meth:`EnsembleModel.predict` (pyfunc): a DataFrame with columns ``image_id`` and
``root`` (a dataset root in the Kaggle layout) and optionally ``split`` (default ``"test"``): the
image is ``{root}/{split}/{image_id}_{red,green,blue,yellow}.png``. For in-memory images use
``load_ensemble(uri).predict_arrays({image_id: (H, W, 4) float32 in [0, 1]})``.

Output: one row per cell, :data:`OUTPUT_COLUMNS`: ``image_id, cell_id``, the 19 class
probabilities ``cell_0..cell_18`` (float32; the OOF layout, so apply_spec and the selectors read
it), ``integrity`` (float32), ``rle`` (the cell's mask, :func:`ensemble.submission.encode_mask`),
``width, height`` of the image. With ``member_outputs`` set, also each network's own cell
probabilities, :func:`member_columns` (to score the members beside the ensemble).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.artifacts import download_artifacts
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from ensemble import tracking
from ensemble.data import hpa
from ensemble.data.cells import CellStore, crop_cells
from ensemble.data.features import FeatureSettings, cell_features
from ensemble.data.segment import create_segmenter
from ensemble.labels import NUM_CLASSES
from ensemble.selectors import EnsembleSpec, apply_spec
from ensemble.submission import encode_mask
from ensemble.trainers.loop import CELL_COLUMNS, IMAGE_COLUMNS, build_model, fit_size
from ensemble.trainers.spec import ModelSpec, TrainSettings

logger = logging.getLogger(__name__)

DEFAULT_INTEGRITY_LOADER = "ensemble.integrity:load_integrity"
CONFIG_VERSION = 1
OUTPUT_COLUMNS = ["image_id", "cell_id", *CELL_COLUMNS, "integrity", "rle", "width", "height"]
IMAGES_PER_BATCH = 8  # images whose cells the members see together in predict()
CHECKPOINT_ARTIFACT = "checkpoint"  # training runs log checkpoint/best.pt and checkpoint/spec.json

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image_id"), ColSpec("string", "root"),
                   ColSpec("string", "split", required=False)]),
    outputs=Schema([ColSpec("string", "image_id"), ColSpec("long", "cell_id"),
                    *(ColSpec("float", c) for c in CELL_COLUMNS), ColSpec("float", "integrity"),
                    ColSpec("string", "rle"), ColSpec("long", "width"), ColSpec("long", "height")]),
)


@dataclass(frozen=True)
class Preprocessing:
    """How cells are cut out of an image: exactly as the cell store the members trained on.

    Attributes
    ----------
    segmenter : dict
        ``{"name": ..., "settings": {...}}`` as in the store's meta.json.
    crop_size : int
        Crop side S of the store (members resize to their own ``image_size`` as in training).
    features : dict
        :class:`~ensemble.data.features.FeatureSettings` fields (the VID intensity feature).
    """

    segmenter: dict
    crop_size: int
    features: dict = field(default_factory=lambda: dataclasses.asdict(FeatureSettings()))

    @classmethod
    def from_store(cls, store: str | Path) -> Preprocessing:
        """The preprocessing recorded in a cell store's meta.json."""
        meta = CellStore(store).meta
        return cls(segmenter=meta["segmenter"], crop_size=int(meta["size"]), features=meta["features"])


@dataclass(frozen=True)
class MemberCheckpoints:
    """The K fold networks of one model.

    Attributes
    ----------
    spec : ModelSpec
    folds : dict of int to Path
        Fold -> its network's state_dict file (``torch.save``; loaded with ``weights_only=True``).
    runs : dict of int to str
        Fold -> the MLflow run it came from (empty for files given by hand).
    store : str or None
        The cell store the runs trained on (their ``store`` parameter), if known.
    """

    spec: ModelSpec
    folds: dict[int, Path]
    runs: dict[int, str] = field(default_factory=dict)
    store: str | None = None


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

    After loading, ``device`` (default: CUDA when available) and ``batch_size`` (cells per
    forward pass) may be changed before the first prediction; ``timings`` accumulates the seconds
    of each stage and ``last_report`` lists the images the last :meth:`predict` skipped.
    ``member_outputs = True`` adds each network's own cell probabilities (:func:`member_columns`).
    The member networks are loaded on first use, so a process that only segments (a Ray
    preprocessing actor) never loads them.
    """

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        config = json.loads(Path(artifacts["config"]).read_text())
        if config.get("version") != CONFIG_VERSION:
            raise ValueError(f"unsupported ensemble model config version {config.get('version')!r}")
        self.spec = EnsembleSpec.from_json(artifacts["ensemble_spec"])
        segmenter = config["preprocessing"]["segmenter"]
        settings = dict(segmenter["settings"])
        for key, name in config["segmenter_files"].items():
            settings[key] = str(Path(artifacts["segmenter"]) / name)
        self.segmenter = create_segmenter(segmenter["name"], **settings)
        self.crop_size = int(config["preprocessing"]["crop_size"])
        self.features = FeatureSettings(**config["preprocessing"]["features"])
        self.member_specs = {name: _model_spec(spec) for name, spec in config["members"].items()}
        self.member_folds = {name: list(folds) for name, folds in config["member_folds"].items()}
        self.members_dir = Path(artifacts["members"])
        self.integrity = None
        if "integrity" in artifacts:
            self.integrity = _load_integrity(config["integrity_loader"], artifacts["integrity"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = 128
        self.member_outputs = False
        self.timings = PredictTimings()
        self.last_report = hpa.BatchReport()
        self._networks: dict[str, list[torch.nn.Module]] | None = None

    # --- pyfunc entry point -------------------------------------------------------------------

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Cells of the images named by ``model_input`` (columns ``image_id, root[, split]``).

        Images that cannot be read are skipped (logged, and listed in ``self.last_report``).
        """
        frame = pd.DataFrame(model_input)
        if "split" not in frame:
            frame["split"] = "test"
        report = hpa.BatchReport()
        outputs = []
        for (root, split), rows in frame.groupby(["root", "split"], sort=False):
            segmented = self.iter_segmented(root, rows["image_id"].astype(str), split, report)
            for chunk in batched(segmented, IMAGES_PER_BATCH):
                outputs.append(self.classify(chunk))
        self.last_report = report
        return pd.concat(outputs, ignore_index=True) if outputs else self.classify([])

    def predict_arrays(self, images: Mapping[str, np.ndarray]) -> pd.DataFrame:
        """Cells of in-memory images: ``{image_id: (H, W, 4) float in [0, 1], CHANNELS order}``."""
        return self.classify([self.segment(image_id, image) for image_id, image in images.items()])

    # --- the two stages -----------------------------------------------------------------------

    def iter_segmented(self, root: str | Path, ids: Iterable[str], split: str,
                       report: hpa.BatchReport) -> Iterator[SegmentedImage]:
        """Read and segment images one at a time; bad ones go to ``report`` (hpa.iter_images)."""
        images = hpa.iter_images(root, ids, split, report=report)
        while True:
            start = time.perf_counter()
            item = next(images, None)
            self.timings.read += time.perf_counter() - start
            if item is None:
                return
            yield self.segment(*item)

    def segment(self, image_id: str, image: np.ndarray) -> SegmentedImage:
        """Segment one image and cut its cells out as the cell store does (cells.process_image)."""
        start = time.perf_counter()
        cells = self.segmenter(image).cells
        segmented = time.perf_counter()
        table = cell_features(image, cells, self.features)
        crops = crop_cells(image, cells, table, self.crop_size)
        rle = [encode_mask(cells == cell_id) for cell_id in table["cell_id"]]
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
        crops = np.concatenate([s.crops for s in images]) if n else np.zeros((0, 4, self.crop_size, self.crop_size), np.uint8)
        integrity = np.ones(n, np.float32)
        probabilities = np.zeros((n, NUM_CLASSES), np.float32)
        if n:
            frames = {}
            for name, folds in networks.items():
                cell, image = predict_member(self.member_specs[name], folds, crops, counts, self.device, self.batch_size)
                frames[name] = index.assign(**dict(zip(CELL_COLUMNS, cell.T)))
                if image is not None:
                    frames[name] = frames[name].assign(**dict(zip(IMAGE_COLUMNS, image.T)))
            fusing = time.perf_counter()
            self.timings.members += fusing - start
            start = fusing
            # apply_spec returns its rows sorted by (image_id, cell_id): put them back in ours.
            fused = index.merge(apply_spec(self.spec, frames), on=["image_id", "cell_id"], how="left")
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
            out = pd.concat([out, *(frames[name][CELL_COLUMNS].set_axis(member_columns(name), axis=1)
                                    for name in frames)], axis=1)
        out["integrity"] = integrity
        out["rle"] = pd.Series([text for s in images for text in s.rle], dtype=object)
        out["width"] = np.repeat([s.width for s in images], counts).astype(np.int64)
        out["height"] = np.repeat([s.height for s in images], counts).astype(np.int64)
        self.timings.fuse += time.perf_counter() - start
        self.timings.images += len(images)
        self.timings.cells += n
        return out

    @property
    def networks(self) -> dict[str, list[torch.nn.Module]]:
        """Member -> its fold networks, in eval mode on ``self.device`` (loaded on first use)."""
        if self._networks is None:
            self._networks = {}
            for name, spec in self.member_specs.items():
                # The state_dict holds every weight: never let timm download pretrained ones here.
                bare = dataclasses.replace(spec, pretrained=False, checkpoint_path=None)
                networks = []
                for fold in self.member_folds[name]:
                    network = build_model(bare)
                    path = self.members_dir / name / f"fold{fold}.pt"
                    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                    networks.append(network.to(self.device).eval())
                self._networks[name] = networks
        return self._networks


@torch.no_grad()
def predict_member(spec: ModelSpec, networks: Sequence[torch.nn.Module], crops: np.ndarray, counts: Sequence[int],
                   device: torch.device, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """One member's probabilities on the cells of a batch of images: the mean over its fold networks.

    Parameters
    ----------
    spec : ModelSpec
    networks : sequence of nn.Module
        The member's fold networks, in eval mode on ``device``.
    crops : ndarray of uint8, shape (n, 4, S, S)
        Cells of consecutive images, each image's cells in cell id order.
    counts : sequence of int
        Cells per image (summing to n).
    device : torch.device
    batch_size : int
        Cells per forward pass (DSA: ``batch_size // cells_per_image`` bags).

    Returns
    -------
    cell : ndarray (n, 19) float32
    image : ndarray (n, 19) float32 or None
        DSA only: the image stream, the same for every cell of an image. As in training
        (``trainers.loop.predict_fold``), an image's cells are cut into consecutive bags of
        ``cells_per_image`` and the image stream is the max over its bags.
    """
    cells = torch.from_numpy(np.ascontiguousarray(crops))
    n, k = len(cells), len(networks)
    cell = torch.zeros((n, NUM_CLASSES))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def as_input(x: torch.Tensor) -> torch.Tensor:  # uint8 crops -> [0, 1] floats at the model's size
        return fit_size(x.to(device).float() / 255.0, spec.image_size)

    if spec.head != "dsa":
        for start in range(0, n, batch_size):
            x = as_input(cells[start:start + batch_size])
            with torch.autocast(**autocast):
                for network in networks:
                    cell[start:start + batch_size] += torch.sigmoid(network(x).float()).cpu()
        return (cell / k).numpy(), None

    size = spec.cells_per_image
    offsets = np.r_[0, np.cumsum(counts)]
    bags = [(i, a, min(a + size, offsets[i + 1])) for i in range(len(counts)) for a in range(offsets[i], offsets[i + 1], size)]
    image = torch.zeros((k, len(counts), NUM_CLASSES))
    per_step = max(1, batch_size // size)
    for step in range(0, len(bags), per_step):
        chunk = bags[step:step + per_step]
        x = torch.zeros((len(chunk), size, *cells.shape[1:]), dtype=torch.uint8)
        valid = torch.zeros((len(chunk), size), dtype=torch.bool)
        for j, (_, a, b) in enumerate(chunk):
            x[j, : b - a] = cells[a:b]
            valid[j, : b - a] = True
        x, on_device = as_input(x), valid.to(device)
        rows = torch.from_numpy(np.concatenate([np.arange(a, b) for _, a, b in chunk]))
        owners = [i for i, _, _ in chunk]
        with torch.autocast(**autocast):
            for m, network in enumerate(networks):
                out = network(x, on_device)
                cell[rows] += torch.sigmoid(out.cell_logits.float()).cpu()[valid]
                bag = torch.sigmoid(out.image_logits.float()).cpu()
                for j, i in enumerate(owners):  # an image's stream is the max over its bags
                    image[m, i] = torch.maximum(image[m, i], bag[j])
    image = image.mean(dim=0).numpy()
    return (cell / k).numpy(), np.repeat(image, counts, axis=0)


def member_columns(name: str) -> list[str]:
    """Columns of one network's own cell probabilities in a prediction table (``member_outputs``)."""
    return [f"{name}.{column}" for column in CELL_COLUMNS]


def load_ensemble(model_uri: str) -> EnsembleModel:
    """Load a registered (or saved) ensemble and return the :class:`EnsembleModel` itself.

    ``model_uri`` is any MLflow model URI: ``models:/hpa-ensemble@champion``, ``runs:/...``, or a
    local directory written by :func:`save_ensemble`.
    """
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


def needed_models(spec: EnsembleSpec) -> list[str]:
    """Models whose networks inference runs: the members and, when a class fuses, the image models."""
    members = [m for group in spec.groups.values() for m in group]
    fuses = any(rule.rule == "product" for rule in spec.fusion.values())
    return list(dict.fromkeys([*members, *(spec.image_models if fuses else [])]))


def member_checkpoints(experiment: str, model_names: Sequence[str], tracking_uri: str | None = None,
                       dst: str | Path | None = None) -> dict[str, MemberCheckpoints]:
    """Download the fold networks of models trained in an MLflow experiment.

    Contract with training (``trainers.fit``): one FINISHED run per (model, fold), tagged
    ``ensemble.kind=job``, ``model``, ``fold`` and ``spec_hash``, with the artifacts
    ``checkpoint/best.pt`` and ``checkpoint/spec.json``. Of repeated runs of a (model, fold), the
    latest wins.

    Parameters
    ----------
    experiment : str
        Experiment name (one per zoo).
    model_names : sequence of str
        Models to fetch, e.g. :func:`needed_models` of an ensemble spec.
    tracking_uri : str, optional
    dst : str or Path, optional
        Download directory (default: a new temporary directory).

    Raises
    ------
    ValueError
        Unknown experiment, a model without finished runs, or fold runs trained from different
        specs (a model re-trained with changed settings on some folds only).
    """
    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r}")
    dst = Path(dst or tempfile.mkdtemp(prefix="ensemble-members-"))
    members = {}
    for name in model_names:
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=(f"tags.`{tracking.TAG_KIND}` = 'job' and tags.`{tracking.TAG_MODEL}` = '{name}' "
                           "and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"],
        )
        latest = {}
        for run in runs:  # newest first
            latest.setdefault(int(run.data.tags[tracking.TAG_FOLD]), run)
        if not latest:
            raise ValueError(f"experiment {experiment!r} has no finished training run of model {name!r}")
        hashes = {run.data.tags.get(tracking.TAG_SPEC) for run in latest.values()}
        if len(hashes) > 1:
            raise ValueError(f"model {name!r}: its latest fold runs were trained from different specs {sorted(map(str, hashes))}")
        folds = {}
        for fold, run in sorted(latest.items()):
            local = Path(download_artifacts(run_id=run.info.run_id, artifact_path=CHECKPOINT_ARTIFACT,
                                            dst_path=str(dst / name / f"fold{fold}"), tracking_uri=uri))
            folds[fold] = local / "best.pt"
        spec = _model_spec(json.loads((local / "spec.json").read_text()))  # the same for every fold (hash checked)
        members[name] = MemberCheckpoints(spec=spec, folds=folds, runs={f: r.info.run_id for f, r in latest.items()},
                                          store=next(iter(latest.values())).data.params.get("store"))
    return members


def save_ensemble(path: str | Path, spec: EnsembleSpec, members: Mapping[str, MemberCheckpoints],
                  preprocessing: Preprocessing, *, integrity_dir: str | Path | None = None,
                  integrity_loader: str = DEFAULT_INTEGRITY_LOADER) -> Path:
    """Write the ensemble as a local MLflow model directory (no tracking server needed).

    Useful offline (a Kaggle notebook) and in tests; ``load_ensemble(path)`` reads it. Arguments
    as for :func:`register_ensemble`.
    """
    with tempfile.TemporaryDirectory() as staging:
        mlflow.pyfunc.save_model(str(path), **_model_arguments(spec, members, preprocessing, integrity_dir,
                                                               integrity_loader, Path(staging)))
    return Path(path)


def register_ensemble(spec: EnsembleSpec | str | Path, members: Mapping[str, MemberCheckpoints],
                      preprocessing: Preprocessing, *, tracking_uri: str | None = None, name: str = "hpa-ensemble",
                      alias: str = "champion", experiment: str | None = None,
                      integrity_dir: str | Path | None = None,
                      integrity_loader: str = DEFAULT_INTEGRITY_LOADER):
    """Log the ensemble as a pyfunc model, register it as a new version of ``name``, point ``alias`` at it.

    Parameters
    ----------
    spec : EnsembleSpec or path of its JSON
    members : mapping of model name to MemberCheckpoints
        At least :func:`needed_models` of the spec (see :func:`member_checkpoints`).
    preprocessing : Preprocessing
        Usually ``Preprocessing.from_store(store)`` of the store the members trained on.
    tracking_uri : str, optional
        Default: ``MLFLOW_TRACKING_URI`` or local SQLite (``tracking.tracking_uri``).
    name, alias : str
        Registered model and the alias given to the new version.
    experiment : str, optional
        Experiment of the registering run (tag ``ensemble.kind=register``); default ``name``.
    integrity_dir : str or Path, optional
        The VID model's directory; packed and loaded with ``integrity_loader``. Required when
        ``spec.integrity_weighting`` is on.
    integrity_loader : str
        ``"module:function"`` taking the directory and returning an object with ``weights``.

    Returns
    -------
    mlflow.entities.model_registry.ModelVersion
    """
    spec = spec if isinstance(spec, EnsembleSpec) else EnsembleSpec.from_json(spec)
    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(experiment or name, uri)
    with tempfile.TemporaryDirectory() as staging:
        arguments = _model_arguments(spec, members, preprocessing, integrity_dir, integrity_loader, Path(staging))
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{name}",
                              tags={tracking.TAG_KIND: "register"}, nested=mlflow.active_run() is not None):
            mlflow.log_params({
                "members": ",".join(needed_models(spec)),
                "folds": ",".join(f"{m}:{len(members[m].folds)}" for m in needed_models(spec)),
                "aggregation": spec.aggregation, "fusion_mode": spec.fusion_mode,
                "integrity_weighting": spec.integrity_weighting, "integrity_model": integrity_dir is not None,
                "segmenter": preprocessing.segmenter["name"], "crop_size": preprocessing.crop_size,
            })
            runs = {f"{m}/fold{f}": r for m in needed_models(spec) for f, r in members[m].runs.items()}
            if runs:
                mlflow.log_dict(runs, "member_runs.json")
            info = mlflow.pyfunc.log_model(name="model", registered_model_name=name, **arguments)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def _model_arguments(spec: EnsembleSpec, members: Mapping[str, MemberCheckpoints], preprocessing: Preprocessing,
                     integrity_dir, integrity_loader: str, staging: Path) -> dict:
    """Stage the artifacts and return the keyword arguments of ``save_model`` / ``log_model``."""
    needed = needed_models(spec)
    absent = [m for m in needed if m not in members]
    if absent:
        raise ValueError(f"no checkpoints for the ensemble's models {absent}")
    empty = [m for m in needed if not members[m].folds]
    if empty:
        raise ValueError(f"models {empty} have no fold checkpoints")
    if spec.integrity_weighting and integrity_dir is None:
        raise ValueError("the ensemble spec weights cells by integrity, but no integrity model (integrity_dir) was given")
    spec.to_json(staging / "ensemble_spec.json")
    for m in needed:
        for fold, path in members[m].folds.items():
            (staging / "members" / m).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staging / "members" / m / f"fold{fold}.pt")
    # Files the segmenter reads (hpacellseg's U-Net weights) travel with the model; load_context
    # points the settings at the packed copies.
    segmenter_files = {key: Path(value).name for key, value in preprocessing.segmenter["settings"].items()
                       if isinstance(value, str) and Path(value).is_file()}
    artifacts = {"ensemble_spec": str(staging / "ensemble_spec.json"), "members": str(staging / "members"),
                 "config": str(staging / "config.json")}
    if segmenter_files:
        (staging / "segmenter").mkdir()
        for key, file_name in segmenter_files.items():
            shutil.copyfile(preprocessing.segmenter["settings"][key], staging / "segmenter" / file_name)
        artifacts["segmenter"] = str(staging / "segmenter")
    if integrity_dir is not None:
        _load_integrity(integrity_loader, integrity_dir)  # fail now, not on a user's machine
        artifacts["integrity"] = str(integrity_dir)
    config = {
        "version": CONFIG_VERSION,
        "preprocessing": dataclasses.asdict(preprocessing),
        "segmenter_files": segmenter_files,
        "members": {m: dataclasses.asdict(members[m].spec) for m in needed},
        "member_folds": {m: sorted(members[m].folds) for m in needed},
        "integrity_loader": integrity_loader,
    }
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    return dict(python_model=EnsembleModel(), artifacts=artifacts, signature=SIGNATURE,
                pip_requirements=_requirements())


def _model_spec(data: dict) -> ModelSpec:
    """A ModelSpec from its JSON form (``dataclasses.asdict``, as checkpoint/spec.json holds it)."""
    return ModelSpec(**{**data, "train": TrainSettings(**data["train"])})


def _load_integrity(loader: str, path: str | Path):
    module, _, function = loader.partition(":")
    return getattr(importlib.import_module(module), function)(str(path))


def _requirements() -> list[str] | None:
    """The installed ``ensemble`` distribution's own requirements, so MLflow need not infer them
    (inference loads the model in a subprocess: slow). The ``ensemble`` package itself is not on
    PyPI: a serving environment installs it from its source."""
    try:
        requires = metadata.requires("ensemble") or []
    except metadata.PackageNotFoundError:
        return None
    return [r for r in requires if "extra ==" not in r]


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
