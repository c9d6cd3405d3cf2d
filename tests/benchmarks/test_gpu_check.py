"""benchmarks/gpu_check.py runs its steps where there is no GPU (--cpu-smoke) and says so otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "UNICOM_NO_PROGRESS": "1"})


def test_without_cuda_it_says_so_and_exits_2():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = _run()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout.startswith("no CUDA device: nothing measured")


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_and_prints_one_table():
    done = _run("--cpu-smoke")
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.splitlines()
    assert table[0].startswith("gpu_check on CPU smoke run (tiny model)")
    rows = {line.split("  ")[0].strip(): line for line in table[1:] if "  " in line}
    for check in ("embed tiny fp32", "embed tiny bf16", "embed tiny fp32 vs bf16", "search torch on cpu",
                  "finetune tiny 20 steps", "1-process GLOO group"):
        assert check in rows and "  ok  " in rows[check], (check, done.stdout)
    assert "identical neighbours vs CPU faiss" in rows["search torch on cpu"]
    assert "DALI" in done.stdout  # a row either way: measured, or skipped with the reason
