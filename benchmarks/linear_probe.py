"""Linear-probe fit time: our full-batch L-BFGS in PyTorch vs scikit-learn's LogisticRegression, one run.

    python benchmarks/linear_probe.py                              # 100,000 × 768, 1,000 classes (the issue's size)
    python benchmarks/linear_probe.py --n 20000 --classes 200      # what a busy 2-core box finishes
    python benchmarks/linear_probe.py --skip-sklearn               # ours only (e.g. on a GPU)
    python benchmarks/linear_probe.py --n 1281167 --skip-sklearn --max-iter 3   # ImageNet-sized: memory, s/iteration

Both fit the same objective (C·ΣCE + ½‖W‖², bias unpenalised) on the same float32 features with
the same C, max_iter and gradient tolerance; each then scores the same held-out rows. Features
are synthetic: unit-norm class means plus Gaussian noise, L2-normalised like eval-linear's
default, with enough noise that neither reaches 100%. Times are wall clock on the same machine
in the same run; the ratio is what to read, not the seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def features(n: int, dim: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Made in blocks, so that ImageNet's 1.28 M × 768 needs little more than its own 3.9 GB."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, classes, n)
    x = np.empty((n, dim), np.float32)
    for a in range(0, n, 100_000):
        block = means[y[a:a + 100_000]] + noise / np.sqrt(dim) * rng.standard_normal(
            (len(y[a:a + 100_000]), dim), dtype=np.float32)
        x[a:a + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="training rows")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--val", type=int, default=10_000, help="held-out rows scored by both")
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=5.0, help="noise norm relative to the class mean")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for both (torch and scikit-learn's BLAS); 1 suits a busy shared box")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sklearn", action="store_true")
    args = ap.parse_args()

    import torch

    from unicom_cli.eval.linear import accuracy_counts, fit

    torch.set_num_threads(args.threads)
    if not args.skip_sklearn:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        threadpool_limits(args.threads)  # scikit-learn's BLAS: the same number of threads
    x, y = features(args.n + args.val, args.dim, args.classes, args.noise, 0)
    xtr, ytr, xva, yva = x[:args.n], y[:args.n], x[args.n:], y[args.n:]
    print(f"{args.n:,} × {args.dim} train features, {args.classes:,} classes, {args.val:,} held out; "
          f"C={args.C}, max_iter={args.max_iter}, {args.threads} thread(s) each, device {args.device}")

    dev = torch.device(args.device)
    xt, yt = torch.from_numpy(xtr).to(dev), torch.from_numpy(ytr).to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    W, b, iters = fit(xt, yt, args.classes, args.C, max_iter=args.max_iter)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - t
    hits = accuracy_counts(torch.from_numpy(xva).to(dev), torch.from_numpy(yva).to(dev), W, b, (1,))[1]
    ours_acc = 100 * hits / args.val
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"ours (torch L-BFGS, float32):       {ours_s:8.1f} s  {iters:4d} iterations  top-1 {ours_acc:.2f}"
          f"  ({ours_s / max(iters, 1):.1f} s per iteration; peak RSS {peak:.1f} GiB, features "
          f"{xtr.nbytes / 2**30:.1f} GiB)")
    if args.skip_sklearn:
        return
    from sklearn.linear_model import LogisticRegression

    t = time.perf_counter()
    sk = LogisticRegression(C=args.C, max_iter=args.max_iter).fit(xtr, ytr)
    sk_s = time.perf_counter() - t
    sk_acc = 100 * float((sk.predict(xva) == yva).mean())
    print(f"scikit-learn LogisticRegression:    {sk_s:8.1f} s  {int(sk.n_iter_[0]):4d} iterations  top-1 {sk_acc:.2f}")
    print(f"ratio: ours is {sk_s / ours_s:.2f}x faster; top-1 difference {ours_acc - sk_acc:+.2f} points")


if __name__ == "__main__":
    main()
