"""Checks of a Ray launcher config (cluster.yaml) before ``ray up``: ``ensemble check-cluster``.

Ray's own validation, no placeholder left, every file it mounts present (the MLflow backend
store's URI above all), and a head instance profile that may launch the workers (read through IAM).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import yaml

PLACEHOLDER = "FILL_IN"
"""Every value of cluster.yaml a user must fill holds this marker."""
MLFLOW_SECRET = "~/.config/hpa-ensemble/mlflow_backend_uri"
"""The local file cluster.yaml mounts on the head as the MLflow backend store's URI."""
HEAD_LAUNCH_ACTIONS = ("ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances", "ec2:TerminateInstances")
"""The EC2 calls Ray 2.60's autoscaler makes from the head (``ray/autoscaler/_private/aws/node_provider.py``);
it also needs ``iam:PassRole`` of each workers' role. docs/aws/head-launch-policy.json grants them."""


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
