"""Per-rank parts, resume state and streaming assembly of the final files (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unicom_cli.errors import OutputExists
from unicom_cli.pipelines import writer
from unicom_cli.pipelines.writer import OutputFiles, PartWriter, assemble


def test_output_names(tmp_path):
    files = OutputFiles.for_output(tmp_path / "feats.npy")
    assert [p.name for p in files.finals()] == ["feats.npy", "feats.ids.txt", "feats.json",
                                                "feats.failures.txt"]
    assert files.workdir.name == "feats.npy.partial"
    assert OutputFiles.for_output(tmp_path).feats == tmp_path / "feats.npy"  # a folder
    assert OutputFiles.for_output(tmp_path / "x").feats.name == "x.npy"


def test_three_ranks_with_an_empty_one_assemble_in_order(tmp_path, monkeypatch):
    """Ranks of 4, 3 and 0 rows, failures on two ranks; streamed in chunks of 2 rows."""
    monkeypatch.setattr(writer, "STREAM_ROWS", 2)
    files = OutputFiles.for_output(tmp_path / "f.npy")
    files.start("fresh", {"k": 1})
    rows = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    failed = {1: "empty file (0 bytes)", 5: "cannot decode:\ttruncated\nfile"}
    for rank, (start, stop) in enumerate([(0, 4), (4, 7), (7, 7)]):
        part = PartWriter(files.workdir, rank, stop - start, 3, "float16")
        data = rows[start:stop].copy()
        for pos in failed:
            if start <= pos < stop:
                data[pos - start] = 0
        part.write(0, data, [(p, r) for p, r in failed.items() if start <= p < stop])
        part.close()
    ids = [f"img{i}.jpg" for i in range(7)]
    count, got = assemble(files, ids, 3, 3, "float16", {"model": "m"})
    keep = [i for i in range(7) if i not in failed]
    assert count == 5 and sorted(got) == [1, 5]
    out = np.load(files.feats)
    assert out.dtype == np.float16 and np.array_equal(out, rows[keep].astype(np.float16))
    assert files.ids.read_text().splitlines() == [ids[i] for i in keep]
    assert files.failures.read_text().splitlines() == [
        "img1.jpg\tempty file (0 bytes)", "img5.jpg\tcannot decode: truncated file"]
    meta = json.loads(files.meta.read_text())
    assert (meta["count"], meta["failures"], meta["model"]) == (5, 2, "m")
    assert not files.workdir.exists()
    with pytest.raises(OutputExists):
        files.plan(overwrite=False)
    assert files.plan(overwrite=True) == "overwrite"


def test_resume_forgets_rows_and_failures_after_the_last_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    part = PartWriter(workdir, 0, 6, 2, "float32", checkpoint_every_s=3600)
    part.write(0, np.ones((2, 2), np.float32), [(1, "bad one")])
    part.checkpoint()
    part.write(2, np.full((2, 2), 7, np.float32), [(3, "bad two")])  # never checkpointed
    part._failures.flush()
    del part  # as if killed here
    resumed = PartWriter(workdir, 0, 6, 2, "float32")
    assert resumed.rows_done == 2
    resumed.write(2, np.full((4, 2), 5, np.float32), [(4, "bad three")])
    resumed.close()
    assert writer.read_failures(workdir, 1) == {1: "bad one", 4: "bad three"}
    assert np.array_equal(np.load(workdir / "part-00000.npy")[:, 0], [1, 1, 5, 5, 5, 5])
