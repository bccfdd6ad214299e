"""The per-worker training loop of one (model, fold) job, run by Ray Train.

Each epoch: train on the other folds' cells, less an inner validation split of their images;
score the epoch on that split; checkpoint. When training stops, the best epoch's weights predict
every cell of the held-out fold once: that is the job's out-of-fold (OOF) table. No label of the
held-out fold reaches the weights, the choice of epoch or early stopping, so OOF scores, and
everything fitted on them downstream, are out of sample. A restarted worker (killed process, lost
node, re-run of train_all) resumes from the latest checkpoint that Ray Train hands back.

Input: DataLoader worker processes (``placement.loader_workers``) read, augment and convert the
crops while the model steps; the training loader is built once per job and its workers persist
across epochs. Crops are read a window of whole images at a time
(:class:`~ensemble.data.datasets.CellStream`), or from memory with ``placement.in_memory``; a remote
store's shards are kept on the node's disk (``placement.shard_cache``), so a job reads the bucket
once. On a GPU, batches come in pinned memory and are copied asynchronously; the model
runs in channels_last memory format under bf16 autocast. Optimiser and learning-rate schedule
come from timm's factories, named in the zoo's train settings.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch.utils.data import DataLoader, DistributedSampler

import ray.train
import ray.train.torch

from ensemble.data.augment import build_augment
from ensemble.data.datasets import BagDataset, CellDataset, CellStream, ImageChunks, make_loader
from ensemble.data.folds import inner_split
from ensemble.data.store import CellStore, default_shard_cache, evaluation_labels
from ensemble.metrics import cell_map
from ensemble.models import build_model, cell_input, init_class_prior
from ensemble.models.inference import predict_cells
from ensemble.models.losses import DSALoss, FocalLoss, WeightedBCELoss, class_weights
from ensemble.oof import CELL_COLUMNS, IMAGE_COLUMNS, KEYS
from ensemble.storage import write_parquet
from ensemble.zoo import ModelSpec, Placement, TrainSettings

PREDICT_CHUNK_CELLS = 1024  # cells of whole images read from the store per prediction step
OOF_METRICS = ("oof_map", "oof_map_image", "oof_map_product")  # the held-out fold's scores, in a job's summary


@dataclass(frozen=True)
class JobConfig:
    """Everything a worker needs, as plain data (it crosses process and node boundaries)."""

    spec: dict
    fold: int
    store: str
    oof_path: str
    tracking_uri: str | None = None
    run_id: str | None = None
    without: tuple[int, ...] = ()  # further held-out folds (nested CRA): not trained on, predicted with `fold`
    validation_path: str | None = None  # where the chosen epoch's predictions of the inner validation split go

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.spec)


def _criterion(spec: ModelSpec, positive_rates: np.ndarray) -> torch.nn.Module:
    weights = torch.as_tensor(class_weights(positive_rates, power=spec.train.class_weight_power), dtype=torch.float32)
    if spec.train.loss == "focal":
        base = FocalLoss(gamma=spec.train.focal_gamma, class_weights=weights)
    elif spec.train.loss == "bce":
        base = WeightedBCELoss(class_weights=weights)
    else:
        raise ValueError(f"model {spec.name!r}: loss must be 'bce' or 'focal', got {spec.train.loss!r}")
    if spec.head == "dsa":
        return DSALoss(base, image_weight=spec.train.image_loss_weight, cell_weight=spec.train.cell_loss_weight)
    return base


def loader_workers(placement: Placement) -> int:
    """DataLoader processes of a job's worker: as set, or one per CPU it holds beyond the training process's."""
    if placement.loader_workers is not None:
        return placement.loader_workers
    return max(0, int(placement.cpus_per_worker) - 1)


def job_rows(store: CellStore, fold: int, settings: TrainSettings,
             without: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Store rows a job trains on, chooses its epoch on, and predicts: (train, validation, held-out).

    The held-out rows are the cells of ``fold`` and of the folds ``without``; the validation rows
    are the cells of a stratified ``settings.val_fraction`` of the other (training) folds' images
    (:func:`~ensemble.data.folds.inner_split`), drawn with the job's seed.
    """
    fold_of_cell = store.cells["fold"].to_numpy()
    held_out = np.isin(fold_of_cell, (fold, *without))
    training = np.flatnonzero(~held_out)
    image_ids = store.cells["image_id"].to_numpy()[training]
    images, first, which = np.unique(image_ids, return_index=True, return_inverse=True)
    inner = inner_split(store.labels("weak")[training[first]], settings.val_fraction, settings.seed)
    return training[~inner[which]], training[inner[which]], np.flatnonzero(held_out)


@torch.no_grad()
def predict_rows(model: torch.nn.Module, store: CellStore, rows: np.ndarray, spec: ModelSpec, device: torch.device,
                 batch_size: int = 128, workers: int = 0) -> pd.DataFrame:
    """Probabilities of every cell of ``rows`` (cell stream, and image stream for DSA), one row per cell.

    The same path as serving (:func:`~ensemble.models.inference.predict_cells`), fed whole
    images at a time (:class:`~ensemble.data.datasets.ImageChunks`), read by ``workers``
    processes while the model predicts; the chunks, and so the predictions, do not depend on
    ``workers``.
    """
    model.eval()
    chunks = ImageChunks(store, rows=rows, max_cells=PREDICT_CHUNK_CELLS)
    table = store.cells.iloc[chunks.rows][[*KEYS, "fold"]].reset_index(drop=True)
    cell = np.zeros((len(table), len(CELL_COLUMNS)), np.float32)
    image = np.zeros_like(cell) if spec.head == "dsa" else None
    for chunk in make_loader(chunks, batch_size=None, workers=workers, pin_memory=device.type == "cuda"):
        start, stop = chunk["start"], chunk["stop"]
        cell[start:stop], chunk_image = predict_cells(spec, [model], chunk["crops"], chunk["counts"].numpy(), device,
                                                      batch_size)
        if image is not None:
            image[start:stop] = chunk_image
    table[CELL_COLUMNS] = cell
    if image is not None:
        table[IMAGE_COLUMNS] = image
    return table


def score_predictions(predictions: pd.DataFrame, labels: np.ndarray, prefix: str = "val") -> dict[str, float]:
    """Cell mAP of a prediction table, and for DSA of the image stream and of the product of both."""
    metrics = {f"{prefix}_map": cell_map(labels, predictions[CELL_COLUMNS].to_numpy()).map}
    if IMAGE_COLUMNS[0] in predictions:
        image = predictions[IMAGE_COLUMNS].to_numpy()
        metrics[f"{prefix}_map_image"] = cell_map(labels, image).map
        metrics[f"{prefix}_map_product"] = cell_map(labels, image * predictions[CELL_COLUMNS].to_numpy()).map
    return metrics


def train_loader(store: CellStore, rows: np.ndarray, spec: ModelSpec, device: torch.device, world_size: int = 1,
                 rank: int = 0) -> DataLoader:
    """The job's training loader, built once: call :func:`start_epoch` before each pass.

    It shuffles with the job's seed and the epoch, and with several Ray Train workers gives each
    its share of the items (what ``prepare_data_loader`` would add, which rebuilds the loader
    without its persistent workers): in memory through a ``DistributedSampler``, from the store
    through a :class:`~ensemble.data.datasets.CellStream`, which reads whole images in windows.
    """
    settings = spec.train
    transform = build_augment(settings.augment, seed=settings.seed) if settings.augment > 0 else None
    if spec.head == "dsa":
        dataset = BagDataset(store, rows=rows, bag_size=spec.cells_per_image, train=True, labels=settings.labels,
                             transform=transform, seed=settings.seed, in_memory=spec.placement.in_memory)
        batch = max(1, settings.batch_size // spec.cells_per_image)
    else:
        dataset = CellDataset(store, rows=rows, labels=settings.labels, transform=transform,
                              in_memory=spec.placement.in_memory)
        batch = settings.batch_size
    workers = loader_workers(spec.placement)
    if not spec.placement.in_memory:
        stream = CellStream(dataset, batch, seed=settings.seed, world_size=world_size, rank=rank)
        return make_loader(stream, batch_size=None, workers=workers, pin_memory=device.type == "cuda",
                           persistent=workers > 0)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=settings.seed)
    return make_loader(dataset, batch_size=batch, workers=workers, pin_memory=device.type == "cuda", sampler=sampler,
                       drop_last=len(sampler) > batch, persistent=workers > 0)


def start_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of the loader's shuffling and, for bags, of the cells drawn from each image."""
    if not isinstance(loader.dataset, CellStream):  # a stream orders its items itself
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.dataset, (BagDataset, CellStream)):
        loader.dataset.set_epoch(epoch)


def _inputs(crops: torch.Tensor, spec: ModelSpec, device: torch.device) -> torch.Tensor:
    """The network's input on the device (:func:`~ensemble.models.cell_input`), channels-last on a GPU."""
    x = cell_input(crops, spec.cell_size, device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def _loss(criterion, model, batch, spec: ModelSpec, device) -> torch.Tensor:
    def move(name: str) -> torch.Tensor:
        return batch[name].to(device, non_blocking=True)

    if spec.head == "dsa":
        valid = move("valid")
        out = model(_inputs(batch["cells"], spec, device), valid)
        return criterion(out, move("image_target"), move("cell_targets"), valid)
    return criterion(model(_inputs(batch["image"], spec, device)), move("target"))


def train_epoch(model: torch.nn.Module, batches, criterion: torch.nn.Module, optimizer: torch.optim.Optimizer,
                spec: ModelSpec, device: torch.device) -> tuple[float, int]:
    """One pass of training steps over ``batches`` (a loader, or batches already in memory).

    Returns the mean loss and the number of steps. The loss is summed on the device, so steps
    queue on a GPU without waiting for each other.
    """
    model.train()
    autocast = device.type == "cuda" and spec.train.mixed_precision
    total, steps = torch.zeros((), device=device), 0
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(criterion, model, batch, spec, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach().float()
        steps += 1
    return total.item() / max(steps, 1), steps


def build_optimizer(model: torch.nn.Module, settings: TrainSettings) -> tuple[torch.optim.Optimizer, Scheduler]:
    """timm's optimiser and per-epoch schedule for ``settings``; step the schedule with the next epoch.

    timm leaves biases and normalisation weights out of weight decay. With the defaults (adam,
    cosine over ``epochs``, no warm-up) the learning rates are those of ``torch.optim.Adam``
    under ``CosineAnnealingLR(T_max=epochs)``.
    """
    optimizer = create_optimizer_v2(model, opt=settings.optimizer, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=settings.schedule, num_epochs=settings.epochs,
                                       warmup_epochs=settings.warmup_epochs)
    return optimizer, scheduler


def save_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler,
               state: dict, best_weights: dict, spec: dict) -> None:
    """Write a checkpoint: weights, optimiser and schedule, the best epoch's weights, the loop's state, the spec."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               directory / "state.pt")
    torch.save(best_weights, directory / "best.pt")
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "spec.json").write_text(json.dumps(spec))


def _learnt(spec: dict) -> dict:
    """A spec's JSON form without its placement: what its weights depend on."""
    return {k: v for k, v in json.loads(json.dumps(spec)).items() if k != "placement"}


def restore_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Scheduler) -> tuple[dict, dict]:
    """Load a :func:`save_state` checkpoint into the job's objects; returns the loop's state and the best weights."""
    saved = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    best_weights = torch.load(directory / "best.pt", map_location="cpu", weights_only=True)
    return json.loads((directory / "state.json").read_text()), best_weights


def _agree(stop: bool) -> bool:
    """Rank 0's early-stopping decision, shared so every DDP worker leaves the loop together."""
    if not (dist.is_available() and dist.is_initialized()):
        return stop
    flag = torch.tensor([int(stop)], device=ray.train.torch.get_device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _log_mlflow(job: JobConfig, metrics: dict, epoch: int) -> None:
    if not job.run_id:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient(job.tracking_uri).log_batch(
        job.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items() if np.isfinite(v)])


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point; ``config`` is a :class:`JobConfig` as a dict. Returns the job's summary."""
    job = JobConfig(**config)
    spec = job.model_spec
    settings = spec.train
    if spec.placement.torch_threads:
        torch.set_num_threads(spec.placement.torch_threads)
    torch.manual_seed(settings.seed)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()

    store = CellStore(job.store, shard_cache=default_shard_cache() if spec.placement.shard_cache else None)
    train_rows, val_rows, held_rows = job_rows(store, job.fold, settings, tuple(job.without))
    truth, label_source = evaluation_labels(store)
    rates = store.labels("weak")[train_rows].mean(axis=0)

    model = build_model(spec)
    if settings.prior_init:
        init_class_prior(model, store.labels(settings.labels)[train_rows].mean(axis=0))
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = _criterion(spec, rates).to(device)
    optimizer, scheduler = build_optimizer(model, settings)
    state = {"epoch": 0, "best": -np.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            # A job's Ray run is named after its model and fold only, so a changed spec finds the
            # old spec's checkpoints: resume only what this spec learnt (placement may differ).
            if _learnt(json.loads((Path(directory) / "spec.json").read_text())) == _learnt(job.spec):
                state, best_weights = restore_state(Path(directory), model, optimizer, scheduler)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    loader = train_loader(store, train_rows, spec, device, context.get_world_size(), rank)
    workers = loader_workers(spec.placement)

    while state["epoch"] < settings.epochs and state["bad_epochs"] < settings.patience:
        epoch = state["epoch"]
        start_epoch(loader, epoch)
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        loss, _ = train_epoch(model, loader, criterion, optimizer, spec, device)
        scheduler.step(epoch + 1)
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "train_loss": loss, "lr": lr, "epoch_seconds": seconds,
                   "cells_per_second": len(train_rows) / seconds}
        stop = False
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                validation = predict_rows(bare, store, val_rows, spec, device, workers=workers)
                metrics.update(score_predictions(validation, truth[val_rows]))
                if best_weights is None or metrics["val_map"] > state["best"]:
                    state.update(best=metrics["val_map"], best_epoch=epoch, bad_epochs=0)
                    best_weights = {k: v.detach().cpu() for k, v in bare.state_dict().items()}
                else:
                    state["bad_epochs"] += 1
                state["epoch"] = epoch + 1
                state["history"].append(metrics)
                metrics.update(best_val_map=state["best"], label_source=label_source)
                save_state(Path(directory), bare, optimizer, scheduler, state, best_weights, job.spec)
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
                _log_mlflow(job, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, epoch)
                stop = state["epoch"] >= settings.epochs or state["bad_epochs"] >= settings.patience
            else:
                state["epoch"] = epoch + 1
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if _agree(stop):
            break
    summary = {"best_val_map": state["best"], "best_epoch": state["best_epoch"], "epochs": state["epoch"],
               "history": state["history"], "label_source": label_source, "world_size": context.get_world_size(),
               "node_id": ray.get_runtime_context().get_node_id()}
    if rank == 0:
        # The held-out fold, predicted once by the chosen epoch: the OOF table and its score.
        bare.load_state_dict(best_weights)
        oof = predict_rows(bare, store, held_rows, spec, device, workers=workers)
        write_parquet(oof, job.oof_path)
        summary.update(score_predictions(oof, truth[held_rows], prefix="oof"))
        if job.validation_path:
            # A second out-of-sample network for these cells (beside their own fold's): what
            # selection estimates the fold networks' disagreement from (selectors/served.py).
            # Predicted again rather than kept from the best epoch, so a checkpoint holds no table.
            validation = predict_rows(bare, store, val_rows, spec, device, workers=workers)
            write_parquet(validation.assign(network=job.fold), job.validation_path)
    return summary
