"""Where select_ensemble spends its time: cProfile of one run on bench_select's synthetic OOF.

Profiles the default path (nested, greedy, the competition's objective) on one thread and times
it in CPU seconds, which a busy machine distorts much less than wall time.

    python bench/profile_select.py              # 50 models x 240k cells
    python bench/profile_select.py --cells 1200000
    python bench/profile_select.py --no-nested  # one fit and the baselines, no refits
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from bench_select import families_for

from ensemble.sim.oof import make_synthetic_oof
from ensemble.selectors import select_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--cells", type=int, default=240_000)
    parser.add_argument("--nested", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--top", type=int, default=25, help="functions to print, by cumulative time")
    args = parser.parse_args()
    synthetic = make_synthetic_oof(args.cells // 30, 30, 5, families_for(args.models), seed=0)
    profile = cProfile.Profile(time.process_time)
    profile.runcall(select_ensemble, synthetic.oof, synthetic.labels, nested=args.nested, greedy=True, n_jobs=1)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
