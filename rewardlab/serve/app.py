"""The FastAPI application of ``rewardlab serve`` and the scoring service behind it.

Endpoints: ``POST /v1/score`` (JSON, base64 images or allowed-root paths), ``POST /v1/score/npy`` (a JSON
header line + an ``.npy`` uint8 batch), ``POST /get_reward`` (OpenRLHF), ``GET /v1/models``,
``GET /healthz``, ``GET /metrics`` (Prometheus). Status codes: 400 bad items (every bad item listed in
``errors``), 401 missing/wrong token, 413 too large, 422 bad JSON schema, 429 queue full (``Retry-After``),
503 a worker died during the batch or none is up (``Retry-After``), 500 a scoring bug.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool

from ..scoring.ensemble import NORMALIZATIONS, Calibration, combine, stats_by_label
from ..scoring.scorer import ScoreResult
from .backend import Unavailable, WorkerCrashed
from .batcher import DynamicBatcher, Overloaded
from .protocol import (
    RequestError,
    RewardRequest,
    ScoreRequest,
    check_prompts,
    decode_base64_images,
    first_error,
    parse_npy_body,
    resolve_paths,
)

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class ServeConfig:
    """Limits and behaviour of the server (the ``rewardlab serve`` options)."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024  # queued items per model; beyond: 429
    max_requests: int = 256  # requests being read, parsed or waiting; beyond: 429 before the body is read
    max_body_bytes: int = 64 << 20
    max_inflight_bytes: int = 1 << 30  # request bodies held at once, all requests together; beyond: 429
    max_items: int = 256  # images per request
    max_image_side: int = 4096  # .npy height/width limit
    allowed_root: Path | None = None
    token: str | None = None
    retry_after_s: int = 1
    normalize: str = "none"
    weights: dict[str, float] = field(default_factory=dict)  # default weights of "avg"
    calibration: Mapping[str, Calibration] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_requests", "max_body_bytes", "max_inflight_bytes",
                     "max_items", "max_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_items > self.max_queue:
            raise ValueError(f"max_items ({self.max_items}) must not exceed max_queue ({self.max_queue}): "
                             "such a request could never be queued")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError("max_wait_ms must be within 0..10000")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}")


class ScoringService:
    """Backend + one dynamic batcher per model + admission control + metrics."""

    def __init__(self, backend, config: ServeConfig | None = None):
        self.backend = backend
        self.config = config or ServeConfig()
        self.labels = [m["id"] for m in backend.models]
        self.names = dict(backend.names)
        unknown = set(self.config.weights) - set(self.labels)
        if unknown:
            raise ValueError(f"default weights for unknown models {sorted(unknown)}")
        self.stats = stats_by_label(self.labels, [self.names[label] for label in self.labels], self.config.calibration)
        self._setup_metrics()
        self.executor = ThreadPoolExecutor(max_workers=max(1, backend.capacity * len(self.labels)),
                                           thread_name_prefix="score")
        self.batchers = {
            label: DynamicBatcher(label, partial(backend.run, label), backend.slots(label), self.executor,
                                  self.config.max_batch_size, self.config.max_wait_ms / 1000.0, self.config.max_queue,
                                  on_batch=self._observe_batch, on_error=self._observe_batch_error)
            for label in self.labels}
        for label, batcher in self.batchers.items():
            self.m_queue.labels(label).set_function(lambda b=batcher: b.depth)
        backend.on_restart = self.m_restarts.inc
        self._admission = threading.Lock()
        self._active = 0
        self._body_bytes = 0  # bytes of request bodies currently held

    # -- metrics ------------------------------------------------------------------------------------------
    def _setup_metrics(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_queue = Gauge("rewardlab_queue_depth", "Items waiting for a batch", ["model"], registry=r)
        self.m_active = Gauge("rewardlab_requests_in_flight", "Requests being read, queued or scored", registry=r)
        self.m_batch = Histogram("rewardlab_batch_size", "Items per forward pass", ["model"], buckets=BATCH_BUCKETS,
                                 registry=r)
        self.m_batch_seconds = Histogram("rewardlab_batch_seconds", "Seconds per batch (decode + forward)", ["model"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.m_latency = Histogram("rewardlab_request_seconds", "Request latency", ["endpoint"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.m_items = Counter("rewardlab_items", "Images scored", ["model"], registry=r)
        self.m_errors = Counter("rewardlab_errors", "Errors by kind", ["kind"], registry=r)
        self.m_restarts = Counter("rewardlab_worker_restarts", "Worker restarts", registry=r)

    def _observe_batch(self, label: str, size: int, seconds: float) -> None:
        self.m_batch.labels(label).observe(size)
        self.m_batch_seconds.labels(label).observe(seconds)
        self.m_items.labels(label).inc(size)

    def _observe_batch_error(self, label: str, exc: BaseException) -> None:
        self.m_errors.labels("worker_crash" if isinstance(exc, WorkerCrashed) else "batch").inc()
        if not isinstance(exc, (WorkerCrashed, Overloaded, Unavailable)):
            logger.error("batch of %s failed: %s: %s", label, type(exc).__name__, exc)

    # -- requests -----------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        token = self.config.token
        if not token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise RequestError(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @asynccontextmanager
    async def handling(self, request: Request, endpoint: str):
        """Auth, then admission (429 before the body is read when too many requests are in flight)."""
        started = time.perf_counter()
        try:
            self.check_auth(request)
            with self._admission:
                if self._active >= self.config.max_requests:
                    raise RequestError(429, f"{self._active} requests in flight; retry later",
                                       headers={"Retry-After": str(self.config.retry_after_s)})
                self._active += 1
        except RequestError as exc:
            self.m_errors.labels("overload" if exc.status == 429 else "request").inc()
            raise
        self.m_active.inc()
        request.state.body_bytes = 0
        try:
            yield
        except RequestError as exc:
            self.m_errors.labels("overload" if exc.status == 429 else "request").inc()
            raise
        finally:
            with self._admission:
                self._active -= 1
                self._body_bytes -= request.state.body_bytes
            self.m_active.dec()
            self.m_latency.labels(endpoint).observe(time.perf_counter() - started)

    def _reserve(self, request: Request, size: int) -> None:
        """Count ``size`` more body bytes against the in-flight budget (429 when it is spent)."""
        with self._admission:
            if self._body_bytes + size > self.config.max_inflight_bytes:
                raise RequestError(429, "too many request bytes in flight; retry later",
                                   headers={"Retry-After": str(self.config.retry_after_s)})
            self._body_bytes += size
            request.state.body_bytes += size

    async def read_body(self, request: Request) -> bytes:
        """The body, within ``max_body_bytes`` (413) and the in-flight byte budget (429)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, "bad Content-Length header") from None
            if size > limit:
                raise RequestError(413, f"body of {size} bytes; the limit is {limit}")
            self._reserve(request, size)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"body larger than the limit of {limit} bytes")
            if declared is None or total > int(declared):
                self._reserve(request, len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)

    def resolve_models(self, requested: Sequence[str] | None) -> list[str]:
        if not requested:
            return list(self.labels)
        by_name = {}
        for label in self.labels:
            by_name.setdefault(self.names[label], label)
        out, unknown = [], []
        for model in requested:
            label = model if model in self.batchers else by_name.get(model)
            (out if label else unknown).append(label or model)
        if unknown:
            raise RequestError(400, f"unknown model(s) {', '.join(map(repr, unknown))}; this server has "
                                    f"{', '.join(self.labels)}")
        if len(set(out)) != len(out):
            raise RequestError(400, "a model is listed twice")
        return out

    def resolve_weights(self, labels: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
        if weights is None:
            return {label: self.config.weights.get(label, 1.0) for label in labels}
        resolved = {}
        for key, value in weights.items():
            label = self.resolve_models([key])[0]
            if label not in labels:
                raise RequestError(400, f"weight for {key!r}, which is not among the requested models")
            if not math.isfinite(value):
                raise RequestError(400, f"weight for {key!r} is not finite")
            resolved[label] = float(value)
        return {label: resolved.get(label, 1.0) for label in labels}

    def submit(self, labels: list[str], prompts: list[str], items: list) -> dict[str, asyncio.Future]:
        """Queue the items with every model, all or nothing (429 when any queue is full)."""
        with self._admission:
            full = [label for label in labels if self.batchers[label].free() < len(items)]
            if full:
                self.m_errors.labels("overload").inc()
                raise RequestError(429, f"queue full for {', '.join(full)}; retry later",
                                   headers={"Retry-After": str(self.config.retry_after_s)})
            return {label: asyncio.wrap_future(self.batchers[label].submit(prompts, items, check=False))
                    for label in labels}

    async def score(self, labels: list[str], prompts: list[str], items: list) -> dict[str, ScoreResult]:
        if not self.backend.healthy()["ok"]:
            raise RequestError(503, "no worker is running; retry later", headers={"Retry-After": "5"})
        futures = self.submit(labels, prompts, items)
        try:
            results = await asyncio.gather(*futures.values())
        except WorkerCrashed as exc:
            raise RequestError(503, f"{exc}; it is being restarted, retry the request",
                               headers={"Retry-After": str(self.config.retry_after_s)}) from None
        except (Overloaded, Unavailable) as exc:
            raise RequestError(503, str(exc), headers={"Retry-After": str(self.config.retry_after_s)}) from None
        except Exception as exc:
            raise RequestError(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        return dict(zip(futures, results, strict=True))

    def respond(self, labels: list[str], results: dict[str, ScoreResult], weights: dict[str, float],
                with_avg: bool, started: float) -> dict:
        count = len(next(iter(results.values())).scores)
        errors: dict[int, str] = {}
        for label in labels:
            result = results[label]
            for index, message in result.errors.items():
                errors.setdefault(index, message)
            for index, value in enumerate(result.scores):
                if index not in errors and not math.isfinite(value):
                    errors[index] = f"model {label} returned a non-finite score for item {index}"
        if errors:
            self.m_errors.labels("item").inc(len(errors))
        scores = {label: [None if i in errors else results[label].scores[i] for i in range(count)] for label in labels}
        out: dict = {"scores": scores}
        if with_avg:
            good = [i for i in range(count) if i not in errors]
            avg: list = [None] * count
            if good:
                total = combine({label: [results[label].scores[i] for i in good] for label in labels}, weights,
                                self.config.normalize, self.stats)
                for i, value in zip(good, total.tolist(), strict=True):
                    avg[i] = value
            out["avg"] = avg
        out["errors"] = {str(i): errors[i] for i in sorted(errors)}
        out["duration"] = time.perf_counter() - started
        return out

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.backend.close()


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValueError as exc:
        raise RequestError(422, f"bad request body: {first_error(exc)}") from None


def create_app(service: ScoringService) -> FastAPI:
    """The ASGI app; ``service`` is kept in ``app.state.service``."""
    from .. import __version__

    app = FastAPI(title="rewardlab serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        async with service.handling(request, "/v1/score"):
            started = time.perf_counter()
            body = await service.read_body(request)

            def parse(data: bytes) -> tuple:
                req = _parse(ScoreRequest, data)
                if (req.images is None) == (req.paths is None):
                    raise RequestError(400, "give either 'images' (base64) or 'paths', not both or neither")
                raw = req.images if req.images is not None else req.paths
                prompts = check_prompts(req.prompts, len(raw), service.config.max_items)
                labels = service.resolve_models(req.models)
                weights = service.resolve_weights(labels, req.weights)
                items = (decode_base64_images(raw) if req.images is not None
                         else resolve_paths(raw, service.config.allowed_root))
                return req, prompts, labels, weights, items

            # JSON parsing and base64 decoding of large bodies run off the event loop
            req, prompts, labels, weights, items = await run_in_threadpool(parse, body)
            del body  # the decoded items are all that is kept while queued
            results = await service.score(labels, prompts, items)
            return JSONResponse(service.respond(labels, results, weights, len(labels) > 1 or req.weights is not None,
                                                started))

    @app.post("/v1/score/npy")
    async def score_npy(request: Request) -> JSONResponse:
        async with service.handling(request, "/v1/score/npy"):
            started = time.perf_counter()
            batch = parse_npy_body(await service.read_body(request), service.config.max_items,
                                   service.config.max_image_side)  # header checks only; the pixels are a view
            labels = service.resolve_models(batch.header.models)
            weights = service.resolve_weights(labels, batch.header.weights)
            results = await service.score(labels, batch.header.prompts, list(batch.array))
            return JSONResponse(service.respond(labels, results, weights,
                                                len(labels) > 1 or batch.header.weights is not None, started))

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        """OpenRLHF remote reward: ``{query: [base64 images], prompts: [texts]}`` -> ``{rewards, scores,
        extra_logs}``; any unreadable item fails the request (400) since a trainer cannot use a null reward."""
        async with service.handling(request, "/get_reward"):
            started = time.perf_counter()
            body = await service.read_body(request)

            def parse(data: bytes) -> tuple:
                req = _parse(RewardRequest, data)
                if req.prompts is None:
                    raise RequestError(400, "'prompts' (one text per image in 'query') is required")
                return check_prompts(req.prompts, len(req.query), service.config.max_items), \
                    decode_base64_images(req.query)

            prompts, items = await run_in_threadpool(parse, body)
            del body  # the decoded items are all that is kept while queued
            labels = list(service.labels)
            weights = service.resolve_weights(labels, None)
            results = await service.score(labels, prompts, items)
            out = service.respond(labels, results, weights, True, started)
            if out["errors"]:
                raise RequestError(400, f"{len(out['errors'])} of {len(prompts)} images could not be scored",
                                   {int(k): v for k, v in out["errors"].items()})
            return JSONResponse({"rewards": out["avg"], "scores": out["avg"], "extra_logs": out["scores"]})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        service.check_auth(request)
        return JSONResponse({"models": service.backend.models, "normalize": service.config.normalize,
                             "weights": service.resolve_weights(service.labels, None),
                             "calibrated": sorted(service.stats),
                             "limits": {"max_batch_size": service.config.max_batch_size,
                                        "max_items": service.config.max_items,
                                        "max_body_bytes": service.config.max_body_bytes,
                                        "max_image_side": service.config.max_image_side}})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health = service.backend.healthy()
        health["queue"] = {label: b.depth for label, b in service.batchers.items()}
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        service.check_auth(request)
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    return app
