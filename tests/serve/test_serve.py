"""rewardlab serve: served scores against the direct Scorer, batching, limits, overload, workers, client."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import socket
import threading
import time
import tracemalloc

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

import rewardlab
from rewardlab.cli import cli
from rewardlab.rl import reward_fn
from rewardlab.scoring.scorer import ScoreResult
from rewardlab.serve import Client, ScoringService, ServeConfig, build_service, create_app
from rewardlab.serve.batcher import DynamicBatcher, Overloaded
from rewardlab.serve.cli import choose_host, parse_devices
from rewardlab.serve.protocol import encode_npy_body


def arrays(n, seed, size=(40, 34)):
    rng = np.random.RandomState(seed)
    return [(rng.rand(size[1], size[0], 3) * 255).astype(np.uint8) for _ in range(n)]


def png64(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def service(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    for i, array in enumerate(arrays(3, 7)):
        Image.fromarray(array).save(root / f"{i}.png")
    svc = build_service([tiny_checkpoint], max_wait_ms=20, max_batch_size=64, allowed_root=root, max_items=64,
                        max_body_bytes=4 << 20)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def label(service):
    return service.labels[0]


# -- parity with the direct scorer -----------------------------------------------------------------------

def test_one_request_equals_direct_scorer_exactly(client, service, label, tiny_scorer):
    images = arrays(6, 0)
    prompts = ["a red circle", "a cat", "a dog", "a cat", "sky", "sea"]
    before = len(service.batchers[label].batches)
    answer = client.post("/v1/score", json={"prompts": prompts, "images": [png64(a) for a in images]}).json()
    assert service.batchers[label].batches[before:] == [6]  # one batch: the same composition as below
    direct = tiny_scorer.score(prompts, images, batch_size=6)
    assert answer["scores"][label] == direct and answer["errors"] == {} and "avg" not in answer
    body = encode_npy_body({"prompts": prompts}, np.stack(images))
    answer = client.post("/v1/score/npy", content=body).json()
    assert answer["scores"][label] == direct


def test_concurrent_requests_keep_order_and_match_within_1e5(service, label, tiny_scorer):
    app = create_app(service)
    requests = [(arrays(1 + i % 4, 100 + i), f"prompt {i}") for i in range(24)]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(
                http.post("/v1/score", json={"prompts": prompt, "images": [png64(a) for a in images]})
                for images, prompt in requests))

    before = len(service.batchers[label].batches)
    responses = asyncio.run(main())
    sizes = service.batchers[label].batches[before:]
    assert sum(sizes) == sum(len(images) for images, _ in requests)
    assert max(sizes) > 4  # items of several requests shared a forward pass
    for (images, prompt), response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        direct = tiny_scorer.score(prompt, images, batch_size=1)
        assert np.allclose(response.json()["scores"][label], direct, atol=1e-5, rtol=0)


def test_paths_under_the_allowed_root(client, service, label, tiny_scorer):
    root = service.config.allowed_root
    answer = client.post("/v1/score", json={"prompts": "x", "paths": ["0.png", str(root / "2.png")]}).json()
    assert answer["scores"][label] == tiny_scorer.score("x", [str(root / "0.png"), str(root / "2.png")], batch_size=2)
    bad = client.post("/v1/score", json={"prompts": "x", "paths": ["0.png", "../escape.png", "/etc/passwd"]})
    assert bad.status_code == 400
    assert set(bad.json()["errors"]) == {"1", "2"} and "outside the allowed root" in bad.json()["errors"]["1"]


def test_unreadable_item_does_not_fail_the_batch(client, label, tiny_scorer):
    images = arrays(3, 9)
    junk = base64.b64encode(b"not an image").decode()
    answer = client.post("/v1/score", json={"prompts": "x", "images": [png64(images[0]), junk, png64(images[2])]})
    assert answer.status_code == 200
    body = answer.json()
    assert body["scores"][label][1] is None and list(body["errors"]) == ["1"]
    assert body["errors"]["1"].startswith("image #1 (bytes): cannot decode")
    direct = tiny_scorer.score("x", [images[0], images[2]], batch_size=2)
    assert np.allclose([body["scores"][label][0], body["scores"][label][2]], direct, atol=1e-5)


# -- malformed requests ------------------------------------------------------------------------------------

def npy_raw(array: np.ndarray, header: dict) -> bytes:
    return encode_npy_body(header, array)


@pytest.mark.parametrize("case, status, needle", [
    ("bad_base64", 400, "not valid base64"),
    ("unknown_model", 400, "unknown model"),
    ("prompt_count", 400, "2 prompts for 3 images"),
    ("schema", 422, "prompts"),
    ("both", 400, "not both"),
    ("npy_dtype", 400, "dtype float32"),
    ("npy_shape", 400, "shape (2, 8, 8)"),
    ("npy_fortran", 400, "Fortran"),
    ("npy_truncated", 400, "promises"),
    ("npy_object", 400, "dtype object"),
    ("npy_no_header", 400, "JSON header line"),
    ("npy_side", 413, "each side"),
    ("too_many_items", 413, "limit is 64"),
])
def test_malformed_requests_get_4xx(client, case, status, needle):
    good = png64(arrays(1, 1)[0])
    if case == "bad_base64":
        response = client.post("/v1/score", json={"prompts": "x", "images": [good, "@@@", good, "x"]})
        assert set(response.json()["errors"]) == {"1", "3"}
    elif case == "unknown_model":
        response = client.post("/v1/score", json={"prompts": "x", "images": [good], "models": ["nope"]})
    elif case == "prompt_count":
        response = client.post("/v1/score", json={"prompts": ["a", "b"], "images": [good] * 3})
    elif case == "schema":
        response = client.post("/v1/score", json={"images": [good]})
    elif case == "both":
        response = client.post("/v1/score", json={"prompts": "x", "images": [good], "paths": ["0.png"]})
    elif case == "too_many_items":
        response = client.post("/v1/score", json={"prompts": "x", "images": [good] * 65})
    else:
        header = {"prompts": "x"}
        if case == "npy_dtype":
            body = npy_raw(np.zeros((2, 8, 8, 3), np.float32), header)
        elif case == "npy_shape":
            body = npy_raw(np.zeros((2, 8, 8), np.uint8), header)
        elif case == "npy_fortran":
            body = b'{"prompts": "x"}\n' + _npy_bytes(np.asfortranarray(np.zeros((2, 8, 8, 3), np.uint8)))
        elif case == "npy_truncated":
            body = npy_raw(np.zeros((2, 8, 8, 3), np.uint8), header)[:-10]
        elif case == "npy_object":
            body = b'{"prompts": "x"}\n' + _npy_bytes(np.array([None, 1], dtype=object), allow_pickle=True)
        elif case == "npy_no_header":
            body = _npy_bytes(np.zeros((1, 8, 8, 3), np.uint8)).replace(b"\n", b" ")
        else:  # npy_side: a header promising a huge image; nothing of that size is ever allocated
            body = b'{"prompts": "x"}\n' + _npy_header_only((1, 100_000, 8, 3))
        response = client.post("/v1/score/npy", content=body)
    assert response.status_code == status, response.text
    assert needle in response.text


def _npy_bytes(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npy_header_only(shape) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_oversized_body_is_refused_before_reading(client):
    response = client.post("/v1/score", content=b"x" * ((4 << 20) + 1), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


# -- several models, OpenRLHF, auth, metrics ----------------------------------------------------------------

def test_two_models_weighted_avg_and_get_reward(tiny_checkpoint, tmp_path):
    from rewardlab.testing import make_random_checkpoint

    other = make_random_checkpoint(tmp_path / "other.safetensors", seed=3)
    svc = build_service([tiny_checkpoint, f"{other}:0.5"], max_wait_ms=1)
    try:
        with TestClient(create_app(svc)) as http:
            images = arrays(3, 4)
            a, b = svc.labels
            answer = http.post("/v1/score", json={"prompts": "x", "images": [png64(i) for i in images]}).json()
            sa, sb = (rewardlab.load(p).score("x", images, batch_size=3) for p in (tiny_checkpoint, other))
            assert answer["scores"] == {a: sa, b: sb}
            assert answer["avg"] == pytest.approx([x + 0.5 * y for x, y in zip(sa, sb, strict=True)], abs=1e-12)
            answer = http.post("/v1/score", json={"prompts": "x", "images": [png64(i) for i in images],
                                                   "models": [b], "weights": {b: 2.0}}).json()
            assert list(answer["scores"]) == [b] and answer["avg"] == pytest.approx([2 * y for y in sb], abs=1e-12)
            reward = http.post("/get_reward", json={"query": [png64(i) for i in images], "prompts": ["x"] * 3}).json()
            assert reward["rewards"] == pytest.approx([x + 0.5 * y for x, y in zip(sa, sb, strict=True)], abs=1e-12)
            assert reward["extra_logs"] == {a: sa, b: sb}
            junk = base64.b64encode(b"junk").decode()
            failed = http.post("/get_reward", json={"query": [png64(images[0]), junk], "prompts": ["x", "y"]})
            assert failed.status_code == 400 and list(failed.json()["errors"]) == ["1"]
            models = http.get("/v1/models").json()
            assert [m["id"] for m in models["models"]] == [a, b] and models["weights"] == {a: 1.0, b: 0.5}
    finally:
        svc.close()


def test_token_auth_and_metrics(tiny_checkpoint):
    svc = build_service([tiny_checkpoint], token="s3cret", max_wait_ms=1)
    try:
        with TestClient(create_app(svc)) as http:
            body = {"prompts": "x", "images": [png64(arrays(1, 2)[0])]}
            assert http.post("/v1/score", json=body).status_code == 401
            assert http.post("/v1/score", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/metrics").status_code == 401
            assert http.get("/healthz").status_code == 200
            auth = {"Authorization": "Bearer s3cret"}
            assert http.post("/v1/score", json=body, headers=auth).status_code == 200
            text = http.get("/metrics", headers=auth).text
            assert f'rewardlab_batch_size_count{{model="{svc.labels[0]}"}} 1.0' in text
            assert "rewardlab_queue_depth" in text and 'rewardlab_errors_total{kind="request"} 2.0' in text
            assert 'rewardlab_request_seconds_count{endpoint="/v1/score"} 1.0' in text
    finally:
        svc.close()
    assert choose_host(None, None) == "127.0.0.1" and choose_host(None, "t") == "0.0.0.0"
    assert choose_host("0.0.0.0", None) == "0.0.0.0"  # explicit: allowed, with a warning


# -- batching and overload with a controllable backend ------------------------------------------------------

class FakeBackend:
    """Scores = image value; ``gate`` blocks every batch until set."""

    def __init__(self):
        self.models = [{"id": "fake", "name": "fake"}]
        self.names = {"fake": "fake"}
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()  # set once a batch has reached the backend
        self._slots = threading.Semaphore(1)
        self.capacity = 1

    def slots(self, label):
        return self._slots

    def run(self, label, prompts, items):
        self.running.set()
        self.gate.wait(30)
        return ScoreResult([float(len(b)) for b in items], {})

    def healthy(self):
        return {"ok": True, "workers": []}

    def close(self):
        self.gate.set()


def test_flush_on_size_and_on_time():
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(2)
    calls = []

    def run(prompts, items):
        calls.append(len(items))
        return ScoreResult([float(i) for i in items], {})

    by_size = DynamicBatcher("m", run, threading.Semaphore(1), executor, max_batch_size=4, max_wait_s=30)
    started = time.monotonic()
    futures = [by_size.submit(["p"] * 2, [1, 2]), by_size.submit(["p"] * 2, [3, 4])]
    assert [f.result(timeout=10).scores for f in futures] == [[1.0, 2.0], [3.0, 4.0]]
    assert time.monotonic() - started < 5 and calls == [4]  # full batch left long before the 30 s wait
    by_size.close()

    by_time = DynamicBatcher("m", run, threading.Semaphore(1), executor, max_batch_size=64, max_wait_s=0.3)
    started = time.monotonic()
    futures = [by_time.submit(["p"], [5]), by_time.submit(["p"] * 2, [6, 7])]
    assert [f.result(timeout=10).scores for f in futures] == [[5.0], [6.0, 7.0]]
    waited = time.monotonic() - started
    assert 0.28 <= waited < 5 and calls == [4, 3]  # both requests in one batch, flushed by the timer
    by_time.close()
    executor.shutdown()


def test_overload_returns_429_without_growing_memory():
    backend = FakeBackend()
    svc = ScoringService(backend, ServeConfig(max_queue=8, max_items=8, max_batch_size=4, max_wait_ms=0,
                                              max_requests=64))
    threads = []
    try:
        with TestClient(create_app(svc)) as http:
            try:
                _overload_checks(http, svc, backend, threads)
            finally:
                backend.gate.set()
                for t in threads:
                    t.join(20)
    finally:
        svc.close()


def _overload_checks(http, svc, backend, threads):
    backend.gate.clear()  # the first batch blocks; the queue fills up
    payload = {"prompts": "x", "images": [png64(np.zeros((8, 8, 3), np.uint8))] * 4}
    results = []
    threads.extend(threading.Thread(target=lambda: results.append(http.post("/v1/score", json=payload)))
                   for _ in range(3))
    backend.running.clear()
    threads[0].start()
    assert backend.running.wait(10)  # the first batch is in flight (blocked); then two requests fill the queue
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while svc.batchers["fake"].depth < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.batchers["fake"].depth == 8  # one batch of 4 blocked + 8 queued
    big = {"prompts": "x", "images": [base64.b64encode(bytes(64 << 10)).decode()] * 4}
    gc.collect()
    tracemalloc.start()
    first = tracemalloc.take_snapshot()
    statuses = []
    for _ in range(100):  # keep only what is checked (a Response holds its 350 KB request)
        response = http.post("/v1/score", json=big)
        statuses.append((response.status_code, response.headers.get("Retry-After")))
        del response
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(first, "filename"))
    tracemalloc.stop()
    assert set(statuses) == {(429, "1")}
    assert svc.batchers["fake"].depth == 8
    assert grown < 1 << 20, f"memory grew by {grown} bytes over 100 rejected 350 KB requests"
    backend.gate.set()
    for t in threads:
        t.join(20)
    assert [r.status_code for r in results] == [200, 200, 200]


def test_batcher_queue_bound():
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Event()
    executor = ThreadPoolExecutor(1)
    batcher = DynamicBatcher("m", lambda p, i: (gate.wait(10), ScoreResult([0.0] * len(i), {}))[1],
                             threading.Semaphore(1), executor, max_batch_size=2, max_wait_s=0, max_queue=3)
    first = batcher.submit(["p"] * 2, [0, 0])
    time.sleep(0.2)  # taken as a batch; now the queue is empty and the backend blocked
    batcher.submit(["p"] * 3, [0, 0, 0])
    with pytest.raises(Overloaded):
        batcher.submit(["p"], [0])
    assert batcher.depth == 3
    gate.set()
    assert first.result(10).scores == [0.0, 0.0]
    batcher.close()
    executor.shutdown()


# -- a real server and the client ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_real_uvicorn_server_and_client(service, label, tiny_scorer):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        images = np.stack(arrays(7, 21))
        prompts = [f"p{i % 3}" for i in range(7)]
        with Client(f"http://127.0.0.1:{port}", batch_size=3, concurrency=3) as remote:
            scores, info = remote(images, prompts, {})
            local, local_info = reward_fn(tiny_scorer)(images, prompts, {})
            assert np.allclose(scores, local, atol=1e-5, rtol=0) and list(info) == [label]
            # a float tensor is quantised to uint8 by the client: equal to scoring those uint8 pixels
            import torch

            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            assert np.allclose(remote(pixels, prompts)[0], local, atol=1e-5, rtol=0)
            assert remote.health()["ok"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_client_retries_429_then_raises_on_4xx():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            return httpx.Response(429, json={"detail": "busy"}, headers={"Retry-After": "0"})
        if len(calls) == 3:
            return httpx.Response(200, json={"scores": {"m": [1.0, 2.0]}, "errors": {}})
        return httpx.Response(400, json={"detail": "bad", "errors": {"0": "image #0: broken"}})

    remote = Client("http://test", transport=httpx.MockTransport(handler), backoff=0.001)
    scores, info = remote(np.zeros((2, 8, 8, 3), np.uint8), "x")
    assert scores.tolist() == [1.0, 2.0] and len(calls) == 3 and calls[0] == "/v1/score/npy"
    with pytest.raises(rewardlab.RewardLabError, match="400: bad.*image #0: broken"):
        remote(np.zeros((2, 8, 8, 3), np.uint8), "x")
    assert len(calls) == 4  # no retry on 400


# -- CLI validation ----------------------------------------------------------------------------------------

def test_serve_cli_validates_before_loading():
    result = CliRunner().invoke(cli, ["serve", "--model", "imagereward-v1.O"])
    assert result.exit_code == 2 and "unknown model" in result.output and "imagereward-v1.0" in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", "imagereward-v1.0", "--devices", "gpu0"])
    assert result.exit_code == 2 and "--devices" in result.output
    assert parse_devices("0, 1") == ["0", "1"] and parse_devices(None) is None


# -- one worker process per device: crash and restart --------------------------------------------------------

def test_worker_crash_fails_in_flight_with_503_and_restarts(tiny_checkpoint, tiny_scorer):
    import os
    import signal

    svc = build_service([tiny_checkpoint], devices=["cpu", "cpu"], max_wait_ms=1)
    label = svc.labels[0]
    try:
        with TestClient(create_app(svc)) as http:
            images = arrays(4, 50)
            body = {"prompts": "x", "images": [png64(a) for a in images]}
            direct = tiny_scorer.score("x", images, batch_size=4)
            # a CPU worker runs with fewer torch threads than this process: equal up to summation order
            served = http.post("/v1/score", json=body).json()["scores"][label]
            assert np.allclose(served, direct, atol=1e-5, rtol=0)
            pids = [w.pid for w in svc.backend.workers]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)  # both frozen: the next batch is in flight on one of them
            results = []
            sender = threading.Thread(target=lambda: results.append(http.post("/v1/score", json=body)))
            sender.start()
            time.sleep(0.5)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            sender.join(20)
            assert results[0].status_code == 503 and results[0].headers["Retry-After"] == "1"
            assert "died during a batch" in results[0].json()["detail"]
            deadline = time.monotonic() + 60
            answer = None
            while time.monotonic() < deadline:
                answer = http.post("/v1/score", json=body)
                if answer.status_code == 200:
                    break
                time.sleep(0.5)
            assert answer.status_code == 200
            assert np.allclose(answer.json()["scores"][label], direct, atol=1e-5, rtol=0)
            assert svc.backend.restarts >= 1 and all(w.pid not in pids for w in svc.backend.workers if w.pid)
    finally:
        svc.close()


def test_cancelled_request_does_not_break_its_batch():
    from concurrent.futures import ThreadPoolExecutor

    gate = threading.Event()
    executor = ThreadPoolExecutor(1)

    def run(prompts, items):
        gate.wait(10)
        return ScoreResult([float(i) for i in items], {})

    batcher = DynamicBatcher("m", run, threading.Semaphore(1), executor, max_batch_size=8, max_wait_s=0.05)
    gone = batcher.submit(["p"], [1])
    kept = batcher.submit(["p"] * 2, [2, 3])
    time.sleep(0.2)  # both in one running batch
    assert gone.cancel()  # the client went away
    gate.set()
    assert kept.result(10).scores == [2.0, 3.0] and batcher.batches == [3]
    batcher.close()
    executor.shutdown()


def test_inflight_body_bytes_are_bounded():
    backend = FakeBackend()
    svc = ScoringService(backend, ServeConfig(max_inflight_bytes=200_000, max_wait_ms=0))
    payload = {"prompts": "x", "images": [base64.b64encode(bytes(90_000)).decode()]}  # ~120 KB body
    results = []
    try:
        with TestClient(create_app(svc)) as http:
            backend.gate.clear()
            holder = threading.Thread(target=lambda: results.append(http.post("/v1/score", json=payload)))
            holder.start()
            deadline = time.monotonic() + 10
            while svc._body_bytes == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            second = http.post("/v1/score", json=payload)
            assert second.status_code == 429 and "bytes in flight" in second.json()["detail"]
            backend.gate.set()
            holder.join(20)
            assert results[0].status_code == 200 and svc._body_bytes == 0
            assert http.post("/v1/score", json=payload).status_code == 200
    finally:
        backend.gate.set()
        svc.close()
    with pytest.raises(ValueError, match="could never be queued"):
        ServeConfig(max_items=100, max_queue=10)
