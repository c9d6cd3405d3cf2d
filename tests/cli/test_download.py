"""`unicom download` and `unicom models` end to end, against a loopback weights server."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.weights_server import weights_server  # noqa: F401 (fixture)
from unicom_cli.cli.app import main
from unicom_cli.models import registry
from unicom_cli.models.registry import GITHUB_RELEASES, ModelSpec

PATH = "/tiny/FP16-tiny.pt"


@pytest.fixture
def tiny_registered(weights_server, tiny_checkpoint, monkeypatch):  # noqa: F811
    """A registered model 'tiny-dl' whose release file the loopback server (the mirror) holds."""
    payload = tiny_checkpoint.read_bytes()
    weights_server.files[PATH] = payload
    spec = ModelSpec("tiny-dl", 32, 8, 32, 2, 2, 16, filename="FP16-tiny.pt",
                     url=f"{GITHUB_RELEASES}/tiny/FP16-tiny.pt",
                     sha256=hashlib.sha256(payload).hexdigest())
    drive = ModelSpec("tiny-drive", 32, 8, 32, 2, 2, 16, filename="tiny-drive.pt",
                      gdrive_id="DRIVE1")
    weights_server.drive["DRIVE1"] = PATH
    monkeypatch.setitem(registry._MODELS, spec.name, spec)
    monkeypatch.setitem(registry._MODELS, drive.name, drive)
    monkeypatch.setenv("UNICOM_GDRIVE_URL", weights_server.base)
    return weights_server


def test_download_then_verify_then_models(tiny_registered, capsys, tmp_path):
    cache = str(tmp_path / "cache")
    code = main(["download", "tiny-dl", "--mirror", tiny_registered.base, "--cache-dir", cache])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "downloaded" in out and "published" in out
    assert main(["download", "tiny-drive", "--cache-dir", cache]) == 0  # via the Drive flow
    out = capsys.readouterr().out
    digest = hashlib.sha256(tiny_registered.files[PATH]).hexdigest()
    assert f"tiny-drive sha256 {digest}" in out  # the computed checksum is reported in full

    assert main(["download", "--verify", "tiny-dl", "tiny-drive", "--cache-dir", cache]) == 0
    assert capsys.readouterr().out.count(" ok ") == 2

    assert main(["models", "--json", "--cache-dir", cache]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["tiny-dl"]["cached"] and rows["tiny-dl"]["checksum"] == "verified"
    assert rows["tiny-drive"]["checksum"] == "computed" and rows["tiny-drive"]["sha256"] == digest
    assert rows["ViT-B/32"]["cached"] is False and rows["ViT-B/32"]["checksum"] == "published"

    (tmp_path / "cache" / "FP16-tiny.pt").write_bytes(b"garbage")
    assert main(["download", "--verify", "--cache-dir", cache]) == 1
    captured = capsys.readouterr()
    assert "corrupt" in captured.out and "unicom download tiny-dl" in captured.err
    assert "missing" in captured.out  # the published models are not cached here


def test_verify_of_a_named_missing_model_fails(tiny_registered, capsys, tmp_path):
    assert main(["download", "--verify", "tiny-dl", "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "not cached" in capsys.readouterr().err


def test_mirror_from_environment(tiny_registered, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UNICOM_MIRROR", tiny_registered.base)
    assert main(["download", "tiny-dl", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert tiny_registered.requested(PATH) == [None]


def test_failed_download_exits_1_and_names_the_url(tiny_registered, capsys, tmp_path):
    code = main(["download", "tiny-dl", "--mirror", tiny_registered.base + "/nothing-here",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1
    assert tiny_registered.base + "/nothing-here/tiny/FP16-tiny.pt" in err and "404" in err


@pytest.mark.parametrize("args, message", [
    (["download", "ViT-B32"], "did you mean 'ViT-B/32'"),
    (["download"], "--all"),
    (["download", "ViT-B/32", "--all"], "not both"),
    (["download", "ViT-B/32", "ViT-B/16", "--sha256", "a" * 64], "exactly one model"),
    (["download", "ViT-B/32", "--sha256", "xyz"], "64 hexadecimal"),
])
def test_bad_usage_exits_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_stall_budget_option(tiny_registered, capsys, tmp_path, monkeypatch):
    """Issue 28 item 27: --stall-budget bounds the stalled time of all attempts together."""
    monkeypatch.setenv("UNICOM_DOWNLOAD_STALL_S", "0.3")
    tiny_registered.fault(PATH, *["trickle"] * 100)
    code = main(["download", "tiny-dl", "--mirror", tiny_registered.base, "--cache-dir",
                 str(tmp_path / "c"), "--stall-budget", "0.75"])
    err = capsys.readouterr().err
    assert code == 1 and "stalled for" in err and "--stall-budget" in err, err
    assert 3 <= len(tiny_registered.requested(PATH)) <= 4
