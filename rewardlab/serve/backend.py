"""Where batches are scored: in this process (one device), or in one worker process per device.

Both run a whole batch with :meth:`Scorer.score_detailed` and ``batch_size=len(batch)`` (one forward),
so served scores equal direct ``Scorer`` scores for the same batch composition. A worker that dies
fails its in-flight batch with :class:`WorkerCrashed` (HTTP 503) and is restarted with backoff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..scoring.scorer import ScoreResult
from .protocol import pack_items, read_frame, write_frame

logger = logging.getLogger(__name__)


class WorkerCrashed(RuntimeError):
    """The worker scoring a batch died; its items fail with HTTP 503 and it is restarted."""


class Unavailable(RuntimeError):
    """No worker can take work (all failed to start, or the server is shutting down)."""


def model_info(label: str, scorer) -> dict:
    spec = scorer.spec
    return {"id": label, "name": spec.name, "architecture": spec.architecture, "device": str(scorer.device),
            "dtype": str(scorer.dtype).replace("torch.", ""), "uses_prompt": spec.uses_prompt,
            "output": spec.normalization, "score_range": getattr(spec, "score_range", "")}


def load_models(models: Sequence[str], device: str | None, dtype: str | None) -> dict[str, object]:
    """{label: Scorer} for each model (``NAME``, ``NAME:WEIGHT`` or a checkpoint path; weights are ignored
    here), labels made distinct."""
    from ..scoring.ensemble import distinct_labels, parse_reward
    from ..scoring.loader import load

    scorers = [load(parse_reward(m).model, device=device, dtype=dtype) for m in models]
    labels = distinct_labels([s.label for s in scorers])
    return dict(zip(labels, scorers, strict=True))


def score_batch(scorer, prompts: list[str], items: list) -> ScoreResult:
    """One forward over the batch; unreadable items come back as per-item errors."""
    return scorer.score_detailed(prompts, items, batch_size=max(1, len(items)))


class InProcessBackend:
    """Scorers loaded in the server process; one batch at a time per model."""

    def __init__(self, scorers: dict[str, object]):
        self.scorers = scorers
        self.models = [model_info(label, s) for label, s in scorers.items()]
        self.names = {label: s.name for label, s in scorers.items()}
        self._slots = {label: threading.Semaphore(1) for label in scorers}
        self.restarts = 0

    def slots(self, label: str) -> threading.Semaphore:
        return self._slots[label]

    @property
    def capacity(self) -> int:
        return 1

    def run(self, label: str, prompts: list[str], items: list) -> ScoreResult:
        return score_batch(self.scorers[label], prompts, items)

    def healthy(self) -> dict:
        return {"ok": True, "workers": [{"device": m["device"], "alive": True} for m in self.models[:1]]}

    def close(self) -> None:
        pass


@dataclass
class WorkerSpec:
    models: list[str]
    device: str
    dtype: str | None = None
    start_timeout: float = 600.0
    threads: int | None = None  # torch threads (CPU workers share the cores)


class Worker:
    """One ``python -m rewardlab.serve.worker`` process speaking length-prefixed JSON frames on stdin/stdout."""

    def __init__(self, spec: WorkerSpec, index: int):
        self.spec = spec
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.models: list[dict] = []
        self.failures = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        command = [sys.executable, "-m", "rewardlab.serve.worker", "--device", self.spec.device,
                   "--models", json.dumps(self.spec.models)]
        if self.spec.dtype:
            command += ["--dtype", self.spec.dtype]
        if self.spec.threads:
            command += ["--threads", str(self.spec.threads)]
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        ready: dict = {}
        result: list = []

        def wait_ready() -> None:
            try:
                result.append(read_frame(self.proc.stdout)[0])
            except Exception as exc:  # EOF: the worker died while loading
                result.append(exc)

        reader = threading.Thread(target=wait_ready, daemon=True)
        reader.start()
        reader.join(self.spec.start_timeout)
        if not result or isinstance(result[0], Exception) or "models" not in result[0]:
            self.stop()
            detail = result[0] if result else f"no answer in {self.spec.start_timeout:.0f} s"
            raise WorkerCrashed(f"worker on {self.spec.device} failed to start ({detail}); see its log above")
        ready = result[0]
        self.models = ready["models"]
        logger.info("worker %d (pid %d) ready on %s", self.index, self.proc.pid, self.spec.device)

    def run(self, label: str, prompts: list[str], items: list) -> ScoreResult:
        if not self.alive():
            raise WorkerCrashed(f"worker on {self.spec.device} is not running")
        records, payload = pack_items(items)
        try:
            write_frame(self.proc.stdin, {"model": label, "prompts": prompts, "items": records}, payload)
            reply, _ = read_frame(self.proc.stdout)
        except (EOFError, OSError, ValueError) as exc:
            raise WorkerCrashed(f"worker on {self.spec.device} (pid {self.pid}) died during a batch ({exc})") from None
        if "error" in reply:
            raise RuntimeError(f"worker on {self.spec.device}: {reply['error']}")
        scores = [float("nan") if s is None else float(s) for s in reply["scores"]]
        return ScoreResult(scores, {int(k): v for k, v in reply["errors"].items()})

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WorkerPool:
    """One worker process per device behind one queue of idle workers; any worker scores any model."""

    def __init__(self, models: Sequence[str], devices: Sequence[str], dtype: str | None = None,
                 start_timeout: float = 600.0, max_restart_delay: float = 30.0):
        if not devices:
            raise ValueError("a worker pool needs at least one device")
        cpu_workers = sum(1 for d in devices if d == "cpu")
        cpu_threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
        self.workers = [Worker(WorkerSpec(list(models), d, dtype, start_timeout, cpu_threads if d == "cpu" else None), i)
                        for i, d in enumerate(devices)]
        self.max_restart_delay = max_restart_delay
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._slots = threading.Semaphore(len(self.workers))
        self._closed = False
        self.restarts = 0
        self.on_restart = lambda: None
        errors = []
        threads = [threading.Thread(target=self._start_one, args=(w, errors)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]
        self.models = self.workers[0].models
        self.names = {m["id"]: m["name"] for m in self.models}

    def _start_one(self, worker: Worker, errors: list) -> None:
        try:
            worker.start()
            self._idle.put(worker)
        except Exception as exc:
            errors.append(exc)

    @property
    def capacity(self) -> int:
        return len(self.workers)

    def slots(self, label: str) -> threading.Semaphore:
        return self._slots  # shared by all models: one batch per worker at a time

    def run(self, label: str, prompts: list[str], items: list) -> ScoreResult:
        if self._closed:
            raise Unavailable("the server is shutting down")
        worker = self._idle.get()
        try:
            if not worker.alive():
                self._restart(worker)  # died while idle: nothing was in flight
            return worker.run(label, prompts, items)
        except WorkerCrashed:
            threading.Thread(target=self._restart_and_release, args=(worker,), daemon=True).start()
            worker = None
            raise
        finally:
            if worker is not None:
                self._idle.put(worker)

    def _restart_and_release(self, worker: Worker) -> None:
        try:
            self._restart(worker)
        finally:
            self._idle.put(worker)

    def _restart(self, worker: Worker) -> None:
        """Restart until it is up (exponential backoff, capped), unless the pool is closing."""
        delay = 0.5
        while not self._closed:
            worker.stop()
            self.restarts += 1
            self.on_restart()
            logger.warning("restarting worker %d on %s", worker.index, worker.spec.device)
            try:
                worker.start()
                worker.failures = 0
                if self._closed:  # closed while it was starting
                    worker.stop()
                return
            except WorkerCrashed as exc:
                worker.failures += 1
                logger.error("%s; retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(self.max_restart_delay, delay * 2)

    def healthy(self) -> dict:
        states = [{"device": w.spec.device, "pid": w.pid, "alive": w.alive()} for w in self.workers]
        return {"ok": any(s["alive"] for s in states), "workers": states}

    def close(self) -> None:
        self._closed = True
        for worker in self.workers:
            worker.stop()
