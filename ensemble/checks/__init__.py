"""A run's configuration checked before Ray starts: ``ensemble check`` and ``train-all --dry-run``.

- :mod:`ensemble.checks.training`: the zoo built and run on a batch, its search spaces, the jobs
  it would run and whether the cluster holds them.
- :mod:`ensemble.checks.data`: the dataset, the segmenter's settings and the VID's labels.
"""

from ensemble.checks.data import (INTEGRITY_MODES, check_data, check_segmenter, data_notes, has_truth,
                                  resolve_integrity, truth_note)
from ensemble.checks.training import (JobConfigError, Plan, check_spaces, check_training, check_zoo, head_problem,
                                      preflight_zoo)

__all__ = ["INTEGRITY_MODES", "JobConfigError", "Plan", "check_data", "check_segmenter", "check_spaces",
           "check_training", "check_zoo", "data_notes", "has_truth", "head_problem", "preflight_zoo",
           "resolve_integrity", "truth_note"]
