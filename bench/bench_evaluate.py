"""Benchmark ``ensemble evaluate``: peak memory and seconds per image, 4 against 40 submission images.

Each image is 2048 px with 25 cells, every cell listed for all 19 classes (the submission
``ensemble predict`` writes). The data is drawn directly, to be quick: the truth's 25 cells are
disks cut by their neighbours around a jittered 5 x 5 grid, each with one or two classes; the
prediction is that mask moved by (3, 2) px with random scores. Written once to ``--workdir``:
``truth/masks``, ``truth/cell_labels.csv`` and ``submission.csv`` per image count.

Each run evaluates in a fresh subprocess, after its imports: peak memory is the peak resident set
while ``evaluate`` runs (the kernel's high-water mark, reset through ``/proc/self/clear_refs`` just
before) less the resident set before it, so it counts C allocations (pycocotools, Pillow) too.
The 4-image run is the baseline of the 40-image one; the ratio of their peaks shows whether
memory grows with the number of images.

``--source DIR`` also runs a copy of the package from DIR (first on ``PYTHONPATH``), e.g. the
committed code before evaluation streamed, in the same run::

    mkdir -p /tmp/before && git archive HEAD ensemble | tar -x -C /tmp/before
    python bench/bench_evaluate.py [--images 4 40] [--repeats 2] [--source /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ensemble.labels import NUM_CLASSES
from ensemble.serving.submission import Detection, SubmissionImage, encode_cells, write_submission

CHILD = """
import json, sys, time
from pathlib import Path
import ensemble
from ensemble.serving.evaluate import evaluate

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

submission, root, plot = sys.argv[1:4]
before = status("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
start = time.perf_counter()
result = evaluate(submission, root, plot=plot)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "before_mb": before, "peak_mb": status("VmHWM:") - before,
                  "competition_map": result.competition.map, "cell_map": result.cell.map,
                  "n_images": result.n_images, "package": ensemble.__file__}))
"""


def draw_cells(rng: np.random.Generator, size: int, n_side: int) -> np.ndarray:
    """(size, size) uint16 instance mask: n_side**2 cells around a jittered grid, disks cut where
    they meet (drawn at a quarter of the size and scaled up, which keeps it quick)."""
    small = size // 4
    step = small / n_side
    centres = (np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) + 0.5) * step
    centres += rng.uniform(-0.2, 0.2, centres.shape) * step
    yy, xx = np.mgrid[:small, :small]
    distance = np.hypot(yy[..., None] - centres[:, 0], xx[..., None] - centres[:, 1])
    labels = (distance.argmin(-1) + 1).astype(np.uint16)
    labels[distance.min(-1) > 0.55 * step] = 0
    return labels.repeat(4, axis=0).repeat(4, axis=1)


def write_data(workdir: Path, n_images: int, size: int, n_side: int, seed: int = 0) -> tuple[Path, Path]:
    """A dataset root with truth for ``n_images`` images and their submission CSV."""
    root = workdir / f"data-{n_images}"
    submission = root / "submission.csv"
    if submission.exists():
        return root, submission
    (root / "truth" / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels, images = [], {}
    for k in range(n_images):
        image_id = f"bench{k:04d}"
        mask = draw_cells(rng, size, n_side)
        Image.fromarray(mask).save(root / "truth" / "masks" / f"{image_id}.png")
        ids = np.unique(mask)[1:]
        for cell_id in ids:
            labels.append((image_id, int(cell_id), "|".join(map(str, sorted(rng.choice(NUM_CLASSES, rng.integers(1, 3),
                                                                                       replace=False))))))
        predicted = np.roll(mask, (3, 2), axis=(0, 1))
        scores = np.round(rng.random((len(ids), NUM_CLASSES)), 4)
        images[image_id] = SubmissionImage(size, size, [Detection(c, float(row[c]), text) for text, row in
                                                        zip(encode_cells(predicted, ids), scores) for c in range(NUM_CLASSES)])
    pd.DataFrame(labels, columns=["ID", "cell_id", "Label"]).to_csv(root / "truth" / "cell_labels.csv", index=False)
    write_submission(images, submission)
    return root, submission


def run(root: Path, submission: Path, source: str | None) -> dict:
    """Evaluate in a fresh process (with ``source`` first on the path, if given).

    It runs in the data folder: ``python -c`` puts its working directory first on the path, and
    in a checkout that would be the package beside it, whatever ``source`` says.
    """
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(source).resolve()), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", CHILD, str(submission), str(root), str(root / "plot.png")],
                          env=env, capture_output=True, text=True, check=False, cwd=root)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[4, 40])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells-per-side", type=int, default=5, help="cells per image: its square")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--source", default=None, help="also run the package found in this folder")
    parser.add_argument("--workdir", default=None, help="where the data is written (default: a temporary folder)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-evaluate-"))
    data = {n: write_data(workdir, n, args.size, args.cells_per_side) for n in args.images}
    rows = []
    for label, source in [("this tree", None), *([("--source", args.source)] if args.source else [])]:
        for n in args.images:
            for repeat in range(args.repeats):
                result = run(*data[n], source)
                rows.append({"code": label, "images": n, "repeat": repeat, **result,
                             "s_per_image": result["seconds"] / n})
                print(rows[-1], flush=True)
    assert {r["package"] for r in rows if r["code"] == "this tree"}.isdisjoint(
        r["package"] for r in rows if r["code"] != "this tree"), "--source must run other code"
    table = pd.DataFrame(rows).groupby(["code", "images"], sort=False).agg(
        peak_mb=("peak_mb", "max"), s_per_image=("s_per_image", "median"), competition_map=("competition_map", "first"))
    print(f"\n{args.size} px, {args.cells_per_side ** 2} cells x {NUM_CLASSES} classes per image; "
          f"peak = most extra resident memory over {args.repeats} runs, s/image = median")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    for code, group in table.groupby(level="code", sort=False):
        peaks = group["peak_mb"].droplevel("code")
        print(f"{code}: peak at {max(args.images)} images / at {min(args.images)} images = "
              f"{peaks[max(args.images)] / peaks[min(args.images)]:.2f}x")


if __name__ == "__main__":
    main()
