"""`unicom embed` end to end: summary, outputs, and clear errors before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from unicom_cli.cli.app import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def photos(tmp_path):
    from sklearn.datasets import load_sample_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, arr in enumerate(load_sample_images().images):
        Image.fromarray(arr).reduce(4).save(folder / f"{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if a command gets as far as building a model."""
    import unicom_cli.models.factory as factory

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the input/output checks")

    monkeypatch.setattr(factory, "create_model", boom)


def _args(src, out, spec, ckpt, *extra):
    return ["embed", str(src), "-o", str(out), "--model", str(spec), "--weights", str(ckpt),
            "--workers", "0", "--batch-size", "2", *extra]


def test_embed_cli_writes_outputs_and_summary(photos, tmp_path, tiny_spec_file, tiny_checkpoint,
                                              capsys):
    out = tmp_path / "feats.npy"
    assert main(_args(photos, out, tiny_spec_file, tiny_checkpoint, "--num-feat", "8",
                      "--dtype", "float16")) == 0
    printed = capsys.readouterr().out
    assert "2 of 3 images" in printed and "broken.jpg" in printed and "images/s" in printed
    feats = np.load(out)
    assert feats.shape == (2, 8) and feats.dtype == np.float16
    meta = json.loads((tmp_path / "feats.json").read_text())
    assert meta["normalized"] is True and meta["num_feat"] == 8 and meta["failures"] == 1
    assert (tmp_path / "feats.ids.txt").read_text() == "0.jpg\n1.jpg\n"
    # A finished output is protected: exit code 2 and a hint.
    assert main(_args(photos, out, tiny_spec_file, tiny_checkpoint)) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_input", "empty_folder", "out_dir_is_a_file",
                                  "read_only_out_dir", "bad_dtype", "num_feat_no_norm"])
def test_errors_before_any_work(case, photos, tmp_path, tiny_spec_file, tiny_checkpoint, capsys,
                                no_model_load):
    src, out, extra = photos, tmp_path / "f.npy", []
    if case == "missing_input":
        src = tmp_path / "nowhere"
    elif case == "empty_folder":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "out_dir_is_a_file":
        (tmp_path / "taken").write_text("a file where the output folder should be")
        out = tmp_path / "taken" / "such" / "f.npy"
    elif case == "read_only_out_dir":
        out = __import__("pathlib").Path("/proc/f.npy")  # read-only even for root
    elif case == "bad_dtype":
        extra = ["--dtype", "int8"]
    else:
        extra = ["--num-feat", "4", "--no-normalize"]
    code = main(_args(src, out, tiny_spec_file, tiny_checkpoint, *extra))
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    expected = {"missing_input": "nowhere: no such file or folder",
                "empty_folder": "no image files", "out_dir_is_a_file": "cannot create the output folder",
                "read_only_out_dir": "cannot write", "bad_dtype": "'int8' is not one of",
                "num_feat_no_norm": "--normalize"}[case]
    assert expected in err
    assert not list(tmp_path.glob("f.*"))
