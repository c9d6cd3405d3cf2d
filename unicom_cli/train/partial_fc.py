"""Margin-based softmax (ArcFace/CosFace/combined) over class centres sharded across ranks (Partial FC)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from unicom_cli.distributed import rank as _rank
from unicom_cli.distributed import world_size as _world_size
from unicom_cli.distributed.comm import shard_range


def margin_target(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """The target-class logit before scaling: value cos(m1·θ + m2) − m3 with θ = acos(cos).

    The gradient is taken with respect to cos θ (d/dcos = 1), as the reference does: it rewrites
    the target logit's value under ``no_grad`` (a straight-through margin, as arcface_torch).
    m1 = 1, m3 = 0 is ArcFace; m1 = 1, m2 = 0 is CosFace, whose derivative is 1 anyway.
    """
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3
    with torch.no_grad():
        shift = torch.cos(m1 * torch.acos(cos.clamp(-1.0, 1.0)) + m2) - m3 - cos
    return cos + shift


def filter_negatives(cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """Zero every non-target cosine above ``threshold`` (0: off), without gradient through them.

    The reference's inter-class filtering (``--margin_loss_filter``): negatives that look like the
    target class (label noise, near-duplicate classes) stop pushing the embedding away.
    """
    if threshold <= 0:
        return cos
    with torch.no_grad():
        dirty = cos > threshold
        dirty[rows, cols] = False
    return cos.masked_fill(dirty, 0.0)


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; the backward sums the gradient over ranks and returns this
    rank's slice, multiplied by the world size so that DDP's gradient *averaging* of the backbone
    yields the gradient of the global-batch loss (1 process and N processes then train alike)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        parts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), world, rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.n
        return grad[start:start + ctx.n] * ctx.world


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. Every rank then computes the same (replicated) loss, so the backward is
    the identity: each rank keeps the gradient of the paths through its own contribution."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def all_gather_with_grad(rows: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph; identity without a process group."""
    return _AllGatherRows.apply(rows) if _group_active() else rows


def _all_gather_plain(rows: torch.Tensor) -> torch.Tensor:
    if not _group_active():
        return rows
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if _group_active() else x


class PartialFC(nn.Module):
    """Class centres for ``num_classes`` classes, this rank holding a contiguous slice of them.

    ``forward(embeddings, labels, step)`` takes this rank's batch and returns the mean margin
    softmax cross-entropy over the *global* batch (identical on every rank).

    Sampling (sample_rate < 1), as the reference: each rank trains on exactly
    ``int(sample_rate × local classes)`` of its centres per step, every positive of the global
    batch on this rank plus the negatives with the highest scores of one uniform draw (only the
    positives when they alone exceed that number). The draw (and the num_feat dimension draw)
    comes from a generator seeded by ``(seed, step)`` over all classes, so it is reproducible and
    every rank agrees on it. At sample rate 1.0 one process and N processes give the same loss
    and gradients; below 1.0 the per-rank count depends on the number of processes, so the
    selected centres (and the loss) do too, as in the reference.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, s: float = 32.0,
                 m1: float = 1.0, m2: float = 0.25, m3: float = 0.0, sample_rate: float = 1.0,
                 num_feat: int | None = None, seed: int = 1024, margin_filter: float = 0.0,
                 rank: int | None = None, world: int | None = None) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if num_feat is not None and not 0 < num_feat <= embedding_size:
            raise ValueError(f"num_feat must be in 1..{embedding_size}, got {num_feat}")
        if not 0.0 <= margin_filter <= 1.0:
            raise ValueError(f"margin_filter must be in [0, 1] (0: off), got {margin_filter}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.sample_rate, self.num_feat, self.seed = sample_rate, num_feat, seed
        self.margin_filter = margin_filter
        rank = _rank() if rank is None else rank
        world = _world_size() if world is None else world
        block = shard_range(num_classes, rank, world)
        self.class_start, self.local_classes = block.start, len(block)
        self.world = world
        self.num_sample = int(sample_rate * self.local_classes)  # centres per step when < 1
        # Centres ~ N(0, 0.01): rows of one seeded draw over all classes, so that the init does
        # not depend on the number of processes (81k GLDv2 classes × 768: 250 MB, briefly).
        gen = torch.Generator().manual_seed(seed * 7919)
        rows = torch.normal(0.0, 0.01, (num_classes, embedding_size), generator=gen)
        self.weight = nn.Parameter(rows[block.start:block.stop].clone())
        self.last_selected: torch.Tensor | None = None  # global ids of the classes used last step

    def extra_repr(self) -> str:
        return (f"classes={self.class_start}..{self.class_start + self.local_classes - 1} "
                f"of {self.num_classes}, dim={self.embedding_size}, s={self.s}, "
                f"m=({self.m1}, {self.m2}, {self.m3}), sample_rate={self.sample_rate}, "
                f"num_feat={self.num_feat}, margin_filter={self.margin_filter}")

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Mean loss over the global batch; ``step`` seeds class and dimension sampling."""
        device = self.weight.device
        emb = all_gather_with_grad(embeddings.float())
        labels = _all_gather_plain(labels.to(device=emb.device, dtype=torch.long)).to(device)
        gen = self._generator(step)
        weight = self.weight
        if self.num_feat is not None and self.num_feat < self.embedding_size:
            dims = torch.randperm(self.embedding_size, generator=gen)[: self.num_feat].to(device)
            emb, weight = emb.index_select(1, dims), weight.index_select(1, dims)

        local = labels - self.class_start
        on_rank = (local >= 0) & (local < self.local_classes)
        if self.sample_rate < 1.0:
            # One uniform draw over all classes (identical on every rank), this rank's slice of it.
            draw = torch.rand(self.num_classes, generator=gen)
            draw = draw[self.class_start:self.class_start + self.local_classes].to(device)
            positives = torch.unique(local[on_rank])
            if len(positives) <= self.num_sample:
                draw[positives] = 2.0  # above every draw: positives always in
                selected = torch.topk(draw, self.num_sample).indices.sort().values
            else:
                selected = positives
            remap = torch.full((self.local_classes,), -1, dtype=torch.long, device=device)
            remap[selected] = torch.arange(len(selected), device=device)
            weight = weight.index_select(0, selected)
            target = torch.where(on_rank, remap[local.clamp(0, self.local_classes - 1)], -1)
        else:
            selected = torch.arange(self.local_classes, device=device)
            target = torch.where(on_rank, local, -1)
        self.last_selected = selected + self.class_start

        cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight.float(), dim=1)).clamp(-1, 1)
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        cos = filter_negatives(cos, rows, cols, self.margin_filter)
        target_cos = cos[rows, cols]
        logits = cos.index_put((rows, cols), margin_target(target_cos, self.m1, self.m2, self.m3))
        logits = logits * self.s

        # Distributed, numerically stable log-softmax: global row max, global sum of exps.
        row_max = logits.detach().max(dim=1).values if logits.shape[1] else \
            torch.full((logits.shape[0],), -math.inf, device=device)
        if _group_active():
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        sum_exp = _all_reduce_sum(torch.exp(logits - row_max[:, None]).sum(dim=1))
        target_logit = torch.zeros(logits.shape[0], device=device, dtype=logits.dtype)
        target_logit = target_logit.index_put((rows,), logits[rows, cols])
        target_logit = _all_reduce_sum(target_logit)
        return (torch.log(sum_exp) + row_max - target_logit).mean()
