"""`export_model`: ONNX graphs and safetensors files against PyTorch computed independently here."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from unicom_cli.errors import CheckpointMismatch, OutputExists, UsageError
from unicom_cli.export.check import PHOTOS, sample_photos
from unicom_cli.export.runtime import OnnxModel
from unicom_cli.models.factory import create_model
from unicom_cli.pipelines.export import ExportConfig, export_model


def reference(spec_file: Path, ckpt: Path, pixels: np.ndarray) -> np.ndarray:
    """PyTorch fp32 embeddings of uint8 pixels, normalised in float64 from the definition."""
    loaded = create_model(spec_file, weights=ckpt, device="cpu", precision="fp32")
    mean = np.asarray(loaded.spec.mean).reshape(1, 3, 1, 1)
    std = np.asarray(loaded.spec.std).reshape(1, 3, 1, 1)
    x = ((pixels / 255.0 - mean) / std).astype(np.float32)
    with torch.no_grad():
        return loaded.model(torch.from_numpy(x)).numpy().astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def photos(tiny_files):
    return sample_photos(32)[1]


@pytest.fixture(scope="module")
def plain(tiny_files, tmp_path_factory) -> Path:
    spec_file, ckpt = tiny_files
    out = tmp_path_factory.mktemp("plain") / "tiny.onnx"
    summary = export_model(ExportConfig(str(spec_file), out, weights=ckpt))
    assert summary.outputs == [out, out.with_suffix(".json")] and summary.parity.ok
    assert summary.parity.cosine.min() >= 0.99999 and len(summary.parity.names) == 7
    return out


def test_onnx_matches_pytorch_at_batch_1_and_7(plain, tiny_files, photos):
    ref = reference(*tiny_files, photos)
    runtime = OnnxModel(plain, device="cpu")
    seven = runtime.run(photos)
    one = runtime.run(photos[3:4])
    assert photos.shape == (7, 3, 32, 32) and seven.shape == (7, 16) and one.shape == (1, 16)
    assert cosine(seven, ref).min() >= 0.99999 and cosine(one, ref[3:4]).min() >= 0.99999
    np.testing.assert_allclose(seven, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(one[0], seven[3], rtol=0, atol=1e-5)


def test_onnx_file_and_description(plain, tiny_files):
    import onnx

    spec_file, ckpt = tiny_files
    graph = onnx.load(str(plain))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [20]
    (inp,) = graph.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    meta = json.loads(plain.with_suffix(".json").read_text())
    assert meta["preprocessing"]["input_size"] == 32 and meta["embedding_size"] == 16
    assert meta["preprocessing"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert meta["preprocessing"]["std"] == [0.26862954, 0.26130258, 0.27577711]
    assert "bicubic" in meta["preprocessing"]["resize"] and "center-crop" in meta["preprocessing"]["resize"]
    assert meta["sha256"] == hashlib.sha256(plain.read_bytes()).hexdigest()
    assert meta["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["onnx"]["output_dim"] == 16 and meta["onnx"]["normalized"] is False
    assert not list(plain.parent.glob(".*partial*"))


@pytest.mark.slow
def test_normalize_and_num_feat_inside_the_graph(tiny_files, photos, tmp_path):
    spec_file, ckpt = tiny_files
    out = tmp_path / "n.onnx"
    export_model(ExportConfig(str(spec_file), out, weights=ckpt, normalize=True, num_feat=8))
    got = OnnxModel(out, device="cpu").run(photos)
    full = reference(spec_file, ckpt, photos)
    expected = (full / np.linalg.norm(full, axis=1, keepdims=True))[:, :8]  # SPEC §2: no renorm
    assert got.shape == (7, 8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.all(np.linalg.norm(got, axis=1) < 1.0)


@pytest.mark.slow
def test_float_input_and_fp16(tiny_files, photos, tmp_path):
    spec_file, ckpt = tiny_files
    ref = reference(spec_file, ckpt, photos)
    out = tmp_path / "f.onnx"
    export_model(ExportConfig(str(spec_file), out, weights=ckpt, input_dtype="float32"))
    runtime = OnnxModel(out, device="cpu")
    mean, std = np.asarray(runtime.spec.mean).reshape(1, 3, 1, 1), np.asarray(runtime.spec.std).reshape(1, 3, 1, 1)
    x = ((photos / 255.0 - mean) / std).astype(np.float32)
    got = runtime.session.run(None, {"images": x})[0]
    assert cosine(got, ref).min() >= 0.99999
    out16 = tmp_path / "h.onnx"
    summary = export_model(ExportConfig(str(spec_file), out16, weights=ckpt, precision="fp16"))
    import onnx

    dtypes = {t.data_type for t in onnx.load(str(out16)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    got16 = OnnxModel(out16, device="cpu").run(photos)
    assert got16.dtype == np.float32
    assert cosine(got16, ref).min() >= 0.999 and summary.parity.bound == 0.999
    assert out16.stat().st_size < out.stat().st_size


@pytest.mark.slow
def test_int8_dynamic_quantisation(tiny_files, photos, tmp_path):
    import onnx

    spec_file, ckpt = tiny_files
    out = tmp_path / "q.onnx"
    summary = export_model(ExportConfig(str(spec_file), out, weights=ckpt, precision="int8"))
    assert summary.parity.bound == 0.99 and summary.parity.ok
    assert onnx.TensorProto.INT8 in {t.data_type for t in onnx.load(str(out)).graph.initializer}
    got = OnnxModel(out, device="cpu").run(photos)
    assert cosine(got, reference(spec_file, ckpt, photos)).min() >= 0.99
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "q.onnx"]  # no fp32 leftover


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_safetensors_round_trip(tiny_files, photos, tmp_path, precision):
    from safetensors.torch import load_file

    spec_file, ckpt = tiny_files
    out = tmp_path / "tiny.safetensors"
    summary = export_model(ExportConfig(str(spec_file), out, weights=ckpt, precision=precision))
    arch = tmp_path / "tiny.arch.json"
    assert summary.outputs == [out, arch]
    header_len = struct.unpack("<Q", out.read_bytes()[:8])[0]  # safetensors: no pickle, a JSON header
    assert json.loads(out.read_bytes()[8:8 + header_len])["__metadata__"]["model"] == "tiny"
    source = torch.load(ckpt, weights_only=True)
    saved = load_file(str(out))
    assert saved.keys() == source.keys()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    for key, value in source.items():
        expected = value.to(dtype) if value.is_floating_point() else value
        assert saved[key].dtype == expected.dtype and torch.equal(saved[key], expected), key
    # Loadable wherever --weights is accepted: the architecture JSON plus the file, strict keys.
    reloaded = create_model(arch, weights=out, device="cpu", precision="fp32")
    x = torch.from_numpy(((photos / 255.0 - 0.45) / 0.27).astype(np.float32))
    with torch.no_grad():
        original = create_model(spec_file, weights=ckpt, device="cpu", precision="fp32")
        np.testing.assert_array_equal(reloaded.model(x).numpy(), original.model(x).numpy())


def test_checkpoint_given_as_model_uses_arch_json_beside_it(tiny_files, tmp_path):
    """A finetune run folder: model.pt + arch.json."""
    import shutil

    spec_file, ckpt = tiny_files
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "model.pt")
    shutil.copy(spec_file, run / "arch.json")
    summary = export_model(ExportConfig(str(run / "model.pt"), tmp_path / "m.safetensors"))
    assert summary.model == "tiny" and summary.parity.ok


def _no_outputs(folder: Path) -> bool:
    """Nothing named after the output m.*: no file, sidecar or hidden work folder."""
    return not list(folder.glob("m.*")) and not list(folder.glob(".m.*"))


@pytest.mark.parametrize("case", ["opset_low", "opset_high", "fp16_bf16", "bad_suffix",
                                  "num_feat_too_big", "normalize_safetensors", "int8_safetensors",
                                  "exists"])
def test_bad_arguments_fail_before_any_work(case, tiny_files, tmp_path, monkeypatch):
    import unicom_cli.models.factory as factory

    monkeypatch.setattr(factory, "create_model", lambda *a, **k: pytest.fail("model loaded"))
    spec_file, ckpt = tiny_files
    kw = {"opset_low": {"opset": 17}, "opset_high": {"opset": 24}, "fp16_bf16": {"precision": "bf16"},
          "num_feat_too_big": {"normalize": True, "num_feat": 17},
          "normalize_safetensors": {"normalize": True}, "int8_safetensors": {"precision": "int8"},
          "exists": {}}.get(case, {})
    out = tmp_path / ("m.bin" if case == "bad_suffix" else
                      "m.safetensors" if case.endswith("safetensors") else "m.onnx")
    if case == "exists":
        out.write_bytes(b"keep me")
    error = OutputExists if case == "exists" else UsageError
    with pytest.raises(error) as info:
        export_model(ExportConfig(str(spec_file), out, weights=ckpt, **kw))
    assert info.value.exit_code == 2
    message = str(info.value)
    assert {"opset_low": "--opset 17", "opset_high": "--opset 24", "fp16_bf16": "bf16",
            "bad_suffix": ".onnx", "num_feat_too_big": "only 16", "exists": "--overwrite",
            "normalize_safetensors": "ONNX graph", "int8_safetensors": "fp32 or fp16"}[case] in message
    if case == "exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert _no_outputs(tmp_path)


def test_mismatched_checkpoint_is_bad_input_and_writes_nothing(tiny_files, tmp_path):
    spec_file, ckpt = tiny_files
    other = tmp_path / "wide.json"
    other.write_text(json.dumps({**json.loads(spec_file.read_text()), "name": "wide", "width": 48}))
    with pytest.raises(CheckpointMismatch, match="FP16-tiny.pt: does not match architecture wide") as info:
        export_model(ExportConfig(str(other), tmp_path / "m.onnx", weights=ckpt))
    assert info.value.exit_code == 2
    assert _no_outputs(tmp_path)


def test_photos_are_the_seven_real_ones():
    names, pixels = sample_photos(48)
    assert names == list(PHOTOS) and pixels.shape == (7, 3, 48, 48) and pixels.dtype == np.uint8
    assert len({p.tobytes() for p in pixels}) == 7 and pixels.std() > 30  # distinct, not blank


@pytest.mark.slow
def test_vit_b32_architecture_with_random_weights(tmp_path):
    """The published ViT-B/32 architecture (random weights: no download), batch 1 and 7."""
    out = tmp_path / "b32.onnx"
    torch.manual_seed(0)
    summary = export_model(ExportConfig("ViT-B/32", out, pretrained=False))
    assert summary.output_dim == 512 and summary.parity.ok and summary.parity.cosine.min() >= 0.99999
    torch.manual_seed(0)  # the same initialisation as inside export_model
    loaded = create_model("ViT-B/32", pretrained=False, device="cpu", precision="fp32")
    photos = sample_photos(224)[1]
    mean = np.asarray(loaded.spec.mean).reshape(1, 3, 1, 1)
    std = np.asarray(loaded.spec.std).reshape(1, 3, 1, 1)
    with torch.no_grad():
        ref = loaded.model(torch.from_numpy(((photos / 255.0 - mean) / std).astype(np.float32))).numpy()
    runtime = OnnxModel(out, device="cpu")
    seven, one = runtime.run(photos), runtime.run(photos[:1])
    assert seven.shape == (7, 512) and one.shape == (1, 512)
    assert cosine(seven, ref).min() >= 0.99999 and cosine(one, ref[:1]).min() >= 0.99999
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["name"] == "ViT-B/32" and meta["input_size"] == 224 and meta["weights_sha256"] is None
