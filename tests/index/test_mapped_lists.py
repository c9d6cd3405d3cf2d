"""On-disk inverted lists: the pages searches touch can be let go, and the answers stay the same."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from unicom_cli.index.store import release_mapped_lists


def _file_backed_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on Linux")
def test_released_pages_stop_counting_and_searches_answer_alike(tmp_path, capfd):
    import faiss

    x = np.random.default_rng(0).standard_normal((40_000, 64)).astype(np.float32)
    index = faiss.index_factory(64, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x[:5000])
    lists = faiss.OnDiskInvertedLists(16, index.code_size, str(tmp_path / "lists.ivfdata"))
    index.replace_invlists(lists, True)
    lists.this.disown()
    index.add(x)
    index.nprobe = 16  # every list: every page of the file is touched
    before_scores, before_rows = index.search(x[:300], 10)
    data_kib = 40_000 * (64 * 4 + 8) // 1024
    touched = _file_backed_kib()
    release_mapped_lists(index)
    assert touched - _file_backed_kib() >= 0.9 * data_kib
    scores, rows = index.search(x[:300], 10)
    assert np.array_equal(rows, before_rows) and np.array_equal(scores, before_scores)
    flat = faiss.IndexFlatIP(64)
    flat.add(x)
    release_mapped_lists(flat)  # nothing mapped: nothing to do
    capfd.readouterr()
