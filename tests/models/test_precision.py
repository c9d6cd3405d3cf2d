"""Inference precision: chosen from the CPU's capabilities (one seam), recorded, never mixed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unicom_cli.errors import UsageError
from unicom_cli.models.factory import resolve_inference_precision
from unicom_cli.utils import cpu

# Flag lines as /proc/cpuinfo shows them (abridged) on three kinds of machine.
ZEN3 = frozenset("fpu sse2 avx avx2 fma bmi2".split())  # no bf16
SAPPHIRE_RAPIDS = frozenset("avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8".split())
GRAVITON3 = frozenset("fp asimd sve bf16 i8mm".split())  # Arm "Features"


@pytest.fixture
def cpu_is(monkeypatch):
    def play(flags: frozenset[str]) -> None:
        monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    return play


def test_native_bf16_from_flags():
    assert not cpu.native_bf16(ZEN3)
    assert not cpu.native_bf16(frozenset({"avx512f", "avx512bw"}))  # AVX-512 alone emulates bf16
    assert cpu.native_bf16(SAPPHIRE_RAPIDS)
    assert cpu.native_bf16(frozenset({"avx512_bf16"}))  # Zen 4
    assert cpu.native_bf16(GRAVITON3)


def test_this_machine_has_flags():
    flags = cpu.cpu_flags()
    assert isinstance(flags, frozenset) and len(flags) > 0
    assert cpu.native_bf16() == bool(flags & cpu.NATIVE_BF16_FLAGS)


@pytest.mark.parametrize("flags,expected", [(ZEN3, "fp32"), (SAPPHIRE_RAPIDS, "bf16"),
                                            (GRAVITON3, "bf16")])
def test_auto_on_cpu_follows_the_capability(cpu_is, flags, expected):
    cpu_is(flags)
    assert resolve_inference_precision("cpu", "auto") == expected
    assert resolve_inference_precision("cpu", None) == expected
    # An explicit choice is kept, whatever the CPU; CUDA's default stays fp16 (the reference's).
    assert resolve_inference_precision("cpu", "fp32") == "fp32"
    assert resolve_inference_precision("cpu", "bf16") == "bf16"
    assert resolve_inference_precision("cuda:0", "auto") == "fp16"


def test_bad_precisions_are_usage_errors():
    with pytest.raises(UsageError, match="fp16 is not supported on CPU"):
        resolve_inference_precision("cpu", "fp16")
    with pytest.raises(UsageError, match="choose one of auto, fp32, fp16, bf16"):
        resolve_inference_precision("cpu", "fp8")


def _photo_folder(root):
    from PIL import Image
    from skimage import data

    root.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"):
        Image.fromarray(getattr(data, name)()).reduce(4).save(root / f"{name}.jpg", quality=92)
    return root


def _embed(main, folder, out, spec, ckpt, *extra):
    return main(["embed", str(folder), "-o", str(out), "--model", str(spec), "--weights",
                 str(ckpt), "--workers", "0", "--batch-size", "2", *extra])


def test_bf16_embeddings_are_close_to_fp32_and_recorded(tmp_path, tiny_spec_file, tiny_checkpoint,
                                                        cpu_is, capsys):
    """On real photos bf16 autocast keeps every row within cosine 0.999 of fp32 (a tiny random
    model; ViT-B/32 and L/14 figures are in benchmarks/embed_throughput.py)."""
    import torch

    from unicom_cli.cli.app import main

    torch.set_num_threads(1)
    folder = _photo_folder(tmp_path / "photos")
    cpu_is(SAPPHIRE_RAPIDS)  # auto → bf16 (torch emulates bf16 where the CPU lacks it)
    assert _embed(main, folder, tmp_path / "auto.npy", tiny_spec_file, tiny_checkpoint) == 0
    assert "tiny on cpu, bf16" in capsys.readouterr().err
    assert _embed(main, folder, tmp_path / "fp32.npy", tiny_spec_file, tiny_checkpoint,
                  "--precision", "fp32") == 0
    a, b = np.load(tmp_path / "auto.npy"), np.load(tmp_path / "fp32.npy")
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert a.shape == (6, 16) and 0.999 < cosine.min() and not np.array_equal(a, b)
    assert json.loads((tmp_path / "auto.json").read_text())["precision"] == "bf16"
    assert json.loads((tmp_path / "fp32.json").read_text())["precision"] == "fp32"
    cpu_is(ZEN3)  # the same command on a CPU without bf16: fp32, bit-identical to --precision fp32
    assert _embed(main, folder, tmp_path / "zen.npy", tiny_spec_file, tiny_checkpoint) == 0
    assert np.array_equal(np.load(tmp_path / "zen.npy"), b)
    assert json.loads((tmp_path / "zen.json").read_text())["precision"] == "fp32"


def test_resume_with_another_precision_is_refused(tmp_path, tiny_spec_file, tiny_checkpoint,
                                                  cpu_is, capsys):
    import torch

    from unicom_cli.cli.app import main
    from unicom_cli.pipelines.writer import OutputFiles

    torch.set_num_threads(1)
    folder = _photo_folder(tmp_path / "photos")
    out = tmp_path / "f.npy"
    cpu_is(SAPPHIRE_RAPIDS)
    assert _embed(main, folder, tmp_path / "done.npy", tiny_spec_file, tiny_checkpoint) == 0
    # An unfinished bf16 run: the finished run's fingerprint, its work folder left in place.
    files = OutputFiles.for_output(out)
    files.workdir.mkdir()
    recorded = json.loads((tmp_path / "done.json").read_text())
    assert recorded["precision"] == "bf16"
    capsys.readouterr()
    (files.workdir / "run.json").write_text(json.dumps({"precision": "bf16"}))
    code = _embed(main, folder, out, tiny_spec_file, tiny_checkpoint, "--precision", "fp32")
    err = capsys.readouterr().err
    assert code == 2
    assert "bf16" in err and "fp32" in err and "--precision bf16" in err
    cpu_is(ZEN3)  # auto on a CPU without bf16 resolves to fp32: refused the same way
    assert _embed(main, folder, out, tiny_spec_file, tiny_checkpoint) == 2
    assert "--precision bf16 to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_retrieval_records_and_prints_the_precision(tmp_path, tiny_spec_file, tiny_checkpoint,
                                                         cpu_is, capsys):
    import torch

    from unicom_cli.cli.app import main
    from unicom_cli.data.digits import write_digits_tree

    torch.set_num_threads(1)
    tree = write_digits_tree(tmp_path / "d", size=32, limit_per_class=4)
    for flags, expected in ((SAPPHIRE_RAPIDS, "bf16"), (ZEN3, "fp32")):
        cpu_is(flags)
        out = tmp_path / f"{expected}.json"
        assert main(["eval-retrieval", "--dataset", f"folder:{tree.test}", "--model",
                     str(tiny_spec_file), "--weights", str(tiny_checkpoint), "--device", "cpu",
                     "--workers", "0", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["precision"] == expected
        assert f"tiny on cpu, {expected}" in capsys.readouterr().err
