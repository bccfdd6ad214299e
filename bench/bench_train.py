"""Training throughput: the Ray Train job loop vs a bare PyTorch loop, a zoo run concurrently vs
serially, and the job's input with and without DataLoader worker processes.

    python bench/bench_train.py                 # all figures, on a simulated dataset
    python bench/bench_train.py --only loop     # just the loop ratio
    python bench/bench_train.py --only loader   # 2 loader workers vs 0, and vs in-memory tensors

Loop: the same model (CLA on regnetx_002, 48 px cells), data (the store's training folds, in
memory), batch size and threads; cells/s of training epochs after the first (warm-up). Zoo: the
quick zoo for one epoch, all jobs as Ray schedules them vs ``max_concurrent=1``. Both are
measured in the same run, so the ratios hold on a noisy machine. Loader: the job's own epoch
code (``train_loader`` + ``train_epoch``, as ``train_loop_per_worker`` runs them, here in this
process) on the quick zoo's cla_regnet, fed from the store by 0 and by 2 loader workers and from
batches already in memory, epochs interleaved so that drift hits all three alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
import torch
from torch.utils.data import DataLoader

from ensemble import tracking
from ensemble.data.store import CellStore
from ensemble.data.store_build import prepare
from ensemble.data.datasets import CellDataset
from ensemble.sim.images import simulate
from ensemble.trainers.fit import RunContext, trainer_for
from ensemble.models import build_model, cell_input
from ensemble.trainers.loop import _criterion, start_epoch, train_loader
from ensemble.zoo import ModelSpec, Placement, TrainSettings, load_zoo
from ensemble.trainers.jobs import train_zoo

THREADS = 2


def bare_loop(spec: ModelSpec, store_uri: str, fold: int, epochs: int) -> list[float]:
    """Cells/s per epoch of a plain PyTorch loop over the same data, model and settings.

    Runs in a fresh process (see :func:`main`), as a user's own training script would, rather
    than in this driver, whose Ray and Ray Data threads would slow it.
    """
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    store = CellStore(store_uri)
    train_folds = sorted(set(store.cells["fold"].unique()) - {fold})
    dataset = CellDataset(store, folds=train_folds, in_memory=True)
    rates = store.labels("weak")[store.cells["fold"].to_numpy() != fold].mean(axis=0)
    model, criterion = build_model(spec), _criterion(spec, rates)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.train.lr)
    speeds = []
    for epoch in range(epochs):
        loader = DataLoader(dataset, batch_size=spec.train.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(epoch))
        model.train()
        started = time.perf_counter()
        for batch in loader:
            loss = criterion(model(cell_input(batch["image"])), batch["target"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        speeds.append(len(dataset) / (time.perf_counter() - started))
    return speeds


def ray_loop(spec: ModelSpec, ctx: RunContext, fold: int) -> list[float]:
    result = trainer_for(spec, fold, ctx, name=f"bench-loop-{time.time_ns()}").fit()
    return [h["cells_per_second"] for h in result.return_value["history"]]


def loader_figures(store_uri: str, epochs: int) -> None:
    """Cells/s of the job's training epochs: store-fed by 0 and by 2 loader workers, and on in-memory tensors."""
    from bench_gpu import job_parts, memory_batches, timed_epoch  # the GPU script's figure, on this CPU

    spec = load_zoo("quick").model("cla_regnet")
    torch.set_num_threads(spec.placement.torch_threads)
    device, store = torch.device("cpu"), CellStore(store_uri)
    folds = sorted(set(store.cells["fold"].unique()) - {0})
    sources = {}
    for workers in (0, 2):
        fed = dataclasses.replace(spec, placement=dataclasses.replace(spec.placement, loader_workers=workers))
        sources[f"store, {workers} loader workers"] = (fed, train_loader(store, folds, fed, device))
    steps = len(next(iter(sources.values()))[1])
    batches = memory_batches(spec, store.cell_size, 4, device)
    sources["in-memory tensors"] = (spec, [batches[i % len(batches)] for i in range(steps)])
    parts, rates = {}, {key: [] for key in sources}
    for key, (job, _) in sources.items():
        torch.manual_seed(0)
        parts[key] = job_parts(job, device)
    for epoch in range(epochs):
        for key, (job, source) in sources.items():
            if isinstance(source, DataLoader):
                start_epoch(source, epoch)
            model, criterion, optimizer = parts[key]
            seconds, cells = timed_epoch(model, source, criterion, optimizer, job, device)
            if epoch:  # the first epoch starts the workers
                rates[key].append(cells / seconds)
    median = {key: statistics.median(values) for key, values in rates.items()}
    alone, memory = median["store, 0 loader workers"], median["in-memory tensors"]
    print(f"cla_regnet ({spec.backbone}, {spec.cell_size} px, batch {spec.train.batch_size}, augment "
          f"{spec.train.augment}, in_memory {spec.placement.in_memory}, {spec.placement.torch_threads} torch thread), "
          f"{steps * spec.train.batch_size} cells per epoch; cells/s per epoch after the first: "
          + "; ".join(f"{key} {[round(v) for v in values]}" for key, values in rates.items()))
    print("\n| input | cells/s (median) | x 0 loader workers | x in-memory tensors |\n|---|---:|---:|---:|")
    for key, value in median.items():
        print(f"| {key} | {value:.0f} | {value / alone:.2f} | {value / memory:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved bare/Ray pairs of the loop figure")
    parser.add_argument("--only", choices=["loop", "zoo", "loader"], default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    simulate(work / "data", n_images=args.images, seed=0, size=384)
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    prepare(str(work / "data"), str(work / "store"), cell_size=48, n_folds=3, progress=False)
    store = CellStore(str(work / "store"))
    uri = f"sqlite:///{work}/mlflow.db"
    ctx = RunContext(zoo="bench", store=str(work / "store"), workdir=str(work / "runs"),
                     experiment_id=tracking.ensure_experiment("bench", uri), tracking_uri=uri, fingerprint="bench")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
          f"available, {len(store)} cells")
    if args.only in (None, "loop"):
        spec = ModelSpec(name="cla_regnet", head="cla", backbone="regnetx_002", cell_size=48,
                         train=TrainSettings(epochs=args.epochs, batch_size=48, lr=1e-3, augment=0.0, patience=99),
                         placement=Placement(in_memory=True, torch_threads=THREADS, cpus_per_worker=2.0))
        # Interleave, so drift of the machine's speed hits both loops alike.
        bare, inside = [], []
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in range(args.rounds):
                bare += pool.submit(bare_loop, spec, str(work / "store"), 0, args.epochs).result()[1:]
                inside += ray_loop(spec, ctx, 0)[1:]
        b, r = statistics.median(bare), statistics.median(inside)
        print(f"epochs, cells/s: bare {[round(v) for v in bare]}, Ray Train {[round(v) for v in inside]}")
        print("\n| loop | cells/s (median of epochs after the first) | ratio to bare |\n|---|---:|---:|")
        print(f"| bare PyTorch | {b:.0f} | 1.00 |\n| Ray Train job (1 worker) | {r:.0f} | {r / b:.2f} |")
    if args.only in (None, "loader"):
        loader_figures(str(work / "store"), args.epochs)
    if args.only in (None, "zoo"):
        zoo = load_zoo("quick", overrides={"epochs": 1})
        times = {}
        for label, limit in (("concurrent (as Ray schedules)", None), ("one job at a time", 1)):
            # A fresh experiment and workdir each, so nothing is skipped as done.
            name = f"zoo-{limit}"
            started = time.perf_counter()
            train_zoo(dataclasses.replace(zoo, name=name), str(work / "store"), str(work / name), tracking_uri=uri,
                      progress=False, max_concurrent=limit)
            times[label] = time.perf_counter() - started
        serial = times["one job at a time"]
        print(f"\n| quick zoo, 1 epoch, {len(zoo.models) * 3} jobs | wall s | speed-up vs serial |\n|---|---:|---:|")
        for label, seconds in times.items():
            print(f"| {label} | {seconds:.0f} | {serial / seconds:.2f} |")


if __name__ == "__main__":
    main()
