"""Benchmark ``mlflow models serve`` of the registered champion: cold start and per-image latency.

An ensemble of a zoo's models (the quick zoo's by default, all of them, as the demo's champion
has at most; untrained fold networks: speed does not depend on the weights) is registered in a SQLite registry and served with the README's command
(``mlflow models serve -m models:/hpa-ensemble@champion --env-manager local``). One simulated
image of 2048 px, 16-bit, as the Kaggle data has them, is sent as the README's request: its four
channels as base64 PNG text, segmented on the server. Printed:

- cold start: from starting the server to its first ``/ping`` answer (it loads the model, the
  member networks included, before it answers);
- the first request after that, alone;
- the baseline of the same run: one client, requests one after another;
- two clients at once, each sending its requests one after another: each request's latency, and
  images per second over both.

MLflow answers a request that takes longer than its scoring timeout (60 s unless
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` says otherwise) with an error; such requests are
counted. On a shared machine other processes' load moves every figure: the load average is printed.

    python bench/bench_serving.py [--size 2048] [--requests 3] [--folds 3] [--members dsa_regnet ...]
    python bench/bench_serving.py --zoo hcpl --folds 5 --requests 1 --request-timeout 1800  # 45 networks
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
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
from pathlib import Path

import torch

from bench_predict import ensemble_spec
from ensemble.data.segment import create_segmenter
from ensemble.sim.images import simulate
from ensemble.labels import CHANNELS
from ensemble.models import build_model
from ensemble.serving.registry import MemberCheckpoints, register_ensemble
from ensemble.serving.model import Preprocessing
from ensemble.zoo import load_zoo


def register(workdir: Path, zoo_name: str, member_names: list[str], n_folds: int) -> str:
    """Register the ensemble (untrained fold networks) in a SQLite registry; its tracking URI."""
    zoo = load_zoo(zoo_name)
    members = {}
    for name in member_names:
        spec = dataclasses.replace(zoo.model(name), pretrained=False)  # untrained: nothing to download
        folds = {}
        for fold in range(n_folds):
            folds[fold] = workdir / f"{name}-fold{fold}.pt"
            torch.save(build_model(spec).state_dict(), folds[fold])
        members[name] = MemberCheckpoints(spec, folds)
    uri = f"sqlite:///{workdir}/mlflow.db"
    register_ensemble(ensemble_spec([m.spec for m in members.values()]), members,
                      Preprocessing(create_segmenter("classical").describe(), cell_size=zoo.cell_size),
                      tracking_uri=uri, experiment="bench-serving")
    return uri


def request_body(workdir: Path, size: int) -> bytes:
    """One simulated 16-bit image of ``size`` px as the README's request: each channel's PNG file
    as base64 text, as a client holding the Kaggle files sends it."""
    data = simulate(workdir / "data", 1, seed=5, size=size, bit_depth=16, split="test")
    image_id = data.image_ids[0]
    row = {"image_id": image_id, **{c: base64.b64encode((Path(data.root) / "test" / f"{image_id}_{c}.png").read_bytes())
                                    .decode("ascii") for c in CHANNELS}}
    return json.dumps({"dataframe_records": [row]}).encode()


def post(url: str, body: bytes) -> tuple[float, int, str]:
    """Seconds, cells answered (or -1) and the error (or "") of one request."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            cells = len(json.loads(answer.read())["predictions"])
        return time.perf_counter() - start, cells, ""
    except urllib.error.HTTPError as error:
        return time.perf_counter() - start, -1, f"HTTP {error.code}: {error.read()[:200]!r}"


def clients(url: str, body: bytes, n_clients: int, requests: int) -> tuple[list[tuple[float, int, str]], float]:
    """``n_clients`` threads each sending ``requests`` requests in turn: every result, and the wall time."""
    results: list[tuple[float, int, str]] = []
    lock = threading.Lock()

    def client():
        for _ in range(requests):
            result = post(url, body)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def row(path: str, results: list[tuple[float, int, str]], wall: float) -> str:
    seconds = [s for s, _, error in results if not error]
    failed = sum(bool(error) for _, _, error in results)
    if not seconds:
        return f"| {path} | {len(results)} | - | - | - | {failed} |"
    return (f"| {path} | {len(results)} | {statistics.median(seconds):.1f} | {max(seconds):.1f} | "
            f"{len(seconds) / wall:.3f} | {failed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--folds", type=int, default=3, help="fold networks per member")
    parser.add_argument("--zoo", default="quick", help="the zoo whose models are the members (quick, hcpl)")
    parser.add_argument("--members", nargs="+", default=None, help="model names of the zoo (default: all)")
    parser.add_argument("--request-timeout", type=int, default=None,
                        help="MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, seconds (default: MLflow's, 60)")
    args = parser.parse_args()
    args.members = args.members or [m.name for m in load_zoo(args.zoo).models]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        uri = register(workdir, args.zoo, args.members, args.folds)
        body = request_body(workdir, args.size)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        # The README's command, from this environment (MLflow starts `uvicorn` by name from PATH).
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        if args.request_timeout:
            env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(args.request_timeout)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/hpa-ensemble@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None:
                    sys.exit("mlflow models serve exited before answering /ping")
                time.sleep(0.2)
            cold = time.perf_counter() - start
            first = post(url, body)
            alone, alone_wall = clients(url, body, 1, args.requests)
            pair, pair_wall = clients(url, body, 2, args.requests)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)

    networks = len(args.members) * args.folds
    print(f"# mlflow models serve: {args.size} px 16-bit image ({len(body) / 2**20:.0f} MiB request, "
          f"{first[1]} cells), {args.zoo} zoo: {len(args.members)} members x {args.folds} folds = {networks} networks "
          f"({', '.join(args.members)}), classical segmentation on the server; CPU, {os.cpu_count()} cores, "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print(f"cold start (server start to /ping): {cold:.1f} s; first request: {first[0]:.1f} s"
          f"{' (' + first[2] + ')' if first[2] else ''}\n")
    print("| clients | requests | median s/image | max s/image | images/s | failed |")
    print("|---|---|---|---|---|---|")
    print(row("1 (baseline)", alone, alone_wall))
    print(row("2 at once", pair, pair_wall))
    for _, _, error in alone + pair:
        if error:
            print(f"\nfailed: {error}")
            break


if __name__ == "__main__":
    main()
