"""Training input: image lists from folders or benchmarks, a resumable step sampler, seeded augmentation."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from unicom_cli.data.images import scan_class_folders
from unicom_cli.errors import InputError
from unicom_cli.utils.console import warn


@dataclass
class LabelledImages:
    """Training images with contiguous integer labels 0..num_classes-1."""

    paths: list[Path]
    labels: list[int]
    num_classes: int
    classes: list[str] | None = None  # name of each label (the class folder), when known


def scan_image_folder(root: Path) -> LabelledImages:
    """An ImageFolder tree (``data.images.scan_class_folders``): sorted class names give labels 0..C-1."""
    root = Path(root)
    paths, names = scan_class_folders(root)
    return relabel([root / p for p in paths], names)


def relabel(paths: list, labels: list) -> LabelledImages:
    """Map arbitrary class ids (e.g. SOP class_id) to contiguous labels in sorted order."""
    ids = sorted(set(labels))
    index = {c: i for i, c in enumerate(ids)}
    return LabelledImages([Path(p) for p in paths], [index[c] for c in labels], len(ids), [str(c) for c in ids])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch (independent of workers and resume)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)


class StepBatches:
    """Batch sampler: a seeded permutation per epoch, cut into global batches of
    ``batch × world`` images; rank r takes rows ``r·batch … (r+1)·batch`` of each. The global
    batch of a step therefore does not depend on the number of processes, and a resumed run
    starts at ``start_step`` without reading the skipped images. The last partial batch is dropped.
    """

    def __init__(self, size: int, batch: int, rank: int, world: int, seed: int) -> None:
        self.size, self.batch, self.rank, self.world, self.seed = size, batch, rank, world, seed
        self.steps_per_epoch = size // (batch * world)
        if self.steps_per_epoch == 0:
            raise InputError(f"{size} training images are fewer than one global batch of "
                             f"{batch * world} ({batch} per process × {world}); lower --batch-size")
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        glob = self.batch * self.world
        for step in range(self.start_step, self.steps_per_epoch):
            mine = order[step * glob + self.rank * self.batch: step * glob + (self.rank + 1) * self.batch]
            yield [(int(i), sample_seed(self.seed, self.epoch, int(i))) for i in mine]


class SeededImageDataset(torch.utils.data.Dataset):
    """Decodes ``items[(index, seed)]`` and applies ``transform`` with RNGs seeded by ``seed``.

    The global RNG states are restored afterwards, so loading never perturbs the training RNG
    (drop-path) and augmentations replay exactly after a resume. An unreadable image is replaced
    by the next one, with a warning naming it.
    """

    def __init__(self, images: LabelledImages, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, seed = key
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            path = self.images.paths[i]
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                break
            except Exception as exc:  # PIL raises many kinds
                warn(f"{path}: cannot decode ({exc}); using another image in its place")
        else:  # not one image of the data set decodes
            raise InputError(f"{self.images.paths[index]}: none of the {len(self):,} training "
                             "images can be decoded; check the data set")
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            tensor = self.transform(img)
        random.setstate(py_state)
        return tensor, self.images.labels[i]
