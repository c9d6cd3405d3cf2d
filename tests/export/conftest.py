"""Export tests share a few exports per module (the dynamo exporter takes ~15 s even for a tiny
ViT on this machine); one torch thread avoids OpenMP stalls on a busy box."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY


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
    """The tiny architecture of tests/conftest.py and a seeded checkpoint with trained-looking BN stats."""
    import torch

    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    spec_file = root / "tiny.json"
    spec_file.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = build_model(get_spec(spec_file))
    for bn in (model.feature[1], model.feature[3]):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    ckpt = root / "FP16-tiny.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, ckpt)
    return spec_file, ckpt
