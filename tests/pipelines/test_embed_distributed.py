"""embed_images and extract_features on 2 gloo processes equal the 1-process run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from tests.pipelines.test_embed import BAD, _make_folder


def _worker(rank: int, world: int, init_file: str, root: str, out: str, spec: str, ckpt: str,
            results: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on a small machine
    os.environ["RANK"] = str(rank)  # the console reads it: only rank 0 prints
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        from unicom_cli.models.factory import create_model
        from unicom_cli.pipelines.embed import EmbedConfig, embed_images, extract_features

        config = EmbedConfig(input=Path(root), output=Path(out), model=spec, weights=Path(ckpt),
                             batch_size=3, workers=0, draft=False, progress=False)
        summary = embed_images(config)
        assert (summary is not None) == (rank == 0)
        paths = sorted(p for p in Path(root).rglob("*.*"))
        loaded = create_model(spec, weights=ckpt)
        full = extract_features(paths, loaded, batch_size=3, workers=0)
        mine = extract_features(paths, loaded, batch_size=3, workers=0, gather=False)
        np.savez(f"{results}-{rank}.npz", features=full.features, ok=full.ok,
                 failures=np.array([p for p, _ in full.failures]), indices=mine.positions,
                 mine=mine.features)
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_gloo_processes_match_one(tmp_path, tiny_spec_file, tiny_checkpoint):
    root = tmp_path / "imgs"
    names = _make_folder(root)  # 17 files incl. 3 bad: odd, not a multiple of the batch (3)
    assert len(names) % 2 == 1 and len(names) % 3 != 0
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(root), str(tmp_path / "two.npy"),
                                      str(tiny_spec_file), str(tiny_checkpoint),
                                      str(tmp_path / "res")),
                       nprocs=2, join=True, start_method="spawn")
    from unicom_cli.models.factory import create_model
    from unicom_cli.pipelines.embed import EmbedConfig, embed_images, extract_features

    embed_images(EmbedConfig(input=root, output=tmp_path / "one.npy", model=str(tiny_spec_file),
                             weights=tiny_checkpoint, batch_size=3, workers=0, draft=False,
                             progress=False))
    for suffix in (".ids.txt", ".failures.txt"):
        assert (tmp_path / f"two{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == two.shape == (len(names) - len(BAD), 16)
    # Shards are whole global batches: the same batches as one process, the same bits.
    assert (tmp_path / "two.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()

    paths = sorted(p for p in root.rglob("*.*"))
    single = extract_features(paths, create_model(tiny_spec_file, weights=tiny_checkpoint),
                              batch_size=3, workers=0)
    r0, r1 = (np.load(tmp_path / f"res-{r}.npz") for r in range(2))
    for res in (r0, r1):
        assert np.array_equal(res["features"], single.features)
        assert np.array_equal(res["ok"], single.ok)
        assert list(res["failures"]) == [p for p, _ in single.failures]
    assert list(r0["indices"]) + list(r1["indices"]) == list(range(len(paths)))
    assert len(r0["indices"]) == 9 and len(r1["indices"]) == 8  # batches 0-2 | 3-5 (of 3)
    assert np.array_equal(r0["mine"], single.features[:9])
