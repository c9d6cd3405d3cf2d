"""Export tests share a few exports per module (the dynamo exporter takes ~15 s even for a tiny
ViT on this machine); one torch thread avoids OpenMP stalls on a busy box."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, write_tiny_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> tuple[Path, Path]:
    """(architecture JSON, fp16 checkpoint in the published format) shared by a module."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def make_tiny(root: Path) -> tuple[Path, Path]:
    """The tiny architecture of tests/conftest.py and its seeded checkpoint, in ``root``."""
    spec_file = root / "tiny.json"
    spec_file.write_text(json.dumps(TINY))
    return spec_file, write_tiny_checkpoint(spec_file, root / "FP16-tiny.pt")
