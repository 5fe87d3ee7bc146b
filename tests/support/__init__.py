"""Test support shared by every test module (tests never import each other): paths to real data, the
official packages' venv, and hand-written references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "imagereward"
REFERENCE = REPO / "rewardlab" / "testing" / "reference"
OFFICIAL_PYTHON = Path(os.environ.get("REWARDLAB_OFFICIAL_VENV", REPO / ".official-venv")) / "bin" / "python"
EXAMPLE_PROMPT = "a painting of an ocean with clouds and birds, day time, low depth field effect"


def shared_file(relative: str) -> Path:
    """A file of the project's shared ImageReward data (``../shared/data/imagereward``); the test is skipped,
    naming the path, on a machine without that folder."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (a checkout beside the project's shared/ folder has it)")
    return path


def example_images() -> list[str]:
    return [str(shared_file(f"images/{i}.webp")) for i in range(1, 5)]


def official_python() -> str:
    if not OFFICIAL_PYTHON.exists():
        pytest.skip(f"official packages' venv not found at {OFFICIAL_PYTHON.parent.parent}; "
                    "build it with ../shared/tools/official-env.sh .official-venv")
    return str(OFFICIAL_PYTHON)


def official_test_loop(all_scores, rankings):
    """ImageReward's test procedure, written out plainly: every pair with different human ranks,
    correct when the score order agrees (a predicted tie is wrong), pooled over prompts."""
    correct = total = 0
    for scores, ranking in zip(all_scores, rankings, strict=True):
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                if ranking[i] == ranking[j]:
                    continue
                total += 1
                if (ranking[i] < ranking[j] and scores[i] > scores[j]) or (ranking[i] > ranking[j] and scores[i] < scores[j]):
                    correct += 1
    return correct / total, total


def record_calls(monkeypatch, owner, name: str, log: list) -> None:
    """Wrap ``owner.name`` so each call appends ``(detached clone of the first argument, detached clone of the
    result)`` to ``log`` and returns the real result."""
    real = getattr(owner, name)

    def recording(value, *args, **kwargs):
        result = real(value, *args, **kwargs)
        log.append((value.detach().clone(), result.detach().clone()))
        return result

    monkeypatch.setattr(owner, name, recording)
