"""What the finetune loop iterates over: image folders and benchmarks through the train transform
with the resumable step sampler, or GLDv2 RecordIO through DALI."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from unicom_cli import distributed as D
from unicom_cli.utils.cpu import cores_per_process

if TYPE_CHECKING:
    from unicom_cli.train.loop import FinetuneConfig


class ImageLoader:
    """Image datasets through the timm train transform, with the resumable step sampler."""

    def __init__(self, images, spec, cfg: FinetuneConfig, device: torch.device) -> None:
        from unicom_cli.models.transforms import train_transform
        from unicom_cli.train.data import SeededImageDataset, StepBatches

        self.num_classes = images.num_classes
        self.classes = images.classes or [str(i) for i in range(images.num_classes)]
        self.sampler = StepBatches(len(images.paths), cfg.batch_size, D.rank(), D.world_size(), cfg.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        workers = cfg.workers if cfg.workers is not None else \
            (min(8, cores_per_process(D.world_size())) if device.type == "cuda" else 0)
        self.loader = torch.utils.data.DataLoader(
            SeededImageDataset(images, train_transform(spec, cfg.augment)),
            batch_sampler=self.sampler, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed))  # never draws from the global RNG

    def epoch(self, epoch: int, start_step: int):
        self.sampler.set_epoch(epoch, start_step)
        return iter(self.loader)


def _record_root(cfg: FinetuneConfig) -> Path:
    """--data may be the prepare-gldv2 output itself or the data root holding GLDv2/."""
    root = Path(cfg.data) if cfg.data else Path("data")
    return root if any(root.glob("*.rec")) else root / "GLDv2"


def train_images(cfg: FinetuneConfig):
    """The training split of an image dataset (SPEC §3: the complement of the test classes)."""
    from unicom_cli.train.data import scan_image_folder

    if cfg.dataset.startswith("folder:"):
        root = Path(cfg.dataset[len("folder:"):])
        return scan_image_folder(root / "train" if (root / "train").is_dir() else root)
    from unicom_cli.train import datasets

    return datasets.train_split(cfg.dataset, cfg.data)


def make_loader(cfg: FinetuneConfig, spec, device: torch.device):
    """An object with ``num_classes``, ``steps_per_epoch`` and ``epoch(e, start_step)``."""
    if cfg.dataset == "gldv2":
        from unicom_cli.data.dali import RecordLoader, find_record

        rec = find_record(_record_root(cfg))
        return RecordLoader(rec, batch_size=cfg.batch_size, input_size=spec.input_size,
                            mean=spec.mean, std=spec.std, device=device, seed=cfg.seed,
                            shuffle_fill=cfg.shuffle_fill, workers=cfg.workers)
    return ImageLoader(train_images(cfg), spec, cfg, device)
