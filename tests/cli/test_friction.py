"""The first hour's small frictions (issue 27): each test fails before its fix."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import one_error_line
from unicom_cli.cli.app import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def digits(tmp_path):
    """Two class folders of four small real digit images each (sklearn's 8x8 digits, enlarged)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    folder = tmp_path / "digits"
    for label in (0, 1):
        (folder / str(label)).mkdir(parents=True)
        rows = [i for i, t in enumerate(data.target) if t == label][:4]
        for n, i in enumerate(rows):
            pixels = (data.images[i] * 16).clip(0, 255).astype("uint8")
            Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(folder / str(label) / f"{n}.png")
    return folder


def test_embed_refusal_names_the_file_that_exists(digits, tmp_path, tiny_spec_file, capsys):
    """Only mine.json is there: the refusal names mine.json, not the absent mine.npy."""
    (tmp_path / "mine.json").write_text("{}")
    code = main(["embed", str(digits), "-o", str(tmp_path / "mine.npy"), "--model", str(tiny_spec_file),
                 "--random-init", "--workers", "0"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "mine.json already exists" in line and "mine.npy" not in line
    assert not (tmp_path / "mine.npy").exists()
