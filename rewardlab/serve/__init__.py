"""``rewardlab serve``: reward models behind HTTP with dynamic batching, and the client for trainers.

Imports are lazy: ``from rewardlab.serve import Client`` needs only httpx; the server side needs fastapi,
uvicorn and prometheus-client (``pip install rewardlab[serve]``).
"""

from __future__ import annotations

__all__ = ["Client", "ServeConfig", "ScoringService", "create_app", "build_service"]


def __getattr__(name: str):
    if name == "Client":
        from .client import Client

        return Client
    if name in ("ServeConfig", "ScoringService", "create_app"):
        from . import app

        return getattr(app, name)
    if name == "build_service":
        from .cli import build_service

        return build_service
    raise AttributeError(name)
