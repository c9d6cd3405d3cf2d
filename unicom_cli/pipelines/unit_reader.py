"""Reader of one unit of a source: items decoded in worker processes, regrouped into batches in item order.

Every worker walks the whole unit (a tar shard is a stream: it cannot be split by offset) and
decodes only the items at its positions (``position % workers == worker``), skipping the bytes
of the others unread. The main process puts the decoded items back in position order and cuts
them into consecutive batches, so a batch holds the same items whatever the number of workers,
and a unit resumed at a batch boundary gives the bytes of an uninterrupted run.
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


class UnitStream(IterableDataset):
    """Iterable dataset over a unit from position ``skip`` on: (position, pixels, reason, id, meta)."""

    def __init__(self, unit: Unit, skip: int, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 draft: bool = False) -> None:
        super().__init__()
        self.unit, self.skip, self.size, self.max_pixels = unit, skip, size, max_pixels
        self.draft_size = size * DRAFT_MARGIN if draft else None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)

        def want(position: int) -> bool:
            return position >= self.skip and (position - self.skip) % workers == worker

        for position, item in self.unit.items(want):
            pixels, reason = decode_item(item, self.size, self.max_pixels, self.draft_size)
            yield position, pixels, reason, item.id, item.meta


def iter_unit_batches(unit: Unit, *, skip: int, size: int, batch_size: int, workers: int,
                      pin_memory: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      draft: bool = False) -> Iterator[Batch]:
    """Batches of ``batch_size`` consecutive items from position ``skip`` (the last may be shorter)."""
    stream = UnitStream(unit, skip, size, max_pixels, draft)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        prefetch_factor=max(2, 2 * batch_size // workers) if workers else None,
                        persistent_workers=False)
    waiting: dict[int, tuple] = {}  # decoded ahead of their turn
    expected = skip
    pending: list[tuple] = []
    for sample in loader:
        waiting[sample[0]] = sample
        while expected in waiting:
            pending.append(waiting.pop(expected))
            expected += 1
            if len(pending) == batch_size:
                yield _batch(pending, pin_memory)
                pending = []
    for position in sorted(waiting):  # only after a gap, which positions from 0 never have
        pending.append(waiting[position])
    while pending:
        yield _batch(pending[:batch_size], pin_memory)
        pending = pending[batch_size:]


def _batch(samples: list[tuple], pin_memory: bool) -> Batch:
    pixels = torch.stack([s[1] for s in samples])
    if pin_memory:
        pixels = pixels.pin_memory()
    return Batch(np.array([s[0] for s in samples], dtype=np.int64), pixels, [s[2] for s in samples],
                 [s[3] for s in samples], [s[4] for s in samples])
