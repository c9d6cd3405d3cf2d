"""`unicom finetune --task classify` end to end: the exported backbone embeds, the head classifies
through `unicom embed --head`, eval-knn runs on the backbone; bad settings exit 2 with one line."""

from __future__ import annotations

import csv

import pytest

from unicom_cli.cli.app import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_classify_run_exports_backbone_and_head(tiny_spec_file, tiny_checkpoint, tmp_path, capsys):
    from unicom_cli.data.digits import write_digits_tree

    tree = write_digits_tree(tmp_path / "d", size=32, limit_per_class=16)
    run = tmp_path / "run"
    code = main(["finetune", "--task", "classify", "--arch", str(tiny_spec_file), "--weights", str(tiny_checkpoint),
                 "--dataset", f"folder:{tree.root / 'knn'}", "-o", str(run), "--epochs", "3", "-b", "8",
                 "--lr", "1e-3", "--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1",
                 "--layer-decay", "0.75", "--weight-decay", "0.05", "--input-size", "48", "--device", "cpu",
                 "--workers", "0"])
    out = "".join(capsys.readouterr().out.split())  # the terminal width wraps long paths anywhere
    assert code == 0, out
    assert f"wrote{run / 'head.safetensors'}" in out and "besttop1" in out  # a wrote line per file
    model = ["-m", str(run / "arch.json"), "--weights", str(run / "model.pt"), "--workers", "0", "--device", "cpu"]
    assert main(["embed", str(tree.knn_val), "-o", str(tmp_path / "v.npy"), *model,
                 "--head", str(run / "head.safetensors")]) == 0
    rows = list(csv.DictReader((tmp_path / "v.predictions.csv").open()))
    assert len(rows) == 40 and {r["class"] for r in rows} <= {"5", "6", "7", "8", "9"}
    assert all(0.2 <= float(r["probability"]) <= 1 for r in rows)  # the top class of 5
    assert main(["eval-knn", "--train-dataset", str(tree.knn_train), "--val-dataset", str(tree.knn_val),
                 *model, "--nb-knn", "5"]) == 0


def test_classify_on_gldv2_exits_2(tmp_path, capsys):
    code = main(["finetune", "--task", "classify", "--dataset", "gldv2", "-o", str(tmp_path / "o"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--task classify needs an image dataset" in " ".join(err.split())
    assert "Traceback" not in err and not (tmp_path / "o").exists()
