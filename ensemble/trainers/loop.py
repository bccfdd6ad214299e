"""The per-worker training loop of one (model, fold) job, run by Ray Train.

Each epoch: train on the other folds' cells, predict every cell of the held-out fold, score it,
checkpoint. The predictions of the best epoch are the job's out-of-fold (OOF) table, so no second
prediction pass is needed at the end. A restarted worker (killed process, lost node, re-run of
train_all) resumes from the latest checkpoint that Ray Train hands back.
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
from torch.utils.data import DataLoader

import ray.train
import ray.train.torch

from ensemble.data.augment import build_augment
from ensemble.data.datasets import BagDataset, CellDataset
from ensemble.data.store import CellStore, evaluation_labels
from ensemble.metrics import cell_map
from ensemble.models import build_model, fit_size, init_class_prior
from ensemble.models.inference import predict_cells
from ensemble.models.losses import DSALoss, FocalLoss, WeightedBCELoss, class_weights
from ensemble.oof import CELL_COLUMNS, IMAGE_COLUMNS, KEYS
from ensemble.storage import write_parquet
from ensemble.zoo import ModelSpec

PREDICT_CHUNK_CELLS = 1024  # cells of whole images read from the store per prediction step


@dataclass(frozen=True)
class JobConfig:
    """Everything a worker needs, as plain data (it crosses process and node boundaries)."""

    spec: dict
    fold: int
    store: str
    oof_path: str
    tracking_uri: str | None = None
    run_id: str | None = None

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


@torch.no_grad()
def predict_fold(model: torch.nn.Module, store: CellStore, fold: int, spec: ModelSpec, device: torch.device,
                 batch_size: int = 128) -> pd.DataFrame:
    """Probabilities of every cell of ``fold`` (cell stream, and image stream for DSA), one row per cell.

    The same path as serving (:func:`~ensemble.models.inference.predict_cells`), fed whole
    images of the fold at a time.
    """
    model.eval()
    rows = np.flatnonzero(store.cells["fold"].to_numpy() == fold)
    table = store.cells.iloc[rows][[*KEYS, "fold"]].reset_index(drop=True)
    ids = table["image_id"].to_numpy()
    ends = np.flatnonzero(np.r_[ids[1:] != ids[:-1], True]) + 1 if len(ids) else np.zeros(0, int)
    cell = np.zeros((len(rows), len(CELL_COLUMNS)), np.float32)
    image = np.zeros_like(cell) if spec.head == "dsa" else None
    first = 0  # the chunk's first image
    while first < len(ends):
        start = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, start + PREDICT_CHUNK_CELLS, side="right")))
        stop = ends[last - 1]
        counts = np.diff(np.r_[start, ends[first:last]])
        cell[start:stop], chunk_image = predict_cells(spec, [model], store.crops(rows[start:stop]), counts, device,
                                                      batch_size)
        if image is not None:
            image[start:stop] = chunk_image
        first = last
    table[CELL_COLUMNS] = cell
    if image is not None:
        table[IMAGE_COLUMNS] = image
    return table


def score_oof(oof: pd.DataFrame, labels: np.ndarray) -> dict[str, float]:
    """Validation metrics of an OOF table: cell mAP, and for DSA the image stream and the product."""
    metrics = {"val_map": cell_map(labels, oof[CELL_COLUMNS].to_numpy()).map}
    if IMAGE_COLUMNS[0] in oof:
        image = oof[IMAGE_COLUMNS].to_numpy()
        metrics["val_map_image"] = cell_map(labels, image).map
        metrics["val_map_product"] = cell_map(labels, image * oof[CELL_COLUMNS].to_numpy()).map
    return metrics


def _train_loader(store: CellStore, folds: list[int], spec: ModelSpec, epoch: int) -> DataLoader:
    settings = spec.train
    transform = build_augment(settings.augment) if settings.augment > 0 else None
    if spec.head == "dsa":
        dataset = BagDataset(store, folds=folds, bag_size=spec.cells_per_image, train=True, labels=settings.labels,
                             transform=transform, seed=settings.seed, in_memory=spec.placement.in_memory)
        dataset.set_epoch(epoch)
        batch = max(1, settings.batch_size // spec.cells_per_image)
    else:
        dataset = CellDataset(store, folds=folds, labels=settings.labels, transform=transform,
                              in_memory=spec.placement.in_memory)
        batch = settings.batch_size
    generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=len(dataset) > batch, generator=generator)
    return ray.train.torch.prepare_data_loader(loader)


def _loss(criterion, model, batch, spec: ModelSpec, device) -> torch.Tensor:
    if spec.head == "dsa":
        valid = batch["valid"].to(device)
        out = model(fit_size(batch["cells"], spec.cell_size).to(device), valid)
        return criterion(out, batch["image_target"].to(device), batch["cell_targets"].to(device), valid)
    return criterion(model(fit_size(batch["image"], spec.cell_size).to(device)), batch["target"].to(device))


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

    store = CellStore(job.store)
    fold_of_cell = store.cells["fold"].to_numpy()
    train_folds = sorted(set(np.unique(fold_of_cell).tolist()) - {job.fold})
    labels, label_source = evaluation_labels(store)
    labels = labels[fold_of_cell == job.fold]
    rates = store.labels("weak")[fold_of_cell != job.fold].mean(axis=0)

    model = build_model(spec)
    if settings.prior_init:
        init_class_prior(model, store.labels(settings.labels)[fold_of_cell != job.fold].mean(axis=0))
    criterion = _criterion(spec, rates).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    state = {"epoch": 0, "best": -np.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = json.loads((Path(directory) / "state.json").read_text())
            best_weights = torch.load(Path(directory) / "best.pt", map_location="cpu", weights_only=True)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    autocast = device.type == "cuda" and settings.mixed_precision

    while state["epoch"] < settings.epochs and state["bad_epochs"] < settings.patience:
        epoch = state["epoch"]
        model.train()
        loader = _train_loader(store, train_folds, spec, epoch)
        if context.get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        started, total, steps = time.perf_counter(), 0.0, 0
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(criterion, model, batch, spec, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        scheduler.step()
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch, "train_loss": total / max(steps, 1), "epoch_seconds": seconds,
                   "cells_per_second": len(loader.dataset) / seconds}
        stop = False
        with tempfile.TemporaryDirectory() as directory:
            report_checkpoint = None
            if rank == 0:
                oof = predict_fold(bare, store, job.fold, spec, device)
                metrics.update(score_oof(oof, labels))
                improved = metrics["val_map"] > state["best"]
                if improved:
                    state.update(best=metrics["val_map"], best_epoch=epoch, bad_epochs=0)
                    best_weights = {k: v.detach().cpu() for k, v in bare.state_dict().items()}
                    write_parquet(oof, job.oof_path)   # the best epoch's predictions are the OOF
                else:
                    state["bad_epochs"] += 1
                state["epoch"] = epoch + 1
                state["history"].append(metrics)
                metrics.update(best_val_map=state["best"], label_source=label_source)
                torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, Path(directory) / "state.pt")
                torch.save(best_weights, Path(directory) / "best.pt")
                (Path(directory) / "state.json").write_text(json.dumps(state))
                (Path(directory) / "spec.json").write_text(json.dumps(job.spec))
                report_checkpoint = ray.train.Checkpoint.from_directory(directory)
                _log_mlflow(job, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, epoch)
                stop = state["epoch"] >= settings.epochs or state["bad_epochs"] >= settings.patience
            else:
                state["epoch"] = epoch + 1
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if _agree(stop):
            break
    return {"best_val_map": state["best"], "best_epoch": state["best_epoch"], "epochs": state["epoch"],
            "history": state["history"], "label_source": label_source, "world_size": context.get_world_size()}
