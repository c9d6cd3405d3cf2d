"""Pipeline tests run tiny models: one torch thread avoids OpenMP barrier stalls on a busy machine."""

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocesses too
    yield
    torch.set_num_threads(saved)
