"""`finetune` on a timm model (timm's tiny ``test_vit``, random-init: offline): Partial FC on its
pre-logits output, layer-wise lr decay by timm's own grouping, exact resume, and a folder in timm's
hub layout that every --model takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unicom_cli.train.loop import FinetuneConfig, finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TIMM = "timm:test_vit.r160_in1k"  # 6 blocks, width 64, 160 px: 0.3 M parameters


def _cfg(data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(arch=TIMM, pretrained=False, dataset=f"folder:{data}", output=out, epochs=2, batch_size=8,
                lr=3e-4, lr_pfc_weight=30, m2=0.3, device="cpu", eval_every=0, log_every=1, workers=0, seed=7,
                precision="fp32")
    base.update(kw)
    return FinetuneConfig(**base)


def _losses(path: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "step" in m and "loss" in m}


def test_layer_decay_groups_are_timms_own():
    """Each parameter's lr equals lr × the lr_scale timm's param_groups_layer_decay gives it."""
    from timm.optim import param_groups_layer_decay

    from unicom_cli.models.factory import create_model
    from unicom_cli.train.heads import ClassifyHead, param_groups

    model = create_model(TIMM, pretrained=False, precision="fp32").model
    groups = param_groups(model, ClassifyHead(64, ["a", "b"]), lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    timm_scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model.net, layer_decay=0.5)
                  for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named) + 2 and all(lr_of[id(p)] == timm_scale[id(p)] for p in named.values())
    assert lr_of[id(named["net.patch_embed.proj.weight"])] == lr_of[id(named["net.pos_embed"])] == 0.5 ** 6
    assert lr_of[id(named["net.blocks.0.mlp.fc1.weight"])] == 0.5 ** 5
    assert lr_of[id(named["net.blocks.5.mlp.fc1.weight"])] == lr_of[id(named["net.norm.weight"])] == 1.0


def test_layer_decay_applies_with_partial_fc_too(tmp_path):
    """--layer-decay without --task classify: the backbone by layer, the class centres last at
    lr × --lr-pfc-weight (it was silently ignored there)."""
    from timm.optim import param_groups_layer_decay

    from unicom_cli.models.factory import create_model
    from unicom_cli.train.loop import _make_optimizer
    from unicom_cli.train.partial_fc import PartialFC

    model = create_model(TIMM, pretrained=False, precision="fp32").model
    pfc = PartialFC(64, 5)
    cfg = _cfg(tmp_path, tmp_path / "run", lr=2.0, lr_pfc_weight=10, layer_decay=0.5)
    optimizer, _ = _make_optimizer(cfg, model, pfc)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    timm_scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model.net, layer_decay=0.5)
                  for p in g["params"]}
    assert all(lr_of[id(p)] == 2.0 * timm_scale[id(p)] for p in model.parameters())
    assert optimizer.param_groups[-1]["params"] == [pfc.weight] and optimizer.param_groups[-1]["lr"] == 20.0
    assert min(lr_of.values()) == 2.0 * 0.5 ** 6


def test_kill_and_resume_continues_exactly(digits_small, tmp_path):
    """Partial FC (ArcFace margin) with layer decay: a run cut at step 5 and resumed logs the
    uninterrupted run's losses."""
    full = finetune(_cfg(digits_small, tmp_path / "full", layer_decay=0.8))
    finetune(_cfg(digits_small, tmp_path / "cut", layer_decay=0.8, save_every=2, max_steps=5))
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    resumed = finetune(_cfg(digits_small, tmp_path / "cut", layer_decay=0.8, save_every=2, resume="auto"))
    assert resumed.resumed_from.endswith("step-00000004")
    a, b = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "cut" / "metrics.jsonl")
    assert full.steps == 14 and sorted(b) == list(range(5, 15))
    assert [b[s] for s in b] == [a[s] for s in b]  # exact on CPU
    epoch1, epoch2 = np.mean([a[s] for s in range(1, 8)]), np.mean([a[s] for s in range(8, 15)])
    assert epoch2 < epoch1 - 2.0  # it learns (19.7 → 14.5 here)
    from safetensors.torch import load_file

    sa, sb = (load_file(p.model_path / "model.safetensors") for p in (full, resumed))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_classify_then_embed_the_folder_gives_the_trained_networks_numbers(digits_small, tmp_path, capsys):
    """--task classify with layer decay through the CLI; `unicom embed --model run/model` equals
    timm's own network holding the last checkpoint's weights, on the same pixels."""
    import timm

    from PIL import Image

    from unicom_cli.cli.app import main
    from unicom_cli.models.families import resolve_spec
    from unicom_cli.models.transforms import eval_transform

    out = tmp_path / "run"
    assert main(["finetune", "--model", TIMM, "--random-init", "--dataset", f"folder:{digits_small}",
                 "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--output", str(out),
                 "--workers", "0", "--task", "classify", "--layer-decay", "0.75", "--precision", "fp32"]) == 0
    assert f"use: unicom embed --model {out / 'model'}" in capsys.readouterr().out
    recorded = json.loads((out / "config.json").read_text())["model_spec"]
    assert recorded["family"] == "timm" and recorded["embedding"].startswith("timm forward_head")
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "head.safetensors").is_file()

    feats = tmp_path / "feats.npy"
    images = digits_small / "test"
    assert main(["embed", str(images), "--model", str(out / "model"), "-o", str(feats), "--precision", "fp32",
                 "--workers", "0", "--batch-size", "16"]) == 0
    ids = feats.with_suffix(".ids.txt").read_text().split()
    ours = np.load(feats)

    def network(checkpoint: Path):
        state = torch.load(checkpoint / "trainer.pt", weights_only=True)["model"]
        net = timm.create_model("test_vit", num_classes=0).eval()
        net.load_state_dict({k[len("net."):]: v for k, v in state.items()})
        return net

    epoch1, epoch2 = sorted((out / "checkpoints").iterdir())[-2:]
    from safetensors.torch import load_file

    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in network(epoch2).state_dict().items())
    transform = eval_transform(resolve_spec(out / "model"))
    pixels = torch.stack([transform(Image.open(images / name)) for name in ids])
    with torch.no_grad():
        expected, before = network(epoch2)(pixels).numpy(), network(epoch1)(pixels).numpy()
    # embed's decode route matches the PIL transform within 1/255 a pixel, not bit for bit
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() < 2e-4 * scale < np.abs(before - expected).max() / 10


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_damaged_timm_folder_is_one_line(damage, digits_small, tmp_path, capsys):
    """A timm folder whose weights are cut short, or only pickled: one line naming it, exit 2, nothing written."""
    import timm
    from timm.models import save_for_hf

    from tests.conftest import one_error_line
    from unicom_cli.cli.app import main

    folder = tmp_path / "model"
    save_for_hf(timm.create_model("test_vit", num_classes=0), str(folder), safe_serialization=True)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    else:
        weights.rename(folder / "pytorch_model.bin")
    out = tmp_path / "feats.npy"
    assert main(["embed", str(digits_small / "test"), "--model", str(folder), "-o", str(out), "--workers", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("model.safetensors" in line and "do not load" in line) if damage == "truncated" else "pickled" in line
    assert not out.exists()


def test_index_of_a_timm_folder_searches_with_it_and_refuses_other_weights(digits_small, tmp_path, capsys):
    """index.json records the folder and its SHA-256: search re-creates the network; once the
    folder holds other weights (a new finetune run) it refuses, naming the file."""
    import timm
    from timm.models import save_for_hf

    from tests.conftest import one_error_line
    from unicom_cli.cli.app import main

    folder = tmp_path / "model"
    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_vit", num_classes=0), str(folder), safe_serialization=True)
    images, index = digits_small / "test", tmp_path / "idx"
    assert main(["index", str(images), "-o", str(index), "--model", str(folder), "--precision", "fp32",
                 "--workers", "0"]) == 0
    recorded = json.loads((index / "index.json").read_text())
    import hashlib

    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() in json.dumps(recorded)
    query = sorted((images / "7").iterdir())[0]
    capsys.readouterr()
    assert main(["search", str(index), str(query), "-k", "1"]) == 0
    rows = [line.split("│") for line in capsys.readouterr().out.splitlines() if line.count("│") == 2]
    assert rows[0][2].strip() == f"7/{query.name}" and float(rows[0][1]) > 0.9999  # itself, top 1
    torch.manual_seed(1)
    save_for_hf(timm.create_model("test_vit", num_classes=0), str(folder), safe_serialization=True)
    assert main(["search", str(index), str(query), "-k", "1"]) != 0
    assert "SHA-256" in one_error_line(capsys.readouterr().err)
