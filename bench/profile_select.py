"""Where select_ensemble spends its time: cProfile of one run on bench_select's synthetic OOF.

    python bench/profile_select.py              # 50 models x 240k cells, one thread
    python bench/profile_select.py --cells 1200000
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

from bench_select import families_for

from ensemble.selectors import make_synthetic_oof, select_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--cells", type=int, default=240_000)
    parser.add_argument("--top", type=int, default=25, help="functions to print, by cumulative time")
    args = parser.parse_args()
    synthetic = make_synthetic_oof(args.cells // 30, 30, 5, families_for(args.models), seed=0)
    profile = cProfile.Profile()
    profile.runcall(select_ensemble, synthetic.oof, synthetic.labels, nested=False, greedy=False, n_jobs=1)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
