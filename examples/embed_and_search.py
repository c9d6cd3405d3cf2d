"""Embed a folder with the Python API and print every image's nearest neighbour.

    python examples/embed_and_search.py ./photos --model ViT-B/32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import unicom_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="ViT-B/32", help="model name or JSON architecture file")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=Path("example-feats.npy"))
    args = parser.parse_args()

    unicom_cli.embed_folder(args.folder, args.output, model=args.model, weights=args.weights,
                            normalize=True, overwrite=True)
    features = np.load(args.output)
    ids = args.output.with_suffix(".ids.txt").read_text().splitlines()
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)  # never match an image with itself
    for i, j in enumerate(similarity.argmax(axis=1)):
        print(f"{ids[i]}  ->  {ids[j]}  (cosine {similarity[i, j]:.3f})")


if __name__ == "__main__":
    main()
