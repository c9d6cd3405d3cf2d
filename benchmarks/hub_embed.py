"""`unicom embed` images/s for an MLCD base/32-sized transformers model against UNICOM ViT-B/32, on
the same photos, each with its network-alone rate, in one run (interleaved rounds, medians).

    python benchmarks/hub_embed.py                 # 128 photos, 2 threads, 2 rounds
    python benchmarks/hub_embed.py -n 32 --repeat 1   # a quick smoke run

Both networks are randomly initialised (speed does not depend on the weights): UNICOM ViT-B/32
from the registry, and a CLIPVisionModel with MLCD-ViT-B/32's configuration (hidden 768, 12
layers, patch 32, 224 px, CLIPImageProcessor) saved as a config-only save_pretrained folder and
run with --random-init. For each: (a) the network alone on pre-decoded, pre-transformed tensors,
(b) ``embed_images`` end to end (decode in workers, forward, .npy), and the ratio b/a; then the
ratio of the two models' end-to-end rates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.embed_throughput import end_to_end, make_photos, model_alone  # noqa: E402


def mlcd_base_folder(folder: Path) -> Path:
    """MLCD-ViT-B/32's architecture and preprocessing, without weights (use with --random-init)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=32, image_size=224).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds; medians are printed")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "unicom-bench-photos")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from unicom_cli.models.factory import create_model, resolve_inference_precision

    torch.set_num_threads(args.threads)
    precision = resolve_inference_precision("cpu", args.precision)
    folder = args.data / f"n{args.images}"
    paths = make_photos(folder, args.images)
    models = {"UNICOM ViT-B/32": "ViT-B/32",
              "MLCD base/32 (CLIPVisionModel)": str(mlcd_base_folder(Path(tempfile.mkdtemp()) / "mlcd-b32"))}
    loaded = {label: create_model(name, pretrained=False, device="cpu", precision=precision)
              for label, name in models.items()}
    tensors = {label: torch.stack([m.transform(Image.open(p).convert("RGB")) for p in paths])
               for label, m in loaded.items()}
    out = Path(tempfile.mkdtemp()) / "feats.npy"
    runs: dict[str, dict[str, list[float]]] = {label: {"a": [], "b": []} for label in models}
    for _ in range(args.repeat):  # interleaved: load drifts hit both models alike
        for label, name in models.items():
            runs[label]["a"].append(model_alone(loaded[label].model, tensors[label], args.batch_size))
            runs[label]["b"].append(end_to_end(folder, out, name, args.batch_size, None, draft=False,
                                               precision=precision)[0])
    print(f"{len(paths)} photos, batch {args.batch_size}, {args.threads} threads, {precision}, "
          f"median of {args.repeat} interleaved round(s)")
    rates = {}
    for label, r in runs.items():
        a, b = float(np.median(r["a"])), float(np.median(r["b"]))
        rates[label] = b
        print(f"{label:32s} (a) network alone {a:7.1f} images/s   (b) embed {b:7.1f} images/s   b/a = {b / a:.2f}")
    mlcd, unicom = rates["MLCD base/32 (CLIPVisionModel)"], rates["UNICOM ViT-B/32"]
    print(f"MLCD / UNICOM end to end = {mlcd / unicom:.2f}")
    print("rounds (images/s): " + "; ".join(f"{label} {k} " + ", ".join(f"{v:.1f}" for v in vals)
                                            for label, r in runs.items() for k, vals in r.items()))


if __name__ == "__main__":
    main()
