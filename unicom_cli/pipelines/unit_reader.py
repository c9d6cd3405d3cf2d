"""Reader of a rank's units: items decoded in worker processes as whole batches, delivered in order.

The items of all units are cut into consecutive batches of ``batch_size`` (per unit, from its
resume point), numbered across units; worker ``w`` of ``W`` decodes the batches numbered
``w, w + W, …``. Every worker walks every unit (a tar shard is a stream: it cannot be split by
offset) but reads only the bytes of its own samples. The loader hands batches back in number
order, so a batch holds the same items whatever the number of workers, and a unit resumed at a
batch boundary gives the bytes of an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unicom_cli.data.images import DEFAULT_MAX_PIXELS, DRAFT_MARGIN, decode_pixels, load_pixels, resize_center_crop
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
    """Batches of a list of units: (number, unit index, positions, pixels, reasons, ids, metas)."""

    def __init__(self, units: list[Unit], skips: list[int], size: int, batch_size: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = False) -> None:
        super().__init__()
        self.units, self.skips, self.size, self.batch_size = units, skips, size, batch_size
        self.max_pixels = max_pixels
        self.draft_size = size * DRAFT_MARGIN if draft else None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        base = 0  # number of the unit's first batch
        for u, (unit, skip) in enumerate(zip(self.units, self.skips)):
            last = [-1]  # the highest position the unit offered: its length, for numbering the next

            def want(position: int, skip=skip, base=base, last=last) -> bool:
                last[0] = max(last[0], position)
                return position >= skip and (base + (position - skip) // self.batch_size) % workers == worker

            samples: list[tuple] = []
            number = None
            for position, item in unit.items(want):
                this = base + (position - skip) // self.batch_size
                if samples and this != number:
                    yield _collate(number, u, samples)
                    samples = []
                number = this
                pixels, reason = decode_item(item, self.size, self.max_pixels, self.draft_size)
                samples.append((position, pixels, reason, item.id, item.meta))
            if samples:
                yield _collate(number, u, samples)
            remaining = last[0] + 1 - skip
            base += -(-remaining // self.batch_size) if remaining > 0 else 0


def _collate(number: int, unit: int, samples: list[tuple]) -> tuple:
    return (number, unit, np.array([s[0] for s in samples], dtype=np.int64), torch.stack([s[1] for s in samples]),
            [s[2] for s in samples], [s[3] for s in samples], [s[4] for s in samples])


def iter_unit_batches(units: list[Unit], skips: list[int], *, size: int, batch_size: int, workers: int,
                      pin_memory: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      draft: bool = False) -> Iterator[tuple[int, Batch]]:
    """(unit index, batch) over ``units``, each from its position in ``skips``, in order."""
    stream = UnitsStream(units, skips, size, batch_size, max_pixels, draft)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    waiting: dict[int, tuple] = {}  # a batch that came early (the loader keeps worker order: never)
    expected = 0
    for block in loader:
        waiting[block[0]] = block
        while expected in waiting:
            _, unit, positions, pixels, reasons, ids, metas = waiting.pop(expected)
            expected += 1
            yield unit, Batch(positions, pixels, list(reasons), list(ids), list(metas))
    if waiting:  # pragma: no cover - a batch number skipped would be a numbering bug
        raise RuntimeError(f"unit reader: batches {sorted(waiting)[:3]} arrived without batch {expected}")
