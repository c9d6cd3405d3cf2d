"""Sharding by rank and gathering back into dataset order, without a process group."""

from __future__ import annotations

import numpy as np
import pytest

from unicom_cli.distributed.comm import broadcast_object, gather_objects, gather_rows, shard_range


@pytest.mark.parametrize("total", [0, 1, 2, 7, 16, 17, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("align", [1, 3, 4])
def test_shards_cover_every_item_once_in_order(total, world, align):
    shards = [shard_range(total, r, world, align=align) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(total))  # contiguous, in rank order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) < 2 * align  # at most one batch more, plus a short last one
    for s in shards:
        if len(s):
            assert s.start % align == 0  # batches of `align` never straddle two ranks


def test_aligned_shards_form_the_single_process_batches():
    # 19 items, batches of 4 on 2 ranks: [0-3][4-7][8-11] | [12-15][16-18], as one process.
    assert shard_range(19, 0, 2, align=4) == range(0, 12)
    assert shard_range(19, 1, 2, align=4) == range(12, 19)
    assert shard_range(19, 0, 2) == range(0, 10)


def test_gather_without_a_group_places_rows():
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = gather_rows(np.array([4, 0, 2]), rows, 5)
    np.testing.assert_array_equal(out, [[2, 3], [0, 0], [4, 5], [0, 0], [0, 1]])
    empty = gather_rows(np.array([], dtype=np.int64), np.zeros((0, 3)), 2)
    assert empty.shape == (2, 3) and not empty.any()


def test_objects_without_a_group():
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert gather_objects(5) == [5]
