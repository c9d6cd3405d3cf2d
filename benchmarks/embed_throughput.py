"""Throughput of `unicom embed` vs the model alone and vs the original's naive loop, in one run.

    python benchmarks/embed_throughput.py                       # ViT-B/32, 256 photos, 2 threads
    python benchmarks/embed_throughput.py --model tiny.json -n 64   # a quick smoke run

Makes ``-n`` real-photo-sized JPEGs (long side 1600-2400 px) from the photos that ship with
scikit-learn and scikit-image, then measures, with the same random weights:

  (a) the model alone on pre-decoded, pre-transformed tensors (the ceiling),
  (b) ``embed_images`` end to end (decode in workers, forward, write .npy), by default
      and with JPEG draft decoding,
  (c) the naive loop of the original: one process, PIL + torchvision transform + forward,

and prints images/s for each with the ratios b/a and b/c. ``--draft-check`` also measures
how far JPEG draft decoding and embed's own loader (TurboJPEG decode + torch's uint8 bicubic)
move the embeddings away from the reference (Pillow decode + torchvision transform), next to
a resampling-noise yardstick (bilinear instead of bicubic resizing of the full image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of 1600-2400 px long side: random crops/flips of the packaged photos, upscaled."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    sources = list(load_sample_images().images) + [
        getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket",
                                           "immunohistochemistry", "hubble_deep_field")]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(np.ascontiguousarray(src[y:y + ch, x:x + cw]))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        long_side = int(rng.integers(1600, 2401))
        scale = long_side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)),
                         Image.Resampling.BICUBIC)
        img.save(path, quality=90)
    return paths


def model_alone(model, tensors, batch_size: int) -> float:
    """(a) images/s of the forward pass on tensors already decoded and transformed."""
    import torch

    with torch.inference_mode():
        model(tensors[:batch_size])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(tensors), batch_size):
            model(tensors[i:i + batch_size])
    return len(tensors) / (time.perf_counter() - start)


def naive_loop(model, transform, paths, batch_size: int) -> float:
    """(c) the original's loop: single process, PIL open + transform + forward per batch."""
    import torch
    from PIL import Image

    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = [transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]]
            model(torch.stack(batch))
    return len(paths) / (time.perf_counter() - start)


def end_to_end(folder: Path, out: Path, model: str, batch_size: int, workers: int | None,
               draft: bool) -> tuple[float, float]:
    """(b) ``embed_images``: (images/s of the embedding loop, wall seconds incl. model build).

    The rate covers decode + forward + writing, not building the model (done once per run)."""
    import torch

    from unicom_cli.pipelines.embed import EmbedConfig, embed_images

    torch.manual_seed(0)  # the same random weights as (a) and (c)
    start = time.perf_counter()
    summary = embed_images(EmbedConfig(input=folder, output=out, model=model, pretrained=False,
                                       batch_size=batch_size, workers=workers, device="cpu",
                                       draft=draft, overwrite=True, progress=False))
    return summary.images_per_s, time.perf_counter() - start


def draft_check(model, spec, paths) -> None:
    """Cosine between embeddings of full decodes and of draft decodes (and of a bilinear resize)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from unicom_cli.data.images import (
        DRAFT_MARGIN,
        load_image,
        load_pixels,
        resize_center_crop,
    )

    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    size = spec.input_size

    def prep(img, mode=InterpolationMode.BICUBIC):
        img = F.center_crop(F.resize(img, size, interpolation=mode), size)
        return (F.to_tensor(img) - mean) / std

    full, draft, bilinear, loader, drafted = [], [], [], [], 0
    for p in paths:
        ref = load_image(p)
        small = load_image(p, draft_size=size * DRAFT_MARGIN)
        drafted += small.size != ref.size
        full.append(prep(ref))
        draft.append(prep(small))
        bilinear.append(prep(ref, InterpolationMode.BILINEAR))
        loader.append((resize_center_crop(load_pixels(p), size).float() / 255 - mean) / std)
    with torch.inference_mode():
        emb = [model(torch.stack(x)) for x in (full, draft, bilinear, loader)]
    cos = [torch.nn.functional.cosine_similarity(emb[0], e).numpy() for e in emb[1:]]
    pix = [(torch.stack(x) - torch.stack(full)).mul(std).abs().mean().item() * 255
           for x in (draft, bilinear, loader)]
    print(f"draft check on {len(paths)} photos ({drafted} decoded at reduced scale, margin "
          f"{DRAFT_MARGIN}x the {size}px input):")
    print(f"  draft vs full decode   : cosine mean {cos[0].mean():.6f} min {cos[0].min():.6f}, "
          f"mean |pixel diff| {pix[0]:.2f}/255")
    print(f"  bilinear vs bicubic    : cosine mean {cos[1].mean():.6f} min {cos[1].min():.6f}, "
          f"mean |pixel diff| {pix[1]:.2f}/255  (resampling-noise yardstick)")
    print(f"  embed's loader vs PIL  : cosine mean {cos[2].mean():.6f} min {cos[2].min():.6f}, "
          f"mean |pixel diff| {pix[2]:.3f}/255  (TurboJPEG decode + torch uint8 bicubic)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B/32", help="registered name or JSON spec (random weights)")
    parser.add_argument("-n", "--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--workers", type=int, default=None, help="decoders for (b) (default: library's)")
    parser.add_argument("--no-draft", action="store_true", help="skip the (b) run with --draft")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; medians are printed")
    parser.add_argument("--draft-check", action="store_true", help="also measure the draft effect")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "unicom-bench-photos")
    args = parser.parse_args()

    import torch

    from unicom_cli.models.factory import create_model

    torch.set_num_threads(args.threads)
    folder = args.data / f"n{args.images}"
    t = time.perf_counter()
    paths = make_photos(folder, args.images)
    print(f"{len(paths)} JPEGs in {folder} ({time.perf_counter() - t:.1f} s to prepare)")
    torch.manual_seed(0)
    loaded = create_model(args.model, pretrained=False, device="cpu")
    model, transform = loaded.model, loaded.transform

    tensors = torch.stack([transform(__import__("PIL.Image").Image.open(p).convert("RGB"))
                           for p in paths])
    out = Path(tempfile.mkdtemp()) / "feats.npy"
    runs: dict[str, list[float]] = {"a": [], "b": [], "bd": [], "c": []}
    for _ in range(args.repeat):  # interleaved rounds: load drifts hit every method alike
        runs["a"].append(model_alone(model, tensors, args.batch_size))
        runs["b"].append(end_to_end(folder, out, args.model, args.batch_size, args.workers,
                                    draft=False)[0])
        if not args.no_draft:
            runs["bd"].append(end_to_end(folder, out, args.model, args.batch_size, args.workers,
                                         draft=True)[0])
        runs["c"].append(naive_loop(model, transform, paths, args.batch_size))
    a, b, c = (float(np.median(runs[k])) for k in "abc")
    bd = float(np.median(runs["bd"])) if runs["bd"] else float("nan")
    print(f"model {loaded.spec.name}, batch {args.batch_size}, {args.threads} threads, "
          f"workers {args.workers if args.workers is not None else 'default'}, "
          f"median of {args.repeat} interleaved round(s)")
    print(f"(a) model alone on pre-decoded tensors : {a:8.1f} images/s")
    print(f"(b) unicom embed end to end            : {b:8.1f} images/s")
    print(f"    … with --draft                     : {bd:8.1f} images/s")
    print(f"(c) naive original loop                : {c:8.1f} images/s")
    print(f"b/a = {b / a:.2f}   b/c = {b / c:.2f}   with --draft: b/a = {bd / a:.2f}   b/c = {bd / c:.2f}")
    if args.repeat > 1:
        print("rounds (images/s): " + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in vals)
                                                for k, vals in runs.items() if vals))
    if args.draft_check:
        draft_check(model, loaded.spec, paths[: min(len(paths), 64)])


if __name__ == "__main__":
    main()
