"""`finetune --task classify` on CPU: it learns beyond the frozen linear probe (with and without
Mixup/CutMix), resumes exactly, exports a backbone that still embeds plus the head, refuses bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unicom_cli.errors import UsageError
from unicom_cli.train.loop import FinetuneConfig, finetune

SMALL = {"name": "small", "input_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4,
         "embedding_size": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-block, 64-wide ViT (random weights) as an architecture file + state dict."""
    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    root = tmp_path_factory.mktemp("small")
    spec = root / "small.json"
    spec.write_text(json.dumps(SMALL))
    torch.manual_seed(0)
    torch.save(build_model(get_spec(spec)).state_dict(), root / "w.pt")
    return spec, root / "w.pt"


def _cfg(spec, weights, data: Path, out: Path, **kw) -> FinetuneConfig:
    base = {"arch": str(spec), "weights": weights, "dataset": f"folder:{data}", "output": out,
            "epochs": 6, "batch_size": 32, "lr": 1e-3, "device": "cpu", "workers": 0, "task": "classify",
            "augment": False, "label_smoothing": 0.1, "layer_decay": 0.75, "weight_decay": 0.05,
            "drop_path": 0.0, "log_every": 1, "seed": 3}
    base.update(kw)
    return FinetuneConfig(**base)


def _losses(path: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "step" in m and "loss" in m}


@pytest.mark.slow
def test_finetune_beats_the_frozen_linear_probe(small_model, tmp_path_factory):
    """Digits 5-9 shifted by up to ±4 px with pixel noise: the frozen random network's features
    carry little, so finetuning the whole network has much to gain over the linear probe."""
    from unicom_cli.data.digits import write_digits_tree
    from unicom_cli.models.factory import create_model
    from unicom_cli.pipelines.features import ModelOptions
    from unicom_cli.pipelines.linear import LinearConfig, run_linear

    spec, weights = small_model
    tmp = tmp_path_factory.mktemp("cls")
    tree = write_digits_tree(tmp / "digits", size=32, shift=4, noise=0.2)
    probe = run_linear(LinearConfig(tree.knn_train, tree.knn_val,
                                    model=ModelOptions(str(spec), weights, "cpu", workers=0)))
    probe_top1 = probe["metrics"]["top1"]  # percentages, as the loop's evaluation
    results = {}
    for name, mix in (("plain", 0.0), ("mixup", 0.2)):
        summary = finetune(_cfg(spec, weights, tree.root / "knn", tmp / name, mixup=mix, cutmix=mix))
        top1 = [e["top1"] for e in summary.evals]
        assert [e["epoch"] for e in summary.evals] == list(range(1, 7))
        results[name] = top1
        losses = _losses(tmp / name / "metrics.jsonl")
        assert np.mean(list(losses.values())[-10:]) < np.mean(list(losses.values())[:10])
        assert summary.best["top1"] == max(top1) and summary.head_path.is_file()
        assert (tmp / name / "best-head.safetensors").is_file()
    print(f"frozen linear probe top-1 {probe_top1:.1f} %; finetune top-1 per epoch (%) {results}")
    assert results["plain"][-1] > probe_top1 + 10
    assert results["mixup"][-1] > probe_top1 + 5

    # The exported backbone embeds as before, and the head file classifies its embeddings
    # exactly as the evaluation did.
    from unicom_cli.data.images import scan_class_folders
    from unicom_cli.eval.linear import LinearHead
    from unicom_cli.pipelines.features import model_features

    run = tmp / "plain"
    loaded = create_model(run / "arch.json", weights=run / "model.pt", device="cpu")
    paths, names = scan_class_folders(tree.knn_val)
    feats = model_features(paths, tree.knn_val, ModelOptions(workers=0), loaded)
    head = LinearHead.load(run / "head.safetensors")
    pred, _ = head.predict(feats.features)
    acc = 100 * float(np.mean(np.array(head.classes)[pred] == np.array(names)))
    assert acc == pytest.approx(results["plain"][-1], abs=1e-9)


@pytest.fixture(scope="module")
def digits_tiny(tmp_path_factory) -> Path:
    from unicom_cli.data.digits import write_digits_tree

    return write_digits_tree(tmp_path_factory.mktemp("dt"), size=32, limit_per_class=16).root / "knn"


@pytest.mark.slow
def test_resume_is_exact_with_mixup(small_model, digits_tiny, tmp_path):
    """40 train images, batch 8: 5 steps per epoch; cut after step 7, resume from step 6 (mid-epoch)."""
    spec, weights = small_model
    kw = {"batch_size": 8, "epochs": 3, "mixup": 0.8, "cutmix": 1.0, "drop_path": 0.1, "augment": True,
          "eval_every": 1}
    full = finetune(_cfg(spec, weights, digits_tiny, tmp_path / "full", **kw))
    assert full.steps == 15  # (OneCycle needs more than 10 steps for its 10% warm-up)
    finetune(_cfg(spec, weights, digits_tiny, tmp_path / "cut", save_every=2, max_steps=7, **kw))
    (tmp_path / "cut" / "metrics.jsonl").unlink()
    resumed = finetune(_cfg(spec, weights, digits_tiny, tmp_path / "cut", save_every=2, resume="auto", **kw))
    assert resumed.resumed_from.endswith("step-00000006")
    a, b = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "cut" / "metrics.jsonl")
    assert sorted(b) == list(range(7, 16)) and [b[s] for s in b] == [a[s] for s in b]
    sa, sb = torch.load(full.model_path, weights_only=True), torch.load(resumed.model_path, weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    from safetensors.numpy import load_file

    ha, hb = load_file(full.head_path), load_file(resumed.head_path)
    assert all(np.array_equal(ha[k], hb[k]) for k in ha)
    assert [e["top1"] for e in full.evals][-1] == [e["top1"] for e in resumed.evals][-1]


def test_layer_decay_groups(small_model):
    from unicom_cli.models.factory import create_model
    from unicom_cli.train.heads import ClassifyHead, param_groups

    spec, weights = small_model
    model = create_model(spec, weights=weights, device="cpu").model
    head = ClassifyHead(32, ["a", "b", "c"])
    groups = param_groups(model, head, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["patch_embed.proj.weight"])] == (0.125, 0.05)  # 0.5^(depth 2 + 1)
    assert lr_of[id(named["pos_embed"])] == (0.125, 0.0)
    assert lr_of[id(named["blocks.0.attn.qkv.weight"])] == (0.25, 0.05)
    assert lr_of[id(named["blocks.1.norm1.bias"])] == (0.5, 0.0)
    assert lr_of[id(named["feature.0.weight"])] == (1.0, 0.05)
    assert groups[-1]["params"] == [head.fc.weight, head.fc.bias]
    assert sum(len(g["params"]) for g in groups) == len(named) + 2


@pytest.mark.parametrize("case", ["gldv2", "odd_batch", "task"])
def test_refuses_bad_settings(case, small_model, digits_tiny, tmp_path):
    spec, weights = small_model
    kw = {"gldv2": {"dataset": "gldv2"}, "odd_batch": {"batch_size": 7, "mixup": 0.8},
          "task": {"task": "detect"}}[case]
    cfg = _cfg(spec, weights, digits_tiny, tmp_path / "o")
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(UsageError, match={"gldv2": "needs an image dataset", "odd_batch": "even batch size",
                                          "task": "--task detect"}[case]):
        finetune(cfg)
    assert not (tmp_path / "o").exists()


def _finetune_worker(rank, world, cfg):
    finetune(cfg)


@pytest.mark.slow
def test_two_processes_keep_one_head_and_track_one_process(small_model, digits_tiny, tmp_path):
    """The head lives outside DDP: its averaged gradients keep the ranks' copies identical."""
    from tests.train.dist_util import spawn

    spec, weights = small_model
    one = _cfg(spec, weights, digits_tiny, tmp_path / "one", batch_size=8, epochs=3, eval_every=0)
    finetune(one)
    two = _cfg(spec, weights, digits_tiny, tmp_path / "two", batch_size=4, epochs=3, eval_every=0)
    spawn(_finetune_worker, 2, two)
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000015"
    heads = [torch.load(ckpt / f"rank-{r}.pt", weights_only=True)["centres"] for r in (0, 1)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    a, b = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 16))
    # Same global batches and init; only the feature head's BatchNorm sees 4 instead of 8 images.
    assert b[1] == pytest.approx(a[1], rel=0.05)
