"""data/sources.py: brace patterns, WebDataset keys, shard lists, tables, units and their order."""

from __future__ import annotations

import pytest

from tests.pipelines.shards_util import real_images, write_shard
from unicom_cli.data.sources import expand_braces, open_source, split_key
from unicom_cli.errors import InputError, UsageError
from unicom_cli.pipelines.sharded import my_units, parse_part


def test_brace_patterns_keep_padding_and_multiply():
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{0..1}/{8..9}.tar") == ["0/8.tar", "0/9.tar", "1/8.tar", "1/9.tar"]
    with pytest.raises(UsageError, match="runs backwards"):
        expand_braces("{5..2}.tar")


def test_webdataset_keys_split_at_the_first_dot_of_the_base_name():
    assert split_key("000/abc.seg.PNG") == ("000/abc", "seg.png")
    assert split_key("a.b/c.jpg") == ("a.b/c", "jpg")
    assert split_key("noext") == ("noext", "")


def test_tar_list_file_nested_names_and_items_in_member_order(tmp_path):
    images = real_images(3)
    write_shard(tmp_path / "a" / "x.tar", [("k2", {"png": images[0]}), ("k1", {"jpg": images[1], "json": b"[1]"})])
    write_shard(tmp_path / "b" / "x.tar", [("k0", {"webp": images[2], "txt": b"hi"})])
    (tmp_path / "list.txt").write_text("# shards\na/x.tar\nb/x.tar\n")
    source = open_source(tmp_path / "list.txt")
    assert source.kind == "tar" and [u.name for u in source.units] == ["a/x", "b/x"]
    items = [item for unit in source.units for _, item in unit.items()]
    assert [i.id for i in items] == ["a/x/k2", "a/x/k1", "b/x/k0"]
    assert items[0].data == images[0] and items[1].meta == {} and items[2].meta == {"txt": "hi"}
    assert [p for p, _ in source.units[0].items(lambda p: p == 1)] == [1]


def test_an_image_member_over_the_byte_limit_is_a_failure_left_unread(tmp_path, monkeypatch):
    """A shard claiming a huge member must not make us read it into memory (--max-pixels decides)."""
    import unicom_cli.data.sources as sources

    images = real_images(2)
    big_meta = b'{"caption": "' + b"x" * 4000 + b'"}'
    write_shard(tmp_path / "s.tar", [("small", {"png": images[0], "json": big_meta}),
                                     ("big", {"jpg": images[1] + bytes(50_000), "txt": b"kept"})])
    monkeypatch.setattr(sources, "MAX_METADATA_BYTES", 1000)
    reads = []
    real_read = sources.TarReader.read
    monkeypatch.setattr(sources.TarReader, "read", lambda self: reads.append(self.size) or real_read(self))
    unit = open_source(tmp_path / "s.tar").units[0]
    limit = len(images[0]) + 10
    small, big = [item for _, item in unit.items(max_bytes=limit)]
    assert small.data == images[0] and small.meta == {}  # the 4 kB json is over the (lowered) limit
    assert big.data is None and big.id == "s/big"
    size = len(images[1]) + 50_000
    assert big.failure.startswith(f"the jpg member is {size / 1024:.1f} KiB, more than an image within --max-pixels")
    assert max(reads) <= limit  # neither oversized member was read
    assert [i.data for _, i in unit.items()] == [images[0], images[1] + bytes(50_000)]  # no limit


def test_csv_table_units_and_missing_or_empty_inputs(tmp_path):
    (tmp_path / "t.csv").write_text("path,label\n" + "".join(f"img{i}.jpg,{i}\n" for i in range(5)))
    source = open_source(tmp_path / "t.csv", shard_size=2)
    assert [len(u) for u in source.units] == [2, 2, 1]
    assert [(i.id, i.meta) for _, i in source.units[2].items()] == [("img4.jpg", {"label": "4"})]
    with pytest.raises(InputError, match="no column 'file'"):
        open_source(tmp_path / "t.csv", path_column="file")
    (tmp_path / "empty.csv").write_text("path\n")
    with pytest.raises(InputError, match="no rows"):
        open_source(tmp_path / "empty.csv")


def test_parts_and_ranks_tile_the_units_once(tmp_path, monkeypatch):
    units = list(range(23))
    seen = sorted(u for part in range(3) for rank in range(2) for u in my_units(units, (part, 3), rank, 2))
    assert seen == units
    assert parse_part("2/5") == (2, 5)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "10")
    assert parse_part("slurm") == (3, 10)
    for bad in ("5/5", "1", "a/b"):
        with pytest.raises(UsageError):
            parse_part(bad)
