"""Training throughput of each backbone family, and the cost of Weibull pooling against average pooling.

For one representative per family of the paper (``family_representatives()``) at its configured
cell size, a CLA model (backbone + Weibull pooling + FC) runs forward+backward on random 4-channel
cells: images/s, and images per CPU-second (all threads together; less sensitive than wall
time to other processes on a shared machine). On the same model's feature map,
Weibull pooling (eq. 2-4) and plain global average pooling each run forward+backward: their time
ratio, and the Weibull's extra time as a share of the whole training step. Prints a markdown
table headed by the machine.

    python bench/bench_models.py                                  # CPU, 2 threads
    python bench/bench_models.py --device cuda --channels-last --bf16 --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time

import torch

from ensemble.models import PAPER_BACKBONES, AvgPool, WeibullPool, create_model
from ensemble.models.backbones import family_representatives


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=8, help="cells per step")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model (after one warm-up step)")
    parser.add_argument("--pool-iters", type=int, default=50, help="timed steps of each pooling")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (fast on GPU)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--families", nargs="*", help="only these families (default: all)")
    return parser.parse_args()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux); ``platform.processor()`` elsewhere."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = cpu_name()
    load = os.getloadavg()[0]  # other processes on a shared machine slow every figure down
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}, load average {load:.1f}"


def time_steps(step, iters: int, device: torch.device) -> tuple[float, float]:
    """Fastest of ``iters`` calls of ``step()``: (wall seconds, process CPU seconds), after one warm-up call.

    Minima, as ``timeit`` reports: on a shared machine other processes only ever slow a step
    down, and CPU seconds (all threads together) less so than wall time.
    """

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    wall, cpu = [], []
    for _ in range(iters):
        sync()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def bench_family(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    size = PAPER_BACKBONES[name]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    model = create_model("cla", name).to(device, memory_format=memory_format).train()
    cells = torch.rand(args.batch, 4, size, size, device=device).to(memory_format=memory_format)

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = model(cells)
        logits.float().mean().backward()

    step_s, step_cpu_s = time_steps(train_step, args.iters, device)

    with torch.no_grad(), autocast:
        features = model.forward_features(cells)
    pool_s = {}
    for pool_name, pool in (("weibull", WeibullPool()), ("avg", AvgPool())):
        pool = pool.to(device)
        leaf = features.detach().requires_grad_(True)

        def pool_step():
            with autocast:
                out = pool(leaf)
            out.float().mean().backward()

        pool_s[pool_name], _ = time_steps(pool_step, args.pool_iters, device)
    return {
        "backbone": name,
        "size": size,
        "images_s": args.batch / step_s,
        "images_cpu_s": args.batch / step_cpu_s,
        "features": "x".join(str(d) for d in features.shape[1:]),
        "pool_ratio": pool_s["weibull"] / pool_s["avg"],
        "weibull_share": (pool_s["weibull"] - pool_s["avg"]) / step_s,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode = ", ".join(
        [f"batch {args.batch}"] + ["channels-last"] * args.channels_last + ["bf16 autocast"] * args.bf16
    )
    print(f"Machine: {machine(device, args.threads)}; {mode}; forward+backward\n")
    print(
        "| family | backbone | cell size | images/s | images per CPU-s | feature map "
        "| Weibull / avg pool time | Weibull extra, % of step |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for family, name in family_representatives().items():
        if args.families and family not in args.families:
            continue
        row = bench_family(name, args, device)
        per_cpu_s = f"{row['images_cpu_s']:.1f}" if device.type == "cpu" else "n/a"  # GPU work is not CPU time
        print(
            f"| {family} | {row['backbone']} | {row['size']} | {row['images_s']:.1f} | {per_cpu_s} "
            f"| {row['features']} "
            f"| {row['pool_ratio']:.1f}x | {100 * row['weibull_share']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
