"""`unicom serve` refusals before it serves: one line, exit 2, no traceback."""

from __future__ import annotations

import socket

import pytest

from unicom_cli.cli.app import main
from unicom_cli.cli.serve import parse_size

pytest.importorskip("fastapi")


def test_sizes():
    assert parse_size("20MB") == 20_000_000
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("1048576") == 1048576


@pytest.mark.parametrize("size", ["", "20XB", "-1MB", "0", "MB", "1e6"])
def test_a_bad_max_upload_is_refused(size, collection, capsys):
    assert main(["serve", str(collection.index), "--max-upload", size]) == 2
    err = capsys.readouterr().err
    assert "--max-upload" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_or_broken_index_is_refused(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.index")]) == 2
    assert "nope.index" in capsys.readouterr().err
    broken = tmp_path / "broken.index"
    broken.mkdir()
    (broken / "index.json").write_text("{not json")
    assert main(["serve", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.index" in err and "Traceback" not in err


def test_a_busy_port_is_refused_before_the_model_loads(collection, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(collection.index), "--port", str(port), "--weights", "/no/such.pt"]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}: cannot listen" in err and "--port" in err


def test_an_ids_file_that_is_a_fifo_is_refused_at_once(collection, tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: serve must refuse, not hang."""
    import os
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "fifo.index"
    shutil.copytree(collection.index, folder)
    (folder / "ids.txt").unlink()
    os.mkfifo(folder / "ids.txt")
    env = dict(os.environ, OMP_NUM_THREADS="1", UNICOM_NO_PROGRESS="1", COLUMNS="200")
    try:
        done = subprocess.run([sys.executable, "-m", "unicom_cli", "serve", str(folder), "--port", "0"],
                              capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("unicom serve hung reading a FIFO ids file")
    assert done.returncode == 2
    assert "ids.txt" in done.stderr and "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
