"""Shared fixtures: tiny model configs, an isolated cache, subprocesses that import this checkout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Subprocesses (the launcher's workers, `python -m unicom_cli`) must import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("UNICOM_NO_PROGRESS", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = {"name": "tiny", "input_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2,
        "embedding_size": 16}


# Flag lines as /proc/cpuinfo shows them (abridged) on two kinds of x86 machine: --precision auto
# resolves to fp32 on the first and to bf16 on the second (torch emulates bf16 where it must).
CPU_KINDS = {
    "avx2": frozenset("fpu sse2 avx avx2 fma bmi2".split()),
    "native-bf16": frozenset("avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8".split()),
}


@pytest.fixture(params=sorted(CPU_KINDS))
def cpu_kind(request, monkeypatch) -> str:
    """Run the test once as each kind of CPU, whatever this machine is, so that both branches of
    the precision choice are exercised on every CI machine (``utils.cpu.cpu_flags`` is the seam)."""
    from unicom_cli.utils import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: CPU_KINDS[request.param])
    return request.param


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's weights cache."""
    monkeypatch.setenv("UNICOM_HOME", str(tmp_path_factory.mktemp("unicom_home")))


@pytest.fixture
def tiny_spec_file(tmp_path) -> Path:
    """A JSON architecture file for a 2-block ViT at 32 px (16 patches, 16-dim embedding)."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture
def tiny_checkpoint(tiny_spec_file, tmp_path) -> Path:
    """A checkpoint in the published format: fp16 state dict, same keys, trained-looking BN stats."""
    return write_tiny_checkpoint(tiny_spec_file, tmp_path / "FP16-tiny.pt")


def write_tiny_checkpoint(tiny_spec_file: Path, path: Path) -> Path:
    """The seeded tiny checkpoint of ``tiny_checkpoint`` at ``path`` (for module-scoped fixtures)."""
    import torch

    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    torch.manual_seed(0)
    model = build_model(get_spec(tiny_spec_file))
    for bn in (model.feature[1], model.feature[3]):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


def _mount_tmpfs(folder: Path, size: str, readonly: bool = False) -> bool:
    """Mount a tmpfs of ``size`` at ``folder`` (root only); False where that is not permitted."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real, nearly full file system: ``small_disk(size)`` mounts a tmpfs of that size (root)."""
    import subprocess

    mounted: list[Path] = []

    def make(size: str = "256k", readonly: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        if not _mount_tmpfs(folder, size, readonly):
            pytest.skip("mounting a small tmpfs needs root (the full-disk test needs a real full disk)")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


@pytest.fixture
def one_torch_thread():
    """Tiny models on a busy machine: one torch thread avoids OpenMP barrier stalls.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def one_error_line(err: str) -> str:
    """The CLI's message for a failure: no traceback and exactly one ``error:`` line, the last one
    (notes such as the model and device may come before it). Returns it, whitespace collapsed."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [n for n, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == len(lines) - 1, err
    return " ".join(lines[-1].split())
