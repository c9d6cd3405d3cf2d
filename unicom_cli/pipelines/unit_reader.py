"""Reader of a rank's units: items decoded in worker processes as whole batches, delivered in unit order.

Each unit's items are cut into consecutive batches of ``batch_size`` from its resume point, so
a batch holds the same items however the work is dealt, and a unit resumed at a batch boundary
gives the bytes of an uninterrupted run. The batches are dealt to the decoding workers in one of
two ways:

* whole units, unit ``u`` to worker ``u % W``, when there are at least twice as many units as
  workers (the usual case at scale): each tar shard is then read once, by one worker;
* batch by batch otherwise (a few big units): batch ``n`` (numbered across units) to worker
  ``n % W``. Every worker walks every unit (a tar stream cannot be split by offset) and reads
  only the bytes of its own samples; the loader hands batches back in number order.

Each batch says whether it is its unit's last, so that the unit can be finished at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unicom_cli.data.images import (
    DEFAULT_MAX_PIXELS,
    DRAFT_MARGIN,
    decode_pixels,
    load_pixels,
    max_file_bytes,
    resize_center_crop,
)
from unicom_cli.data.sources import Item, Unit
from unicom_cli.errors import BadImage

@dataclass
class Batch:
    """Consecutive items of one unit, decoded: zero pixels and a reason for each failed item."""

    positions: np.ndarray  # int64 positions in the unit
    pixels: torch.Tensor  # uint8 (B, 3, S, S)
    reasons: list[str]
    ids: list[str]
    metas: list[dict]


def decode_item(item: Item, size: int, max_pixels: int | None, draft_size: int | None):
    """(uint8 CHW tensor, reason): the reason is "" for a decoded image, else why it failed."""
    if not item.failure:
        try:
            if item.data is not None:
                pixels = decode_pixels(item.data, max_pixels=max_pixels, draft_size=draft_size)
            else:
                pixels = load_pixels(item.path, max_pixels=max_pixels, draft_size=draft_size)
            return resize_center_crop(pixels, size), ""
        except BadImage as exc:
            return torch.zeros(3, size, size, dtype=torch.uint8), str(exc)
    return torch.zeros(3, size, size, dtype=torch.uint8), item.failure


class UnitsStream(IterableDataset):
    """Batches of a list of units: (number or None, unit index, last of its unit, positions, pixels,
    reasons, ids, metas)."""

    def __init__(self, units: list[Unit], skips: list[int], size: int, batch_size: int, workers: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = False) -> None:
        super().__init__()
        self.units, self.skips, self.size, self.batch_size = units, skips, size, batch_size
        self.whole_units = len(units) >= 2 * max(workers, 1)
        self.max_pixels = max_pixels
        self.draft_size = size * DRAFT_MARGIN if draft else None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        base = 0  # number of the unit's first batch (batch-by-batch dealing)
        for u, (unit, skip) in enumerate(zip(self.units, self.skips)):
            if self.whole_units and u % workers != worker:
                continue
            seen = [-1]  # the highest position the unit offered: its length

            def owner(position: int, skip=skip, base=base) -> bool:
                return self.whole_units or self._number(position, base, skip) % workers == worker

            def want(position: int, skip=skip, seen=seen, owner=owner) -> bool:
                seen[0] = max(seen[0], position)
                return position >= skip and owner(position)

            samples: list[tuple] = []
            for position, item in unit.items(want, max_file_bytes(self.max_pixels)):
                if samples and self._number(position, base, skip) != self._number(samples[0][0], base, skip):
                    yield self._block(samples, u, base, skip, last=False)  # a later batch of the unit exists
                    samples = []
                pixels, reason = decode_item(item, self.size, self.max_pixels, self.draft_size)
                samples.append((position, pixels, reason, item.id, item.meta))
            batches = -(-(seen[0] + 1 - skip) // self.batch_size) if seen[0] + 1 > skip else 0
            if samples:
                final = self._number(samples[0][0], base, skip) == base + batches - 1
                yield self._block(samples, u, base, skip, last=final)
            base += batches

    def _number(self, position: int, base: int, skip: int) -> int:
        """The batch of a position, numbered across the units."""
        return base + (position - skip) // self.batch_size

    def _block(self, samples: list[tuple], unit: int, base: int, skip: int, last: bool) -> tuple:
        number = None if self.whole_units else self._number(samples[0][0], base, skip)
        return (number, unit, last, np.array([s[0] for s in samples], dtype=np.int64),
                torch.stack([s[1] for s in samples]), [s[2] for s in samples], [s[3] for s in samples],
                [s[4] for s in samples])


def iter_unit_batches(units: list[Unit], skips: list[int], *, size: int, batch_size: int, workers: int,
                      pin_memory: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      draft: bool = False) -> Iterator[tuple[int, bool, Batch]]:
    """(unit index, last batch of the unit, batch) over ``units``, each from its position in
    ``skips``; a unit's batches in order (units may interleave when dealt whole)."""
    stream = UnitsStream(units, skips, size, batch_size, workers, max_pixels, draft)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    waiting: dict[int, tuple] = {}  # batch-by-batch: a batch that came early (the loader keeps worker order)
    expected = 0
    for block in loader:
        if block[0] is None:
            yield _batch(block)
            continue
        waiting[block[0]] = block
        while expected in waiting:
            yield _batch(waiting.pop(expected))
            expected += 1
    if waiting:  # pragma: no cover - a batch number skipped would be a numbering bug
        raise RuntimeError(f"unit reader: batches {sorted(waiting)[:3]} arrived without batch {expected}")


def _batch(block: tuple) -> tuple[int, bool, Batch]:
    _, unit, last, positions, pixels, reasons, ids, metas = block
    return unit, last, Batch(np.asarray(positions, dtype=np.int64), pixels, list(reasons), list(ids), list(metas))
