"""Issue 19, evaluation: NaN/Inf features are refused with the count and the first ids (items 2),
and truncated or odd feature files get a message instead of exit 130 or a traceback (item 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli.test_eval_retrieval import digits  # noqa: F401 (fixture: tree, npy, ids, feats)
from tests.conftest import one_error_line
from unicom_cli.cli.app import main


def _save(folder, name, feats, ids):
    np.save(folder / f"{name}.npy", feats)
    (folder / f"{name}.ids.txt").write_text("\n".join(ids) + "\n")
    return folder / f"{name}.npy"


def _err(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("rows", ["two_nan", "one_inf", "all_nan"])
def test_retrieval_refuses_nonfinite_embeddings(digits, tmp_path, capsys, rows):  # noqa: F811
    tree, _, ids, feats = digits
    feats = feats.copy()
    bad = {"two_nan": [3, 7], "one_inf": [5], "all_nan": list(range(len(ids)))}[rows]
    feats[bad, 2] = np.inf if rows == "one_inf" else np.nan
    npy = _save(tmp_path, "f", feats, ids)
    out = tmp_path / "r.json"
    code = main(["eval-retrieval", "--dataset", f"folder:{tree.test}", "--embeddings", str(npy),
                 "--json", str(out)])
    err = _err(capsys)
    assert code == 1, err
    assert f"{len(bad):,} of {len(ids):,} feature rows are not finite" in err
    assert ids[bad[0]] in err
    assert not out.exists()


def test_knn_refuses_nonfinite_train_embeddings(digits, tmp_path, capsys):  # noqa: F811
    tree, _, ids, feats = digits
    bad = feats.copy()
    bad[0] = np.nan
    train = _save(tmp_path, "train", bad, ids)
    val = _save(tmp_path, "val", feats, ids)
    code = main(["eval-knn", "--train-dataset", str(tree.test), "--val-dataset", str(tree.test),
                 "--train-embeddings", str(train), "--val-embeddings", str(val)])
    err = _err(capsys)
    assert code == 1 and f"1 of {len(ids)} feature rows are not finite" in err and ids[0] in err


def test_retrieval_with_nan_weights_is_refused(digits, tmp_path, capsys, tiny_spec_file,  # noqa: F811
                                              tiny_checkpoint):
    """The issue's case: NaN weights reported Recall@1 100.0."""
    import torch

    tree, _, ids, _ = digits
    state = torch.load(tiny_checkpoint, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[key][:] = float("nan")
    ckpt = tmp_path / "nan.pt"
    torch.save(state, ckpt)
    code = main(["eval-retrieval", "--dataset", f"folder:{tree.test}", "--model", str(tiny_spec_file),
                 "--weights", str(ckpt), "--workers", "0", "--batch-size", "100"])
    err = _err(capsys)
    assert code == 1 and f"{len(ids)} of {len(ids)} feature rows are not finite" in err


@pytest.mark.parametrize("case", ["empty", "truncated", "strings", "latin1_ids"])
def test_odd_feature_files_get_a_message(digits, tmp_path, capsys, case):  # noqa: F811
    """Item 11 (0-byte .npy was exit 130 with no output) and the low-severity file cases."""
    tree, _, ids, feats = digits
    npy = _save(tmp_path, "f", feats, ids)
    if case == "empty":
        npy.write_bytes(b"")
    elif case == "truncated":
        npy.write_bytes(npy.read_bytes()[:100])
    elif case == "strings":
        np.save(npy, np.array([["a"] * 4] * len(ids)))
    else:  # a non-UTF-8 ids file: read as bytes (surrogateescape), not a UnicodeDecodeError
        (tmp_path / "f.ids.txt").write_bytes(b"\n".join(i.encode() for i in ids[:-1]) + b"\ncaf\xe9\n")
    out = tmp_path / "r.json"
    code = main(["eval-retrieval", "--dataset", f"folder:{tree.test}", "--embeddings", str(npy),
                 "--json", str(out)])
    if case == "latin1_ids":  # one id matches no image: that image is skipped, the rest evaluated
        assert code == 0 and json.loads(out.read_text())["skipped"] == 1
        return
    err = _err(capsys)
    assert code == 2 and str(npy) in err, err
    assert not out.exists()
