"""`unicom embed` on 1 process vs `--procs N` (gloo) vs `--gpus N`, wall clock, in one run.

    python benchmarks/embed_procs.py                          # ViT-B/32, 128 photos, 1 vs 2 CPU processes
    python benchmarks/embed_procs.py -n 32 --model tiny.json  # a quick smoke run
    python benchmarks/embed_procs.py --gpus 1                 # adds a 1-GPU run (where CUDA is present)

Times the whole command (start-up, model load, decode, forward, writing and assembling the
files) with the same random weights, prints images/s for each run and the ratio against the
1-process baseline, and checks that every run wrote the same files, byte for byte on CPU.
On a 2-core machine expect no speed-up from 2 processes: they share the same cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_weights(model: str, path: Path) -> None:
    """A checkpoint in the published format (fp16 state dict) with seeded random weights."""
    import torch

    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    torch.manual_seed(0)
    state = build_model(get_spec(model)).state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)


def run_embed(folder: Path, out: Path, model: str, weights: Path, batch: int, extra: list[str]) -> float:
    """Wall-clock seconds of one `python -m unicom_cli embed` run."""
    cmd = [sys.executable, "-m", "unicom_cli", "embed", str(folder), "-o", str(out), "--model", model,
           "--weights", str(weights), "--batch-size", str(batch), "--overwrite", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "UNICOM_NO_PROGRESS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("-n", "--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2, help="CPU processes to compare with 1")
    parser.add_argument("--gpus", type=int, default=0, help="also time --device cuda with this many GPUs")
    parser.add_argument("--dir", type=Path, default=None, help="keep photos here between runs")
    args = parser.parse_args()

    from benchmarks.embed_throughput import make_photos

    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        folder = work / "photos"
        make_photos(folder, args.images)
        weights = work / "weights.pt"
        random_weights(args.model, weights)
        runs = [("1 process (baseline)", "one", ["--device", "cpu"]),
                (f"--procs {args.procs} (gloo)", "procs", ["--device", "cpu", "--procs", str(args.procs)])]
        if args.gpus:
            runs.append((f"--gpus {args.gpus}", "gpus", ["--device", "cuda", "--gpus", str(args.gpus)]))
        print(f"{args.model}, {args.images} photos, batch {args.batch_size}, {os.cpu_count()} CPUs")
        base = None
        for label, name, extra in runs:
            seconds = run_embed(folder, work / f"{name}.npy", args.model, weights, args.batch_size, extra)
            rate = args.images / seconds
            base = base or rate
            same = ""
            if name != "one":
                equal = all((work / f"{name}{s}").read_bytes() == (work / f"one{s}").read_bytes()
                            for s in (".npy", ".ids.txt", ".failures.txt"))
                same = "files identical to 1 process" if equal else "files DIFFER from 1 process"
            print(f"  {label:24s} {seconds:7.1f} s  {rate:7.2f} images/s  ratio {rate / base:5.2f}  {same}")


if __name__ == "__main__":
    main()
