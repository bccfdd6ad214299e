"""What the Ray cluster can offer, and the checks a driver runs before it starts any job.

A cluster launched with ``ray up cluster.yaml`` keeps its launcher config on the head at
``~/ray_bootstrap_config.yaml``: its node types say what the cluster can ever offer, even while
an autoscaling cluster has no worker yet. Without a config, the nodes alive now are all there is.

- :func:`check_jobs_fit`: a job asking for a resource that no node type offers (a GPU on a CPU
  cluster) fails at once with a message that says so, instead of waiting for ever.
- :func:`check_shared`: on more than one node, the tracking URI and the workdir must be places
  every node reaches (an MLflow server, a bucket), not files on the driver's disk.
- :func:`default_concurrency`: how many jobs to hand Ray at once, from what the nodes hold and
  the memory of the driver's node, where every queued job waits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ensemble.storage import is_local

if TYPE_CHECKING:
    from ensemble.zoo import ModelSpec, Zoo

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
HEAD_BYTES_PER_QUEUED_JOB = 1.55 * 2**30
"""Memory each job handed to Ray holds on the driver's node until it ends, started or waiting:
its task (a process that imports torch), its Ray Train controller and a placement-group cleaner,
1.54 GiB (PSS; median of bench/rehearsal.sh's samples, 90th percentile 1.58) as measured in
BENCHMARKS.md, "The user's run, rehearsed"."""
QUEUE_MEMORY_SHARE = 0.5
"""Of the driver node's available memory, the share queued jobs may hold; the rest is Ray's own
services, the MLflow server of cluster.yaml and the driver's OOF tables."""


@dataclass(frozen=True)
class NodeType:
    """One kind of node: its resources, and how many of it the cluster may run."""

    name: str
    resources: dict[str, float]
    max_workers: int = 1


@dataclass(frozen=True)
class ClusterShape:
    """The node types a cluster has or may start.

    Attributes
    ----------
    node_types : tuple of NodeType
    autoscaling : bool
        True when the launcher config lets the cluster add nodes on demand.
    source : str
        Where the shape came from (the config file, or "the nodes alive now").
    nodes_alive : int
    driver_memory : float
        Bytes available on the driver's node (the head, under ``ray submit``), where every job
        handed to Ray waits; infinite when not known.
    """

    node_types: tuple[NodeType, ...]
    autoscaling: bool
    source: str
    nodes_alive: int = 1
    driver_memory: float = math.inf

    @classmethod
    def from_config(cls, config: dict, source: str, nodes_alive: int = 1,
                    driver_memory: float = math.inf) -> ClusterShape:
        """From a launcher config (cluster.yaml after ``ray up``)."""
        types, autoscaling = [], False
        for name, node in (config.get("available_node_types") or {}).items():
            top = int(node.get("max_workers", 0 if name == config.get("head_node_type") else 1))
            autoscaling |= top > int(node.get("min_workers", 0))
            types.append(NodeType(name, {k: float(v) for k, v in (node.get("resources") or {}).items()},
                                  max(top, 1)))
        return cls(tuple(types), autoscaling, source, nodes_alive, driver_memory)

    def fits(self, bundle: dict[str, float]) -> bool:
        """Whether some node type offers every resource of ``bundle`` at once."""
        return any(all(node.resources.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)
                   for node in self.node_types)

    def most(self, resource: str) -> float:
        """The most of ``resource`` the cluster can hold at once (all nodes at their maximum)."""
        return sum(node.resources.get(resource, 0.0) * node.max_workers for node in self.node_types)

    def describe(self) -> str:
        return ", ".join(f"{n.name} {n.resources}" for n in self.node_types) or "no nodes"


def connect() -> None:
    """Attach to a running cluster (``ray submit``, ``ray job submit``, ``ray start``) or start a local one.

    Workers' own logs stay in Ray's log directory unless ENSEMBLE_WORKER_LOGS=1: progress bars and
    MLflow carry what a user follows, and failures still reach the driver as exceptions.
    """
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=os.environ.get("ENSEMBLE_WORKER_LOGS") == "1")


def cluster_shape(config: str | Path | None = None) -> ClusterShape:
    """The shape of the Ray cluster this process is attached to (``ray.init`` done).

    Parameters
    ----------
    config : str or Path, optional
        A launcher config; default the head's ``~/ray_bootstrap_config.yaml`` when present, else
        the nodes alive now.
    """
    import psutil
    import ray

    connect()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    memory = psutil.virtual_memory().available  # this process runs on the node its jobs queue on
    path = Path(config).expanduser() if config else BOOTSTRAP_CONFIG.expanduser()
    if path.exists():
        return ClusterShape.from_config(yaml.safe_load(path.read_text()), str(path), len(alive), memory)
    if config:
        raise FileNotFoundError(f"cluster config {config} not found")
    types = tuple(NodeType(node["NodeID"][:8], {k: float(v) for k, v in node["Resources"].items()})
                  for node in alive)
    return ClusterShape(types, autoscaling=False, source="the nodes alive now", nodes_alive=len(alive),
                        driver_memory=memory)


def job_bundle(spec: ModelSpec) -> dict[str, float]:
    """The resources one Ray Train worker of ``spec`` asks for."""
    placement = spec.placement
    return {"CPU": float(placement.cpus_per_worker),
            **({"GPU": float(placement.gpus_per_worker)} if placement.use_gpu else {})}


def check_jobs_fit(zoo: Zoo, shape: ClusterShape) -> None:
    """Raise if a model of ``zoo`` asks for more than any node of the cluster can ever offer."""
    for spec in zoo.models:
        bundle = job_bundle(spec)
        if not shape.fits(bundle):
            hint = ("" if shape.source != "the nodes alive now" else
                    "; if the cluster autoscales, pass its launcher config (--cluster-config cluster.yaml)")
            raise ValueError(f"model {spec.name!r} asks for {bundle} per worker, which no node type of this "
                             f"cluster offers ({shape.source}: {shape.describe()}): change its placement "
                             f"(use_gpu, cpus_per_worker) or the cluster{hint}")


def default_concurrency(zoo: Zoo, shape: ClusterShape, n_jobs: int) -> int:
    """How many jobs to hand Ray at once when the user does not say.

    Every job handed to Ray holds a task, a Ray Train controller and a placement-group cleaner on
    the driver's node until it ends, started or waiting (:data:`HEAD_BYTES_PER_QUEUED_JOB` each). An autoscaling cluster
    gets as many as the driver's node holds in :data:`QUEUE_MEMORY_SHARE` of its memory, up to
    every job, so the autoscaler sees as much demand as can wait. A fixed one gets at most what
    its nodes run at once: a job that cannot start only costs memory.
    """
    queue = n_jobs
    if math.isfinite(shape.driver_memory):
        queue = max(1, min(n_jobs, int(shape.driver_memory * QUEUE_MEMORY_SHARE // HEAD_BYTES_PER_QUEUED_JOB)))
    if shape.autoscaling:
        return queue
    fits = []
    for spec in zoo.models:
        bundle = job_bundle(spec)
        workers = spec.placement.num_workers
        fits.append(min(int(shape.most(k) // (v * workers)) for k, v in bundle.items() if v > 0))
    return max(1, min(*fits, queue))


def check_shared(shape: ClusterShape, tracking_uri: str, workdir: str) -> None:
    """On a cluster of more than one node, the tracking URI and workdir must reach every node."""
    if shape.nodes_alive <= 1 and not shape.autoscaling:
        return
    nodes = "an autoscaling cluster" if shape.autoscaling else f"a cluster of {shape.nodes_alive} nodes"
    if re.match(r"(sqlite|file):", tracking_uri) or "://" not in tracking_uri:
        raise ValueError(f"MLflow tracking URI {tracking_uri} is a file on this machine, but this is {nodes}: "
                         "workers on other nodes would write their runs to their own disks. Run an MLflow server "
                         "(cluster.yaml starts one on the head) and pass --tracking-uri http://HEAD:5000 or set "
                         "MLFLOW_TRACKING_URI")
    if is_local(workdir):
        raise ValueError(f"workdir {workdir} is a local path, but this is {nodes}: the store, checkpoints and OOF "
                         "tables must be where every node reads them; give --workdir s3://BUCKET/runs (or gs://)")
