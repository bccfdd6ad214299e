"""Benchmark the HPA image reader: images/s at 512 and 2048 px, 8- and 16-bit.

Writes fluorescence-like 4-channel images (dark background, smooth bright blobs, shot noise,
so they compress like microscopy rather than like white noise) to a temporary directory, then
times, on the same files:

- ``read_image`` as the pipeline uses it (float32 in [0, 1]) and raw (``dtype=None``);
- decoding the four PNGs alone with Pillow (what ``read_png`` uses) and with OpenCV
  (``cv2.imdecode``), to justify the choice of decoder;
- reading the files' bytes only, the I/O floor (files are in the page cache after the first pass).

Each figure is the best of ``--repeats`` passes over all images, the readers taking turns.
Prints a markdown table.

    python bench/bench_reader.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from ensemble.data.hpa import channel_paths, read_image, read_png
from ensemble.labels import CHANNELS

# (size in px, bits, images written): fewer large images keep the run under a minute.
CASES = [(512, 8, 8), (512, 16, 8), (2048, 8, 3), (2048, 16, 3)]


def fluorescence_channel(rng: np.random.Generator, size: int, bits: int) -> np.ndarray:
    """One synthetic channel: blobs on a dark background with Poisson noise."""
    blobs = ndimage.gaussian_filter(rng.random((size // 16, size // 16)), 1.5)
    image = cv2.resize(blobs, (size, size), interpolation=cv2.INTER_LINEAR)
    image = np.clip((image - image.mean()) * 6, 0, 1) ** 2 + rng.poisson(3, image.shape) / 255
    full_scale = 255 if bits == 8 else 65535
    return (np.clip(image, 0, 1) * 0.8 * full_scale).astype(np.uint8 if bits == 8 else np.uint16)


def write_images(root: Path, size: int, bits: int, count: int) -> list[str]:
    """Write ``count`` images in the Kaggle layout under ``root/train``; return their IDs."""
    rng = np.random.default_rng(size + bits)
    (root / "train").mkdir(parents=True, exist_ok=True)
    ids = [f"s{size}_b{bits}_{i}" for i in range(count)]
    for image_id in ids:
        for path in channel_paths(root, image_id):
            Image.fromarray(fluorescence_channel(rng, size, bits)).save(path)
    return ids


def images_per_second(
    readers: dict[str, Callable[[str], object]], ids: list[str], repeats: int
) -> dict[str, float]:
    """Best-of-``repeats`` throughput of each reader over all ``ids``.

    The readers take turns within each repeat, so a burst of load from other processes on the
    machine slows all of them alike rather than one of them.
    """
    best = dict.fromkeys(readers, float("inf"))
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            for image_id in ids:
                read(image_id)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(ids) / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement (best is kept)")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # PNG decoding is single-threaded in both libraries; compare like with like

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def decode_cv2(image_id: str) -> list[np.ndarray]:
            paths = channel_paths(root, image_id)
            return [cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_UNCHANGED) for p in paths]

        readers = {
            "float32": lambda image_id: read_image(root, image_id),
            "raw": lambda image_id: read_image(root, image_id, dtype=None),
            "pillow": lambda image_id: [read_png(p) for p in channel_paths(root, image_id)],
            "cv2": decode_cv2,
            "bytes": lambda image_id: [Path(p).read_bytes() for p in channel_paths(root, image_id)],
        }
        for size, bits, count in CASES:
            ids = write_images(root, size, bits, count)
            rate = images_per_second(readers, ids, args.repeats)
            megabytes = sum(Path(p).stat().st_size for i in ids for p in channel_paths(root, i)) / len(ids) / 1e6
            rows.append((size, bits, megabytes, rate))

    channels = ", ".join(CHANNELS)
    print(f"Reader throughput: 4 PNGs ({channels}) per image; {os.cpu_count()} CPUs, one thread used.\n")
    print(
        "| size | bits | PNG MB/image | read_image float32 img/s | read_image raw img/s "
        "| Pillow decode img/s | cv2 decode img/s | cv2/Pillow | file bytes only img/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, bits, megabytes, rate in rows:
        print(
            f"| {size} | {bits} | {megabytes:.2f} | {rate['float32']:.1f} | {rate['raw']:.1f} "
            f"| {rate['pillow']:.1f} | {rate['cv2']:.1f} | {rate['cv2'] / rate['pillow']:.2f} "
            f"| {rate['bytes']:.0f} |"
        )


if __name__ == "__main__":
    main()
