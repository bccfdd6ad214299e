"""Which timm families learn from scratch on a store's cells in a few CPU epochs (choosing the quick zoo).

For each backbone: a zoo model (``--model``, by default the quick zoo's CLA) on that backbone,
trained in this process on one fold's training cells by the job's own epoch code
(``train_loader``, ``train_epoch``), the epoch chosen on the inner validation split, then the
held-out fold predicted once: the job's OOF score, without Ray. One line of JSON per backbone; a
DSA adds its image stream and the product of both streams. ``--set KEY=VALUE`` changes a train
setting (e.g. the labels trained on, the DSA's cell-loss weight).

    python bench/scan_families.py --store /tmp/demo/store resnet10t ese_vovnet19b_slim regnetx_002
    python bench/scan_families.py --store /tmp/science/seed0/store --model dsa_resnet10t \
        --set labels=cra2 --set cell_loss_weight=1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import yaml

from ensemble.data.store import CellStore, evaluation_labels
from ensemble.models import build_model, init_class_prior
from ensemble.trainers.loop import (_criterion, build_optimizer, job_rows, predict_rows, score_predictions,
                                    start_epoch, train_epoch, train_loader)
from ensemble.zoo import ModelSpec, load_zoo


def scan(store: CellStore, spec: ModelSpec, fold: int) -> dict:
    torch.manual_seed(spec.train.seed)
    truth, _ = evaluation_labels(store)
    train, validation, held_out = job_rows(store, fold, spec.train)
    rates = store.labels("weak")[train].mean(axis=0)
    model = build_model(spec)
    if spec.train.prior_init:
        init_class_prior(model, store.labels(spec.train.labels)[train].mean(axis=0))
    criterion, device = _criterion(spec, rates), torch.device("cpu")
    optimizer, scheduler = build_optimizer(model, spec.train)
    loader = train_loader(store, train, spec, device)
    best, best_weights, started = -1.0, None, time.perf_counter()
    for epoch in range(spec.train.epochs):
        start_epoch(loader, epoch)
        train_epoch(model, loader, criterion, optimizer, spec, device)
        scheduler.step(epoch + 1)
        score = score_predictions(predict_rows(model, store, validation, spec, device), truth[validation])["val_map"]
        if score > best:
            best, best_weights = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_weights)
    oof = score_predictions(predict_rows(model, store, held_out, spec, device), truth[held_out], "held_out")
    return {"model": spec.name, "backbone": spec.backbone, "fold": fold, "val": round(best, 4),
            **{key: round(value, 4) for key, value in oof.items()},
            "minutes": round((time.perf_counter() - started) / 60, 2),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbones", nargs="*", help="default: the model's own backbone")
    parser.add_argument("--store", required=True)
    parser.add_argument("--zoo", default="quick")
    parser.add_argument("--model", default="cla_resnet10t", help="the zoo model whose head and settings to train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train setting")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = CellStore(args.store)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    base = load_zoo(args.zoo, overrides).model(args.model)
    for backbone in args.backbones or [base.backbone]:
        spec = dataclasses.replace(base, name=f"{base.head}_{backbone}", backbone=backbone)
        try:
            print(json.dumps({**scan(store, spec, args.fold), **overrides}), flush=True)
        except RuntimeError as error:  # e.g. a family whose feature maps do not fit 48 px cells
            print(json.dumps({"backbone": backbone, "error": str(error).splitlines()[0]}), flush=True)


if __name__ == "__main__":
    main()
