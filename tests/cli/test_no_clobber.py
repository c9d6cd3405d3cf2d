"""No command replaces an existing file without --overwrite: not its main output, not a file it
writes beside it (sidecar, ids, failures list, JSON, picture); the refusal names the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unicom_cli.cli.app import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

MINE = "the user's own file\n"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _refused(capsys, code: int, existing) -> None:
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert f"{existing} already exists" in err and "--overwrite" in err, err
    assert existing.read_text() == MINE  # untouched


@pytest.mark.parametrize("suffix,beside", [(".onnx", "notes.json"), (".safetensors", "notes.arch.json")])
def test_export_keeps_a_user_file_beside_its_output(tmp_path, tiny_spec_file, tiny_checkpoint, capsys,
                                                    suffix, beside):
    mine = tmp_path / beside
    mine.write_text(MINE)
    code = main(["export", str(tiny_spec_file), "--weights", str(tiny_checkpoint),
                 "-o", str(tmp_path / f"notes{suffix}")])
    _refused(capsys, code, mine)
    assert not (tmp_path / f"notes{suffix}").exists()


@pytest.mark.parametrize("beside", ["mine.json", "mine.ids.txt", "mine.failures.txt"])
def test_embed_names_the_file_that_exists(tmp_path, photos, tiny_spec_file, capsys, beside):
    mine = tmp_path / beside
    mine.write_text(MINE)
    code = main(["embed", str(photos), "-o", str(tmp_path / "mine.npy"), "--model", str(tiny_spec_file),
                 "--random-init", "--workers", "0"])
    _refused(capsys, code, mine)
    assert not (tmp_path / "mine.npy").exists()


@pytest.fixture
def index(tmp_path, photos, tiny_spec_file, capsys):
    out = tmp_path / "p.index"
    assert main(["index", str(photos), "-o", str(out), "--model", str(tiny_spec_file), "--random-init",
                 "--workers", "0"]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("option,name", [("-o", "results.csv"), ("--vis", "results.html")])
def test_search_outputs_need_overwrite(tmp_path, photos, index, capsys, option, name):
    mine = tmp_path / name
    mine.write_text(MINE)
    _refused(capsys, main(["search", str(index), str(photos / "p0.png"), option, str(mine)]), mine)
    assert main(["search", str(index), str(photos / "p0.png"), "-k", "2", option, str(mine), "--overwrite"]) == 0
    assert mine.read_text() != MINE


def test_duplicates_output_needs_overwrite(tmp_path, index, capsys):
    mine = tmp_path / "dups.csv"
    mine.write_text(MINE)
    _refused(capsys, main(["search", str(index), "--duplicates", "-o", str(mine)]), mine)


def test_eval_outputs_are_refused_before_the_work(tmp_path, photos, capsys):
    vectors = tmp_path / "f.npy"
    np.save(vectors, np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32))
    (tmp_path / "f.ids.txt").write_text("".join(f"{c}/p{i}.png\n" for i, c in enumerate("aabb")))
    mine = tmp_path / "report.json"
    mine.write_text(MINE)
    code = main(["eval-retrieval", "--embeddings", str(vectors), "--json", str(mine)])
    _refused(capsys, code, mine)
    for argv in (["eval-knn", "--train-dataset", str(photos), "--val-dataset", str(photos)],
                 ["eval-linear", "--train-dataset", str(photos), "--val-dataset", str(photos)]):
        _refused(capsys, main([*argv, "--random-init", "--json", str(mine)]), mine)
    head = tmp_path / "head.safetensors"
    head.write_text(MINE)
    _refused(capsys, main(["eval-linear", "--train-dataset", str(photos), "--val-dataset", str(photos),
                           "--random-init", "--save-classifier", str(head)]), head)
