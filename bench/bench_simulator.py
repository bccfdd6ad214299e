"""Benchmark of the HPA image simulator: images per second at 512 and 2048 px, on one process.

For each size it measures, in the same run:

- ``simulate``: the end-to-end rate (draw, then write 4 channel PNGs, 2 truth masks, the CSVs);
- render: ``simulate_image`` alone, wall and CPU seconds per image;
- baseline: Pillow writing just the four 8-bit channel PNGs of one image of that size, with the
  simulator's encoder settings. Absolute rates move with the machine and its load; the ratio
  render / baseline does not, so compare that across machines.

Usage::

    python bench/bench_simulator.py                 # 8 images at 512 px, 2 at 2048 px
    python bench/bench_simulator.py --sizes 512 --images 20
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from ensemble.sim.images import PNG_OPTIONS, simulate, simulate_image, to_uint
from ensemble.labels import CHANNELS


def machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def bench_size(size: int, n_images: int, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = simulate(Path(tmp) / "sim", n_images, seed=seed, size=size)

        wall, cpu = time.perf_counter(), time.process_time()
        images = [simulate_image([seed, i], size).image for i in range(n_images)]
        render_wall = (time.perf_counter() - wall) / n_images
        render_cpu = (time.process_time() - cpu) / n_images

        wall = time.perf_counter()
        for i, image in enumerate(images):
            pixels = to_uint(image, 8)
            for k, name in enumerate(CHANNELS):
                Image.fromarray(pixels[..., k]).save(Path(tmp) / f"{i}_{name}.png", **PNG_OPTIONS)
        write = (time.perf_counter() - wall) / n_images
    return dict(size=size, n=n_images, rate=result.images_per_second, render=render_wall,
                render_cpu=render_cpu, write=write, cells=result.n_cells / n_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--images", type=int, nargs="+", default=[8, 2],
                        help="images per size (one number for all sizes, or one per size)")
    args = parser.parse_args()
    counts = args.images * len(args.sizes) if len(args.images) == 1 else args.images
    simulate_image(0, 64)  # fit the label sampler and warm the imports outside the timings

    where = machine()
    print(f"machine: {where}")
    print("| machine | size | images | cells/img | simulate img/s | render s/img (wall, cpu) "
          "| baseline: write 4 PNGs s/img | render / baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for size, n in zip(args.sizes, counts):
        r = bench_size(size, n)
        print(f"| {where} | {r['size']} | {r['n']} | {r['cells']:.1f} | {r['rate']:.2f} "
              f"| {r['render']:.3f}, {r['render_cpu']:.3f} | {r['write']:.3f} "
              f"| {r['render'] / r['write']:.2f} |")


if __name__ == "__main__":
    main()
