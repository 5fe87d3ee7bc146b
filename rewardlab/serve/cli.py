"""`rewardlab serve`: reward models over HTTP (see docs/rl.md)."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import click

from ..errors import UsageError

logger = logging.getLogger(__name__)


def _check_model(model: str) -> None:
    from ..registry import get_spec
    from ..scoring.ensemble import parse_reward

    name = parse_reward(model).model
    if not Path(name).is_file():
        get_spec(name)  # UnknownModelError with suggestions


def parse_devices(text: str | None) -> list[str] | None:
    """``0,1`` -> ["0", "1"] (CUDA indices); ``cpu,cpu`` -> two CPU workers; None -> in-process."""
    if text is None:
        return None
    devices = [part.strip() for part in text.split(",") if part.strip()]
    for device in devices:
        if not (device.isdigit() or device == "cpu" or device.startswith(("cuda:", "mps", "xpu"))):
            raise UsageError(f"--devices {text!r}: {device!r} is not a GPU index, cuda:N or cpu")
    if not devices:
        raise UsageError("--devices is empty", "give GPU indices like 0,1")
    return devices


def build_service(models: Sequence[str], devices: Sequence[str] | None = None, device: str | None = None,
                  dtype: str | None = None, normalize: str = "none", calibration=None, **limits):
    """Load the models (in-process, or one worker process per device) and wrap them in a ScoringService."""
    from ..scoring.ensemble import distinct_labels, load_calibration, parse_reward
    from .app import ScoringService, ServeConfig
    from .backend import InProcessBackend, WorkerPool, load_models

    calibration = load_calibration(calibration)
    try:
        config = ServeConfig(normalize=normalize, calibration=calibration, **limits)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    terms = [parse_reward(m) for m in models]
    if devices:
        backend = WorkerPool(models, devices, dtype)
    else:
        backend = InProcessBackend(load_models(models, device, dtype))
    labels = distinct_labels([m["id"] for m in backend.models])
    config.weights = {label: t.weight for label, t in zip(labels, terms, strict=True) if t.weight != 1.0}
    return ScoringService(backend, config)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def choose_host(host: str | None, token: str | None) -> str:
    """Loopback unless a token is set or ``--host`` is given; an explicit open host without a token warns."""
    if host is None:
        return "0.0.0.0" if token else "127.0.0.1"
    if not token and not _is_loopback(host):
        click.echo(f"warning: serving on {host} without --token: anyone who can reach this port can use it", err=True)
    return host


@click.command("serve")
@click.option("--model", "-m", "models", multiple=True, required=True,
              help="Registry name, NAME:WEIGHT (weight in 'avg') or checkpoint path; repeat for several models.")
@click.option("--host", default=None, help="Bind address (default: 127.0.0.1 without a token, 0.0.0.0 with one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--devices", default=None, help="One worker process per device: GPU indices (0,1) or cpu,cpu. "
              "Default: score in the server process on --device.")
@click.option("--device", default=None, help="Device of in-process scoring (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None)
@click.option("--max-batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--max-wait-ms", type=click.FloatRange(0, 10_000), default=5.0, show_default=True,
              help="How long the first item of a batch waits for more.")
@click.option("--max-queue", type=click.IntRange(1), default=1024, show_default=True,
              help="Queued items per model; beyond it requests get 429 with Retry-After.")
@click.option("--max-requests", type=click.IntRange(1), default=256, show_default=True,
              help="Requests in flight; beyond it 429 before the body is read.")
@click.option("--max-body-mb", type=click.FloatRange(0.001, 4096), default=64.0, show_default=True)
@click.option("--max-inflight-mb", type=click.FloatRange(0.001, 1 << 20), default=1024.0, show_default=True,
              help="Request bodies held at once (all requests); beyond it 429.")
@click.option("--max-items", type=click.IntRange(1, 1024), default=None,
              help="Images per request (default: 256, or --max-queue when smaller).")
@click.option("--max-image-side", type=click.IntRange(1, 65535), default=4096, show_default=True)
@click.option("--allowed-root", type=click.Path(file_okay=False), default=None,
              help="Folder whose images requests may name by path (paths are refused without it).")
@click.option("--token", envvar="REWARDLAB_SERVE_TOKEN", default=None,
              help="Bearer token required on every endpoint but /healthz (also REWARDLAB_SERVE_TOKEN).")
@click.option("--normalize", type=click.Choice(["none", "zscore", "rank", "borda"]), default="none", show_default=True,
              help="How 'avg' combines several models.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Calibration JSON from `rewardlab calibrate` (for --normalize zscore).")
def serve_command(models, host, port, devices, device, dtype, max_batch_size, max_wait_ms, max_queue, max_requests,
                  max_body_mb, max_inflight_mb, max_items, max_image_side, allowed_root, token, normalize, calibration) -> None:
    """Serve reward models over HTTP with dynamic batching (POST /v1/score, /v1/score/npy, /get_reward)."""
    import uvicorn

    from .app import create_app

    device_list = parse_devices(devices)
    for model in models:
        _check_model(model)
    if allowed_root is not None and not Path(allowed_root).is_dir():
        raise UsageError(f"--allowed-root {allowed_root}: not a folder")
    if calibration is not None:
        from ..scoring.ensemble import load_calibration

        load_calibration(calibration)
    if normalize == "zscore" and calibration is None and len(models) > 1:
        logger.warning("--normalize zscore without --calibration z-scores each request by its own mean/std")
    host = choose_host(host, token)
    if max_items is None:
        max_items = min(256, max_queue)
    service = build_service(models, device_list, device, dtype, normalize, calibration,
                            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                            max_requests=max_requests, max_body_bytes=int(max_body_mb * (1 << 20)),
                            max_inflight_bytes=int(max_inflight_mb * (1 << 20)),
                            max_items=max_items, max_image_side=max_image_side,
                            allowed_root=Path(allowed_root) if allowed_root else None, token=token or None)
    labels = ", ".join(service.labels)
    click.echo(f"rewardlab serve: {labels} on http://{host}:{port} "
               f"({len(device_list) if device_list else 1} worker(s), pid {os.getpid()})", err=True)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=10)
    finally:
        service.close()

