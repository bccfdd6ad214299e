"""Benchmark segmentation quality on the simulator: how many true cells the segmenter recovers.

For each case (difficulty, image size) simulates images in memory and segments them with the
default :class:`~ensemble.data.segment.ClassicalSegmenter`, then reports, with
:func:`~ensemble.data.segment.match_cells` at the competition's mask IoU of 0.6:

- matched: share of true cells matched (the target is >= 90 % on ``medium``);
- with nucleus: the same over true cells whose nucleus is in view (the others are slivers of
  cells cut by the image edge, found only through the edge seeds);
- mean IoU of the matched pairs; false cells (unmatched predictions) per image; seconds per image.

    python bench/bench_segment_quality.py [--images 30] [--images-2048 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ensemble.data.segment import ClassicalSegmenter, match_cells
from ensemble.sim.images import simulate_image


def evaluate(segmenter, difficulty: str, size: int, n_images: int) -> dict:
    matched = n_true = with_nucleus = matched_with_nucleus = false_cells = 0
    ious, seconds = [], 0.0
    for index in range(n_images):
        sim = simulate_image([99, index], size=size, difficulty=difficulty)
        start = time.perf_counter()
        seg = segmenter(sim.image)
        seconds += time.perf_counter() - start
        matches = match_cells(seg.cells, sim.cell_mask, iou=0.6)
        hits = matches.true_id[matches.matched]
        nucleated = np.setdiff1d(np.unique(sim.nucleus_mask), [0])
        matched += len(hits)
        n_true += matches.n_true
        with_nucleus += len(nucleated)
        matched_with_nucleus += np.isin(hits, nucleated).sum()
        false_cells += matches.false_cells
        ious += list(matches.iou[matches.matched])
    return {
        "matched": matched / n_true,
        "with nucleus": matched_with_nucleus / with_nucleus,
        "mean IoU": float(np.mean(ious)),
        "false cells/image": false_cells / n_images,
        "true cells/image": n_true / n_images,
        "s/image": seconds / n_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30, help="images per difficulty at 512 px")
    parser.add_argument("--images-2048", type=int, default=8, help="medium images at 2048 px")
    args = parser.parse_args()
    segmenter = ClassicalSegmenter()
    cases = [(d, 512, args.images) for d in ("easy", "medium", "hard")] + [("medium", 2048, args.images_2048)]
    print("| difficulty | px | images | matched (IoU >= 0.6) | with nucleus in view | mean IoU "
          "| false cells/image | true cells/image | s/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for difficulty, size, n_images in cases:
        r = evaluate(segmenter, difficulty, size, n_images)
        print(f"| {difficulty} | {size} | {n_images} | {r['matched']:.1%} | {r['with nucleus']:.1%} "
              f"| {r['mean IoU']:.3f} | {r['false cells/image']:.2f} | {r['true cells/image']:.1f} "
              f"| {r['s/image']:.2f} |")


if __name__ == "__main__":
    main()
