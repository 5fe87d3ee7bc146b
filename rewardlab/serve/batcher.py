"""Dynamic batching across concurrent requests.

Each model has one batcher: a bounded queue of items and a thread that forms batches. A batch starts
when the backend has a free slot (the device, or an idle worker) and the queue holds an item; it then
waits until the oldest item has waited ``max_wait`` or ``max_batch_size`` items are queued, whichever
comes first, and is scored in one forward. Under saturation the queue is already full when a slot frees
up, so batches are full and nothing waits. Results are written back to each request's slice in order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..scoring.scorer import ScoreResult

logger = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue cannot take the request now (HTTP 429, retry later)."""


@dataclass
class _Slice:
    """One request's items for one model; ``future`` resolves to a :class:`ScoreResult` when all are done."""

    size: int
    future: Future = field(default_factory=Future)
    scores: list[float] = field(init=False)
    errors: dict[int, str] = field(default_factory=dict)
    left: int = field(init=False)

    def __post_init__(self) -> None:
        self.scores = [math.nan] * self.size
        self.left = self.size
        self.lock = threading.Lock()

    def fill(self, index: int, score: float, error: str | None) -> None:
        with self.lock:
            self.scores[index] = score
            if error is not None:
                self.errors[index] = error
            self.left -= 1
            done = self.left == 0
        if done:
            # the request may have been cancelled (client gone): never let that break the rest of the batch
            with contextlib.suppress(InvalidStateError):
                self.future.set_result(ScoreResult(self.scores, self.errors))

    def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(exc)


@dataclass
class _Item:
    prompt: str
    image: object
    owner: _Slice
    index: int
    arrived: float


_BATCH_POSITION = re.compile(r"^image #\d+ \(")

RunBatch = Callable[[list[str], list], ScoreResult]


class DynamicBatcher:
    """Queue + batch-forming thread for one model (see the module docstring)."""

    def __init__(self, label: str, run_batch: RunBatch, slots: threading.Semaphore, executor: ThreadPoolExecutor,
                 max_batch_size: int = 32, max_wait_s: float = 0.005, max_queue: int = 1024,
                 on_batch: Callable[[str, int, float], None] | None = None,
                 on_error: Callable[[str, BaseException], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_s >= 0")
        self.label = label
        self.run_batch = run_batch
        self.slots = slots
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda label, size, seconds: None)
        self.on_error = on_error or (lambda label, exc: None)
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.batches: list[int] = []  # sizes of the batches formed (bounded history, for tests and benchmarks)
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{label}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def free(self) -> int:
        return self.max_queue - len(self._queue)

    def submit(self, prompts: list[str], images: list, check: bool = True) -> Future:
        """Queue one request's items; raises :class:`Overloaded` when they do not fit (nothing is queued)."""
        owner = _Slice(len(images))
        if not images:
            owner.future.set_result(ScoreResult([], {}))
            return owner.future
        now = time.monotonic()
        with self._cond:
            if self._stopped:
                raise Overloaded("the server is shutting down")
            if check and len(self._queue) + len(images) > self.max_queue:
                raise Overloaded(f"model {self.label}: {len(self._queue)} items queued, limit {self.max_queue}")
            self._queue.extend(_Item(p, im, owner, i, now) for i, (p, im) in enumerate(zip(prompts, images, strict=True)))
            self._cond.notify_all()
        return owner.future

    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            deadline = self._queue[0].arrived + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(self.max_batch_size, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            return not self._stopped

    def _loop(self) -> None:
        # Wait for an item before taking a slot, so an idle model never holds a worker another model needs.
        while self._wait_for_work():
            self.slots.acquire()
            batch = self._take_batch()
            if batch is None:
                self.slots.release()
                return
            try:
                self.executor.submit(self._run, batch)
            except RuntimeError as exc:  # executor shut down
                self.slots.release()
                self._fail(batch, exc)
                return

    def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            result = self.run_batch([item.prompt for item in batch], [item.image for item in batch])
        except BaseException as exc:
            self.on_error(self.label, exc)
            self._fail(batch, exc)
            return
        finally:
            self.slots.release()
        self.on_batch(self.label, len(batch), time.perf_counter() - started)
        if len(self.batches) < 100_000:
            self.batches.append(len(batch))
        for position, item in enumerate(batch):
            error = result.errors.get(position)
            if error is not None:  # name the item by its position in its own request, not in the batch
                error = _BATCH_POSITION.sub(f"image #{item.index} (", error, count=1)
            item.owner.fill(item.index, result.scores[position], error)

    @staticmethod
    def _fail(batch: list[_Item], exc: BaseException) -> None:
        for item in batch:
            item.owner.fail(exc)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._fail(pending, Overloaded("the server is shutting down"))
        self.slots.release()  # wake the loop if it waits for a slot
        self._thread.join(timeout=5)
