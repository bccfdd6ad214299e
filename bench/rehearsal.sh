#!/usr/bin/env bash
# The user's run rehearsed on this machine (bench/rehearsal.py says what and how):
# Kaggle-shaped data in an S3-protocol bucket, the hcpl zoo submitted with `ray job submit` to a
# head and worker nodes on 127.0.0.1, a real `mlflow server`, then `mlflow models serve` of the
# champion answering a 2048 px image. Needs the project's environment (`make install`).
#
#   bash bench/rehearsal.sh [--images 12] [--image-px 2048] [--workers 2] [--models NAME ...] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" bench/rehearsal.py "$@"
