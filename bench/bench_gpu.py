"""The GPU goals in one run and one table (run it through ``bench/gpu.sh``).

1. Training images/s of each backbone family of the hcpl zoo (its first backbone of the family,
   a CLA head, random weights) at 224 px: bf16 autocast and channels_last, the training loop's
   own step (``trainers.loop.train_epoch``) on batches already on the GPU.
2. The training loop fed from a cell store (the job's loader: worker processes, pinned memory,
   the hcpl zoo's augmentation) against the same model on batches already on the GPU, epochs
   interleaved; target >= 0.9x. The store holds simulated cells at the hcpl zoo's 256 px, the
   model (efficientnet_b0) sees them at 224 px, resized on the GPU on both paths.
3. The hcpl-shaped ensemble (its 9 networks, one fold each, random weights, no downloads) saved
   and loaded as the registry does (``save_ensemble`` + ``load_ensemble``) and predicting
   simulated 2048 px images end to end (read, segment, cut cells, members, fuse); target >= 4
   images/s on one H100-class GPU. The members' stage alone is shown beside it.
4. Peak GPU memory of each part.

Without a GPU it prints one line and exits with 0. ``--device cpu --smoke`` runs every code path
at tiny sizes on a CPU (figures meaningless), to check the script where no GPU is.

    bench/gpu.sh                                    # one GPU, < 8 min
    bench/gpu.sh --device cpu --smoke               # the code paths, on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HCPL_STORE_CELL_SIZE = 256  # the hcpl zoo's cell_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: run every code path quickly (e.g. on a CPU)")
    parser.add_argument("--workdir", help="where data, store and models go (default: a new temporary directory)")
    parser.add_argument("--size", type=int, default=224, help="px of the per-family training figure")
    parser.add_argument("--batch", type=int, default=64, help="cells per training step")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per family (after 3 warm-up)")
    parser.add_argument("--store-images", type=int, default=200, help="simulated images (384 px) in the loop's store")
    parser.add_argument("--loop-epochs", type=int, default=4, help="epochs of each loop, the first one warm-up")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader processes of the store-fed loop (default: CPUs - 1)")
    parser.add_argument("--predict-images", type=int, default=12, help="images predicted, after one warm-up image")
    parser.add_argument("--predict-px", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.steps, args.store_images, args.loop_epochs = 32, 4, 1, 8, 2
        args.predict_images, args.predict_px = 1, 256
    if args.loader_workers is None:
        args.loader_workers = 2 if args.smoke else max(1, (os.cpu_count() or 2) - 1)
    return args


class Table:
    """Rows of the one table, printed at the end; progress goes to stderr meanwhile."""

    def __init__(self, device):
        self.device, self.rows = device, []

    def start(self, what: str) -> None:
        print(f"... {what}", file=sys.stderr, flush=True)
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def add(self, part: str, setting: str, figure: str, target: str = "", peak: bool = True) -> None:
        memory = ""
        if peak and self.device.type == "cuda":
            import torch

            memory = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}"
        elif peak:
            memory = "n/a"
        self.rows.append((part, setting, figure, target, memory))

    def print(self, header: str) -> None:
        print(header)
        print("\n| part | setting | figure | target | peak GPU memory, GiB |\n|---|---|---:|---|---:|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def family_backbones() -> dict[str, str]:
    """Family -> the first backbone of that family in the hcpl zoo."""
    from ensemble.models.backbones import family_of
    from ensemble.zoo import load_zoo

    backbones: dict[str, str] = {}
    for spec in load_zoo("hcpl").models:
        backbones.setdefault(family_of(spec.backbone), spec.backbone)
    return backbones


def on_device(model, device):
    """The model as the training loop holds it: channels_last on a GPU."""
    import torch

    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return model.to(device, memory_format=memory_format)


def memory_batches(spec, size: int, count: int, device) -> list[dict]:
    """``count`` random CLA batches of (batch_size, 4, size, size), already on the device."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(spec.train.batch_size, 4, size, size, generator=generator).to(device),
             "target": (torch.rand(spec.train.batch_size, 19, generator=generator) < 0.2).float().to(device)}
            for _ in range(count)]


def job_parts(spec, device):
    """Model, criterion and optimiser of a CLA job, as the training loop builds them."""
    import numpy as np

    from ensemble.models import build_model
    from ensemble.trainers.loop import _criterion, build_optimizer

    model = on_device(build_model(spec), device)
    optimizer, _ = build_optimizer(model, spec.train)
    return model, _criterion(spec, np.full(19, 0.2)).to(device), optimizer


def timed_epoch(model, batches, criterion, optimizer, spec, device) -> tuple[float, int]:
    """Seconds and images of one ``train_epoch`` (it ends by reading the loss: the GPU has finished)."""
    from ensemble.trainers.loop import train_epoch

    started = time.perf_counter()
    _, steps = train_epoch(model, batches, criterion, optimizer, spec, device)
    return time.perf_counter() - started, steps * spec.train.batch_size


def bench_families(args, device, table: Table) -> None:
    from ensemble.zoo import ModelSpec, TrainSettings

    for family, backbone in family_backbones().items():
        table.start(f"family {family}: {backbone}")
        spec = ModelSpec(name=family, head="cla", backbone=backbone, cell_size=args.size,
                         train=TrainSettings(batch_size=args.batch, optimizer="adamw"))
        model, criterion, optimizer = job_parts(spec, device)
        batches = memory_batches(spec, args.size, 2, device)
        timed_epoch(model, batches * 2, criterion, optimizer, spec, device)  # warm-up (cuDNN, allocator)
        seconds, images = timed_epoch(model, [batches[i % 2] for i in range(args.steps)], criterion, optimizer, spec,
                                      device)
        table.add(f"train {family}", f"{backbone}, {args.size} px, batch {args.batch}", f"{images / seconds:.0f} images/s")
        del model, optimizer


def build_store(args, work: Path, cell_size: int) -> str:
    import ray

    from ensemble.data.store_build import prepare
    from ensemble.sim.images import simulate

    simulate(work / "train-data", args.store_images, seed=0, size=384)
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
    try:
        prepare(str(work / "train-data"), str(work / "store"), cell_size=cell_size, n_folds=3, progress=False)
    finally:
        ray.shutdown()
    return str(work / "store")


def bench_loop(args, device, work: Path, table: Table) -> None:
    import numpy as np
    import torch

    from ensemble.data.store import CellStore
    from ensemble.trainers.loop import start_epoch, train_loader
    from ensemble.zoo import ModelSpec, Placement, load_zoo

    store_size = 32 if args.smoke else HCPL_STORE_CELL_SIZE
    table.start(f"cell store of {args.store_images} simulated images")
    store = CellStore(build_store(args, work, store_size))
    hcpl = load_zoo("hcpl").models[0].train
    spec = ModelSpec(name="cla_effb0", head="cla", backbone="efficientnet_b0", cell_size=args.size,
                     train=dataclasses.replace(hcpl, batch_size=args.batch, epochs=args.loop_epochs, warmup_epochs=0),
                     placement=Placement(loader_workers=args.loader_workers))
    rows = np.flatnonzero(store.cells["fold"].to_numpy() != 0)  # a job's training folds
    table.start(f"training loop, store-fed vs in-memory, {args.loop_epochs} epochs each, interleaved")
    loader = train_loader(store, rows, spec, device)  # in_memory false: the store read by CellStream
    batches = memory_batches(spec, store_size, 4, device)
    in_memory = [batches[i % len(batches)] for i in range(len(loader))]  # as many steps as the loader's epoch
    jobs = {}
    for key in ("store", "memory"):
        torch.manual_seed(0)
        jobs[key] = job_parts(spec, device)
    totals = {key: [0.0, 0] for key in jobs}
    for epoch in range(args.loop_epochs):
        start_epoch(loader, epoch)
        for key, source in (("store", loader), ("memory", in_memory)):
            model, criterion, optimizer = jobs[key]
            seconds, images = timed_epoch(model, source, criterion, optimizer, spec, device)
            if epoch > 0 or args.loop_epochs == 1:  # the first epoch starts the workers and warms the GPU up
                totals[key][0] += seconds
                totals[key][1] += images
    rate = {key: images / seconds for key, (seconds, images) in totals.items()}
    setting = (f"efficientnet_b0, {store_size} px cells -> {args.size} px, batch {args.batch}, "
               f"augment {spec.train.augment}")
    table.add("training loop, store-fed", f"{setting}, {args.loader_workers} loader workers, {len(rows)} cells",
              f"{rate['store']:.0f} images/s")
    table.add("training loop, in-memory tensors", f"{setting}, batches already on the device",
              f"{rate['memory']:.0f} images/s")
    table.add("store-fed / in-memory", "same run, epochs interleaved", f"{rate['store'] / rate['memory']:.2f}x",
              ">= 0.9x", peak=False)


def bench_ensemble(args, device, work: Path, table: Table) -> None:
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_predict import build

    from ensemble.sim.images import simulate
    from ensemble.serving.model import PredictTimings, load_ensemble
    from ensemble.zoo import load_zoo

    zoo = load_zoo("hcpl")
    members = [dataclasses.replace(spec, pretrained=False) for spec in zoo.models]
    cell_size = zoo.cell_size
    if args.smoke:  # the zoo's heads and names on tiny backbones
        cell_size = 32
        members = [dataclasses.replace(spec, backbone="test_efficientnet", cell_size=32) for spec in members]
    table.start(f"hcpl ensemble: {len(members)} networks saved, loaded, predicting {args.predict_px} px images")
    model_dir = build(work, members, 1, cell_size)
    data = simulate(work / "predict-data", args.predict_images + 1, seed=7, size=args.predict_px, split="test")
    frame = pd.DataFrame({"image_id": data.image_ids, "root": str(data.root), "split": "test"})
    model = load_ensemble(str(model_dir))
    model.device = device
    model.predict(None, frame.iloc[:1])  # warm-up: loads the networks
    model.timings = PredictTimings()
    started = time.perf_counter()
    cells = model.predict(None, frame.iloc[1:])
    seconds = time.perf_counter() - started
    n = args.predict_images
    timings = model.timings
    setting = f"{len(members)} networks, {n} x {args.predict_px} px images, {len(cells) / n:.1f} cells/image"
    table.add("hcpl ensemble, end to end", setting, f"{n / seconds:.2f} images/s", ">= 4 images/s")
    shares = ", ".join(f"{stage} {share:.0%}" for stage, share in timings.shares().items())
    table.add("hcpl ensemble, members' stage", f"time shares: {shares}", f"{n / timings.members:.2f} images/s",
              peak=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.sh: no GPU on this machine (torch.cuda.is_available() is False); nothing measured")
        return 0
    device = torch.device(args.device)
    began = time.perf_counter()
    table = Table(device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        bench_families(args, device, table)
        bench_loop(args, device, work, table)
        bench_ensemble(args, device, work, table)
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPUs"
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"
    table.print(f"# bench/gpu.sh: {machine}, torch {torch.__version__}, bf16 autocast + channels_last on CUDA"
                f"{', SMOKE sizes (figures meaningless)' if args.smoke else ''}; {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
