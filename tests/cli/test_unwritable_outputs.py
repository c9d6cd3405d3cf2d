"""Issue 28 item 15: outputs that cannot be written (a read-only file system, /proc) end in the
atomic-write helper's one line naming the folder, exit 1, nothing written, no temp left."""

from __future__ import annotations

import pytest

from tests.cli.hostile_index_cases import built_index
from tests.cli.test_hostile_inputs import _linear, world  # noqa: F401 (world is a fixture)
from tests.conftest import one_error_line
from tests.readonly import readonly_folder  # noqa: F401 (a fixture)
from unicom_cli.cli.app import main


def _refused(argv, target, capsys) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    line = one_error_line(err)
    assert str(target.parent) in line and not target.exists()
    assert not [p for p in target.parent.iterdir() if ".tmp" in p.name]
    return line


def test_save_classifier_on_a_read_only_file_system(world, readonly_folder, tmp_path, capsys):  # noqa: F811
    target = readonly_folder / "head.safetensors"
    argv, _ = _linear(world, tmp_path, "--save-classifier", str(target))
    line = _refused(argv, target, capsys)
    assert "read-only" in line or "permission denied" in line  # a ro mount, or a folder without w


@pytest.mark.parametrize("name", ["r.csv", "r.jsonl", "r.parquet"])
def test_search_output_on_a_read_only_file_system(name, world, readonly_folder, tmp_path, capsys):  # noqa: F811
    import numpy as np

    np.save(tmp_path / "q.npy", world.feats[:2])
    target = readonly_folder / name
    _refused(["search", built_index(world), tmp_path / "q.npy", "-k", "2", "-o", target], target, capsys)
