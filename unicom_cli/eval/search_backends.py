"""Candidate generators for exact search: faiss's flat index, torch blocks, torch all-vs-all.

Each returns, per query row, more candidates than asked (scores in float32 or bf16, ids) and
a floor: every item scoring above it was returned. ``eval.search`` turns candidates into the
exact top-k under the one fixed order; nothing here decides an order or a bound.
"""

from __future__ import annotations

import numpy as np


def faiss_module():
    """The faiss module, or None where it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class FaissSearch:
    """faiss IndexFlatIP: blocked sgemm + heaps, CPU or GPU."""

    def __init__(self, gallery: np.ndarray, device: str, want: int) -> None:
        faiss = faiss_module()
        self.n = len(gallery)
        index = faiss.IndexFlatIP(gallery.shape[1])
        # faiss GPU indexes search at most 2,048 neighbours; beyond that stay on the CPU.
        if str(device).startswith("cuda") and faiss.get_num_gpus() > 0 and want <= 2048:
            dev = int(str(device).split(":")[1]) if ":" in str(device) else 0
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, dev, index)
        index.add(gallery)
        self.index = index

    def __call__(self, q: np.ndarray, want: int, self_ids: np.ndarray | None):
        scores, ids = self.index.search(q, want)
        ids = ids.astype(np.int64)
        # Every item scoring above the last returned one was returned.
        floor = scores[:, -1].astype(np.float64) if want < self.n else np.full(len(q), -np.inf)
        if self_ids is not None:
            is_self = ids == self_ids[:, None]
            scores = np.where(is_self, -np.inf, scores)
            ids = np.where(is_self, np.iinfo(np.int64).max, ids)
        return scores.astype(np.float32), ids, floor


class TorchSearch:
    """``torch.mm`` + ``torch.topk`` per chunk, on CPU or CUDA; the gallery whole or in blocks."""

    def __init__(self, gallery: np.ndarray, device: str, block: int, precision: str = "fp32") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.block = block
        self.n = len(gallery)
        self._buf = None
        host = torch.from_numpy(gallery)
        if block >= len(gallery):
            self.gallery = host.to(self.device).to(self.dtype)
        else:  # streamed: stays in (pinned) host memory
            self.gallery = host.pin_memory() if self.device.type == "cuda" else host

    def __call__(self, q: np.ndarray, want: int, self_ids: np.ndarray | None):
        torch = self.torch
        qt = torch.from_numpy(q).to(self.device).to(self.dtype)
        best_s = best_i = None
        floor = torch.full((len(q),), -float("inf"), dtype=torch.float64, device=self.device)
        for start in range(0, self.n, self.block):
            part = self.gallery[start:start + self.block].to(self.device, non_blocking=True).to(self.dtype)
            size = len(qt) * len(part)
            if self._buf is None or self._buf.numel() < size:  # reused: no page faults per chunk
                self._buf = torch.empty(size, device=self.device, dtype=self.dtype)
            sims = self._buf[:size].view(len(qt), len(part))
            torch.mm(qt, part.T, out=sims)
            if self_ids is not None:
                local = torch.from_numpy(self_ids - start).to(self.device)
                inside = (local >= 0) & (local < len(part))
                rows = torch.arange(len(q), device=self.device)[inside]
                sims[rows, local[inside]] = -float("inf")
            take = min(want, len(part))
            s, i = sims.topk(take, dim=1)
            s = s.float()
            if take < len(part):
                floor = torch.maximum(floor, s[:, -1].double())
            i = i + start
            if best_s is not None:
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                if s.shape[1] > want:
                    s, pick = s.topk(want, dim=1)
                    i = i.gather(1, pick)
                    floor = torch.maximum(floor, s[:, -1].double())
            best_s, best_i = s, i
        return best_s.cpu().numpy(), best_i.cpu().numpy(), floor.cpu().numpy()


class SymmetricSearch:
    """All-vs-all with torch: each off-diagonal block of X Xᵀ is computed once and serves the
    rows of both blocks, halving the sgemm work.

    Diagonal blocks seed every row's candidate list with a dense ``topk``; off-diagonal blocks
    only pass the few scores above a row's current want-th best (a comparison instead of a
    ``topk`` over the transposed block). Candidates are merged in a few large sorts, so the
    work outside sgemm is a handful of big operations, not thousands of small ones.
    """

    def __init__(self, x: np.ndarray, device: str, want: int, exclude_self: bool,
                 precision: str, progress: str | None, *, budget_bytes: int, pending_limit: int) -> None:
        import torch

        from unicom_cli.utils.console import progress_bar

        self.torch = torch
        dev = torch.device(device)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        xt = torch.from_numpy(x).to(dev).to(dtype)
        n = len(xt)
        self.n, self.want = n, want
        # Smaller blocks skip more of the matrix (the diagonal blocks are computed whole);
        # 4,096 rows keep sgemm at full speed.
        size = max(1, min(n, int((budget_bytes // 4) ** 0.5) // 2))
        starts = list(range(0, n, size))
        self.vals = torch.full((n, want), -float("inf"), device=dev)
        self.ids = torch.full((n, want), -1, dtype=torch.int64, device=dev)
        self.pending: list[tuple] = []
        self.pending_count = 0
        pairs = len(starts) * (len(starts) + 1) // 2
        with progress_bar(pairs, progress or "search", unit="blocks", enabled=progress is not None) as bar:
            for a in starts:
                block = xt[a:a + size]
                sims = block @ block.T
                if exclude_self:
                    sims.fill_diagonal_(-float("inf"))
                take = min(want, sims.shape[1])
                v, i = sims.topk(take, dim=1)
                self.vals[a:a + len(block), :take] = v
                self.ids[a:a + len(block), :take] = i + a
                bar.advance(1)
            thr = self.vals[:, -1].clone()
            # Reused output buffers: fresh 64 MiB allocations cost page faults on every block.
            sims_buf = torch.empty(size * size, device=dev, dtype=dtype)
            mask_buf = torch.empty(size * size, dtype=torch.bool, device=dev)
            for ai, a in enumerate(starts):
                for b in starts[ai + 1:]:
                    xa, xb = xt[a:a + size], xt[b:b + size]
                    sims = sims_buf[:len(xa) * len(xb)].view(len(xa), len(xb))
                    torch.mm(xa, xb.T, out=sims)
                    row_thr, col_thr = thr[a:a + size], thr[b:b + size]
                    # One comparison with the lowest threshold of either side finds a small
                    # superset of the candidates; the exact per-row tests run on that.
                    low = torch.minimum(row_thr.min(), col_thr.min())
                    mask = mask_buf[:sims.numel()].view(sims.shape)
                    torch.gt(sims, low, out=mask)
                    rows, cols = torch.nonzero(mask, as_tuple=True)
                    v = sims[rows, cols].float()
                    for_rows = v > row_thr[rows]
                    self._add(rows[for_rows] + a, cols[for_rows] + b, v[for_rows])
                    for_cols = v > col_thr[cols]
                    self._add(cols[for_cols] + b, rows[for_cols] + a, v[for_cols])
                    if self.pending_count > 4 * n * want + pending_limit:  # bound the memory
                        self._merge()
                        thr = self.vals[:, -1].clone()
                    bar.advance(1)
        self._merge()
        complete = want >= n
        self.floor = (torch.full((n,), -float("inf"), dtype=torch.float64) if complete
                      else self.vals[:, -1].double().cpu())

    def _add(self, rows, ids, vals) -> None:
        self.pending.append((rows, ids, vals))
        self.pending_count += len(rows)

    def _merge(self) -> None:
        """Fold the pending (row, id, score) candidates into the per-row top-want lists."""
        torch = self.torch
        if not self.pending:
            return
        dev = self.vals.device
        rows = torch.cat([torch.arange(self.n, device=dev).repeat_interleave(self.want)]
                         + [p[0] for p in self.pending])
        ids = torch.cat([self.ids.flatten()] + [p[1] for p in self.pending])
        vals = torch.cat([self.vals.flatten()] + [p[2] for p in self.pending])
        self.pending, self.pending_count = [], 0
        order = torch.argsort(vals, descending=True, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]
        rows, ids, vals = rows[order], ids[order], vals[order]
        counts = torch.bincount(rows, minlength=self.n)
        rank = torch.arange(len(rows), device=dev) - (torch.cumsum(counts, 0) - counts)[rows]
        keep = rank < self.want
        self.vals[rows[keep], rank[keep]] = vals[keep]
        self.ids[rows[keep], rank[keep]] = ids[keep]

    def rows(self, start: int, stop: int):
        """Candidates of query rows start..stop: (scores, ids, floor) as numpy."""
        return (self.vals[start:stop].cpu().numpy(), self.ids[start:stop].cpu().numpy(),
                self.floor[start:stop].numpy())
