"""Issue 28 item 16: a disk that fills while indexing. A real small tmpfs where we may mount one
(root), else the free-space check alone with ``shutil.disk_usage`` reporting a small disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import one_error_line
from tests.index.conftest import clustered, write_features
from unicom_cli.errors import DiskError
from unicom_cli.index import build_index

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    """Mount tmpfs file systems of a given size under tmp_path; unmounted after the test."""
    mounted: list[Path] = []

    def mount(megabytes: float) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0 or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(folder)],
                capture_output=True).returncode != 0:
            pytest.skip("needs root and mount for a real small file system")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_on_disk_build_on_a_disk_too_small_is_one_line(small_disk, tmp_path):
    """The parts fit, the merged lists do not: this died with SIGBUS (exit 135, temp folder left)."""
    disk = small_disk(6)
    npy = write_features(tmp_path / "f", "feats", clustered(30_000, 32, seed=1))
    run = subprocess.run([sys.executable, "-m", "unicom_cli", "index", str(npy), "-o", str(disk / "i"),
                          "--on-disk", "--index", "IVF64,Flat"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    line = one_error_line(run.stderr)
    assert str(disk) in line and ("not enough free space" in line or "disk is full" in line)
    assert _left(disk) == []


def test_merging_lists_into_a_full_disk_is_a_disk_error_not_sigbus(small_disk, tmp_path):
    """The memory-mapped lists file is given its blocks before the copy: a disk that fills
    after the free-space check (another writer) is a DiskError, not a SIGBUS in the copy."""
    disk = small_disk(1)
    script = textwrap.dedent(f"""
        import shutil, sys
        import numpy as np, faiss
        from unicom_cli.errors import DiskError
        from unicom_cli.index import fill
        x = np.random.default_rng(0).standard_normal((20_000, 32)).astype(np.float32)
        index = faiss.index_factory(32, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(x[:2000]); index.add(x)
        empty = faiss.clone_index(index); empty.reset()
        real = shutil.disk_usage
        shutil.disk_usage = lambda p: real(p)._replace(free=1 << 40)  # the check passes: space went later
        try:
            fill._merge_lists_to_disk(empty, [index], __import__("pathlib").Path({str(disk / 'index.ivfdata')!r}),
                                        __import__("pathlib").Path({str(disk)!r}))
        except DiskError as exc:
            print("DiskError:", exc); sys.exit(3)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 3, (run.returncode, run.stderr[-2000:])  # not -7 (SIGBUS)
    assert f"DiskError: {disk}: cannot write, the disk is full" in run.stdout


def test_flat_index_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path, monkeypatch):
    """Refused before the work; and when the disk fills after the check (here: the check is
    told there is room), faiss's write error is the same one line and the temp folder goes."""
    disk = small_disk(1)
    npy = write_features(tmp_path / "f", "feats", clustered(5000, 64))
    with pytest.raises(DiskError, match=f"^{disk}: not enough free space for the index i"):
        build_index(npy, disk / "i", index="flat", progress=False)
    assert _left(disk) == []
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    with pytest.raises(DiskError, match=f"^{disk}: cannot write, the disk is full"):
        build_index(npy, disk / "i", index="flat", progress=False)
    assert _left(disk) == []


@pytest.mark.parametrize("on_disk", [False, True])
def test_free_space_is_checked_before_any_work(on_disk, tmp_path, monkeypatch):
    """Without a small disk to mount: the disk reports less free space than the index needs
    (4,000 × (64 + 8) bytes of lists, twice with --on-disk); refused before training, nothing written."""
    npy = write_features(tmp_path / "f", "feats", clustered(4000, 16))
    need = 4000 * (16 * 4 + 8) * (2 if on_disk else 1)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need))  # the margin is missing
    out = tmp_path / "out" / "i"
    out.parent.mkdir()
    with pytest.raises(DiskError, match="not enough free space for the index i"):
        build_index(npy, out, index="IVF16,Flat", on_disk=on_disk, progress=False)
    assert _left(out.parent) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need + (2 << 20)))
    build_index(npy, out, index="IVF16,Flat", on_disk=on_disk, progress=False, held_out=100)
    assert (out / "index.faiss").is_file()


def test_leftovers_of_a_killed_build_do_not_count_against_the_room(small_disk, tmp_path):
    """A build killed earlier (its pid gone) left its temp folder filling the disk: it is removed
    before the free-space check, so the rerun succeeds."""
    disk = small_disk(2)
    npy = write_features(tmp_path / "f", "feats", clustered(500, 64))  # 128 KiB of vectors (+ 1 MiB margin)
    stale = disk / ".i.tmp-999999999"
    stale.mkdir()
    (stale / "index.faiss").write_bytes(b"\0" * (1200 << 10))
    summary = build_index(npy, disk / "i", index="flat", progress=False)
    assert summary.count == 500 and not stale.exists()
