"""Where the jobs run: the Ray cluster.

- :mod:`ensemble.cluster.shape`: what the cluster offers, whether every job fits it and can reach
  the tracking server and workdir, and how many jobs to hand Ray at once.
- :mod:`ensemble.cluster.launcher`: a launcher config (cluster.yaml) checked before ``ray up``.
"""

from ensemble.cluster.launcher import HEAD_LAUNCH_ACTIONS, MLFLOW_SECRET, check_cluster_file, check_head_profile
from ensemble.cluster.shape import (ClusterShape, NodeType, check_jobs_fit, check_shared, cluster_shape, connect,
                                    default_concurrency, job_bundle)

__all__ = ["HEAD_LAUNCH_ACTIONS", "MLFLOW_SECRET", "ClusterShape", "NodeType", "check_cluster_file",
           "check_head_profile", "check_jobs_fit", "check_shared", "cluster_shape", "connect",
           "default_concurrency", "job_bundle"]
