"""The `unicom` entry point as a user runs it: help, errors, debug tracebacks, no torch at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMMANDS = ("models", "download", "embed", "eval-retrieval", "eval-knn", "eval-linear", "prepare-gldv2",
            "finetune", "demo", "export", "index", "search", "serve")


def _unicom(*args: str, env: dict | None = None, importtime: bool = False):
    prefix = [sys.executable] + (["-X", "importtime"] if importtime else [])
    return subprocess.run(prefix + ["-m", "unicom_cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100", **(env or {})}, timeout=120)


def _imported(stderr: str) -> set[str]:
    """Top-level package names from `python -X importtime` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_lists_every_command_without_importing_torch():
    result = _unicom("--help", importtime=True)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    imported = _imported(result.stderr)
    assert "typer" in imported  # the parse is real
    assert not imported & {"torch", "numpy", "timm", "torchvision", "fastapi", "uvicorn"}


def test_models_json_keys_without_importing_torch():
    result = _unicom("models", "--json", importtime=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows][:4] == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for row in rows:
        assert {"name", "input_size", "embedding_size", "params", "sha256", "cached"} <= set(row)
    assert rows[0]["params"] == 116_723_200 and rows[0]["embedding_size"] == 512
    assert "torch" not in _imported(result.stderr)


def test_models_table_fits_80_columns():
    result = _unicom("models", env={"COLUMNS": "80"})
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ("ViT-L/14@336px", "ViT-B/16@512px-GLDv2", "ViT-L/14@512px-GLDv2"):
        assert any(name in line for line in lines)  # whole names: nothing truncated


def test_unknown_model_is_one_line_exit_2_and_debug_shows_traceback():
    result = _unicom("download", "ViT-B-32")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unknown model 'ViT-B-32'" in result.stderr and "did you mean 'ViT-B/32'" in result.stderr
    debug = _unicom("download", "ViT-B-32", env={"UNICOM_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UnknownModel" in debug.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["nonsense-command"], ["download", "--bogus"]])
def test_click_usage_errors_exit_2(args):
    result = _unicom(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "No such" in result.stderr


def test_version():
    from unicom_cli import __version__

    result = _unicom("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"unicom-cli {__version__}"
