"""Embed a folder with the Python API and print every image's nearest neighbour.

    python examples/embed_and_search.py ./photos --model ViT-B/32
    python examples/embed_and_search.py ./photos --model arch.json --weights model.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import unicom_cli
from unicom_cli.errors import UnicomError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="ViT-B/32", help="model name or JSON architecture file")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--random-init", action="store_true",
                        help="a randomly initialised network (seeded by --seed): tests only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("example-feats.npy"))
    args = parser.parse_args()

    try:
        unicom_cli.embed_folder(args.folder, args.output, model=args.model, weights=args.weights,
                                pretrained=not args.random_init, seed=args.seed,
                                normalize=True, overwrite=True)
    except UnicomError as exc:  # one line, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    features = np.load(args.output)
    ids = args.output.with_suffix(".ids.txt").read_text().splitlines()
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)  # never match an image with itself
    for i, j in enumerate(similarity.argmax(axis=1)):
        print(f"{ids[i]}  ->  {ids[j]}  (cosine {similarity[i, j]:.3f})")


if __name__ == "__main__":
    main()
