"""Kill test of `embed -o feats/`: a 2-process run SIGKILLed at random points, then finished, vs one never killed.

    python benchmarks/embed_kill.py                 # 8 tar shards x 100 images, --procs 2, 3 kills
    python benchmarks/embed_kill.py --kills 5 --seed 7

The uninterrupted run comes first; each interrupted run is then started again on the same folder
and its whole process group SIGKILLed once its checkpointed images pass a point drawn uniformly
from the work left (checkpoints after every batch, so kills land inside shards and between
them). A last run finishes the folder. Every feature file and id list must equal the
uninterrupted run's byte for byte; the script prints what each kill left and exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_shards import TINY, make_images, write_inputs  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "UNICOM_NO_PROGRESS": "1"}


def command(tars: Path, out: Path, spec: Path) -> list[str]:
    return [sys.executable, "-m", "unicom_cli", "embed", str(tars), "-o", f"{out}/", "--model", str(spec),
            "--random-init", "--precision", "fp32", "--batch-size", "8", "--workers", "1", "--procs", "2"]


def progress(folder: Path) -> int:
    """Images checkpointed so far: finished shards' items plus unfinished shards' checkpoints."""
    done = 0
    for path in list(folder.glob("*.json")) + list(folder.glob("*.partial/state.json")):
        if path.name in ("run.json", "manifest.json"):
            continue
        try:
            done += int(json.loads(path.read_text()).get("items", 0))
        except (OSError, ValueError):
            pass  # being replaced this instant
    return done


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy")) + sorted(folder.glob("*.ids.txt"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "tiny.json"
        spec.write_text(json.dumps(TINY))
        _, tars = write_inputs(make_images(args.shards * args.per_shard), tmp, args.shards)
        clean = tmp / "clean"
        start = time.perf_counter()
        subprocess.run(command(tars, clean, spec), env=ENV, check=True, capture_output=True)
        duration = time.perf_counter() - start
        expected = outputs(clean)
        print(f"{args.shards} tar shards x {args.per_shard} images, --procs 2, tiny model: uninterrupted run "
              f"{duration:.1f} s, {len(expected)} files")
        killed = tmp / "killed"
        total = args.shards * args.per_shard
        for n in range(args.kills):
            target = rng.uniform(progress(killed), total)  # a random point of the work left
            proc = subprocess.Popen(command(tars, killed, spec), env={**ENV, "UNICOM_TEST_CHECKPOINT_S": "0"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            while proc.poll() is None and progress(killed) < target:
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            done = len([p for p in killed.glob("*.json") if p.name not in ("run.json", "manifest.json")])
            partial = len(list(killed.glob("*.partial")))
            print(f"kill {n + 1}: SIGKILL at {progress(killed):,} of {total:,} images (aimed at {target:,.0f}, "
                  f"exit {proc.returncode}); {done} shards finished, {partial} unfinished")
        final = subprocess.run(command(tars, killed, spec), env=ENV, capture_output=True, text=True)
        if final.returncode != 0:
            print(f"the finishing run failed: {final.stderr.strip().splitlines()[-1:]}")
            raise SystemExit(1)
        got = outputs(killed)
        same = got == expected
        manifest = json.loads((killed / "manifest.json").read_text())
        print(f"finished: {manifest['shards_done']}/{manifest['units']} shards, {manifest['count']:,} rows; "
              f"bytes equal to the uninterrupted run: {same}")
        if not same:
            differ = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            print(f"differing files: {differ[:10]}")
            raise SystemExit(1)


if __name__ == "__main__":
    main()
