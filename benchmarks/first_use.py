"""The first seconds of a command: how soon a line appears, and how soon an offline run fails.

Run from the repository root: ``python benchmarks/first_use.py [--runs 3]``. For `unicom embed`
with ``UNICOM_MIRROR`` at a folder that does not exist (an offline machine), prints the median
time until the first line on stderr and until the process exits, against `unicom download`
failing the same way in the same run (the baseline the issue compares with). Prints only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "UNICOM_NO_PROGRESS": "1"}


def first_line_and_exit(argv: list[str]) -> tuple[float, float, str]:
    """(seconds to the first stderr line, seconds to exit, that line)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "unicom_cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stderr.readline()
    first = time.perf_counter() - start
    proc.stderr.read()
    proc.wait()
    return first, time.perf_counter() - start, line.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images", "a")
        images.mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (64, 64), (90, 120, 200)).save(images / "0.jpg")
        ENV["UNICOM_HOME"] = str(Path(tmp, "cache"))  # an empty cache
        ENV["UNICOM_MIRROR"] = str(Path(tmp, "no-mirror"))  # offline: a mirror that is not there
        offline: list[str] = []
        cases = {
            "unicom download ViT-B/32 (baseline)": ["download", "ViT-B/32", *offline],
            "unicom embed --model ViT-B/32": ["embed", str(images.parent), "-o", str(Path(tmp, "f.npy")),
                                              "--model", "ViT-B/32", *offline],
        }
        results = {}
        for name, argv in cases.items():
            runs = [first_line_and_exit(argv) for _ in range(args.runs)]
            results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                             runs[0][2])
    base = results["unicom download ViT-B/32 (baseline)"][1]
    for name, (first, total, line) in results.items():
        print(f"{name:<38} first line {first:6.2f} s  fails after {total:6.2f} s "
              f"({total / base:4.2f}x the baseline)  first line: {line[:50]!r}")


if __name__ == "__main__":
    main()
