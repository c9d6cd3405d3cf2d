"""Which faiss index fits a collection: from its size, dimension and a memory budget (as autofaiss decides).

Pure arithmetic: nothing here imports faiss, so choices can be shown and tested instantly.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from unicom_cli.errors import UsageError

KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_MAX = 20_000  # up to here exact search answers a query in well under a millisecond
HNSW_M = 32
ID_BYTES = 8  # faiss stores an int64 id per vector in inverted lists
PQ_CHOICES = (256, 128, 96, 64, 48, 32, 24, 16, 8)  # sub-quantizers (bytes per code), best first


@dataclass(frozen=True)
class Choice:
    """A faiss factory string with what it costs and why it was picked."""

    factory: str
    kind: str  # flat, hnsw, ivf, ivfpq or custom
    memory_bytes: int  # estimated size of the index in RAM
    reason: str


def default_max_memory() -> int:
    """Half of the physical memory: the index, the training sample and the reads share it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return total // 2


def parse_memory(text: str) -> int:
    """``4G``, ``512M``, ``1.5GB``, ``2000000`` → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", str(text))
    if not match:
        raise UsageError(f"--max-memory {text!r}: expected a size such as 4G, 512M or 2000000")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise UsageError(f"--max-memory {text!r}: must be positive")
    return value


def nlist_for(n: int) -> int:
    """Inverted lists: the power of two nearest 4·√N (autofaiss's rule of thumb), at least 16
    lists and at least 39 training points per list (faiss's own minimum)."""
    target = 4 * math.sqrt(n)
    nlist = 1 << max(4, round(math.log2(max(target, 1))))
    while nlist > 16 and n < 39 * nlist:
        nlist //= 2
    return min(nlist, 1 << 18)


def _coarse(nlist: int) -> str:
    """Beyond 2^14 lists a flat coarse quantizer costs more than the lists it selects."""
    return f"IVF{nlist}_HNSW32" if nlist >= (1 << 14) else f"IVF{nlist}"


def memory_of(kind: str, n: int, dim: int, nlist: int = 0, m: int = 0, opq: bool = False) -> int:
    """Estimated RAM of an index (bytes), with 10 % for faiss's own bookkeeping."""
    if kind == "flat":
        size = n * dim * 4
    elif kind == "hnsw":
        size = n * (dim * 4 + HNSW_M * 2 * 4 * 1.1)
    elif kind == "ivf":
        size = n * (dim * 4 + ID_BYTES) + nlist * dim * 4
    else:  # ivfpq
        size = n * (m + ID_BYTES) + nlist * dim * 4 + 256 * dim * 4 + (dim * dim * 4 if opq else 0)
    return int(size * 1.1)


def _pq_m(dim: int) -> list[int]:
    """Sub-quantizer counts for ``dim``: each divides the dimension and covers at least two
    of its components (one-dimensional sub-quantizers cost the bytes of SQ8 with none of its speed)."""
    return [m for m in PQ_CHOICES if 2 * m <= dim and dim % m == 0] or [1]


def ivfpq_choice(n: int, dim: int, max_memory: int, reason: str) -> Choice:
    """IVF + PQ with the largest code that fits the budget; OPQ in front when each
    sub-quantizer covers more than 4 dimensions (there a rotation balances their variance
    and pays for itself; with 2-4 dims per sub-quantizer it hardly changes the codes)."""
    nlist = nlist_for(n)
    for m in _pq_m(dim):
        opq = dim // m > 4
        size = memory_of("ivfpq", n, dim, nlist, m, opq)
        if size <= max_memory:
            prefix = f"OPQ{m}_{dim}," if opq else ""
            return Choice(f"{prefix}{_coarse(nlist)},PQ{m}", "ivfpq", size,
                          f"{reason}; PQ{m} ({m} bytes/vector) is the largest code that fits")
    m = _pq_m(dim)[-1]
    size = memory_of("ivfpq", n, dim, nlist, m, dim // m > 4)
    raise UsageError(f"{n:,} vectors need at least {size / 2**30:.1f} GiB even as {m}-byte PQ "
                     f"codes, above --max-memory {max_memory / 2**30:.1f} GiB; raise it")


def choose_index(n: int, dim: int, max_memory: int, kind: str = "auto", on_disk: bool = False) -> Choice:
    """The index for ``n`` vectors of ``dim`` within ``max_memory`` bytes.

    ``auto``: exact flat search up to FLAT_MAX vectors (nothing to tune, nothing lost); then
    IVF over full vectors while they fit the budget (fast to build on any number of
    cores, reaches 0.95 recall@10 with few lists probed); beyond that IVF + PQ codes sized to
    the budget. ``flat``, ``hnsw``, ``ivf``, ``ivfpq`` force a family with sizes chosen the
    same way; anything else is taken as a faiss factory string.

    ``on_disk``: the inverted lists go to a file, so ``max_memory`` sizes the index on disk and
    auto picks an IVF index at any size (flat and graph indexes have no lists to move).
    """
    if n < 1:
        raise UsageError("cannot index an empty collection")
    nlist = nlist_for(n)
    if on_disk and n < 39 * 16:
        raise UsageError(f"--on-disk: {n:,} vectors are too few for an IVF index (at least {39 * 16}); "
                         "drop --on-disk, a collection this small fits in memory")
    if kind == "auto":
        flat = memory_of("flat", n, dim)
        if n <= FLAT_MAX and flat <= max_memory and not on_disk:
            return Choice("Flat", "flat", flat, f"{n:,} vectors: exact search is fast enough")
        ivf = memory_of("ivf", n, dim, nlist)
        if ivf <= max_memory and n >= 39 * 16:
            return Choice(f"{_coarse(nlist)},Flat", "ivf", ivf,
                          f"{n:,} vectors fit in {ivf / 2**30:.2f} GiB of the "
                          f"{max_memory / 2**30:.1f} GiB budget: IVF over full vectors")
        return ivfpq_choice(n, dim, max_memory,
                            f"{n:,} full vectors ({ivf / 2**30:.1f} GiB) exceed the "
                            f"{max_memory / 2**30:.1f} GiB budget")
    if kind == "flat":
        return Choice("Flat", "flat", memory_of("flat", n, dim), "exact search (--index flat)")
    if kind == "hnsw":
        return Choice(f"HNSW{HNSW_M},Flat", "hnsw", memory_of("hnsw", n, dim), "graph (--index hnsw)")
    if kind == "ivf":
        return Choice(f"{_coarse(nlist)},Flat", "ivf", memory_of("ivf", n, dim, nlist), "IVF (--index ivf)")
    if kind == "ivfpq":
        return ivfpq_choice(n, dim, max_memory, "IVF + PQ (--index ivfpq)")
    return Choice(kind, "custom", 0, "faiss factory string given with --index")
