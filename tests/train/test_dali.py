"""The DALI CPU RecordIO loader yields correctly labelled, CLIP-normalised CHW batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali",
                    reason="NVIDIA DALI is the optional GPU extra: pip install -e '.[dali]' (CI installs it)")

from unicom_cli.data.dali import RecordLoader, find_record  # noqa: E402
from unicom_cli.errors import InputError  # noqa: E402
from unicom_cli.models.registry import CLIP_MEAN, CLIP_STD  # noqa: E402

COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 40)]


def write_rec(root: Path, per_class: int = 6) -> Path:
    """A GLDv2-shaped tree of solid-colour JPEGs (one landmark per colour) packed by the real
    `prepare-gldv2` into .rec/.idx/.lst; returns the .rec path."""
    from PIL import Image

    from unicom_cli.data.gldv2 import image_relpath
    from unicom_cli.pipelines.prepare import PrepareConfig, prepare_gldv2

    rows = []
    for label, colour in enumerate(COLOURS):
        ids = []
        for i in range(per_class):
            image_id = f"{label:x}{i:x}{(label + i) % 16:x}{label:04d}{i:04d}"
            path = root / "train" / image_relpath(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + 7 * i, 30 + 5 * label), colour).save(path, "JPEG", quality=100)
            ids.append(image_id)
        rows.append(f"{1000 + 7 * label},{' '.join(ids)}")  # labels follow first appearance
    csv = root / "train_clean.csv"
    csv.write_text("landmark_id,images\n" + "\n".join(rows) + "\n")
    prepare_gldv2(PrepareConfig(csv=csv, resize=36, workers=1, progress=False))
    return root / "train.rec"


def test_cpu_pipeline_labels_and_normalisation(tmp_path):
    rec = find_record(write_rec(tmp_path).parent)
    loader = RecordLoader(rec, batch_size=8, input_size=32, mean=CLIP_MEAN, std=CLIP_STD,
                          device=torch.device("cpu"), seed=3, shuffle_fill=8, workers=1)
    assert (loader.size, loader.num_classes, loader.steps_per_epoch) == (24, 4, 3)
    seen = []
    for images, labels in loader.epoch(0, 0):
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        for image, label in zip(images, labels.tolist()):
            expected = (np.array(COLOURS[label]) - np.array(CLIP_MEAN) * 255) / (np.array(CLIP_STD) * 255)
            np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), expected, atol=0.06)
            seen.append(label)
    assert sorted(seen) == sorted(list(range(4)) * 6)  # one pass reads every record once


def test_missing_record_names_the_command(tmp_path):
    with pytest.raises(InputError, match="unicom prepare-gldv2"):
        find_record(tmp_path)


def test_finetune_on_a_record_file(tiny_spec_file, tmp_path):
    from unicom_cli.train.loop import FinetuneConfig, finetune

    write_rec(tmp_path)
    summary = finetune(FinetuneConfig(arch=str(tiny_spec_file), dataset="gldv2", data=tmp_path,
                                      output=tmp_path / "run", epochs=2, batch_size=6, lr=1e-3,
                                      sample_rate=0.5, device="cpu", shuffle_fill=8, workers=1,
                                      log_every=1))
    assert summary.steps == 8  # 24 records // 6 × 2 epochs
    assert np.isfinite(summary.final_loss) and summary.best is None  # no GLDv2 test set here
    shard = torch.load(tmp_path / "run" / "checkpoints" / "step-00000008" / "rank-0.pt", weights_only=True)
    assert shard["centres"]["weight"].shape == (4, 16)


def test_resume_mid_epoch_replays_the_same_batches(tmp_path):
    """An epoch's batches depend only on (seed, epoch): starting at step s yields exactly the
    batches an uninterrupted epoch yields from step s on."""
    rec = write_rec(tmp_path, per_class=8)  # 32 records, batch 4: 8 steps per epoch

    def loader():
        return RecordLoader(rec, batch_size=4, input_size=32, mean=CLIP_MEAN, std=CLIP_STD,
                            device=torch.device("cpu"), seed=5, shuffle_fill=16, workers=2)

    full = list(loader().epoch(1, 0))
    resumed = list(loader().epoch(1, 5))
    assert len(full) == 8 and len(resumed) == 3
    for (a_img, a_lab), (b_img, b_lab) in zip(full[5:], resumed):
        assert torch.equal(a_lab, b_lab)
        assert torch.equal(a_img, b_img)
    other_epoch = list(loader().epoch(2, 0))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(full, other_epoch))
