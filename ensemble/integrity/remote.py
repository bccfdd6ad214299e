"""The VID fitted where the zoo's jobs run: one Ray task with the zoo's placement (a GPU on a
cluster), not in the driver process, which on a cluster is the head's CPU.

The task writes its results under a folder of the workdir (shared storage on a cluster), and the
driver reads them back: the held-out table marks the cross-validation done and the model's
``config.json`` the final fit, so a re-run resumes after whichever finished.
"""

from __future__ import annotations

import json

import ray

from ensemble.integrity.model import IntegrityCV, IntegrityModel, cross_validate_integrity
from ensemble.storage import exists, join, read_bytes, read_parquet, write_bytes, write_parquet
from ensemble.zoo import IntegritySettings, Placement


def fit_integrity(store: str, root: str, settings: IntegritySettings, placement: Placement) -> tuple[IntegrityCV, str]:
    """Cross-validate and fit the VID of ``settings`` on ``store`` in a Ray task placed as ``placement``.

    Parameters
    ----------
    store : str
        The cell store (a path or URL every node reaches).
    root : str
        Where the results go (``{workdir}/integrity``): ``scores.parquet``, ``capture.json`` and
        ``heldout.parquet`` of the cross-validation, and the fitted model in ``model/``.
    settings : IntegritySettings
    placement : Placement
        The task's resources: ``cpus_per_worker`` CPUs and, with ``use_gpu``, ``gpus_per_worker``
        GPUs; its torch threads are ``torch_threads``, else one per CPU.

    Returns
    -------
    cv : IntegrityCV
        The held-out results.
    model_uri : str
        The fitted :class:`~ensemble.integrity.IntegrityModel` (packed with the ensemble).
    """
    cv_uri, model_uri = join(root, "heldout.parquet"), join(root, "model")
    if not (exists(cv_uri) and exists(join(model_uri, "config.json"))):
        task = ray.remote(num_cpus=placement.cpus_per_worker,
                          num_gpus=placement.gpus_per_worker if placement.use_gpu else 0)(_fit)
        threads = placement.torch_threads or max(1, int(placement.cpus_per_worker))
        ray.get(task.remote(store, root, settings, threads))
    # The table's index (the score's name) is a column in the file: write_parquet keeps no index.
    scores = read_parquet(join(root, "scores.parquet")).set_index("score")
    return IntegrityCV(scores=scores, cells=read_parquet(cv_uri),
                       capture_accuracy=json.loads(read_bytes(join(root, "capture.json")))["accuracy"]), model_uri


def _fit(store: str, root: str, settings: IntegritySettings, threads: int) -> None:
    """The task: the parts of the cross-validation and the final fit not yet under ``root``."""
    import torch

    torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to 1 in a task
    params = dict(backbone=settings.backbone, pretrained=settings.pretrained, epochs=settings.epochs,
                  rule=settings.rule)
    cv_uri, model_uri = join(root, "heldout.parquet"), join(root, "model")
    if not exists(cv_uri):
        cv = cross_validate_integrity(store, n_splits=settings.cv_splits, labels_csv=settings.labels_csv, **params)
        write_parquet(cv.scores.reset_index(), join(root, "scores.parquet"))
        write_bytes(json.dumps({"accuracy": cv.capture_accuracy}).encode(), join(root, "capture.json"))
        write_parquet(cv.cells, cv_uri)  # last: its presence marks the cross-validation done
    if not exists(join(model_uri, "config.json")):
        IntegrityModel(**params).fit(store, labels_csv=settings.labels_csv).save(model_uri)
