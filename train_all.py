"""Train a whole zoo, select its ensemble and register it: the entry point of `ray submit`.

    ray submit cluster.yaml train_all.py -- --zoo hcpl --data s3://BUCKET/hpa --workdir s3://BUCKET/runs
    python train_all.py                     # the built-in default: simulated data, the quick zoo, local Ray
    python train_all.py --zoo hcpl --data DATA --dry-run   # every check but the model builds, in seconds

Every option is that of `ensemble train-all` (see `ensemble train-all --help`), ``--integrity
on|off|auto`` among them: on data without cell truth (Kaggle's) the VID needs the zoo's
``integrity.labels_csv``, and this is said before any image is read.
"""

import sys

from ensemble.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train-all", *sys.argv[1:]]))
