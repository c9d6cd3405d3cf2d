"""`unicom embed … --procs 2` end to end: the 1-process files, bad files included, and resume after a kill -9."""

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

from tests.conftest import ROOT
from tests.distributed.test_launch import alive, clean_env
from tests.pipelines.test_embed import BAD, _make_folder
from unicom_cli.cli.app import main

pytestmark = pytest.mark.slow  # every test here runs `unicom embed --procs 2`

BATCH = "3"
SUFFIXES = (".npy", ".ids.txt", ".failures.txt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """77 files (3 bad): odd and not a multiple of the batch; a tiny model; the 1-process output."""
    base = tmp_path_factory.mktemp("embed_dist")
    root = base / "imgs"
    names = _make_folder(root)  # real photos, digits and three bad files
    from sklearn.datasets import load_digits

    (root / "more").mkdir()
    for i, d in enumerate(load_digits().images[100:160]):
        Image.fromarray((d * 15).astype(np.uint8), mode="L").save(root / "more" / f"m{i:02d}.png")
    assert (len(names) + 60) % 2 == 1 and (len(names) + 60) % int(BATCH) != 0

    import torch

    from tests.conftest import TINY
    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    spec = base / "tiny.json"
    spec.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    ckpt = base / "tiny.pt"
    torch.save({k: v.half() if v.is_floating_point() else v
                for k, v in build_model(get_spec(spec)).state_dict().items()}, ckpt)
    one = base / "one.npy"
    assert main(args(root, one, spec, ckpt)) == 0  # one process, in this process
    return {"root": root, "spec": spec, "ckpt": ckpt, "one": one, "count": len(names) + 60}


def args(root: Path, out: Path, spec: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["embed", str(root), "-o", str(out), "--model", str(spec), "--weights", str(ckpt),
            "--batch-size", BATCH, "--workers", "0", "--no-draft", *extra]


def unicom(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unicom_cli", *argv], cwd=ROOT, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_files(a: Path, b: Path) -> None:
    """feats.npy, feats.ids.txt and feats.failures.txt of two outputs are byte-for-byte equal."""
    for suffix in SUFFIXES:
        left, right = (Path(f"{p.with_suffix('')}{suffix}") for p in (a, b))
        assert left.read_bytes() == right.read_bytes(), suffix


def test_two_processes_write_the_one_process_files(data, tmp_path):
    two = tmp_path / "two.npy"
    proc = unicom(*args(data["root"], two, data["spec"], data["ckpt"], "--procs", "2"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_same_files(two, data["one"])  # bitwise: every rank forms the 1-process batches
    assert out.count("embedded") == 1 and f"{data['count'] - len(BAD)} of {data['count']}" in out
    meta = json.loads((tmp_path / "two.json").read_text())
    assert meta["world_size"] == 2 and meta["failures"] == len(BAD)
    failed = (tmp_path / "two.failures.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in failed) == sorted(BAD)


def _workers_of(launcher: int) -> dict[int, int]:
    """rank → pid of the launcher's worker processes."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != launcher:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(stat.parent.name)
    return found


def _signal_mid_run(data, out: Path, sig: int, target: str) -> tuple[subprocess.Popen, int, str]:
    """Start a 2-process embed into ``out``, send ``sig`` to the launcher or to rank 1 once rank 1
    has written its first batch; return (launcher, victim pid, its stderr)."""
    state = Path(f"{out}.partial") / "part-00001.state.json"
    env = clean_env(UNICOM_TEST_CHECKPOINT_S="0")  # a resume point after every batch
    launcher = unicom(*args(data["root"], out, data["spec"], data["ckpt"], "--procs", "2"), env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and launcher.poll() is None:
            if state.exists() and json.loads(state.read_text() or "{}").get("rows_done", 0) > 0:
                break
            time.sleep(0.002)
        victim = launcher.pid if target == "launcher" else _workers_of(launcher.pid)[1]
        os.kill(victim, sig)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    return launcher, victim, err


def test_resume_after_killing_one_process(data, tmp_path):
    out = tmp_path / "k.npy"
    state = tmp_path / "k.npy.partial" / "part-00001.state.json"
    launcher, victim, err = _signal_mid_run(data, out, signal.SIGKILL, "rank 1")  # rank 1, mid-run
    assert launcher.returncode != 0 and "rank 1 was killed by SIGKILL" in err, err
    assert not alive(victim) and not out.exists()
    done = json.loads(state.read_text())
    assert 0 < done["rows_done"] < done["rows"]  # really killed mid-run

    again = unicom(*args(data["root"], out, data["spec"], data["ckpt"], "--procs", "2"))
    stdout, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "resumed" in stdout
    assert_same_files(out, data["one"])
    assert not (tmp_path / "k.npy.partial").exists()


@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_mid_run_is_one_line_and_nothing_after_it(data, tmp_path, target):
    """A scheduler's SIGTERM (to the launcher, or to one worker) ends a 2-process embed with one
    line naming what happened: no traceback from the surviving rank, no output at the final path."""
    out = tmp_path / "t.npy"
    launcher, _, err = _signal_mid_run(data, out, signal.SIGTERM, target)
    assert launcher.returncode != 0, err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted"))]
    assert len(lines) == 1, err
    if target == "rank 1":
        assert "rank 1" in lines[0], err
    assert not out.exists()
