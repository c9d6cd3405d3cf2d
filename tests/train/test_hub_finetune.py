"""`finetune` on a transformers model (a tiny MLCD): Partial FC on its pooled output, layer-wise lr
decay over its encoder layers, exact resume, and a save_pretrained folder that every --model takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hub_models import tiny_hub_models  # noqa: F401 - fixture
from unicom_cli.train.loop import FinetuneConfig, finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny(tiny_hub_models):  # noqa: F811
    return tiny_hub_models


def _cfg(model: Path, data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(arch=str(model), dataset=f"folder:{data}", output=out, epochs=2, batch_size=8, lr=1e-3,
                lr_pfc_weight=10, m2=0.3, device="cpu", eval_every=0, log_every=1, workers=0, seed=7,
                precision="fp32")
    base.update(kw)
    return FinetuneConfig(**base)


def _losses(path: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "step" in m and "loss" in m}


def test_layer_decay_groups_follow_the_encoder_layers(tiny):
    from unicom_cli.models.factory import create_model
    from unicom_cli.train.heads import ClassifyHead, param_groups

    model = create_model(str(tiny["mlcd"]), precision="fp32").model
    head = ClassifyHead(32, ["a", "b"])
    groups = param_groups(model, head, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(model.blocks) == 2
    assert lr_of[id(named["net.embeddings.patch_embedding.weight"])] == 0.5 ** 3
    assert lr_of[id(named["net.class_pos_emb"])] == 0.5 ** 3
    assert lr_of[id(named["net.encoder.layers.0.mlp.fc1.weight"])] == 0.5 ** 2
    assert lr_of[id(named["net.encoder.layers.1.mlp.fc1.weight"])] == 0.5
    assert lr_of[id(named["net.post_layernorm.weight"])] == 1.0


def test_kill_and_resume_continues_exactly(tiny, digits_small, tmp_path):
    full = finetune(_cfg(tiny["mlcd"], digits_small, tmp_path / "full", layer_decay=0.7, task="classify"))
    finetune(_cfg(tiny["mlcd"], digits_small, tmp_path / "cut", layer_decay=0.7, task="classify",
                  save_every=2, max_steps=5))
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    resumed = finetune(_cfg(tiny["mlcd"], digits_small, tmp_path / "cut", layer_decay=0.7, task="classify",
                            save_every=2, resume="auto"))
    assert resumed.resumed_from.endswith("step-00000004")
    a, b = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "cut" / "metrics.jsonl")
    assert sorted(b) == list(range(5, full.steps + 1))
    assert [b[s] for s in b] == [a[s] for s in b]  # exact on CPU
    from safetensors.torch import load_file

    assert full.model_path.is_dir()
    sa, sb = (load_file(p.model_path / "model.safetensors") for p in (full, resumed))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_two_epochs_on_digits_then_embed_the_folder(tiny, digits_small, tmp_path, capsys):
    """Partial FC (ArcFace margin) on the MLCD pooled output; the result is a save_pretrained folder."""
    from unicom_cli.cli.app import main
    from unicom_cli.models.factory import create_model

    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny["mlcd"]), "--dataset", f"folder:{digits_small}", "--epochs", "2",
                 "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--output", str(out), "--workers", "0",
                 "--layer-decay", "0.75", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert f"use: unicom embed --model {out / 'model'}" in printed
    evals = [json.loads(line)["eval"] for line in (out / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert len(evals) == 2 and 0 <= evals[-1]["recall@1"] <= 100
    recorded = json.loads((out / "config.json").read_text())["model_spec"]
    assert recorded["family"] == "hf" and recorded["embedding"].startswith("pooler_output")
    before = create_model(str(tiny["mlcd"]), precision="fp32")
    after = create_model(str(out / "model"), precision="fp32")
    assert after.spec.family == "hf" and after.spec.geometry == before.spec.geometry
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        moved = np.abs((after.model(pixels) - before.model(pixels)).numpy()).max()
    assert moved > 1e-4  # trained, not a copy
