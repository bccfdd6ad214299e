"""What the Ray cluster can offer, and the checks a driver runs before it starts any job.

A cluster launched with ``ray up cluster.yaml`` keeps its launcher config on the head at
``~/ray_bootstrap_config.yaml``: its node types say what the cluster can ever offer, even while
an autoscaling cluster has no worker yet. Without a config, the nodes alive now are all there is.

- :func:`check_jobs_fit`: a job asking for a resource that no node type offers (a GPU on a CPU
  cluster) fails at once with a message that says so, instead of waiting for ever.
- :func:`check_shared`: on more than one node, the tracking URI and the workdir must be places
  every node reaches (an MLflow server, a bucket), not files on the driver's disk.
- :func:`check_cluster_file`: Ray's own validation of a launcher config, no placeholder left, every
  file it mounts present (the MLflow backend store's URI above all), and a head instance profile
  that may launch the workers (read through IAM).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ensemble.storage import is_local

if TYPE_CHECKING:
    from ensemble.zoo import ModelSpec, Zoo

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
PLACEHOLDER = "FILL_IN"
"""Every value of cluster.yaml a user must fill holds this marker."""
MLFLOW_SECRET = "~/.config/hpa-ensemble/mlflow_backend_uri"
"""The local file cluster.yaml mounts on the head as the MLflow backend store's URI."""
HEAD_LAUNCH_ACTIONS = ("ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances", "ec2:TerminateInstances")
"""The EC2 calls Ray 2.60's autoscaler makes from the head (``ray/autoscaler/_private/aws/node_provider.py``);
it also needs ``iam:PassRole`` of each workers' role. docs/aws/head-launch-policy.json grants them."""


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
    """

    node_types: tuple[NodeType, ...]
    autoscaling: bool
    source: str
    nodes_alive: int = 1

    @classmethod
    def from_config(cls, config: dict, source: str, nodes_alive: int = 1) -> ClusterShape:
        """From a launcher config (cluster.yaml after ``ray up``)."""
        types, autoscaling = [], False
        for name, node in (config.get("available_node_types") or {}).items():
            top = int(node.get("max_workers", 0 if name == config.get("head_node_type") else 1))
            autoscaling |= top > int(node.get("min_workers", 0))
            types.append(NodeType(name, {k: float(v) for k, v in (node.get("resources") or {}).items()},
                                  max(top, 1)))
        return cls(tuple(types), autoscaling, source, nodes_alive)

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
    import ray

    connect()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    path = Path(config).expanduser() if config else BOOTSTRAP_CONFIG.expanduser()
    if path.exists():
        return ClusterShape.from_config(yaml.safe_load(path.read_text()), str(path), len(alive))
    if config:
        raise FileNotFoundError(f"cluster config {config} not found")
    types = tuple(NodeType(node["NodeID"][:8], {k: float(v) for k, v in node["Resources"].items()})
                  for node in alive)
    return ClusterShape(types, autoscaling=False, source="the nodes alive now", nodes_alive=len(alive))


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

    An autoscaling cluster gets every job, so the autoscaler sees the whole demand. A fixed one
    gets what its nodes hold: every job waiting in Ray Train holds a driver process and a
    controller actor, which only cost memory when they cannot start.
    """
    if shape.autoscaling:
        return n_jobs
    fits = []
    for spec in zoo.models:
        bundle = job_bundle(spec)
        workers = spec.placement.num_workers
        fits.append(min(int(shape.most(k) // (v * workers)) for k, v in bundle.items() if v > 0))
    return max(1, min(fits))


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


def check_cluster_file(path: str | Path, iam: bool = True) -> list[str]:
    """Problems of a Ray launcher config, each one line with its fix; [] if none.

    Ray's own validation, placeholders left, local files it mounts that are missing or empty
    (:func:`check_mounts`) and, with ``iam`` and no placeholder left, the head's instance profile
    (:func:`check_head_profile`, which asks AWS).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = Path(path).read_text()
    unfilled = [f"{path}:{number}: fill in {line.split('#', 1)[0].strip()}"
                for number, line in enumerate(text.splitlines(), 1)
                if PLACEHOLDER in line.split("#", 1)[0]]
    try:
        validate_config(prepare_config(yaml.safe_load(text)))
    except Exception as error:  # Ray raises jsonschema and plain errors alike
        return [*unfilled, f"{path}: Ray rejects the config: {str(error).splitlines()[0]}"]
    config = yaml.safe_load(text)  # as written: prepare_config fills in defaults
    problems = unfilled + check_mounts(config, path)
    if iam and not unfilled and config["provider"]["type"] == "aws":
        problems += check_head_profile(config, path)
    return problems


def check_mounts(config: dict, path: str | Path) -> list[str]:
    """Local sources of ``file_mounts`` that are missing, or empty files.

    ``ray up`` skips a missing source with a log line, not an error; for the MLflow backend URI
    that means a server on the head's own disk, whose runs ``ray down`` deletes.
    """
    problems = []
    for target, source in (config.get("file_mounts") or {}).items():
        local = Path(source).expanduser()
        if local.is_dir() or (local.is_file() and local.read_text().strip()):
            continue
        state = "is empty" if local.exists() else "does not exist"
        fix = ("write the MLflow backend store's URI to it (postgresql://user:password@host:5432/mlflow), or "
               "MLflow on the head keeps the runs and the registry on its own disk, lost with `ray down`"
               if source == MLFLOW_SECRET else "create it, or remove the mount")
        problems.append(f"{path}: file_mounts {target}: {source} {state}, and `ray up` would mount nothing there: {fix}")
    return problems


def check_head_profile(config: dict, path: str | Path) -> list[str]:
    """Whether the head's instance profile may launch the workers, read from IAM.

    A head that names its own profile does not get Ray's default role (EC2 and S3 full access):
    its role must allow :data:`HEAD_LAUNCH_ACTIONS` and ``iam:PassRole`` of every workers' role.
    Uses the AWS credentials ``ray up`` would use.
    """
    head_type = config["head_node_type"]
    profiles = {name: node["node_config"].get("IamInstanceProfile")
                for name, node in config["available_node_types"].items()}
    head = profiles.pop(head_type)
    if not head:
        return []  # Ray creates its own head role, which may launch anything
    name = _profile_name(head)
    fix = ("attach docs/aws/head-launch-policy.json to its role (docs/aws/README.md), or remove "
           f"IamInstanceProfile from node type {head_type!r} to let Ray create its default head role")
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("iam", region_name=config["provider"].get("region"))

    def roles_of(profile: str) -> list[dict]:
        return client.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]

    try:
        roles = roles_of(name)
        statements = [s for role in roles for s in _role_statements(client, role["RoleName"])]
    except (BotoCoreError, ClientError) as error:
        return [f"{path}: cannot read head instance profile {name!r} from IAM ({error}): give the AWS "
                "credentials `ray up` uses, or check it by hand and run check-cluster --no-iam"]
    if not roles:
        return [f"{path}: head instance profile {name!r} holds no role: {fix}"]
    missing = [action for action in HEAD_LAUNCH_ACTIONS if not _allows(statements, action)]
    for worker, profile in profiles.items():
        if not profile:
            continue
        try:
            arns = [role["Arn"] for role in roles_of(_profile_name(profile))]
        except (BotoCoreError, ClientError) as error:
            return [f"{path}: cannot read instance profile {_profile_name(profile)!r} of node type {worker!r} "
                    f"from IAM ({error}): create it (docs/aws/README.md)"]
        missing += [f"iam:PassRole on {arn} ({worker!r})" for arn in arns if not _allows(statements, "iam:PassRole", arn)]
    if missing:
        return [f"{path}: head instance profile {name!r} does not allow {', '.join(missing)}, so the autoscaler "
                f"could not start a single worker: {fix}"]
    return []


def _profile_name(profile: dict) -> str:
    """The name of an ``IamInstanceProfile`` given as ``{Name: ...}`` or ``{Arn: ...}``."""
    return profile.get("Name") or profile["Arn"].rsplit("/", 1)[-1]


def _role_statements(client, role: str) -> list[dict]:
    """Every policy statement of an IAM role: its inline policies and its attached ones."""
    documents = [client.get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
                 for policy in client.list_role_policies(RoleName=role)["PolicyNames"]]
    for attached in client.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
        version = client.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        documents.append(client.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)
                         ["PolicyVersion"]["Document"])
    statements = []
    for document in documents:
        found = document["Statement"]
        statements += [found] if isinstance(found, dict) else found
    return statements


def _allows(statements: list[dict], action: str, resource: str | None = None) -> bool:
    """Whether IAM statements allow ``action`` (on ``resource``; None: on some resource).

    Actions and resources match as IAM matches them (``*`` and ``?`` wildcards, actions in any
    case); a matching Deny wins. Conditions are not evaluated: a statement with one counts.
    """
    def match(patterns, value: str, fold: bool) -> bool:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        return any(fnmatch.fnmatchcase(value.lower() if fold else value, p.lower() if fold else p) for p in patterns)

    def applies(statement: dict) -> bool:
        acts = (match(statement["Action"], action, True) if "Action" in statement
                else not match(statement.get("NotAction", []), action, True))
        if resource is None:
            return acts
        return acts and (match(statement["Resource"], resource, False) if "Resource" in statement
                         else not match(statement.get("NotResource", []), resource, False))

    effects = {statement["Effect"] for statement in statements if applies(statement)}
    return "Allow" in effects and "Deny" not in effects
