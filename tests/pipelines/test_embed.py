"""embed_images / extract_features against load() + transform + model, bad files, resume, ranks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unicom_cli
from unicom_cli.errors import OutputExists, UsageError
from unicom_cli.models.factory import create_model
from unicom_cli.pipelines.embed import EmbedConfig, embed_images, extract_features

BAD = {"zero.jpg": "empty file", "text.jpg": "not an image", "cut.jpg": "truncated"}


def _make_folder(root: Path) -> list[str]:
    """Real photos (sklearn, skimage), real digits and three bad files, in nested folders.

    Returns the expected sorted relative paths."""
    from skimage import data
    from sklearn.datasets import load_digits, load_sample_images

    root.mkdir(parents=True, exist_ok=True)
    (root / "photos").mkdir()
    (root / "digits" / "sub").mkdir(parents=True)
    photos = list(load_sample_images().images) + [data.astronaut(), data.coffee(), data.chelsea()]
    for i, arr in enumerate(photos):
        img = Image.fromarray(arr).reduce(2)  # smaller files: faster tests, still real photos
        img.save(root / "photos" / f"p{i}.jpg", quality=92)
    digits = load_digits().images[:9]
    for i, d in enumerate(digits):
        folder = root / "digits" / ("sub" if i % 2 else "")
        Image.fromarray((d * 15).astype(np.uint8), mode="L").save(folder / f"d{i}.png")
    (root / "photos" / "zero.jpg").write_bytes(b"")
    (root / "digits" / "text.jpg").write_text("not a picture")
    good = (root / "photos" / "p0.jpg").read_bytes()
    (root / "photos" / "cut.jpg").write_bytes(good[: len(good) // 3])
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*.*"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("imgs") / "imgs"
    return root, _make_folder(root)


@pytest.fixture
def reference(folder, tiny_spec_file, tiny_checkpoint) -> dict[str, np.ndarray]:
    """Independent embeddings: unicom_cli.load() + its transform + the model, one image at a time."""
    root, names = folder
    model, transform = unicom_cli.load(tiny_spec_file, weights=tiny_checkpoint)
    out = {}
    with torch.no_grad():
        for name in names:
            if Path(name).name in BAD:
                continue
            with Image.open(root / name) as img:
                out[name] = model(transform(img)[None])[0].numpy()
    return out


def assert_matches_reference(feats, expected):
    """The loader resizes with torch's uint8 bicubic, Pillow's filter to within 1/255 on a few
    pixels (tests/data/test_images.py); that moves the embeddings by ~1e-4 at most."""
    np.testing.assert_allclose(feats, expected, rtol=0, atol=5e-4)
    cosine = (feats * expected).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.99999


def _config(folder, out, spec, ckpt, **kw) -> EmbedConfig:
    # fp32: compared with fp32 references (the default is bf16 on CPUs with native bf16).
    kw = {"batch_size": 4, "workers": 0, "progress": False, "draft": False, "precision": "fp32",
          **kw}
    return EmbedConfig(input=folder[0], output=out, model=str(spec), weights=ckpt, **kw)


def test_embed_equals_reference_with_ids_aligned(folder, reference, tiny_spec_file,
                                                 tiny_checkpoint, tmp_path):
    out = tmp_path / "feats.npy"
    summary = embed_images(_config(folder, out, tiny_spec_file, tiny_checkpoint, workers=2))
    ids = (tmp_path / "feats.ids.txt").read_text().splitlines()
    feats = np.load(out)
    assert ids == [n for n in folder[1] if Path(n).name not in BAD]
    assert feats.dtype == np.float32 and feats.shape == (len(ids), 16)
    expected = np.stack([reference[i] for i in ids])
    assert_matches_reference(feats, expected)
    failures = dict(line.split("\t") for line in
                    (tmp_path / "feats.failures.txt").read_text().splitlines())
    assert {Path(k).name for k in failures} == set(BAD)
    for name, reason in failures.items():
        assert BAD[Path(name).name] in reason
    meta = json.loads((tmp_path / "feats.json").read_text())
    assert meta["count"] == len(ids) and meta["failures"] == 3 and meta["images"] == len(folder[1])
    assert meta["model"] == "tiny" and meta["dim"] == 16 and meta["normalized"] is False
    assert meta["weights_sha256"] and meta["version"] == unicom_cli.__version__
    assert summary.count == len(ids) and len(summary.failures) == 3
    assert not (tmp_path / "feats.npy.partial").exists()


def test_float16_normalized_num_feat(folder, reference, tiny_spec_file, tiny_checkpoint, tmp_path):
    out = tmp_path / "f16.npy"
    embed_images(_config(folder, out, tiny_spec_file, tiny_checkpoint, normalize=True,
                         num_feat=8, dtype="float16"))
    ids = (tmp_path / "f16.ids.txt").read_text().splitlines()
    feats = np.load(out)
    full = np.stack([reference[i] for i in ids])
    expected = (full / np.linalg.norm(full, axis=1, keepdims=True))[:, :8]
    assert feats.dtype == np.float16 and feats.shape == (len(ids), 8)
    np.testing.assert_allclose(feats.astype(np.float32), expected, atol=2e-3)
    assert np.all(np.linalg.norm(feats.astype(np.float32), axis=1) < 1.0)  # not renormalised


def test_num_feat_needs_normalize_and_fits(folder, tiny_spec_file, tiny_checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--normalize"):
        embed_images(_config(folder, tmp_path / "a.npy", tiny_spec_file, tiny_checkpoint,
                             num_feat=8))
    with pytest.raises(UsageError, match="only 16"):
        embed_images(_config(folder, tmp_path / "a.npy", tiny_spec_file, tiny_checkpoint,
                             normalize=True, num_feat=17))


def test_overwrite_protection_and_resume_argument_check(folder, tiny_spec_file, tiny_checkpoint,
                                                        tmp_path):
    out = tmp_path / "o.npy"
    embed_images(_config(folder, out, tiny_spec_file, tiny_checkpoint))
    first = np.load(out)
    with pytest.raises(OutputExists, match="--overwrite"):
        embed_images(_config(folder, out, tiny_spec_file, tiny_checkpoint))
    embed_images(_config(folder, out, tiny_spec_file, tiny_checkpoint, overwrite=True,
                         normalize=True))
    assert np.allclose(np.linalg.norm(np.load(out), axis=1), 1.0, atol=1e-5)
    assert not np.allclose(first, np.load(out))
    # An unfinished run with other arguments is not silently mixed with a new one.
    (tmp_path / "o.npy.partial").mkdir()
    (tmp_path / "o.npy.partial" / "run.json").write_text(json.dumps({"batch_size": 99}))
    with pytest.raises(UsageError, match="batch_size: was 99, now 4"):
        embed_images(_config(folder, out, tiny_spec_file, tiny_checkpoint))


def _cli(folder_root: Path, out: Path, spec: Path, ckpt: Path, env: dict | None = None,
         entry: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, *(entry or ["-m", "unicom_cli"]), "embed", str(folder_root), "-o", str(out),
           "--model", str(spec), "--weights", str(ckpt), "--batch-size", "2", "--workers", "1",
           "--no-draft", "--precision", "fp32"]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# `unicom embed` that SIGKILLs itself right after its first checkpoint with >= k rows done: a real
# kill -9 at a known point, with the hook in the test instead of the product.
KILL_AFTER_ROWS = """
import os, signal, sys
from unicom_cli.pipelines import writer
k = int(os.environ["KILL_AFTER_ROWS"])
checkpoint = writer.PartWriter.checkpoint
def checkpoint_then_die(self):
    checkpoint(self)
    if self.rows_done >= k:
        os.kill(os.getpid(), signal.SIGKILL)
writer.PartWriter.checkpoint = checkpoint_then_die
from unicom_cli.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_kill_at_random_batch_is_bitwise_identical(folder, tiny_spec_file,
                                                                 tiny_checkpoint, tmp_path):
    """kill -9 at a random batch (the process SIGKILLs itself at that checkpoint), then rerun."""
    clean = tmp_path / "clean.npy"
    embed_images(_config(folder, clean, tiny_spec_file, tiny_checkpoint, batch_size=2,
                         workers=1))
    out = tmp_path / "killed.npy"
    k = random.Random(16).randrange(1, len(folder[1]) - 1)  # seeded: a failure replays
    proc = _cli(folder[0], out, tiny_spec_file, tiny_checkpoint,
                {"KILL_AFTER_ROWS": str(k), "UNICOM_TEST_CHECKPOINT_S": "0"},
                entry=["-c", KILL_AFTER_ROWS])
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"k={k}"
    assert not out.exists() and (tmp_path / "killed.npy.partial" / "run.json").exists()
    state = json.loads((tmp_path / "killed.npy.partial" / "part-00000.state.json").read_text())
    assert k <= state["rows_done"] < len(folder[1])
    summary = embed_images(_config(folder, out, tiny_spec_file, tiny_checkpoint, batch_size=2,
                                   workers=1))  # the same arguments as the killed CLI run
    assert summary.resumed_from == state["rows_done"]
    for suffix in (".npy", ".ids.txt", ".failures.txt"):
        a = (tmp_path / f"clean{suffix}").read_bytes()
        assert (tmp_path / f"killed{suffix}").read_bytes() == a, (suffix, k)


@pytest.mark.slow
def test_resume_after_external_kill9_at_a_random_moment(tmp_path, tiny_spec_file, tiny_checkpoint):
    """A real kill -9 from outside while batches are being written."""
    root = tmp_path / "many"
    root.mkdir()
    from sklearn.datasets import load_digits

    for i, d in enumerate(load_digits().images[:80]):
        Image.fromarray((d * 15).astype(np.uint8), mode="L").save(root / f"{i:04d}.png")
    out = tmp_path / "k.npy"
    state = tmp_path / "k.npy.partial" / "part-00000.state.json"
    proc = _cli(root, out, tiny_spec_file, tiny_checkpoint,
                {"UNICOM_TEST_CHECKPOINT_S": "0"})
    deadline = time.monotonic() + 60
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random(16).uniform(0.0, 0.05))  # seeded: a failure replays
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_mid_run = not out.exists()

    def run(output: Path):
        return embed_images(EmbedConfig(input=root, output=output, model=str(tiny_spec_file),
                                        weights=tiny_checkpoint, batch_size=2, workers=1,
                                        draft=False, progress=False, precision="fp32"))

    assert run(out).resumed_from > 0
    clean = tmp_path / "c.npy"
    run(clean)
    assert out.read_bytes() == clean.read_bytes()
    assert (tmp_path / "k.ids.txt").read_bytes() == (tmp_path / "c.ids.txt").read_bytes()
    assert killed_mid_run  # else the run finished before the kill: the test proved nothing


def test_extract_features_in_memory(folder, reference, tiny_spec_file, tiny_checkpoint):
    root, names = folder
    loaded = create_model(tiny_spec_file, weights=tiny_checkpoint, precision="fp32")
    paths = [root / n for n in names]
    result = extract_features(paths, loaded, batch_size=5, workers=1)
    assert result.features.shape == (len(names), 16) and result.features.dtype == np.float32
    for i, name in enumerate(names):
        if Path(name).name in BAD:
            assert not result.ok[i] and not result.features[i].any()
        else:
            assert result.ok[i]
            assert_matches_reference(result.features[i][None], reference[name][None])
    assert sorted(Path(p).name for p, _ in result.failures) == sorted(BAD)
    assert np.array_equal(result.positions, np.arange(len(names)))


def test_shards_cover_the_list_in_order(folder, tiny_spec_file, tiny_checkpoint, monkeypatch):
    """gather=False returns this rank's contiguous shard; three simulated ranks tile the list."""
    import functools

    import unicom_cli.pipelines.embed as embed_mod
    from unicom_cli.distributed.comm import shard_range

    root, names = folder
    loaded = create_model(tiny_spec_file, weights=tiny_checkpoint)
    paths = [root / n for n in names]
    full = extract_features(paths, loaded, batch_size=4, workers=0)
    seen = []
    for r in range(3):
        monkeypatch.setattr(embed_mod, "shard_range", functools.partial(shard_range, rank_=r, world=3))
        assert len(embed_mod.batch_shard(len(names), 4)) == [8, 8, 1][r]  # 5 batches (17 rows) over 3 ranks
        part = extract_features(paths, loaded, batch_size=4, workers=0, gather=False)
        assert np.array_equal(part.features, full.features[part.positions])
        assert np.array_equal(part.ok, full.ok[part.positions])
        assert {p for p, _ in part.failures} <= {p for p, _ in full.failures}
        seen.extend(part.positions.tolist())
    assert seen == list(range(len(names)))


def test_public_embed_folder(folder, reference, tiny_spec_file, tiny_checkpoint, tmp_path):
    summary = unicom_cli.embed_folder(folder[0], tmp_path / "api.npy", model=str(tiny_spec_file),
                                      weights=tiny_checkpoint, workers=0, progress=False,
                                      precision="fp32")
    ids = (tmp_path / "api.ids.txt").read_text().splitlines()
    assert summary.count == len(ids) == len(reference)
    np.testing.assert_allclose(np.load(tmp_path / "api.npy")[0], reference[ids[0]], rtol=1e-4,
                               atol=1e-5)
