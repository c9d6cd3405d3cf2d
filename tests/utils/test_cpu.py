"""The core count follows the CPU affinity (taskset, cpusets), not the machine's total."""

import os
import subprocess
import sys

import pytest

import unicom_cli
from unicom_cli.utils.cpu import cores_per_process, usable_cores


def test_counts_the_affinity_mask():
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert cores_per_process(1) == usable_cores()
    assert cores_per_process(10 * usable_cores()) == 1  # never zero
    assert cores_per_process(2) == max(1, usable_cores() // 2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_process_pinned_to_one_core_counts_one():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from unicom_cli.utils.cpu import usable_cores, cores_per_process; "
            "print(usable_cores(), cores_per_process(4), os.cpu_count())")
    repo = os.path.dirname(os.path.dirname(unicom_cli.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": repo}).stdout.split()
    assert out[:2] == ["1", "1"]
