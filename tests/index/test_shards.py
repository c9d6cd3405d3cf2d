"""`unicom index feats/` over a folder of feature shards (issue 25): the index of the concatenated
rows, built shard by shard; --add takes only the new shards; a folder of another model is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import one_error_line
from tests.index.conftest import clustered, exact_topk, one_thread, write_features  # noqa: F401
from unicom_cli.cli.app import main
from unicom_cli.pipelines.shard_store import ShardFolder


def shard_folder(folder: Path, parts: list[np.ndarray], names: list[str] | None = None, **fields) -> Path:
    """Shards as `embed -o feats/` leaves them: npy + ids + done-record each, then the manifest."""
    names = names or [f"{n:05d}" for n in range(len(parts))]
    for name, x in zip(names, parts):
        npy = write_features(folder, name, x, **fields)
        record = json.loads(npy.with_suffix(".json").read_text())
        ids = [f"{name}/{i:06d}" for i in range(len(x))]  # <shard>/<key>, as tar samples get
        Path(f"{folder / name}.ids.txt").write_text("".join(i + "\n" for i in ids))
        record.update(input=None, failures=0, shard=name)
        npy.with_suffix(".json").write_text(json.dumps(record))
    ShardFolder(folder).write_manifest(names, {"kind": "tar", "input": "test", "units": len(names)})
    return folder


def concatenated(folder: Path, parts: list[np.ndarray], names: list[str]) -> Path:
    """The same rows as one embed-style .npy with the same ids."""
    npy = write_features(folder, "all", np.concatenate(parts))
    ids = [f"{name}/{i:06d}" for name, x in zip(names, parts) for i in range(len(x))]
    (folder / "all.ids.txt").write_text("".join(i + "\n" for i in ids))
    meta = json.loads((folder / "all.json").read_text())
    (folder / "all.json").write_text(json.dumps({**meta, "input": None}))
    return npy


@pytest.fixture
def parts():
    x = clustered(4000, 16, seed=5)
    return [x[:1500], x[1500:1600], x[1600:3100], x[3100:]]


def test_index_over_shards_equals_index_over_the_concatenated_npy(parts, tmp_path):
    from unicom_cli.index import Index

    names = [f"{n:05d}" for n in range(len(parts))]
    feats = shard_folder(tmp_path / "feats", parts)
    npy = concatenated(tmp_path / "one", parts, names)
    common = ["--index", "IVF32,Flat", "--chunk-rows", "512"]
    assert main(["index", str(feats), "-o", str(tmp_path / "shards.index"), *common]) == 0
    assert main(["index", str(npy), "-o", str(tmp_path / "npy.index"), *common]) == 0
    a, b = Index.load(tmp_path / "shards.index"), Index.load(tmp_path / "npy.index")
    assert a.ids == b.ids and a.ids[1500] == "00001/000000"
    queries = np.concatenate(parts)[::9]
    for params in ({"nprobe": 1}, {"nprobe": 8}):
        sa, ra = a.search(queries, 10, params=params)
        sb, rb = b.search(queries, 10, params=params)
        assert np.array_equal(ra, rb) and np.array_equal(sa, sb)
    assert [s["count"] for s in a.meta["sources"]] == [len(x) for x in parts]


def test_add_takes_only_the_new_shards(parts, tmp_path, capsys):
    """Two shards indexed, two more finished later: --add feats/ adds those two only, and the
    result searches like an index over all four; nothing new is one line, exit 2."""
    from unicom_cli.index import Index

    names = [f"{n:05d}" for n in range(len(parts))]
    feats = tmp_path / "feats"
    shard_folder(feats, parts[:2], names[:2])
    assert main(["index", str(feats), "-o", str(tmp_path / "grow.index"), "--index", "flat"]) == 0
    shard_folder(feats, parts, names)  # the other two shards finished: the manifest lists four
    assert main(["index", "--add", str(feats), str(tmp_path / "grow.index")]) == 0
    grown = Index.load(tmp_path / "grow.index")
    x = np.concatenate(parts)
    assert len(grown) == len(x) and grown.ids[1600] == "00002/000000"
    scores, rows = grown.search(x[::50], 5)
    truth, _ = exact_topk(x[::50], x, 5)
    assert (rows[:, 0] == truth[:, 0]).all()
    capsys.readouterr()
    assert main(["index", "--add", str(feats), str(tmp_path / "grow.index")]) == 2
    assert "every shard is already in the index; nothing to add" in one_error_line(capsys.readouterr().err)


def test_add_of_a_folder_by_another_model_is_refused(parts, tmp_path, capsys):
    feats = shard_folder(tmp_path / "feats", parts[:1])
    assert main(["index", str(feats), "-o", str(tmp_path / "a.index"), "--index", "flat"]) == 0
    other = shard_folder(tmp_path / "other", [clustered(300, 8, seed=1)], model="other-model")
    before = (tmp_path / "a.index" / "index.json").read_bytes()
    capsys.readouterr()
    assert main(["index", "--add", str(other), str(tmp_path / "a.index")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "model 'other-model' differs from 'tiny'" in err
    assert "dimension 8 differs from 16" in err
    assert (tmp_path / "a.index" / "index.json").read_bytes() == before
