"""Precomputed features: ids relative to any embedded folder are matched to the data set's paths."""

import numpy as np
import pytest

from unicom_cli.errors import InputError
from unicom_cli.pipelines.features import load_embeddings, save_features


@pytest.mark.parametrize("prefix", ["", "images/", "CUB_200_2011/images/", "data/CUB_200_2011/images/"])
def test_ids_relative_to_any_folder(tmp_path, prefix):
    root = tmp_path / "data" / "CUB_200_2011"
    paths = ["images/001.A/a.jpg", "images/001.A/b.jpg", "images/002.B/c.jpg"]
    ids = [prefix + p.split("/", 1)[1] for p in reversed(paths)]  # file order differs
    feats = np.arange(12, dtype=np.float16).reshape(3, 4)
    np.save(tmp_path / "f.npy", feats)
    (tmp_path / "f.ids.txt").write_text("\n".join(ids) + "\n")
    got = load_embeddings(tmp_path / "f.npy", root, paths)
    assert got.ok.all() and got.features.dtype == np.float32
    np.testing.assert_array_equal(got.features, feats[::-1].astype(np.float32))
    part = load_embeddings(tmp_path / "f.npy", root, paths, positions=np.array([2]))
    np.testing.assert_array_equal(part.features, feats[:1].astype(np.float32))


def test_missing_ids_are_reported_and_bad_files_named(tmp_path):
    save_features(tmp_path, "f", ["x/a.jpg"], np.ones((1, 3)))
    got = load_embeddings(tmp_path / "f.npy", tmp_path, ["x/a.jpg", "x/b.jpg"])
    assert list(got.ok) == [True, False] and got.failures == [("x/b.jpg", "not in f.ids.txt")]
    with pytest.raises(InputError, match="none of the 1 images"):
        load_embeddings(tmp_path / "f.npy", tmp_path, ["y/z.jpg"])
    (tmp_path / "f.ids.txt").write_text("x/a.jpg\nx/b.jpg\n")
    with pytest.raises(InputError, match="1 rows but f.ids.txt lists 2"):
        load_embeddings(tmp_path / "f.npy", tmp_path, ["x/a.jpg"])
    with pytest.raises(InputError, match="g.npy: not found"):
        load_embeddings(tmp_path / "g.npy", tmp_path, ["x/a.jpg"])
