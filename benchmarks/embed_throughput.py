"""Throughput of `unicom embed` in its default precision vs the network alone and vs fp32, in one run.

    python benchmarks/embed_throughput.py                       # ViT-B/32, 256 photos, 2 threads
    python benchmarks/embed_throughput.py --model tiny.json -n 64   # a quick smoke run
    python benchmarks/embed_throughput.py --quality             # + bf16-vs-fp32 cosines, Recall@1

Makes ``-n`` real-photo-sized JPEGs (long side 1600-2400 px) from the photos that ship with
scikit-learn and scikit-image, then measures, with the same random weights:

  (a) the network alone on pre-decoded, pre-transformed tensors, in the default precision
      (``--precision auto``: bf16 on CPUs with native bf16, fp32 elsewhere; ``--default`` forces it),
  (b) ``embed_images`` end to end in the default precision (decode in workers, forward, .npy),
  (c) ``embed_images --precision fp32``,
  (d) the naive loop of the original: one process, PIL + torchvision transform + forward, fp32,

and prints images/s for each with the ratios b/a, b/c and b/d. ``--quality`` adds the minimum
and mean row cosine between default-precision and fp32 embeddings of real photos
(skimage.data) for ViT-B/32 and ViT-L/14 architectures (random weights), and Recall@1 on
scikit-learn's digits with eval-retrieval's feature extraction in both precisions.
``--draft-check`` measures how far JPEG draft decoding and embed's own loader (TurboJPEG decode
+ torch's uint8 bicubic) move the embeddings away from the reference (Pillow decode +
torchvision transform), next to a resampling-noise yardstick (bilinear instead of bicubic).
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
               draft: bool, precision: str) -> tuple[float, float]:
    """(b)/(c) ``embed_images``: (images/s of the embedding loop, wall seconds incl. model build).

    The rate covers decode + forward + writing, not building the model (done once per run)."""
    import torch

    from unicom_cli.pipelines.embed import EmbedConfig, embed_images

    torch.manual_seed(0)  # the same random weights as (a) and (d)
    start = time.perf_counter()
    summary = embed_images(EmbedConfig(input=folder, output=out, model=model, pretrained=False,
                                       batch_size=batch_size, workers=workers, device="cpu",
                                       draft=draft, overwrite=True, progress=False,
                                       precision=precision))
    return summary.images_per_s, time.perf_counter() - start


def _cosines(a, b) -> tuple[float, float]:
    import torch

    cos = torch.nn.functional.cosine_similarity(a.double(), b.double())
    return float(cos.min()), float(cos.mean())


def quality(precision: str, threads: int, digits: int) -> None:
    """bf16-vs-fp32 row cosines on real photos (B/32, L/14) and Recall@1 on digits, both precisions."""
    import torch
    from PIL import Image
    from skimage import data

    from unicom_cli.models.factory import create_model

    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
             "hubble_deep_field", "motorcycle_left", "cat", "retina")
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names if hasattr(data, n)]
    print(f"quality: {precision} vs fp32, random weights, {len(photos)} skimage.data photos")
    for arch in ("ViT-B/32", "ViT-L/14"):
        torch.manual_seed(0)
        loaded = create_model(arch, pretrained=False, device="cpu", precision="fp32")
        x = torch.stack([loaded.transform(p) for p in photos])
        with torch.inference_mode():
            ref = loaded.model(x)
            loaded.model.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
            got = loaded.model(x)
        low, mean = _cosines(got, ref)
        print(f"  {arch:9s} row cosine {precision} vs fp32: min {low:.6f}  mean {mean:.6f}")
        del loaded, ref, got
    recall_on_digits(precision, threads, digits)


def recall_on_digits(precision: str, threads: int, per_class: int) -> None:
    """Recall@1 (all-vs-all) on scikit-learn digits with eval-retrieval's feature extraction."""
    import torch

    from unicom_cli.data.digits import write_digits_tree
    from unicom_cli.eval.retrieval import recall_at_k
    from unicom_cli.eval.search import l2_normalize, search
    from unicom_cli.models.factory import create_model
    from unicom_cli.pipelines.embed import extract_features

    root = Path(tempfile.mkdtemp())
    tree = write_digits_tree(root, size=64, limit_per_class=per_class)
    paths = sorted(p for folder in (tree.train, tree.test) for p in folder.rglob("*.png"))
    labels = np.array([int(p.parent.name) for p in paths])
    out = []
    for prec in dict.fromkeys((precision, "fp32")):
        torch.manual_seed(0)
        loaded = create_model("ViT-B/32", pretrained=False, device="cpu", precision=prec)
        torch.set_num_threads(threads)
        feats = extract_features(paths, loaded, batch_size=32, workers=None,
                                 description=f"digits {prec}").features
        res = search(l2_normalize(feats, None), None, 1, exclude_self=True)
        r1 = 100 * recall_at_k(labels[res.indices], labels, [1])[1]
        out.append(feats)
        print(f"  digits Recall@1 (ViT-B/32 random weights, {len(paths)} images, {prec}): {r1:.2f}")
    if len(out) == 2:
        low, mean = _cosines(torch.from_numpy(out[0]), torch.from_numpy(out[1]))
        print(f"  digits row cosine {precision} vs fp32: min {low:.6f}  mean {mean:.6f}")


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
    parser.add_argument("--default", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the precision (a) and (b) run in (auto: what `unicom embed` picks here)")
    parser.add_argument("--draft", action="store_true", help="also run (b) with --draft")
    parser.add_argument("--no-naive", action="store_true", help="skip (d), the original's loop")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; medians are printed")
    parser.add_argument("--quality", action="store_true", help="bf16-vs-fp32 cosines and Recall@1")
    parser.add_argument("--digits-per-class", type=int, default=10, help="digits per class for --quality")
    parser.add_argument("--draft-check", action="store_true", help="also measure the draft effect")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "unicom-bench-photos")
    args = parser.parse_args()

    import torch

    from unicom_cli.models.factory import create_model, resolve_inference_precision
    from unicom_cli.utils.cpu import native_bf16

    torch.set_num_threads(args.threads)
    default = resolve_inference_precision("cpu", args.default)
    print(f"CPU: native bf16 {'yes' if native_bf16() else 'no'}; default precision here: {default}"
          f"{'' if args.default == 'auto' else ' (forced by --default)'}")
    folder = args.data / f"n{args.images}"
    t = time.perf_counter()
    paths = make_photos(folder, args.images)
    print(f"{len(paths)} JPEGs in {folder} ({time.perf_counter() - t:.1f} s to prepare)")
    torch.manual_seed(0)
    loaded = create_model(args.model, pretrained=False, device="cpu", precision=default)
    model, transform = loaded.model, loaded.transform

    tensors = torch.stack([transform(__import__("PIL.Image").Image.open(p).convert("RGB"))
                           for p in paths])
    out = Path(tempfile.mkdtemp()) / "feats.npy"
    runs: dict[str, list[float]] = {"a": [], "b": [], "bd": [], "c": [], "d": []}
    for _ in range(args.repeat):  # interleaved rounds: load drifts hit every method alike
        runs["a"].append(model_alone(model, tensors, args.batch_size))
        runs["b"].append(end_to_end(folder, out, args.model, args.batch_size, args.workers,
                                    draft=False, precision=default)[0])
        runs["c"].append(end_to_end(folder, out, args.model, args.batch_size, args.workers,
                                    draft=False, precision="fp32")[0])
        if args.draft:
            runs["bd"].append(end_to_end(folder, out, args.model, args.batch_size, args.workers,
                                         draft=True, precision=default)[0])
        if not args.no_naive:
            saved, model.autocast_dtype = model.autocast_dtype, None  # the original's: fp32
            runs["d"].append(naive_loop(model, transform, paths, args.batch_size))
            model.autocast_dtype = saved
    med = {k: float(np.median(v)) if v else float("nan") for k, v in runs.items()}
    a, b, c, d, bd = med["a"], med["b"], med["c"], med["d"], med["bd"]
    print(f"model {loaded.spec.name}, batch {args.batch_size}, {args.threads} threads, "
          f"workers {args.workers if args.workers is not None else 'default'}, "
          f"median of {args.repeat} interleaved round(s)")
    print(f"(a) network alone, {default:4s}             : {a:8.1f} images/s")
    print(f"(b) unicom embed end to end, {default:4s}   : {b:8.1f} images/s")
    print(f"(c) unicom embed --precision fp32    : {c:8.1f} images/s")
    if args.draft:
        print(f"    (b) with --draft                 : {bd:8.1f} images/s")
    if not args.no_naive:
        print(f"(d) naive original loop, fp32        : {d:8.1f} images/s")
    print(f"b/a = {b / a:.2f}   b/c = {b / c:.2f}" + (f"   b/d = {b / d:.2f}" if not args.no_naive else ""))
    if args.repeat > 1:
        print("rounds (images/s): " + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in vals)
                                                for k, vals in runs.items() if vals))
    if args.quality:
        quality("bf16", args.threads, args.digits_per_class)  # what bf16 changes, on any CPU
    if args.draft_check:
        draft_check(model, loaded.spec, paths[: min(len(paths), 64)])


if __name__ == "__main__":
    main()
