"""RecordIO training input through NVIDIA DALI (GPU decode on CUDA, DALI's CPU pipeline otherwise).

DALI is optional: it is imported only here, and only when a RecordIO data set is trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from unicom_cli.distributed import rank, world_size
from unicom_cli.errors import InputError, UsageError


def _dali():
    try:
        from nvidia import dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as exc:
        raise UsageError("RecordIO training needs NVIDIA DALI: pip install 'unicom-cli[dali]' "
                         "(or train an image folder with --dataset folder:PATH)") from exc
    return fn, pipeline_def, types


def find_record(root: Path) -> Path:
    """The ``.rec`` file of a prepared data set (a ``.rec`` path, or a folder holding one with its ``.idx``)."""
    root = Path(root)
    if root.suffix == ".rec":
        rec = root
    else:
        found = sorted(root.glob("*.rec")) if root.is_dir() else []
        if not found:
            raise InputError(f"{root}: no RecordIO training set (.rec + .idx) found; make it with "
                             f"`unicom prepare-gldv2` (see its --help) or point --data at it")
        rec = found[0]
    if not rec.is_file() or not rec.with_suffix(".idx").is_file():
        raise InputError(f"{rec}: missing .rec or its .idx index; rerun `unicom prepare-gldv2`")
    return rec


def count_records(idx: Path) -> tuple[int, int]:
    """(records, classes) from the ``.idx`` and the ``.lst`` beside it (labels = max label + 1)."""
    records = sum(1 for line in open(idx) if line.strip())
    lst = idx.with_suffix(".lst")
    if lst.is_file():
        labels = [float(line.split("\t")[1]) for line in open(lst) if line.strip()]
        return records, int(max(labels)) + 1
    raise InputError(f"{lst}: the .lst list beside the .rec is needed to count classes; "
                     f"rerun `unicom prepare-gldv2`")


class RecordLoader:
    """SPEC §3 GLDv2 train pipeline: shuffled, rank-sharded RecordIO reader; random-resized-crop
    decode (area 0.1–1, aspect 0.8–1.25, 100 attempts); triangular resize to input×input; random
    flip; CLIP mean/std × 255; CHW float. Yields (images, int64 labels) as torch tensors.

    Each epoch gets its own pipeline seeded with (seed, epoch, rank), so an epoch's batches
    depend on nothing before it. DALI's shuffle cannot be seeked, so resuming at step s of an
    epoch replays (and discards) that epoch's first s batches: exact, at the cost of re-reading
    them once.
    """

    def __init__(self, rec: Path, *, batch_size: int, input_size: int, mean, std,
                 device: torch.device, seed: int = 1024, shuffle_fill: int = 16384,
                 workers: int | None = None) -> None:
        _dali()  # fail early, with the install hint, when DALI is missing
        self.rec, self.device, self.batch_size = Path(rec), device, batch_size
        self.input_size, self.mean, self.std = input_size, mean, std
        self.seed, self.shuffle_fill, self.workers = seed, shuffle_fill, workers
        self.size, self.num_classes = count_records(self.rec.with_suffix(".idx"))
        self.steps_per_epoch = self.size // (batch_size * world_size())
        if self.steps_per_epoch == 0:
            raise InputError(f"{rec}: {self.size} records are fewer than one global batch")
        self.pipe = None

    def _pipeline(self, epoch: int):
        """A fresh pipeline whose random stream depends only on (seed, epoch, rank)."""
        fn, pipeline_def, types = _dali()
        gpu = self.device.type == "cuda"
        input_size, mean, std = self.input_size, self.mean, self.std

        @pipeline_def(batch_size=self.batch_size, num_threads=self.workers or 4,
                      device_id=(self.device.index or 0) if gpu else None,
                      seed=(self.seed + 1_000_003 * epoch + 7919 * rank()) % 2**31)
        def pipe():
            jpegs, labels = fn.readers.mxnet(
                path=[str(self.rec)], index_path=[str(self.rec.with_suffix(".idx"))],
                shard_id=rank(), num_shards=world_size(), random_shuffle=True,
                initial_fill=self.shuffle_fill, pad_last_batch=False, name="reader")
            images = fn.decoders.image_random_crop(
                jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                random_area=[0.1, 1.0], random_aspect_ratio=[0.8, 1.25], num_attempts=100)
            images = fn.resize(images, resize_x=input_size, resize_y=input_size,
                               interp_type=types.INTERP_TRIANGULAR)
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW",
                mean=[m * 255 for m in mean], std=[s * 255 for s in std],
                mirror=fn.random.coin_flip(probability=0.5))
            if gpu:
                labels = labels.gpu()
            return images, labels

        built = pipe()
        built.build()
        return built

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.pipe.run()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out_i = torch.empty(images.as_tensor().shape(), dtype=torch.float32, device=self.device)
            out_l = torch.empty(labels.as_tensor().shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(images.as_tensor(), out_i, cuda_stream=torch.cuda.current_stream())
            feed_ndarray(labels.as_tensor(), out_l, cuda_stream=torch.cuda.current_stream())
            return out_i, out_l.reshape(-1).long()
        return (torch.from_numpy(images.as_array()),
                torch.from_numpy(labels.as_array()).reshape(-1).long())

    def epoch(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps_per_epoch - start_step`` batches of this rank's shard, the same ones as an
        uninterrupted run yields from that step on."""
        self.pipe = self._pipeline(epoch)
        for _ in range(start_step):
            self.pipe.run()  # replay: DALI cannot seek its shuffled stream
        for _ in range(start_step, self.steps_per_epoch):
            yield self._next()
