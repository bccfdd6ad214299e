"""Rehearse the user's run on one machine: Kaggle-shaped data, the hcpl zoo, a Ray cluster, a bucket.

What a user does with the real data, each step with the real part that does it:

1. data as Kaggle gives it: 16-bit PNGs of 2048 px and ``train.csv``, no cell truth
   (``ensemble simulate --kaggle``), copied into a bucket (an S3-protocol server, moto's);
2. a real ``mlflow server`` (runs in SQLite, artifacts in the bucket) and a Ray cluster of a head
   that only schedules (no CPU, as the launcher's head) and worker nodes, each ``ray start`` on
   127.0.0.1 with its own temp dir;
3. ``train_all.py`` submitted with ``ray job submit``, data and workdir ``s3://``, the hcpl zoo's
   own models, heads, cell sizes and folds; what this machine cannot do is changed and said:
   no pretrained weights (no download here), CPU workers of one core, ``--epochs 1``, batches
   and DSA bags of 8 cells; CRA rounds as ``--relabel-rounds`` says (nested CRA is 40 DSA jobs a round);
4. the cluster stopped (``ray down``), then the champion served with ``mlflow models serve`` from
   the registry through the same MLflow server and bucket, answering a 2048 px 16-bit image,
   one client and then two at once.

Printed: the wall time of each stage, and the memory of the head node's processes (PSS, every
process the head's ``ray start`` started, the driver included) against the jobs queued on it.
Every job handed to Ray holds a task, a Train controller and a placement-group cleaner on the
driver's node until it ends: their PSS per queued job is the figure that
``ensemble.cluster.shape.HEAD_BYTES_PER_QUEUED_JOB`` carries.

    bash bench/rehearsal.sh [--images 12] [--image-px 2048] [--max-concurrent 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import yaml

from bench_serving import clients, post, request_body, row

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "hpa"
GIB = 2**30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list, env: dict, log: Path) -> subprocess.Popen:
    """A server in a process group of its own, so that stopping it stops only it."""
    return subprocess.Popen([str(c) for c in command], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)  # then killed: a graceful Ray stop can take half a minute
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None, ok_only: bool = True) -> None:
    """Until ``url`` answers 200 (or, without ``ok_only``, answers at all: 401 without a token)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError:
            if not ok_only:
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            sys.exit(f"{process.args[:4]} exited before {url} answered")
        time.sleep(1)
    sys.exit(f"{url} did not answer within {timeout} s")


def rehearsal_zoo(path: Path, batch_size: int, models: list[str] | None = None) -> Path:
    """hcpl.yaml with what this machine cannot do changed: no pretrained weights, CPU workers,
    ``batch_size`` cells per step, and DSA bags of that many cells (16 cells of 256 px through
    EfficientNet-B4 take 5 GB to train on a CPU: two at once and the rest do not fit in 24 GB).
    ``models`` keeps only the zoo's models of those names, in the zoo's order."""
    zoo = yaml.safe_load((REPO / "ensemble" / "zoos" / "hcpl.yaml").read_text())
    if models:
        unknown = sorted(set(models) - {m["name"] for m in zoo["models"]})
        if unknown:
            sys.exit(f"--models: not in the hcpl zoo: {', '.join(unknown)}")
        zoo["models"] = [m for m in zoo["models"] if m["name"] in models]
    zoo["description"] = "the hcpl zoo as bench/rehearsal.py runs it on CPU, without pretrained weights"
    zoo["placement"] = {"use_gpu": False, "cpus_per_worker": 1, "num_workers": 1, "loader_workers": 0}
    zoo["train"]["batch_size"] = batch_size
    for model in zoo["models"]:
        model["pretrained"] = False
        model.setdefault("train", {})["batch_size"] = batch_size
        if model["head"] == "dsa":
            model["cells_per_image"] = batch_size
    zoo["integrity"]["pretrained"] = False
    path.write_text(yaml.safe_dump(zoo, sort_keys=False))
    return path


@dataclass
class Cluster:
    """A head without CPU and worker nodes of one CPU each, all ``ray start`` on 127.0.0.1."""

    work: Path
    env: dict
    n_workers: int
    processes: list = field(default_factory=list)

    def up(self) -> None:
        port, dashboard = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
        self.head = start([BIN / "ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
                           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                           "--disable-usage-stats", f"--temp-dir={self.work}/head", *self.ports(20000)],
                          self.env, self.work / "head.log")
        self.processes.append(self.head)
        wait_for(f"{self.dashboard}/api/version", 300, self.head, ok_only=False)
        for i in range(1, self.n_workers + 1):
            self.processes.append(start([BIN / "ray", "start", "--block", f"--address={self.gcs}", "--num-cpus=1",
                                         "--disable-usage-stats", f"--temp-dir={self.work}/worker{i}",
                                         *self.ports(20000 + 1000 * i)], self.env, self.work / f"worker{i}.log"))
        probe = (f"import ray; ray.init(address={self.gcs!r}, log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = subprocess.run([str(BIN / "python"), "-c", probe], env=self.env, capture_output=True, text=True)
            if done.stdout.strip().splitlines()[-1:] == [str(self.n_workers + 1)]:
                return
            time.sleep(2)
        sys.exit(f"{self.n_workers} worker nodes did not join within 300 s")

    @staticmethod
    def ports(first_worker_port: int) -> list[str]:
        """Every port a node opens, its own: several nodes share this machine."""
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--min-worker-port={first_worker_port}", f"--max-worker-port={first_worker_port + 999}"]

    def job(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "ray"), "job", *args[:1], "--address", self.dashboard, *args[1:]],
                              env=self.env, capture_output=True, text=True, timeout=300)
        done.stdout += done.stderr  # the CLI says some things on one, some on the other
        return done

    def down(self) -> None:
        for process in reversed(self.processes):
            stop(process)


# The processes each job handed to Ray holds on the driver's node until it ends.
PER_JOB = ("ray::fit_job", "ray::TrainController", "ray::PlacementGroupCleaner")


@dataclass
class HeadSample:
    seconds: float
    pss: int          # bytes, every process of the head node
    queued: int       # jobs handed to Ray and not ended: their tasks on the driver's node
    controllers: int  # Ray Train controllers on the head
    job_pss: int      # bytes, the processes of PER_JOB


def sample_head(head: subprocess.Popen, started: float) -> HeadSample:
    pss = queued = controllers = job_pss = 0
    for process in [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]:
        try:
            own = process.memory_full_info().pss
            title = " ".join(process.cmdline()[:1])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += own
        job_pss += own if title.startswith(PER_JOB) else 0
        queued += title.startswith("ray::fit_job")
        controllers += title.startswith("ray::TrainController")
    return HeadSample(time.monotonic() - started, pss, queued, controllers, job_pss)


def watch_head(head: subprocess.Popen, started: float, samples: list, done: threading.Event, every: float) -> None:
    while not done.wait(every):
        samples.append(sample_head(head, started))


def job_stages(uri: str, experiment: str, submitted: float, ended: float) -> dict[str, float]:
    """Stages of the driver from its MLflow runs (wall clock, seconds)."""
    from mlflow.tracking import MlflowClient

    from ensemble import tracking

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    jobs = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "job"]
    first, last = min(r.info.start_time for r in jobs) / 1e3, max(r.info.end_time for r in jobs) / 1e3
    return {"checks and prepare (submit to the first job's run)": first - submitted,
            f"training ({len(jobs)} jobs)": last - first,
            "selection and registration (last job to the driver's end)": ended - last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--image-px", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2, help="worker nodes, one CPU each")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="cells per step, and a DSA's bag")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="only these models of the zoo (default: all nine; on one 24 GB machine the two "
                             "ResNet-200d jobs that train at once do not fit beside the head and the bucket)")
    parser.add_argument("--relabel-rounds", type=int, default=0, help="CRA rounds (the zoo's: 2)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="jobs queued on the head at once")
    parser.add_argument("--requests", type=int, default=1, help="requests per serving client")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples of the head's memory")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, samples)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rehearsal-", dir="/tmp"))  # short: Ray's socket paths have a limit
    zoo = rehearsal_zoo(work / "hcpl-rehearsal.yaml", args.batch_size, args.models)  # an unknown --models name: now
    # Stopped (Ctrl-C, kill), it still stops the servers and nodes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped; logs in {work}"))

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from ensemble.sim.images import simulate

    stages: dict[str, float] = {}
    clock = time.monotonic()

    def stage(name: str) -> None:
        nonlocal clock
        stages[name] = time.monotonic() - clock
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {stages[name]:.1f} s", flush=True)
        clock = time.monotonic()

    data = simulate(work / "data", n_images=args.images, seed=3, size=args.image_px, bit_depth=16, truth=False)
    stage(f"simulate {args.images} Kaggle-shaped images ({args.image_px} px, 16-bit, no truth)")

    s3_port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port)
    moto.start()
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(aws)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    s3fs.S3FileSystem().put(f"{data.root}/", f"{BUCKET}/data/", recursive=True)
    stage("copy the data into the bucket")

    # One machine holds the head, the workers and the bucket: Ray's memory monitor, which sees the
    # whole machine from each node, would kill jobs at its default 95 %.
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_memory_usage_threshold": "0.98"}
    mlflow_port = free_port()
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    mlflow_server = start([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", mlflow_port,
                           "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                           "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"], env, work / "mlflow.log")
    cluster = Cluster(work, env, args.workers)
    serve = None
    try:
        wait_for(f"{tracking_uri}/health", 300, mlflow_server)
        cluster.up()
        stage(f"start mlflow server and Ray ({args.workers} worker nodes)")

        samples = [sample_head(cluster.head, time.monotonic())]
        submitted = time.time()
        done = cluster.job("submit", "--no-wait", "--submission-id", "rehearsal", "--",
                           str(BIN / "python"), str(REPO / "train_all.py"), "--zoo", str(zoo),
                           "--data", f"s3://{BUCKET}/data", "--workdir", f"s3://{BUCKET}/runs",
                           "--tracking-uri", tracking_uri, "--epochs", str(args.epochs),
                           "--relabel-rounds", str(args.relabel_rounds), "--max-concurrent", str(args.max_concurrent))
        if done.returncode:
            sys.exit(f"ray job submit failed:\n{done.stdout[-3000:]}")
        ended = threading.Event()
        watcher = threading.Thread(target=watch_head, args=(cluster.head, time.monotonic(), samples, ended, args.every))
        watcher.start()
        while True:
            status = cluster.job("status", "rehearsal").stdout
            if re.search(r"succeeded|failed|stopped", status, re.I):  # "Job 'rehearsal' succeeded"
                break
            time.sleep(10)
        ended.set()
        watcher.join()
        finished = time.time()
        (work / "train_all.log").write_text(cluster.job("logs", "rehearsal").stdout)
        if not re.search("succeeded", status, re.I):
            sys.exit(f"train_all did not succeed:\n{status[-1000:]}\nlog: {work / 'train_all.log'}")
        stage("ray job submit train_all.py, to its end")
        driver = job_stages(tracking_uri, "hcpl", submitted, finished)
        cluster.down()
        stage("ray down")

        # Served from the registry alone: the MLflow server on the same database and bucket.
        serve_port = free_port()
        url = f"http://127.0.0.1:{serve_port}"
        body = request_body(work / "request", args.image_px)
        serve_env = {**env, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "1800",
                     "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")])}
        started = time.monotonic()
        serve = start([BIN / "python", "-m", "mlflow", "models", "serve", "-m", "models:/hpa-ensemble@champion",
                       "--env-manager", "local", "-h", "127.0.0.1", "-p", serve_port], serve_env, work / "serve.log")
        wait_for(f"{url}/ping", 1800, serve)
        cold = time.monotonic() - started
        first = post(url, body)
        alone, alone_wall = clients(url, body, 1, args.requests)
        pair, pair_wall = clients(url, body, 2, args.requests)
    finally:
        if serve is not None:
            stop(serve)
        cluster.down()
        stop(mlflow_server)
        moto.stop()

    print(f"\n# Rehearsal: {args.images} images of {args.image_px} px, 16-bit, no truth; hcpl zoo"
          f"{' (' + ', '.join(args.models) + ')' if args.models else ''} "
          f"(no pretrained weights, CPU, --epochs {args.epochs}, batch {args.batch_size}, "
          f"--relabel-rounds {args.relabel_rounds}, --max-concurrent {args.max_concurrent}); "
          f"head (0 CPU) + {args.workers} worker nodes of 1 CPU; {os.cpu_count()} cores\n")
    print("| stage | wall s |\n|---|---|")
    for name, seconds in {**stages, **{f"- {k}": v for k, v in driver.items()}}.items():
        print(f"| {name} | {seconds:.0f} |")

    queued = np.array([s.queued for s in samples])
    pss = np.array([s.pss for s in samples]) / GIB
    slope, intercept = np.polyfit(queued, pss, 1) if len(set(queued)) > 1 else (float("nan"), pss.mean())
    print(f"\nHead node memory (PSS of its processes, {len(samples)} samples every {args.every:.0f} s): idle "
          f"{pss[0]:.2f} GiB; peak {pss.max():.2f} GiB with {queued[pss.argmax()]} jobs queued; "
          f"most jobs queued {queued.max()} (Train controllers on the head: up to "
          f"{max(s.controllers for s in samples)}); least squares: {intercept:.2f} GiB + {slope:.3f} GiB per queued job")
    busy = [s for s in samples if s.queued]
    per_job = statistics.median(s.job_pss / s.queued for s in busy) / GIB if busy else float("nan")
    print(f"Per queued job (its task, Train controller and placement-group cleaner on the head, PSS): "
          f"median {per_job:.2f} GiB over {len(busy)} samples")
    for n in sorted(set(queued)):
        print(f"  {n:3d} queued: median {statistics.median(pss[queued == n]):.2f} GiB over {int((queued == n).sum())} samples")

    print(f"\nServing after ray down (mlflow models serve, registry through the MLflow server): cold start "
          f"(start to /ping) {cold:.0f} s; first request {first[0]:.1f} s ({first[1]} cells){' ' + first[2] if first[2] else ''}\n")
    print("| clients | requests | median s/image | max s/image | images/s | failed |\n|---|---|---|---|---|---|")
    print(row("1 (baseline)", alone, alone_wall))
    print(row("2 at once", pair, pair_wall))
    with (work / "head_samples.csv").open("w") as out:
        out.write("seconds,pss_bytes,queued,controllers,job_pss_bytes\n")
        out.writelines(f"{s.seconds:.1f},{s.pss},{s.queued},{s.controllers},{s.job_pss}\n" for s in samples)
    print(f"\nlogs and samples: {work}" if args.keep else "")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
