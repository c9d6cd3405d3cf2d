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


# The options that say which network to build, in every command that builds one from a name or file.
MODEL_SOURCE = {"--weights", "--random-init", "--seed", "--mirror", "--cache-dir"}
MODEL_COMMANDS = ("embed", "index", "eval-retrieval", "eval-knn", "eval-linear", "finetune", "export")


def _option_names(command: str) -> set[str]:
    import typer

    from unicom_cli.cli.app import app

    params = typer.main.get_command(app).commands[command].params
    return {name for p in params for name in p.opts}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_builds_a_model_takes_the_same_model_options(command):
    assert MODEL_SOURCE <= _option_names(command), MODEL_SOURCE - _option_names(command)


def test_export_random_init_is_the_seeded_network(tmp_path, tiny_spec_file, capsys):
    """`export --random-init --seed 3` writes exactly the network that `create_model(seed=3)` builds."""
    from safetensors.torch import load_file

    from unicom_cli.models.factory import create_model

    out = tmp_path / "r.safetensors"
    assert main(["export", str(tiny_spec_file), "-o", str(out), "--random-init", "--seed", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    saved = load_file(str(out))
    want = create_model(str(tiny_spec_file), pretrained=False, seed=3, device="cpu", precision="fp32").model
    other = create_model(str(tiny_spec_file), pretrained=False, seed=4, device="cpu", precision="fp32").model
    for name, tensor in want.state_dict().items():
        assert (saved[name] == tensor).all(), name
    assert any((saved[n] != t).any() for n, t in other.state_dict().items() if t.is_floating_point())
