"""ViT-B/32 images/s on this CPU: PyTorch fp32 against ONNX Runtime, in one run, same weights.

    python benchmarks/onnx_runtime.py                  # ViT-B/32, batch 16, 600 digits for recall
    python benchmarks/onnx_runtime.py --model tiny.json --digits 200   # a quick smoke run

Exports the model (random weights, seeded: no download) with ``unicom_cli.export`` (uint8 input,
the normalisation inside the graph) and times, on batches of real photos (scikit-image's):

  (a) PyTorch fp32: the same module that was exported, under inference_mode (the baseline);
  (b) ONNX Runtime with its graph optimisations disabled (ORT_DISABLE_ALL);
  (c) ONNX Runtime with all graph optimisations (ORT_ENABLE_ALL, what `embed --runtime onnx` uses);
  (d) (c) on the graph after int8 dynamic quantisation of its weights
      (onnxruntime.quantization.quantize_dynamic, QInt8).

Each is given the same number of threads (torch's); the variants are timed in interleaved rounds
and each keeps its best round (the machine's load moves). Ratios are against (a). For (d) it also
measures what int8 costs: the per-row cosine of its embeddings to fp32 and all-vs-all Recall@1 on
scikit-learn's digits (a real retrieval set, labels = digit) with fp32 and with int8 embeddings.
Random weights make that recall a measure of how much int8 moves the neighbours, not of UNICOM's
accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rate(fn, batch: np.ndarray, seconds: float) -> float:
    """Images/s of ``fn(batch)`` repeated for at least ``seconds``."""
    done, start = 0, time.perf_counter()
    while True:
        fn(batch)
        done += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def best_rates(variants: dict, batch: np.ndarray, seconds: float, rounds: int) -> dict[str, float]:
    """Each variant's best rate over ``rounds`` interleaved rounds: on a shared machine the load
    moves during a run, and interleaving gives every variant the same chances."""
    for fn in variants.values():
        fn(batch)  # warm-up (allocations, ORT's first-run planning)
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for label, fn in variants.items():
            best[label] = max(best[label], rate(fn, batch, seconds / rounds))
    return best


def digits_pixels(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` digits as uint8 RGB (n, 3, size, size), resized as embed does, and labels."""
    from sklearn.datasets import load_digits

    from unicom_cli.data.images import resize_center_crop

    digits = load_digits()
    grey = (digits.images[:n] * (255 / 16)).round().astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=3)
    return np.stack([resize_center_crop(img, size).numpy() for img in rgb]), digits.target[:n]


def embed_all(run, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([run(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def recall_at_1(feats: np.ndarray, labels: np.ndarray) -> float:
    from unicom_cli.eval.retrieval import recall_at_k
    from unicom_cli.eval.search import l2_normalize, search

    res = search(l2_normalize(feats), None, 1, exclude_self=True, backend="faiss")
    return recall_at_k(labels[res.indices], labels, [1])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per variant")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--digits", type=int, default=600, help="digits for the recall check (≤ 1797; 0 skips it)")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from unicom_cli.export.check import cosine_rows, sample_photos
    from unicom_cli.export.graph import OPSET_DEFAULT, build_embedder, write_onnx
    from unicom_cli.export.runtime import create_session
    from unicom_cli.models.factory import create_model

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    loaded = create_model(args.model, pretrained=False, device="cpu", precision="fp32")
    spec = loaded.spec
    embedder = build_embedder(loaded.model, spec)
    photos = sample_photos(spec.input_size)[1]
    batch = photos[np.arange(args.batch) % len(photos)]
    print(f"{spec.name}, batch {args.batch}, {threads} threads, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {len(photos)} distinct photos")

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        start = time.perf_counter()
        write_onnx(embedder, spec, fp32_path, opset=OPSET_DEFAULT, input_dtype="uint8")
        print(f"export: {time.perf_counter() - start:.1f} s, {fp32_path.stat().st_size / 2**20:.0f} MiB")
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
        print(f"int8 dynamic quantisation: {int8_path.stat().st_size / 2**20:.0f} MiB")

        def torch_run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return embedder(torch.from_numpy(x)).numpy()

        def ort_run(path: Path, level: str):
            session = create_session(path, optimization=level, threads=threads)
            name = session.get_inputs()[0].name
            return lambda x: session.run(None, {name: x})[0]

        variants = {
            "(a) PyTorch fp32": torch_run,
            "(b) ORT, no graph optimisation": ort_run(fp32_path, "none"),
            "(c) ORT, all graph optimisations": ort_run(fp32_path, "all"),
            "(d) ORT int8 dynamic, all optimisations": ort_run(int8_path, "all"),
        }
        rates = best_rates(variants, batch, args.seconds, args.rounds)
        for label, value in rates.items():
            print(f"{label:<42} {value:7.1f} images/s   x{value / rates['(a) PyTorch fp32']:.2f}")

        ref = torch_run(photos)
        for label in list(variants)[1:]:
            cos = cosine_rows(ref, variants[label](photos))
            print(f"{label:<42} cosine to PyTorch on the photos: min {cos.min():.7f}")
        if args.digits <= 0:
            return
        pixels, labels = digits_pixels(args.digits, spec.input_size)
        fp32 = embed_all(variants["(c) ORT, all graph optimisations"], pixels, args.batch)
        int8 = embed_all(variants["(d) ORT int8 dynamic, all optimisations"], pixels, args.batch)
        cos = cosine_rows(fp32, int8)
        r32, r8 = recall_at_1(fp32, labels), recall_at_1(int8, labels)
        print(f"digits ({len(labels)}, all-vs-all): Recall@1 fp32 {r32:.4f}, int8 {r8:.4f} "
              f"(Δ {r8 - r32:+.4f}); int8 vs fp32 row cosine min {cos.min():.5f}, mean {cos.mean():.5f}")


if __name__ == "__main__":
    main()
