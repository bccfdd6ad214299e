"""Training input at the hcpl zoo's scale: cells/s from memory, local disk and a slow bucket.

What is timed is the job's own training input (``trainers.loop.train_loader``: read, augment,
collate, in the hcpl placement's 5 loader workers, batches of 64, the hcpl zoo's augmentation at
its cell size of 256 px), iterated without a model. Inputs, epochs interleaved so that they share
the machine's load:

- ``memory``: ``placement.in_memory``, crops read into memory up front (the baseline);
- ``local disk``: the store on local disk, read by :class:`~ensemble.data.datasets.CellStream`;
- ``bucket``: the same store served over HTTP with a fixed delay per request (``--delay-ms``, an
  object store's time to first byte), read by range requests, no cache;
- ``bucket + node cache``: the same, with the node-local shard cache (``CellStore(shard_cache=)``):
  the first epoch downloads whole shards, later ones read the node's copies;
- ``per-cell reads (before)``: one range request per cell, the input as it was, on
  ``--before-cells`` cells of the bucket (one epoch; it is slow).

Each epoch is also charged the CPU seconds (user + system) of the whole process tree: the loader
workers, the main process and the server in it. On a machine shared with other work, wall-clock
cells/s follow the load; CPU seconds per cell do not, and on a CPU-bound input they set what 2
idle cores would give.

The bucket is :class:`DelayedRangeServer`, an HTTP server of the store's folder that sleeps
``--delay-ms`` before answering each request and sends the bytes with ``sendfile``. Why this and
not moto or nginx behind a relaying proxy: moto spends 80-220 ms of its own CPU on one range of a
large object (BENCHMARKS.md), and a relaying proxy copies every byte through Python; both take
their time from the same 2 cores as the input under test, which an object store's servers do
not. Here the kernel copies the bytes and the delay costs no CPU, so what the input loses against
memory is its own doing: its requests' latency and its client's work. The server counts requests
and bytes, reported per epoch.

Then the store size of the full Kaggle training set from the measured bytes per cell, beside the
GPU node's disk in cluster.yaml, and the bytes a job reads from the bucket with and without the
cache.

    flock /tmp/pytest.lock .venv/bin/python bench/bench_ingest.py              # ~5 min on 2 cores
    .venv/bin/python bench/bench_ingest.py --images 8 --epochs 2 --cell-size 64  # the code paths
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import os
import re
import tempfile
import threading
import time
from pathlib import Path

KAGGLE_IMAGES = 21_806  # HPA single-cell classification, train.csv
KAGGLE_CELLS_PER_IMAGE = 25  # about, with HPACellSegmentator's masks


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files with ``Range`` (206 answers via sendfile), folders as link lists (fsspec's ls)."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as they do with S3

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        server = self.server
        time.sleep(server.delay)
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            with server.lock:
                server.requests += 1
            super().do_GET() if body else super().do_HEAD()
            return
        size = os.path.getsize(path)
        start, stop = 0, size
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start, stop = int(match[1]), min(size, int(match[2]) + 1 if match[2] else size)
        self.send_response(206 if match else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(stop - start))
        if match:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        with server.lock:
            server.requests += 1
            server.bytes += (stop - start) if body else 0
        if body:
            with open(path, "rb") as file:
                while start < stop:
                    start += os.sendfile(self.connection.fileno(), file.fileno(), start, stop - start)


class DelayedRangeServer(http.server.ThreadingHTTPServer):
    """Serve ``root`` over HTTP on 127.0.0.1 with ``delay_ms`` per request; counts requests and body bytes.

    ``with DelayedRangeServer(root, 30) as server:`` serves from a thread; ``server.url`` is its address.
    """

    daemon_threads = True

    def __init__(self, root: str | Path, delay_ms: float):
        super().__init__(("127.0.0.1", 0), lambda *a: _RangeHandler(*a, directory=str(root)))
        self.delay, self.lock, self.requests, self.bytes = delay_ms / 1000, threading.Lock(), 0, 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that closes its kept-alive connection (a loader worker ending) is no error here

    def counts(self) -> tuple[int, int]:
        """Requests and body bytes served so far."""
        with self.lock:
            return self.requests, self.bytes

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=72, help="simulated 512 px images in the store")
    parser.add_argument("--cell-size", type=int, default=256, help="the store's crop side (hcpl: 256)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each input, interleaved")
    parser.add_argument("--delay-ms", type=float, default=30.0, help="the bucket's delay per request")
    parser.add_argument("--workers", type=int, default=5, help="loader workers (the hcpl placement's 5)")
    parser.add_argument("--batch", type=int, default=64, help="cells per batch (the hcpl zoo's CLA batch)")
    parser.add_argument("--before-cells", type=int, default=128, help="cells of the per-cell-read epoch (0: skip)")
    parser.add_argument("--workdir", help="where data, store and cache go (default: a new temporary directory)")
    return parser.parse_args(argv)


def build_store(work: Path, images: int, cell_size: int) -> str:
    import ray

    from ensemble.data.store_build import prepare
    from ensemble.sim.images import simulate

    store = work / "bucket" / "store"
    if not (store / "cells.parquet").exists():
        simulate(work / "data", images, seed=0, size=512)
        ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
        try:
            prepare(str(work / "data"), str(store), cell_size=cell_size, n_folds=5, progress=False)
        finally:
            ray.shutdown()
    return str(store)


def node_disk_gib() -> int:
    """The GPU worker's root volume in cluster.yaml."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    return int(config["available_node_types"]["gpu_worker"]["node_config"]["BlockDeviceMappings"][0]["Ebs"]
               ["VolumeSize"])


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children (loader workers) so far."""
    import psutil

    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from ensemble.data.datasets import CellDataset, make_loader
    from ensemble.data.store import CellStore
    from ensemble.trainers.loop import start_epoch, train_loader
    from ensemble.zoo import load_zoo

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    path = build_store(work, args.images, args.cell_size)
    local = CellStore(path)
    rows = np.flatnonzero(local.cells["fold"].to_numpy() != 0)  # a job's training folds
    hcpl = load_zoo("hcpl").model("cla_effb4")
    spec = dataclasses.replace(hcpl, cell_size=args.cell_size,
                               train=dataclasses.replace(hcpl.train, batch_size=args.batch),
                               placement=dataclasses.replace(hcpl.placement, loader_workers=args.workers, use_gpu=False))
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    with DelayedRangeServer(work / "bucket", args.delay_ms) as server:
        remote = f"{server.url}/store"
        cache = work / "cache"
        inputs = {
            "memory": train_loader(local, rows, dataclasses.replace(
                spec, placement=dataclasses.replace(spec.placement, in_memory=True)), cpu),
            "local disk": train_loader(local, rows, spec, cpu),
            "bucket": train_loader(CellStore(remote), rows, spec, cpu),
            "bucket + node cache": train_loader(CellStore(remote, shard_cache=cache), rows, spec, cpu),
        }
        results = {name: [] for name in inputs}  # per epoch: seconds, cells, requests, bytes, CPU seconds
        print(f"load average at the start: {os.getloadavg()[0]:.1f}", flush=True)
        for epoch in range(args.epochs):
            # Every other epoch in reverse order, so that a load that drifts during an epoch
            # favours no input.
            for name, loader in list(inputs.items())[::1 if epoch % 2 == 0 else -1]:
                start_epoch(loader, epoch)
                requests, sent = server.counts()
                cpu, started, cells = tree_cpu_seconds(), time.perf_counter(), 0
                for batch in loader:
                    cells += len(batch["index"])
                seconds = time.perf_counter() - started
                cpu = tree_cpu_seconds() - cpu
                after = server.counts()
                results[name].append((seconds, cells, after[0] - requests, after[1] - sent, cpu))
                print(f"epoch {epoch} {name:>20}: {cells / seconds:7.0f} cells/s, {after[0] - requests:5d} requests, "
                      f"{(after[1] - sent) / 2**20:8.1f} MiB, {1000 * cpu / cells:6.2f} CPU ms/cell, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        inputs.clear()  # stop their workers before the slow epoch below
        before = None
        if args.before_cells:
            dataset = CellDataset(CellStore(remote), rows=rows[:args.before_cells])
            loader = make_loader(dataset, batch_size=args.batch, workers=args.workers)
            requests, _ = server.counts()
            started = time.perf_counter()
            cells = sum(len(batch["index"]) for batch in loader)
            before = (cells / (time.perf_counter() - started), server.counts()[0] - requests, cells)

    shards = sorted((Path(path) / "crops").glob("shard-*.npy"))
    shard_bytes = sum(p.stat().st_size for p in shards)
    table_bytes = (Path(path) / "cells.parquet").stat().st_size
    per_cell = (shard_bytes + table_bytes) / len(local)
    memory = results["memory"]

    def rate(epochs) -> float:
        return sum(e[1] for e in epochs) / sum(e[0] for e in epochs)

    def cpu_ms(epochs) -> float:
        return 1000 * sum(e[4] for e in epochs) / sum(e[1] for e in epochs)

    def ratio(epochs) -> float:
        """Median over the later epochs of cells/s against the memory input's in the same epoch."""
        return float(np.median([(e[1] / e[0]) / (m[1] / m[0]) for e, m in zip(epochs, memory[later])]))

    later = slice(1, None) if args.epochs > 1 else slice(None)  # epoch 0 starts workers (and fills the cache)
    baseline = rate(memory[later])
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"\nstore: {len(local)} cells of {len(np.unique(local.cells['image_id']))} images, {len(shards)} shards, "
          f"{args.cell_size} px; job's training rows {len(rows)}; {args.workers} loader workers, batch {args.batch}, "
          f"augment {spec.train.augment}; bucket delay {args.delay_ms:.0f} ms per request; {os.cpu_count()} CPUs")
    print("| input | epoch 1 cells/s | later epochs cells/s | x memory (median of later epochs) "
          "| CPU ms per cell (later) | x memory by CPU cost | requests per epoch (1st, later) "
          "| MiB from the bucket per epoch (1st, later) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, epochs in results.items():
        first, rest = epochs[0], epochs[later]
        print(f"| {name} | {first[1] / first[0]:.0f} | {rate(rest):.0f} | {ratio(rest):.2f} | {cpu_ms(rest):.2f} | "
              f"{cpu_ms(memory[later]) / cpu_ms(rest):.2f} | "
              f"{first[2]}, {np.mean([e[2] for e in rest]):.0f} | {first[3] / 2**20:.0f}, "
              f"{np.mean([e[3] for e in rest]) / 2**20:.0f} |")
    if before:
        print(f"| per-cell reads (before), {before[2]} cells, 1 epoch | {before[0]:.0f} | | "
              f"{before[0] / baseline:.3f} (vs memory's later epochs) | | | {before[1]} | |")
    kaggle = KAGGLE_IMAGES * KAGGLE_CELLS_PER_IMAGE * per_cell
    store_mib = (shard_bytes + table_bytes) / 2**20
    print(f"\nmeasured bytes per cell: {per_cell:,.0f} ({shard_bytes / len(local):,.0f} crop, "
          f"{table_bytes / len(local):,.0f} table); this store {store_mib:.0f} MiB")
    print(f"Kaggle training set: {KAGGLE_IMAGES:,} images x {KAGGLE_CELLS_PER_IMAGE} cells x {per_cell:,.0f} B = "
          f"{kaggle / 2**30:.0f} GiB; GPU node disk in cluster.yaml: {node_disk_gib()} GiB")
    for name in ("bucket", "bucket + node cache"):
        total = sum(e[3] for e in results[name]) / 2**20
        print(f"{name}: {total:.0f} MiB from the bucket over {args.epochs} epochs = "
              f"{total / store_mib:.2f} x the store")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
