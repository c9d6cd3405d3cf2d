"""Issue 19, `unicom embed`: two runs on one output, NaN features, odd file names, extreme
aspect ratios, huge files and full disks. Real files, real kills, a real full tmpfs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import one_error_line
from unicom_cli.cli.app import main


def _digits(folder: Path, n: int) -> Path:
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(load_digits().images[:n]):
        Image.fromarray((d * 15).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return folder


def _args(src, out, spec, ckpt, *extra):
    return ["embed", str(src), "-o", str(out), "--model", str(spec), "--weights", str(ckpt),
            "--workers", "0", "--batch-size", "4", *extra]


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unicom_cli", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_second_run_on_one_output_is_refused_and_a_sigkill_frees_it(tmp_path, tiny_spec_file,
                                                                   tiny_checkpoint, capsys):
    """Item 1: run A is frozen mid-run (SIGSTOP); run B on the same -o is refused at once naming
    A's pid; after A is SIGKILLed, B runs, resumes A's work, and the output equals a clean run."""
    src = _digits(tmp_path / "in", 40)
    out = tmp_path / "feats.npy"
    a = _cli(*_args(src, out, tiny_spec_file, tiny_checkpoint), env={"UNICOM_TEST_CHECKPOINT_S": "0"})
    state = tmp_path / "feats.npy.partial" / "part-00000.state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    a.send_signal(signal.SIGSTOP)
    try:
        assert a.poll() is None, a.communicate()
        assert main(_args(src, out, tiny_spec_file, tiny_checkpoint)) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"feats.npy is in use by another unicom run (pid {a.pid})" in err
        assert not out.exists()
    finally:
        a.send_signal(signal.SIGKILL)
        a.communicate()
    assert main(_args(src, out, tiny_spec_file, tiny_checkpoint)) == 0
    assert "resumed" in capsys.readouterr().out
    clean = tmp_path / "clean.npy"
    assert main(_args(src, clean, tiny_spec_file, tiny_checkpoint)) == 0
    assert np.array_equal(np.load(out), np.load(clean))
    assert not list(tmp_path.glob(".*.lock"))


def test_nan_weights_give_failures_never_good_rows(tmp_path, tiny_spec_file, tiny_checkpoint,
                                                  capsys):
    """Item 2: a checkpoint with a NaN weight: no row is good, so nothing is written and the one
    error line names the reason (an empty .npy with exit 0 would pass for success)."""
    import torch

    from unicom_cli.pipelines.features import NONFINITE_REASON

    state = torch.load(tiny_checkpoint, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[key][0, 0] = float("nan")
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(state, nan_ckpt)
    src = _digits(tmp_path / "in", 6)
    out = tmp_path / "f.npy"
    capsys.readouterr()
    assert main(_args(src, out, tiny_spec_file, nan_ckpt)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "none of its 6 images could be embedded" in err[-1]
    assert NONFINITE_REASON in err[-1]
    assert not any(p.name.startswith("f.") for p in tmp_path.iterdir())  # no .npy, ids or work folder


def test_latin1_and_newline_names(tmp_path, tiny_spec_file, tiny_checkpoint, capsys):
    """Item 3: a Latin-1 file name embeds and its id opens the file; a name with a newline is
    listed as a failure and counted, never dropped."""
    src = _digits(tmp_path / "in", 3)
    latin1 = os.fsdecode(b"caf\xe9.png")  # not UTF-8: a surrogate in the str
    os.rename(src / "0000.png", src / latin1)
    os.rename(src / "0001.png", src / "two\nlines.png")
    out = tmp_path / "f.npy"
    assert main(_args(src, out, tiny_spec_file, tiny_checkpoint)) == 0, capsys.readouterr().err
    assert "2 of 3 images" in capsys.readouterr().out
    raw = (tmp_path / "f.ids.txt").read_bytes()
    assert raw == b"0002.png\ncaf\xe9.png\n"
    ids = (tmp_path / "f.ids.txt").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    assert all((src / i).is_file() for i in ids)
    assert (tmp_path / "f.failures.txt").read_text().startswith("two\\nlines.png\tthe file name")
    meta = json.loads((tmp_path / "f.json").read_text())
    assert (meta["images"], meta["count"], meta["failures"]) == (3, 2, 1)


def test_extreme_aspect_ratio_and_huge_file(tmp_path, tiny_spec_file, tiny_checkpoint, capsys):
    """Items 4 and 6: a 1 x 10,000,000 px PNG (under --max-pixels) embeds; a 30 GB (sparse)
    big.jpg is skipped unread with a reason."""
    src = tmp_path / "in"
    src.mkdir()
    wide = np.tile(np.arange(256, dtype=np.uint8), 10_000_000 // 256 + 1)[:10_000_000]
    Image.fromarray(np.stack([wide] * 3, axis=-1)[None]).save(src / "wide.png")
    big = src / "big.jpg"
    with open(big, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0")
        handle.truncate(30 << 30)
    out = tmp_path / "f.npy"
    assert main(_args(src, out, tiny_spec_file, tiny_checkpoint)) == 0
    assert (tmp_path / "f.ids.txt").read_text() == "wide.png\n"
    assert np.isfinite(np.load(out)).all()
    failure = (tmp_path / "f.failures.txt").read_text()
    assert failure.startswith("big.jpg\tthe file is 30,720 MiB")


def _wide_checkpoint(tmp_path: Path, dim: int) -> tuple[Path, Path]:
    """A tiny network with a wide embedding, so that a few hundred rows fill a small disk."""
    import torch

    from tests.conftest import TINY
    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    spec = tmp_path / "wide.json"
    spec.write_text(json.dumps({**TINY, "name": "wide", "embedding_size": dim}))
    torch.manual_seed(0)
    ckpt = tmp_path / "wide.pt"
    torch.save(build_model(get_spec(spec)).state_dict(), ckpt)
    return spec, ckpt


@pytest.mark.slow
@pytest.mark.parametrize("disk_size, where", [("1m", "start"), ("2800k", "assemble")])
def test_full_disk_is_one_line_naming_the_folder(tmp_path, small_disk, disk_size, where):
    """Item 5: the output on a real, small tmpfs. 300 rows x 1024 float32 = 1.2 MB per copy:
    on 1 MiB the run is refused before embedding; on 2.8 MB the part fits but the assembled
    file does not. Either way one line naming the folder, no SIGBUS, nothing final, no temp."""
    spec, ckpt = _wide_checkpoint(tmp_path, 1024)
    src = _digits(tmp_path / "in", 300)
    disk = small_disk(disk_size)
    out = disk / "f.npy"
    proc = _cli(*_args(src, out, spec, ckpt))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    line = one_error_line(err)
    assert str(disk) in line and "free space" in line
    assert not out.exists() and not (disk / "f.ids.txt").exists()
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name]
    done = (disk / "f.npy.partial" / "part-00000.state.json")
    assert done.exists() == (where == "assemble")


def test_a_big_file_has_its_header_checked_before_it_is_read(tmp_path):
    """Item 6: a 200 MiB (sparse) file below the size bound is refused from its header alone;
    measured in a fresh process, whose peak memory would grow by 200 MiB on a whole read."""
    junk = tmp_path / "junk.png"
    with open(junk, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        handle.truncate(200 << 20)
    # VmHWM (the peak of this process's memory) starts afresh at exec; ru_maxrss would not.
    script = (
        "import re, sys\n"
        "from unicom_cli.data.images import load_pixels\n"
        "from unicom_cli.errors import BadImage\n"
        "def peak():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "before = peak()\n"
        "try:\n    load_pixels(sys.argv[1])\nexcept BadImage as exc:\n    print(exc)\n"
        "print(peak() - before)\n")
    done = subprocess.run([sys.executable, "-c", script, str(junk)], capture_output=True,
                          text=True, timeout=120, check=True)
    reason, grown_kib = done.stdout.strip().splitlines()
    assert "cannot decode" in reason or "not an image" in reason
    assert int(grown_kib) < 100 << 10, grown_kib
