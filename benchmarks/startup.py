"""Start-up time of `unicom --help` and `unicom models` against bare Python and `import torch`.

Run from the repository root: ``python benchmarks/startup.py [--runs 7]``. Prints median wall
times, ratios against the baselines measured in the same run, and whether torch was imported
(``python -X importtime``). Prints only; asserts nothing (timings on shared machines are noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "COLUMNS": "100", "UNICOM_NO_PROGRESS": "1"}
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "unicom --help": [sys.executable, "-m", "unicom_cli", "--help"],
    "unicom models": [sys.executable, "-m", "unicom_cli", "models"],
    "unicom models --json": [sys.executable, "-m", "unicom_cli", "models", "--json"],
}


def median_seconds(command: list[str], runs: int) -> float:
    """Median wall time of ``runs`` executions (after one warm-up for the file cache)."""
    subprocess.run(command, env=ENV, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=ENV, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def imported_packages(command: list[str]) -> set[str]:
    """Top-level packages a command imports, from ``python -X importtime``."""
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], env=ENV,
                            capture_output=True, text=True, check=True)
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in result.stderr.splitlines() if line.startswith("import time:") and "|" in line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    times = {name: median_seconds(cmd, args.runs) for name, cmd in CASES.items()}
    bare, torch_time = times["python -c pass"], times["python -c 'import torch'"]
    print(f"median of {args.runs} runs each ({sys.executable})")
    print(f"{'command':28s} {'seconds':>8s} {'× bare python':>14s} {'× import torch':>15s}")
    for name, seconds in times.items():
        print(f"{name:28s} {seconds:8.3f} {seconds / bare:14.1f} {seconds / torch_time:15.2f}")
    for name in ("unicom --help", "unicom models", "unicom models --json"):
        heavy = imported_packages(CASES[name]) & {"torch", "numpy", "timm", "torchvision", "PIL"}
        print(f"{name}: imports torch: {'yes' if 'torch' in heavy else 'no'}"
              f" (heavy packages imported: {', '.join(sorted(heavy)) or 'none'})")


if __name__ == "__main__":
    main()
