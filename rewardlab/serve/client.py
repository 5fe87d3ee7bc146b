"""``rewardlab.serve.Client``: a remote reward with the signature of :func:`rewardlab.rl.reward_fn`.

    reward = Client("http://127.0.0.1:8000")          # instead of reward_fn("imagereward-v1.0")
    scores, info = reward(images, prompts, metadata)

Batches are split into chunks of ``batch_size`` sent concurrently (the server batches them again across
all its clients). uint8 arrays and float tensors travel as ``.npy`` (float tensors are quantised to uint8
first, ``round(x * 255)``, which is what the server scores: use uint8 on both sides for identical numbers);
paths, PIL images and bytes travel as base64 images. 429 and 503 answers and connection errors are
retried with exponential backoff (honouring ``Retry-After``); other errors raise at once.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import ImageLoadError, RewardLabError, UsageError
from .protocol import encode_npy_body

logger = logging.getLogger(__name__)

RETRY_STATUSES = (429, 502, 503, 504)


class ServerError(RewardLabError):
    """The reward server refused a request (HTTP status and its message)."""

    def __init__(self, status: int, message: str, errors: Mapping[str, str] | None = None):
        detail = f"; items: {dict(list((errors or {}).items())[:5])}" if errors else ""
        super().__init__(f"reward server answered {status}: {message}{detail}")
        self.status = status
        self.errors = dict(errors or {})


def _to_uint8_batch(images):
    """A uint8 (B, H, W, 3) array, or None when the batch must travel as encoded images."""
    import torch

    from ..rl.rewards import split_images

    if isinstance(images, (np.ndarray, torch.Tensor)):
        kind, batch = split_images(images)
        if kind == "tensor":
            batch = batch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
            return batch.permute(0, 2, 3, 1).cpu().numpy()
        return np.stack(batch)
    return None


def _encode(image, index: int) -> str:
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise ImageLoadError(str(image), f"cannot read ({exc})") from None
    else:
        from ..io.images import open_image

        buffer = io.BytesIO()
        open_image(image, index).save(buffer, format="PNG")
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


class Client:
    """A reward server as a reward function: ``client(images, prompts, metadata) -> (scores, info)``."""

    def __init__(self, url: str, models: Sequence[str] | None = None, weights: Mapping[str, float] | None = None,
                 token: str | None = None, batch_size: int = 64, concurrency: int = 4, retries: int = 8,
                 backoff: float = 0.25, max_backoff: float = 10.0, timeout: float = 120.0, transport=None):
        import httpx

        if batch_size < 1 or concurrency < 1 or retries < 0:
            raise UsageError("batch_size and concurrency must be >= 1 and retries >= 0")
        self.url = url.rstrip("/")
        self.models = list(models) if models else None
        self.weights = dict(weights) if weights else None
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        token = token or os.environ.get("REWARDLAB_SERVE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_connections=concurrency * 2), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, **kwargs) -> dict:
        import httpx

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self._http.post(path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ServerError(0, f"cannot reach {self.url}{path} ({type(exc).__name__}: {exc})") from None
                wait = delay
            else:
                if response.status_code == 200:
                    return response.json()
                body = _json_or_text(response)
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    raise ServerError(response.status_code, str(body.get("detail", body)), body.get("errors"))
                wait = max(delay, _retry_after(response))
            logger.info("reward server busy or unreachable; retry %d in %.2f s", attempt + 1, wait)
            time.sleep(min(wait, self.max_backoff))
            delay = min(self.max_backoff, delay * 2)
        raise AssertionError("unreachable")

    def score(self, images, prompts: str | Sequence[str]) -> dict:
        """The server's answer for the whole batch, chunks joined in order:
        ``{"scores": {model: [...]}, "avg"?: [...], "errors": {index: message}}``."""
        batch = _to_uint8_batch(images)
        count = len(batch) if batch is not None else len(images)
        prompts = [prompts] * count if isinstance(prompts, str) else list(prompts)
        if len(prompts) != count:
            raise UsageError(f"{len(prompts)} prompts for {count} images", "pass one prompt per image")
        starts = list(range(0, count, self.batch_size))
        extra = {k: v for k, v in (("models", self.models), ("weights", self.weights)) if v}

        def send(start: int) -> dict:
            stop = min(count, start + self.batch_size)
            chunk_prompts = prompts[start:stop]
            if batch is not None:
                body = encode_npy_body({"prompts": chunk_prompts, **extra}, batch[start:stop])
                return self._post("/v1/score/npy", content=body, headers={"Content-Type": "application/octet-stream"})
            encoded = [_encode(images[i], i) for i in range(start, stop)]
            return self._post("/v1/score", json={"prompts": chunk_prompts, "images": encoded, **extra})

        if len(starts) == 1:
            answers = [send(0)]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(starts))) as pool:
                answers = list(pool.map(send, starts))
        merged: dict = {"scores": {}, "errors": {}}
        for start, answer in zip(starts, answers, strict=True):
            for model, values in answer["scores"].items():
                merged["scores"].setdefault(model, []).extend(values)
            if "avg" in answer:
                merged.setdefault("avg", []).extend(answer["avg"])
            for index, message in answer["errors"].items():
                merged["errors"][str(start + int(index))] = message
        return merged

    def __call__(self, images, prompts: str | Sequence[str], metadata=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Same contract as :func:`rewardlab.rl.reward_fn`: (float64 scores [B], {model: float64 [B]});
        unreadable images raise :class:`ImageLoadError` naming them."""
        answer = self.score(images, prompts)
        if answer["errors"]:
            listing = "; ".join(answer["errors"][k] for k in sorted(answer["errors"], key=int))
            raise ImageLoadError(listing, f"{len(answer['errors'])} images could not be scored by the server")
        info = {model: np.asarray(values, dtype=np.float64) for model, values in answer["scores"].items()}
        total = np.asarray(answer["avg"], dtype=np.float64) if "avg" in answer else next(iter(info.values()))
        return total, info

    def models_info(self) -> dict:
        response = self._http.get("/v1/models")
        if response.status_code != 200:
            raise ServerError(response.status_code, str(_json_or_text(response)))
        return response.json()

    def health(self) -> dict:
        return self._http.get("/healthz").json()


def _json_or_text(response) -> dict:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {"detail": body}
    except ValueError:
        return {"detail": response.text[:500]}


def _retry_after(response) -> float:
    try:
        return float(response.headers.get("retry-after", 0))
    except ValueError:
        return 0.0
