"""Fine-tuning tests run torch on one thread: the runs are then reproducible to the bit, and the learning
margins were measured that way."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
