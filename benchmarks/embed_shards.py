"""`unicom embed` from WebDataset tar shards vs the same images as a folder, tiny model, in one run.

    python benchmarks/embed_shards.py                      # 2,000 photos of 320x240, 4 shards, 3 rounds
    python benchmarks/embed_shards.py -n 400 --rounds 2    # a quick smoke run

A tiny random network (2 blocks at 32 px) makes reading and decoding the bound, which is what
differs between the routes. Rounds are interleaved (tar, folder, folder .npy, tar, …) so that
load on a shared machine hits every route alike; each route's best and median images/s are
printed with the ratio to the folder route (sharded output), and the rows of the routes are
checked equal (same pictures, same model: same embeddings up to batch rounding).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"name": "tiny", "input_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "embedding_size": 16}


def make_images(n: int) -> list[bytes]:
    """``n`` distinct JPEGs of 320x240: crops of scikit-image's sample photos, shifted and flipped."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        w, h = img.size
        x, y = (i * 7) % (w - 320), (i * 5) % (h - 240)
        crop = img.crop((x, y, x + 320, y + 240))
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_inputs(images: list[bytes], root: Path, shards: int) -> tuple[Path, Path]:
    """The same images as a folder (``<shard>/<key>.jpg``) and as tar shards (``<shard>.tar``)."""
    folder, tars = root / "folder", root / "tars"
    tars.mkdir(parents=True)
    per = -(-len(images) // shards)
    for s in range(shards):
        (folder / f"{s:05d}").mkdir(parents=True)
        with tarfile.open(tars / f"{s:05d}.tar", "w") as tar:
            for n in range(s * per, min(len(images), (s + 1) * per)):
                key = f"{n:08d}"
                (folder / f"{s:05d}" / f"{key}.jpg").write_bytes(images[n])
                for ext, payload in (("jpg", images[n]), ("json", json.dumps({"n": n}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder, tars


def run(source: Path, out: Path, spec: Path, args, shard_size: int) -> float:
    """Wall-clock seconds of one embed call (model load, decode, forward, writing)."""
    import shutil

    from unicom_cli.pipelines.embed import EmbedConfig, embed_images

    if out.exists():
        shutil.rmtree(out) if out.is_dir() else None
    for sibling in out.parent.glob(f"{out.stem}.*"):
        sibling.unlink() if sibling.is_file() else shutil.rmtree(sibling)
    config = EmbedConfig(input=source, output=out, model=str(spec), pretrained=False, batch_size=args.batch_size,
                         workers=args.workers, precision="fp32", progress=False, overwrite=True,
                         sharded=out.suffix != ".npy", shard_size=shard_size)
    start = time.perf_counter()
    embed_images(config)
    return time.perf_counter() - start


def rows_of(out: Path) -> dict[str, np.ndarray]:
    if out.suffix == ".npy":
        ids = out.with_suffix(".ids.txt").read_text().splitlines()
        return {i.rsplit(".", 1)[0]: r for i, r in zip(ids, np.load(out))}
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {}
    for shard in manifest["shards"]:
        ids = (out / shard["ids"]).read_text().splitlines()
        rows.update({i.rsplit(".", 1)[0]: r for i, r in zip(ids, np.load(out / shard["features"]))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: embed's)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "tiny.json"
        spec.write_text(json.dumps(TINY))
        folder, tars = write_inputs(make_images(args.images), tmp, args.shards)
        per = -(-args.images // args.shards)
        routes = {"tar shards -> feats/": (tars, tmp / "out-tar"),
                  "folder -> feats/": (folder, tmp / "out-folder"),
                  "folder -> feats.npy": (folder, tmp / "out.npy")}
        run(tars, tmp / "warm", spec, args, per)  # page cache and imports warm for every route
        times: dict[str, list[float]] = {name: [] for name in routes}
        for _ in range(args.rounds):
            for name, (source, out) in routes.items():
                times[name].append(run(source, out, spec, args, per))
        ref = rows_of(tmp / "out-folder")
        for name, (_, out) in routes.items():
            got = rows_of(out)
            assert sorted(got) == sorted(ref), f"{name}: other ids"
            worst = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
            assert worst < 1e-4, f"{name}: rows differ from the folder route by {worst}"
        base = args.images / statistics.median(times["folder -> feats/"])
        print(f"{args.images:,} JPEGs 320x240 in {args.shards} shards, tiny model (fp32), batch {args.batch_size}, "
              f"{args.rounds} interleaved rounds; whole embed call timed")
        print(f"{'route':<22} {'best img/s':>11} {'median img/s':>13} {'vs folder':>10}")
        for name, seconds in times.items():
            best, median = args.images / min(seconds), args.images / statistics.median(seconds)
            print(f"{name:<22} {best:>11,.0f} {median:>13,.0f} {median / base:>9.2f}x")
        print("rows: every route equal to the folder route (max abs difference < 1e-4)")


if __name__ == "__main__":
    main()
