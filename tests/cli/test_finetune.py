"""`unicom finetune` end to end on a tiny model, recipes and flag precedence, clear input errors."""

from __future__ import annotations

import json

import pytest
import torch

from unicom_cli.cli.app import main
from unicom_cli.train.recipes import recipe_for


@pytest.mark.slow
def test_finetune_folder_end_to_end(tiny_spec_file, tiny_checkpoint, tmp_path, capsys):
    from unicom_cli.data.digits import write_digits_tree

    tree = write_digits_tree(tmp_path / "digits", size=32, limit_per_class=8)
    out = tmp_path / "run"
    code = main(["finetune", "--arch", str(tiny_spec_file), "--weights", str(tiny_checkpoint),
                 "--dataset", f"folder:{tree.root}", "--epochs", "1", "--batch-size", "8",
                 "--lr", "1e-3", "--device", "cpu", "--output", str(out), "--workers", "0",
                 "--margin-filter", "0.3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "finetuned 5 steps" in printed and "best recall@1" in printed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 5 and lines[-1]["eval"]["images"] == 40
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(torch.load(tiny_checkpoint, weights_only=True))
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 8 and config["margin_filter"] == 0.3


def test_default_is_the_gldv2_recipe_and_missing_data_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    name, values, gpus = recipe_for(None, "ViT-L/14", None)
    assert name == "gldv2-vit-l14" and gpus == 8
    assert values["init_from"] == "ViT-L/14@336px" and values["input_size"] == 512
    assert values["sample_rate"] == 0.5 and values["lr_pfc_weight"] == 3.0
    assert recipe_for(None, "ViT-B/16", "sop")[0] == "sop-vit-b16"
    monkeypatch.chdir(tmp_path)
    # The model is built before the data is opened; a JSON arch avoids a download here.
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"input_size": 32, "patch_size": 8, "width": 32, "depth": 1,
                                "heads": 2, "embedding_size": 16}))
    code = main(["finetune", "--arch", str(spec), "--device", "cpu"])
    assert code == 2
    assert "unicom prepare-gldv2" in capsys.readouterr().err


def test_unknown_recipe_lists_the_choices(capsys):
    assert main(["finetune", "--recipe", "nope"]) == 2
    assert "sop-vit-b16" in capsys.readouterr().err


def test_margin_filter_outside_0_1_is_refused(capsys):
    assert main(["finetune", "--margin-filter", "1.5"]) == 2
    assert "--margin-filter" in capsys.readouterr().err
