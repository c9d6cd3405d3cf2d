"""Multinomial logistic regression on features: full-batch L-BFGS over row shards, the C search, the head file.

The objective is scikit-learn's: ``C · Σ CE(x_i, y_i) + ½‖W‖²`` with an unpenalised bias. It is
minimised divided by ``C·n`` (the mean cross-entropy plus ``‖W‖²/(2Cn)``), which has the same
minimiser. The gradient tolerance is relative: the fit stops once every gradient entry is below
``tol`` times the largest entry at W = 0. scikit-learn's absolute ``gtol`` on this scaled objective
stops before the first step when there are many balanced classes (ImageNet: every entry at W = 0
is O(1/K), under 1e-4), leaving a chance-level classifier. Each rank holds some rows; the loss
and gradient sums are all-reduced, so every rank takes the same L-BFGS steps and the fit does
not depend on how the rows are split (up to summation order).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unicom_cli.errors import InputError

# The CLIP protocol's coarse sweep (10^-6 … 10^6, here every other decade), then a binary
# search in log10(C) around the best point with halving steps.
COARSE_GRID = tuple(10.0 ** e for e in range(-6, 7, 2))
REFINE_STEPS = 4


@dataclass
class LinearHead:
    """A fitted classifier: ``softmax(W·f(x) + b)`` where f L2-normalises when ``normalize``."""

    weight: np.ndarray  # (classes, dim) float32
    bias: np.ndarray  # (classes,) float32
    classes: list[str]
    normalize: bool
    meta: dict = field(default_factory=dict)  # C, model, source: recorded in the file

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Class scores of feature rows (un-normalised rows; normalised here if the head wants it)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise InputError(f"features have shape {x.shape}; this head expects rows of "
                             f"{self.weight.shape[1]} dimensions")
        if self.normalize:
            from unicom_cli.eval.search import l2_normalize

            x = l2_normalize(x)
        return x @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class index, its softmax probability) per row."""
        z = self.logits(x).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        k = p.argmax(axis=1)
        return k, p[np.arange(len(k)), k].astype(np.float32)

    def save(self, path: Path) -> None:
        """Atomic safetensors file: tensors ``weight``, ``bias``; metadata classes, normalize, meta."""
        from safetensors.numpy import save_file

        from unicom_cli.utils.files import atomic_path, disk_errors

        path = Path(path)
        with disk_errors(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"weight": np.ascontiguousarray(self.weight, np.float32),
                       "bias": np.ascontiguousarray(self.bias, np.float32)}, str(tmp),
                      metadata={"format": "unicom-linear-head/1", "classes": json.dumps(self.classes),
                                "normalize": json.dumps(self.normalize), "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        """Read a head written by ``save`` (eval-linear --save-classifier or finetune --task classify)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: not found; expected a classifier head written by "
                             f"`unicom eval-linear --save-classifier` or `unicom finetune --task classify`")
        try:
            with safe_open(str(path), framework="np") as fh:
                md = fh.metadata() or {}
                weight, bias = fh.get_tensor("weight"), fh.get_tensor("bias")
            classes = json.loads(md["classes"])
            normalize = json.loads(md["normalize"])
            meta = json.loads(md.get("meta", "{}"))
        except Exception as exc:  # safetensors raises several kinds on a damaged file
            raise InputError(f"{path}: not a classifier head file ({exc}); write one with "
                             f"`unicom eval-linear --save-classifier`") from exc
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or len(classes) != weight.shape[0] \
                or not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise InputError(f"{path}: damaged classifier head (weight {weight.shape}, bias {bias.shape}, "
                             f"{len(classes)} class names, or non-finite values)")
        return cls(weight.astype(np.float32), bias.astype(np.float32), list(classes), bool(normalize), meta)


def _all_reduce(t):
    """Sum ``t`` over ranks in place (no-op without a process group)."""
    from unicom_cli.distributed import world_size

    if world_size() == 1:
        return t
    import torch.distributed as dist

    if dist.get_backend() == "nccl" or t.device.type == "cpu":
        dist.all_reduce(t)
        return t
    host = t.cpu()
    dist.all_reduce(host)
    t.copy_(host)
    return t


def _chunk_rows(classes: int, dim: int) -> int:
    """Rows per chunk: the (rows × classes) logits and a copy stay near 256 MB."""
    return max(1024, (64 << 20) // max(classes + dim, 1))


def fit(x, y, num_classes: int, C: float, *, max_iter: int = 1000, tol: float = 1e-4, init=None):
    """Minimise ``C·ΣCE + ½‖W‖²`` (bias unpenalised) over this rank's rows ``x`` (n, D), labels ``y``.

    Args:
        x: torch tensor of features on the fitting device (this rank's rows).
        y: int64 torch tensor of labels in ``[0, num_classes)``.
        C: inverse regularisation strength (scikit-learn's C).
        max_iter: L-BFGS iterations (scikit-learn's max_iter).
        tol: stop when every gradient entry of the ``1/(Cn)``-scaled objective is below ``tol``
            times the largest entry at W = 0 (see the module docstring).
        init: ``(W, b)`` to start from (warm start in the C search); zeros otherwise.

    Returns:
        ``(W, b, iterations)`` with W (K, D) and b (K,) tensors on ``x``'s device.
    """
    import torch

    n_local, dim = x.shape
    dtype, device = x.dtype, x.device
    n = int(_all_reduce(torch.tensor([float(n_local)], dtype=torch.float64, device=device)).item())
    if n == 0:
        raise InputError("no training rows to fit the classifier on")
    if init is None:
        W = torch.zeros(num_classes, dim, dtype=dtype, device=device)
        b = torch.zeros(num_classes, dtype=dtype, device=device)
    else:
        W, b = init[0].detach().clone(), init[1].detach().clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    lam = 1.0 / (C * n)
    chunk = _chunk_rows(num_classes, dim)
    evals = [0]

    def closure():
        evals[0] += 1
        with torch.no_grad():
            buf = torch.zeros(1 + W.numel() + b.numel(), dtype=torch.float64 if device.type == "cpu"
                              else dtype, device=device)
            loss = torch.zeros((), dtype=torch.float64, device=device)
            gW = torch.zeros_like(W)
            gb = torch.zeros_like(b)
            for s in range(0, n_local, chunk):
                xc, yc = x[s:s + chunk], y[s:s + chunk]
                z = torch.addmm(b, xc, W.T)
                lse = torch.logsumexp(z, dim=1)
                rows = torch.arange(len(yc), device=device)
                loss += (lse - z[rows, yc]).sum(dtype=torch.float64)
                p = torch.exp(z - lse[:, None])
                p[rows, yc] -= 1.0
                gW.addmm_(p.T, xc)
                gb += p.sum(0)
            buf[0] = loss
            buf[1:1 + W.numel()] = gW.flatten()
            buf[1 + W.numel():] = gb
            _all_reduce(buf)
            total = buf[0] / n + 0.5 * lam * float((W.double() ** 2).sum())
            W.grad = (buf[1:1 + W.numel()].view_as(W).to(dtype) / n + lam * W).detach()
            b.grad = (buf[1 + W.numel():].to(dtype) / n).detach()
        return total.to(dtype)

    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4,
                            tolerance_grad=tol * _gradient_scale(x, y, num_classes, n),
                            tolerance_change=1e-12, history_size=10, line_search_fn="strong_wolfe")
    opt.step(closure)
    iterations = opt.state[opt._params[0]].get("n_iter", 0)
    return W.detach(), b.detach(), int(iterations)


def _gradient_scale(x, y, num_classes: int, n: int) -> float:
    """The largest entry of the objective's gradient at W = 0, b = 0, where every class has
    probability 1/K: ``(Σ_i x_i / K − Σ_{y_i=c} x_i) / n`` and ``1/K − n_c/n``. One pass over
    the rows (per-class sums), all-reduced, so that every rank stops at the same step."""
    import torch

    chunk = _chunk_rows(num_classes, x.shape[1])
    sums = torch.zeros(num_classes, x.shape[1] + 1, dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk):
        sums[:, :-1].index_add_(0, y[s:s + chunk], x[s:s + chunk].double())
    sums[:, -1] = torch.bincount(y, minlength=num_classes).double()  # the bias column: n_c
    _all_reduce(sums)
    grad = (sums.sum(0, keepdim=True) / num_classes - sums) / n
    return float(grad.abs().max())


def accuracy_counts(x, y, W, b, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is in the top-k scores, for each k; summed over ranks.

    Labels < 0 (classes the classifier never saw) always count as misses.
    """
    import torch

    out = torch.zeros(len(ks), dtype=torch.float64, device=x.device)
    chunk = _chunk_rows(W.shape[0], W.shape[1])
    with torch.no_grad():
        for s in range(0, len(x), chunk):
            z = torch.addmm(b, x[s:s + chunk], W.T)
            top = z.topk(min(max(ks), z.shape[1]), dim=1).indices
            hit = top == y[s:s + chunk, None]
            for i, k in enumerate(ks):
                out[i] += hit[:, :k].any(1).sum()
    _all_reduce(out)
    return {k: int(v) for k, v in zip(ks, out.tolist())}


@dataclass
class SearchResult:
    """The chosen C and every (C, held-out top-1 %) tried, in order."""

    C: float
    tried: list[tuple[float, float]]


def search_C(x_fit, y_fit, x_hold, y_hold, num_classes: int, *, max_iter: int = 1000,
             tol: float = 1e-4, progress=None) -> SearchResult:
    """Pick C on held-out rows: the coarse sweep, then a binary search in log10(C).

    Fits are warm-started from the nearest C already fitted. Ties go to the smaller C
    (the stronger regularisation). ``progress(C, acc)`` is called after each fit.
    """
    import torch

    n_hold = int(_all_reduce(torch.tensor([float(len(y_hold))], dtype=torch.float64,
                                          device=x_fit.device)).item())
    if n_hold == 0:
        raise InputError("the held-out part of the training set is empty; give more training "
                         "images or a fixed --C")
    solutions: dict[float, tuple] = {}
    tried: list[tuple[float, float]] = []

    def score(C: float) -> float:
        for c, acc in tried:
            if math.isclose(c, C, rel_tol=1e-9):
                return acc
        near = min(solutions, key=lambda c: abs(math.log10(c) - math.log10(C))) if solutions else None
        W, b, _ = fit(x_fit, y_fit, num_classes, C, max_iter=max_iter, tol=tol,
                      init=solutions.get(near))
        solutions[C] = (W, b)
        acc = 100.0 * accuracy_counts(x_hold, y_hold, W, b, (1,))[1] / n_hold
        tried.append((C, acc))
        if progress is not None:
            progress(C, acc)
        return acc

    def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[1] > b[1] or (a[1] == b[1] and a[0] < b[0])

    best = (COARSE_GRID[0], score(COARSE_GRID[0]))
    for C in COARSE_GRID[1:]:
        cand = (C, score(C))
        if better(cand, best):
            best = cand
    step = math.log10(COARSE_GRID[1] / COARSE_GRID[0]) / 2
    for _ in range(REFINE_STEPS):
        centre = best
        for C in (centre[0] * 10 ** -step, centre[0] * 10 ** step):
            cand = (C, score(C))
            if better(cand, best):
                best = cand
        step /= 2
    return SearchResult(best[0], tried)
