"""Benchmark `unicom prepare-gldv2` against MXNet's im2rec on the same list, settings and worker count.

    python benchmarks/prepare_gldv2.py [--images 600] [--workers 2] [--mxnet-python /work/mxvenv/bin/python]

Makes a GLDv2-shaped tree of real-photo-sized JPEGs (800-1600 px long side, mosaics of
native-resolution crops of the packaged sample photos, so they carry real photo detail), then
times ``unicom prepare-gldv2 --resize 672 --quality 100 --workers N`` and
``python -m mxnet.tools.im2rec --resize 672 --quality 100 --num-thread N`` on our train.lst
(the MXNet venv, if present). Each tool is run ``--repeats`` times, interleaved; the best time
counts. Rates are images per second of the whole command ("wall") and without start-up
("steady": (N - n) / (t(N) - t(n)) with a second run on the first n = 40 images), which is
what matters for 1.58 M images, and images per CPU-second of the command and its processes,
the figure that stays meaningful on a shared machine where wall times swing with other load.
Also prints our single-process rate, and the floor: the CPU time of the work itself (decode,
resize, encode with OpenCV's libjpeg-turbo, as im2rec does it, in memory, on one thread). Any tool
that produces these JPEGs pays at least that much, so im2rec's CPU per image divided by the floor
bounds the ratio that is attainable here.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = 40


def make_photos(root: Path, count: int, sides: tuple[int, int], seed: int = 0) -> Path:
    """A GLDv2 tree (train_clean.csv + train/a/b/c/id.jpg) of ``count`` photo-like JPEGs; reused if present."""
    import numpy as np
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    csv = root / f"train_clean_{count}_{sides[0]}_{sides[1]}.csv"
    if csv.is_file():
        return csv
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    photos += [Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(seed)
    rows: dict[int, list[str]] = {}
    images = root / f"train_{sides[0]}_{sides[1]}"
    for i in range(count):
        long = int(rng.integers(sides[0], sides[1] + 1))
        short = int(long * rng.uniform(0.6, 0.85))
        w, h = (long, short) if rng.random() < 0.7 else (short, long)
        canvas = Image.new("RGB", (w, h))
        tile = 256
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                p = photos[int(rng.integers(len(photos)))]
                side = min(int(tile * rng.uniform(0.8, 1.25)), p.width, p.height)
                px, py = int(rng.integers(0, p.width - side + 1)), int(rng.integers(0, p.height - side + 1))
                canvas.paste(p.crop((px, py, px + side, py + side)).resize((tile, tile), Image.BILINEAR), (x, y))
        image_id = f"{rng.integers(1 << 62):016x}"
        path = images / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path, quality=int(rng.integers(85, 96)))
        rows.setdefault(i // 5, []).append(image_id)
    tmp = csv.with_suffix(".tmp")
    tmp.write_text("landmark_id,images\n" + "".join(f"{k * 7},{' '.join(v)}\n" for k, v in rows.items()))
    os.replace(tmp, csv)
    return csv


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def ours(csv: Path, images: Path, out: Path, workers: int, limit: int | None = None) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "unicom_cli", "prepare-gldv2", str(csv), "--images", str(images),
           "-o", str(out), "--resize", "672", "--quality", "100", "--workers", str(workers), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "UNICOM_NO_PROGRESS": "1"}
    return timed(cmd + (["--limit", str(limit)] if limit else []), env)


def im2rec(mx_python: str, lst: Path, images: Path, workers: int) -> tuple[float, float]:
    return timed([mx_python, "-m", "mxnet.tools.im2rec", "--resize", "672", "--quality", "100",
                  "--num-thread", str(workers), str(lst), str(images)])


def floor_per_cpu(images: Path, resize: int = 672, quality: int = 100, repeats: int = 2) -> float:
    """Images per CPU-second of bare decode + resize + encode (im2rec's cv2 calls), files already in memory."""
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    datas = [p.read_bytes() for p in sorted(images.rglob("*.jpg"))]
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for data in datas:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            h, w = img.shape[:2]
            size = (resize, h * resize // w) if h > w else (w * resize // h, resize)
            cv2.imencode(".jpg", cv2.resize(img, size), [cv2.IMWRITE_JPEG_QUALITY, quality])
        best = min(best, time.process_time() - start)
    return len(datas) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--sides", type=int, nargs=2, default=(800, 1600), metavar=("MIN", "MAX"),
                        help="range of the long side of the made photos")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("/tmp/unicom-bench-gldv2"))
    parser.add_argument("--mxnet-python", default="/work/mxvenv/bin/python")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    csv = make_photos(args.data, args.images, tuple(args.sides))
    images = args.data / f"train_{args.sides[0]}_{args.sides[1]}"
    sizes = sorted(p.stat().st_size for p in images.rglob("*.jpg"))
    n = len(sizes)
    print(f"{n} JPEGs, long side {args.sides[0]}-{args.sides[1]} px, median {sizes[n // 2] / 1e3:.0f} KB "
          f"(made/found in {time.perf_counter() - t:.0f} s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")

    work = args.data / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    ours(csv, images, work / "ours", args.workers)  # warms the page cache; writes the .lst im2rec reads
    have_mx = Path(args.mxnet_python).exists()
    lines = (work / "ours" / "train.lst").read_text().splitlines(keepends=True)
    for name, count in (("ref", n), ("ref_small", SMALL)):
        (work / name).mkdir()
        (work / name / "train.lst").write_text("".join(lines[:count]))
    runs = {
        "ours": lambda: ours(csv, images, work / "ours", args.workers),
        "ours_small": lambda: ours(csv, images, work / "ours_small", args.workers, SMALL),
        "ref": lambda: im2rec(args.mxnet_python, work / "ref" / "train.lst", images, args.workers),
        "ref_small": lambda: im2rec(args.mxnet_python, work / "ref_small" / "train.lst", images, args.workers),
        "one": lambda: ours(csv, images, work / "one", 1),
        "one_small": lambda: ours(csv, images, work / "one_small", 1, SMALL),
    }
    if not have_mx:
        runs = {k: v for k, v in runs.items() if not k.startswith("ref")}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    cpus: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved: the machine may be shared
        for key, fn in runs.items():
            w, c = fn()
            walls[key].append(w)
            cpus[key].append(c)
    floor = floor_per_cpu(images)
    wall = {k: min(v) for k, v in walls.items()}  # best of each
    cpu = {k: min(v) for k, v in cpus.items()}

    def line(label: str, key: str) -> tuple[float, float]:
        steady = (n - SMALL) / max(wall[key] - wall[f"{key}_small"], 1e-9)
        per_cpu = (n - SMALL) / max(cpu[key] - cpu[f"{key}_small"], 1e-9)
        busy = sorted(c / w for c, w in zip(cpus[key], walls[key]))[len(walls[key]) // 2]  # median of runs
        print(f"{label:22s} {n / wall[key]:7.1f} images/s wall, {steady:7.1f} steady, "
              f"{per_cpu:6.1f} images per CPU-second, {busy:.2f} cores busy")
        return steady, per_cpu

    steady, per_cpu = line(f"ours ({args.workers} workers)", "ours")
    if have_mx:
        ref_steady, ref_per_cpu = line(f"im2rec ({args.workers} threads)", "ref")
        median = sorted(walls["ref"])[len(walls["ref"]) // 2] / sorted(walls["ours"])[len(walls["ours"]) // 2]
        print(f"ratio ours / im2rec: {wall['ref'] / wall['ours']:.2f}x wall (median of runs {median:.2f}x), "
              f"{steady / ref_steady:.2f}x steady, {per_cpu / ref_per_cpu:.2f}x per CPU-second (target >= 1.5x)")
        ids = [(work / d / "train.idx").read_text().split() for d in ("ours", "ref")]
        print(f"same record ids and offsets as im2rec's files: {ids[0][::2] == ids[1][::2]} and "
              f"{ids[0][1::2] == ids[1][1::2]}")
    else:
        print(f"im2rec: skipped ({args.mxnet_python} not found; see benchmarks/mxnet_compat.py for the venv)")
    _, one_per_cpu = line("ours (1 process)", "one")
    print(f"floor (decode + resize + encode only, 1 thread): {floor:6.1f} images per CPU-second; "
          f"ours costs {floor / per_cpu:.2f}x the floor ({floor / one_per_cpu:.2f}x on one process)"
          + (f", im2rec {floor / ref_per_cpu:.2f}x: doing the same work (full-size decode), a tool can be "
             f"at most {floor / ref_per_cpu:.2f}x faster than im2rec per CPU-second" if have_mx else ""))


if __name__ == "__main__":
    main()
