"""Load test of `rewardlab serve` on 127.0.0.1 against scoring directly in one process.

    python benchmarks/serve_load.py                    # tiny random BLIP reward (seconds)
    python benchmarks/serve_load.py --full             # full-size random ImageReward (CPU: minutes)

On a CPU shared with other work, pass ``--threads 1``: torch's OpenMP threads spin-wait on each other,
and a preempted thread can make a forward pass 10-40x slower, which drowns any comparison.

Phases (each bounded by --requests and --time-limit):
1. direct: the scorer in this process scores all C x R x K images in batches of --max-batch-size;
2. served 1x: C client threads each send R requests of K uint8 images (POST /v1/score/npy);
3. served 10x: 10 x C client threads (at least one request each), retrying 429 answers after Retry-After;
4. direct again; the faster direct run is the baseline (other load on a shared machine drifts).
Reported: images/s (served vs direct), mean batch size formed (from /metrics), p50/p99 latency, peak
server RSS per phase, 429 count, and lost / misordered responses (every answer is checked against the
direct score of its own images, |diff| <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

import rewardlab
from rewardlab.serve.protocol import encode_npy_body
from rewardlab.testing import make_random_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_checkpoint(folder: Path, full: bool) -> str:
    if full:
        return make_random_checkpoint(folder / "imagereward-random.safetensors",
                                      spec=rewardlab.get_spec("imagereward-v1.0"), seed=0)
    return make_random_checkpoint(folder / "tiny.safetensors", seed=0)


class RssSampler:
    """Peak resident memory of a process (and its children), sampled every 20 ms."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss + sum(c.memory_info().rss for c in self.process.children(True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def batch_metrics(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    total = sum(float(v) for v in re.findall(r"^rewardlab_batch_size_sum\{[^}]*\} (\S+)", text, re.M))
    count = sum(float(v) for v in re.findall(r"^rewardlab_batch_size_count\{[^}]*\} (\S+)", text, re.M))
    return total, count


def run_clients(url: str, jobs: list[tuple[list[str], np.ndarray, list[float]]], clients: int, deadline: float) -> dict:
    """Send the jobs from ``clients`` threads; check every answer against its expected scores. A 429 is
    retried after its ``Retry-After`` (as a well-behaved client does) until ``deadline``; a request
    without a 200 answer by then is lost."""
    latencies, rejected, lost, wrong = [], [0], [0], [0]
    lock = threading.Lock()
    queue = list(range(len(jobs)))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    index = queue.pop(0)
                prompts, images, expected = jobs[index]
                body = encode_npy_body({"prompts": prompts}, images)
                started = time.perf_counter()
                response = None
                while time.monotonic() < deadline:
                    try:
                        response = http.post("/v1/score/npy", content=body)
                    except httpx.HTTPError:
                        response = None
                        break
                    if response.status_code != 429:
                        break
                    with lock:
                        rejected[0] += 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                seconds = time.perf_counter() - started
                with lock:
                    if response is None or response.status_code != 200:
                        lost[0] += 1
                        continue
                    scores = next(iter(response.json()["scores"].values()))
                    if any(s is None for s in scores) or not np.allclose(scores, expected, atol=1e-4, rtol=0):
                        wrong[0] += 1
                    latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"wall_s": wall, "ok": len(latencies), "ok_images": sum(len(jobs[0][0]) for _ in latencies), "lost": lost[0], "misordered": wrong[0], "rejected_429": rejected[0],
            "p50_ms": float(np.percentile(lat, 50) * 1000), "p99_ms": float(np.percentile(lat, 99) * 1000)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size random ImageReward instead of the tiny model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="requests per client (1x phase)")
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--overload", type=int, default=10, help="client multiplier of the overload phase")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args()
    end = time.monotonic() + args.time_limit
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on kill
    folder = Path(tempfile.mkdtemp(prefix="serve_load."))
    try:
        return run(args, folder, end)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, folder: Path, end: float) -> int:
    checkpoint = build_checkpoint(folder, args.full)
    rng = np.random.RandomState(0)
    total_requests = args.clients * args.requests
    jobs_images = [(rng.rand(args.images, args.size, args.size, 3) * 255).astype(np.uint8) for _ in range(total_requests)]
    jobs_prompts = [[f"prompt {(r * args.images + i) % 7}" for i in range(args.images)] for r in range(total_requests)]

    # 1. direct, in this process, batches of max_batch_size
    flat_images = [image for batch in jobs_images for image in batch]
    flat_prompts = [p for prompts in jobs_prompts for p in prompts]
    n_images = len(flat_images)

    def score_directly() -> tuple[list[float], float]:
        scorer = rewardlab.load(checkpoint, device="cpu")
        scorer.score(flat_prompts[: args.max_batch_size], flat_images[: args.max_batch_size],
                     batch_size=args.max_batch_size)  # warm-up
        started = time.perf_counter()
        scores = scorer.score(flat_prompts, flat_images, batch_size=args.max_batch_size)
        return scores, time.perf_counter() - started

    direct, direct_s = score_directly()
    jobs = [(jobs_prompts[r], jobs_images[r], direct[r * args.images:(r + 1) * args.images]) for r in range(total_requests)]

    # 2./3. the server in its own process
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    command = [sys.executable, "-m", "rewardlab.cli", "serve", "--model", checkpoint, "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--max-batch-size", str(args.max_batch_size),
               "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(args.max_queue)]
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(command, env=env)
    results = {}
    try:
        while time.monotonic() < end:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit("the server exited during start-up")
            time.sleep(0.2)
        run_clients(url, jobs[: args.clients], args.clients, end)  # warm-up
        for name, clients in (("1x", args.clients), (f"{args.overload}x", args.clients * args.overload)):
            # the overload phase keeps every client busy: at least one request each (jobs repeated)
            phase_jobs = [jobs[i % len(jobs)] for i in range(max(len(jobs), clients))]
            before = batch_metrics(url)
            with RssSampler(server.pid) as rss:
                phase = run_clients(url, phase_jobs, clients, end)
            after = batch_metrics(url)
            phase["mean_batch"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            phase["peak_rss_mb"] = rss.peak / 2**20
            phase["images_per_s"] = phase["ok_images"] / phase["wall_s"]  # answered images only
            phase["clients"] = clients
            results[name] = phase
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()

    _, direct_again_s = score_directly()  # again after the server phases: load on a shared machine drifts
    direct_runs = (n_images / direct_s, n_images / direct_again_s)
    direct_s = min(direct_s, direct_again_s)  # the faster run: a conservative baseline
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    direct_rate = n_images / direct_s
    print(f"model: {'full-size random ImageReward' if args.full else 'tiny random BLIP reward'}; CPU: {cpu}, "
          f"{os.cpu_count()} cores; {n_images} images of {args.size}px, {args.images} per request")
    print(f"direct (one process, batches of {args.max_batch_size}): {direct_rate:.3g} images/s "
          f"(faster of two runs: {direct_runs[0]:.3g} before, {direct_runs[1]:.3g} after the served phases)")
    for name, phase in results.items():
        print(f"served {name:>4} ({phase['clients']:3d} clients): {phase['images_per_s']:.3g} images/s "
              f"= {phase['images_per_s'] / direct_rate:.0%} of direct (of the slower direct run: "
              f"{phase['images_per_s'] / min(direct_runs):.0%}); mean batch {phase['mean_batch']:.1f}; "
              f"p50 {phase['p50_ms']:.0f} ms, p99 {phase['p99_ms']:.0f} ms; peak server RSS {phase['peak_rss_mb']:.0f} MiB; "
              f"429s {phase['rejected_429']}; lost {phase['lost']}, misordered {phase['misordered']}")
    print(json.dumps({"direct_images_per_s": direct_rate, "direct_runs": direct_runs, "phases": results}))
    bad = sum(p["lost"] + p["misordered"] for p in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
