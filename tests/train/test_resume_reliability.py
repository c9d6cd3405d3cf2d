"""Issue 19, item 10: `finetune --resume` of bad checkpoints names the file and falls back to the
newest good one (auto); class-count and setting changes are refused with what changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.train.test_loop import _cfg as _loop_cfg
from tests.conftest import one_error_line
from unicom_cli.cli.app import main
from unicom_cli.errors import InputError, UsageError
from unicom_cli.train.loop import FinetuneConfig, finetune


def _cfg(spec_file, data, out, **kw) -> FinetuneConfig:
    """test_loop's configuration, checkpointing every 2 steps."""
    return _loop_cfg(spec_file, data, out, **{"save_every": 2, **kw})


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, digits_small):  # noqa: F811
    """A run 'killed' after step 5: checkpoints at steps 2 and 4."""
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("cut")
    spec = root / "tiny.json"
    spec.write_text(__import__("json").dumps(TINY))
    finetune(_cfg(spec, digits_small, root / "run", max_steps=5))
    return spec, root / "run"


@pytest.fixture
def run(cut_run, tmp_path):
    spec, src = cut_run
    shutil.copytree(src, tmp_path / "run")
    return spec, tmp_path / "run"


def _step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step-{n:08d}"


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_auto_falls_back_past_a_bad_newest_checkpoint(run, digits_small, capsys, damage):  # noqa: F811
    spec, out = run
    trainer = _step(out, 4) / "trainer.pt"
    data = trainer.read_bytes()
    trainer.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    summary = finetune(_cfg(spec, digits_small, out, resume="auto"))
    assert summary.resumed_from.endswith("step-00000002") and summary.steps == 14
    err = "".join(capsys.readouterr().err.split())  # Rich wraps long warnings anywhere
    assert f"{trainer}:unreadablecheckpoint" in err and "fallingbacktostep-00000002" in err


@pytest.mark.parametrize("damage", ["truncated", "missing_rank", "pickled"])
def test_a_named_bad_checkpoint_is_refused_naming_the_file(run, digits_small, capsys, damage):  # noqa: F811
    spec, out = run
    ckpt = _step(out, 4)
    bad = ckpt / ("rank-0.pt" if damage == "missing_rank" else "trainer.pt")
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:1000])
    elif damage == "missing_rank":
        bad.unlink()
    else:  # pickled code: a Path object, refused by weights_only loading
        torch.save({"model": Path("/etc/passwd")}, bad)
    code = main(["finetune", "--arch", str(spec), "--dataset", f"folder:{digits_small}",
                 "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--lr-pfc-weight", "10",
                 "--m2", "0.3", "--device", "cpu", "--workers", "0", "--seed", "7",
                 "--save-every", "2", "--eval-every", "0", "--output", str(out),
                 "--resume", str(ckpt)])
    err = one_error_line(capsys.readouterr().err)
    assert code == 2, err
    assert str(bad) in err
    assert {"truncated": "truncated", "missing_rank": "missing", "pickled": "pickled"}[damage] in err


def test_a_class_count_mismatch_is_refused(run, digits_small, tmp_path):  # noqa: F811
    from unicom_cli.data.digits import write_digits_tree

    spec, out = run
    fewer = write_digits_tree(tmp_path / "fewer", size=32, limit_per_class=12, classes=6).root \
        if "classes" in write_digits_tree.__code__.co_varnames else None
    if fewer is None:  # drop two class folders of a copy instead
        fewer = tmp_path / "fewer"
        shutil.copytree(digits_small, fewer)
        train = fewer / "train" if (fewer / "train").is_dir() else fewer
        for folder in sorted(p for p in train.iterdir() if p.is_dir())[:2]:
            shutil.rmtree(folder)
    with pytest.raises(UsageError, match="class centres are"):
        finetune(_cfg(spec, fewer, out, resume="auto", dataset=f"folder:{fewer}"))


def test_changed_settings_and_extending_a_finished_run_are_refused(run, digits_small):  # noqa: F811
    spec, out = run
    with pytest.raises(UsageError, match="--batch-size was 8, now 4"):
        finetune(_cfg(spec, digits_small, out, resume="auto", batch_size=4))
    finetune(_cfg(spec, digits_small, out, resume="auto"))  # finishes the 2 epochs
    with pytest.raises(UsageError, match=r"--epochs was 2, now 3.*cannot be extended"):
        finetune(_cfg(spec, digits_small, out, resume="auto", epochs=3))


def test_all_training_images_unreadable(tiny_spec_file, tmp_path):
    data = tmp_path / "bad"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(8):
            (data / c / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="none of the 16 training images can be decoded"):
        finetune(_cfg(tiny_spec_file, data, tmp_path / "o", dataset=f"folder:{data}", epochs=1,
                      batch_size=4))
