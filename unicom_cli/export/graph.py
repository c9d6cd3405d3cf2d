"""The exported ONNX graph: pixels in, embedding out, with the preprocessing baked in.

Exporter: ``torch.onnx.export(dynamo=True)``, the torch.export-based exporter that PyTorch has
made the default since 2.9 and keeps developing; the TorchScript exporter (``dynamo=False``)
still runs on torch 2.14 but warns that it will be removed, so a deployment path built on it
would break on an upgrade. The dynamo exporter needs ``onnxscript`` (pure Python, in the
``onnx`` extra) and writes opsets 18 and later natively; older opsets go through ONNX's version
converter, which fails on LayerNormalization (new in 18), so they are refused up front.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from unicom_cli.errors import ExportFailed, UsageError

if TYPE_CHECKING:
    import torch

    from unicom_cli.models.registry import ModelSpec
    from unicom_cli.models.vit import UnicomViT

# torch 2.14's exporter defaults to opset 20 and implements up to 23 (torch.onnx._constants);
# 20 also runs on every ONNX Runtime since 1.17. Kept here: the constants module is private.
OPSET_DEFAULT = 20
OPSET_MIN, OPSET_MAX = 18, 23
INPUT_DTYPES = ("uint8", "float32")
PRECISIONS = ("fp32", "fp16", "int8")  # int8: ONNX only, dynamic quantisation of the weights
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
# A protobuf file holds at most 2 GiB; bigger graphs (ViT-L/14 in fp32) keep their weights in
# <file>.data beside the .onnx, which ONNX Runtime finds by name.
INLINE_LIMIT_BYTES = 1_800_000_000


def check_options(opset: int, precision: str, input_dtype: str) -> None:
    """Reject what the exporter cannot write, before any work."""
    if not OPSET_MIN <= opset <= OPSET_MAX:
        raise UsageError(f"--opset {opset}: the exporter writes opsets {OPSET_MIN} to {OPSET_MAX} "
                         f"(LayerNormalization needs 18); use --opset {OPSET_DEFAULT}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if input_dtype not in INPUT_DTYPES:
        raise UsageError(f"--input {input_dtype}: choose one of {', '.join(INPUT_DTYPES)}")


def _embedder_class():
    """Defined on first use: this module is imported without torch (CLI help, option checks)."""
    import torch
    from torch import nn

    class Embedder(nn.Module):
        """A UNICOM network behind its input conversion and output post-processing.

        uint8 input: NCHW RGB pixels after resize and crop; the graph scales by 1/255 and applies
        mean/std in the order of torchvision's ToTensor + Normalize (and of ``embed``'s loop).
        float32 input: pixels already normalised that way. The output is always float32.
        """

        def __init__(self, model: "UnicomViT", spec: "ModelSpec", *, uint8_input: bool,
                     normalize: bool, num_feat: int | None, half: bool) -> None:
            super().__init__()
            self.model = model
            self.uint8_input, self.normalize, self.num_feat, self.half = uint8_input, normalize, num_feat, half
            self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images
            if self.uint8_input:
                x = x.to(torch.float32).div(255).sub(self.mean).div(self.std)
            if self.half:
                x = x.half()
            out = self.model(x).float()
            if self.normalize:  # zero rows stay zero, as in embed's post-processing
                out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if self.num_feat is not None:
                out = out[:, :self.num_feat]
            return out

    return Embedder


def build_embedder(model: "UnicomViT", spec: "ModelSpec", *, input_dtype: str = "uint8",
                   normalize: bool = False, num_feat: int | None = None,
                   precision: str = "fp32") -> "torch.nn.Module":
    """Wrap an fp32 model for export (in eval mode, on the CPU; ``model`` itself is not changed).

    int8 wraps the fp32 model (``quantize_int8`` quantises the exported graph). fp16 runs the
    patch embedding and the blocks in half precision and keeps the final
    LayerNorm and the feature head in fp32, as the reference inference does under autocast.
    """
    import copy

    model = copy.deepcopy(model).float().cpu().eval()
    model.autocast_dtype = None  # autocast is a PyTorch runtime feature: the graph fixes dtypes
    if precision == "fp16":
        model.half()
        model.norm.float()
        model.feature.float()
    return _embedder_class()(model, spec, uint8_input=input_dtype == "uint8", normalize=normalize,
                             num_feat=num_feat, half=precision == "fp16").eval()


def example_input(spec: "ModelSpec", input_dtype: str, batch: int = 2) -> "torch.Tensor":
    """A traced batch of 2: a batch of 1 would let the exporter specialise the batch axis."""
    import torch

    gen = torch.Generator().manual_seed(0)
    shape = (batch, 3, spec.input_size, spec.input_size)
    if input_dtype == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    return torch.randn(shape, generator=gen)


def write_onnx(embedder: "torch.nn.Module", spec: "ModelSpec", path: Path, *, opset: int,
               input_dtype: str) -> None:
    """Export ``embedder`` to ``path`` with a dynamic batch axis; verifies the opset written."""
    import onnx
    import torch

    params = sum(p.numel() * p.element_size() for p in embedder.parameters())
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    noise = io.StringIO()
    # The exporter reports its progress with print() and logging; the CLI prints its own lines.
    with warnings.catch_warnings(), contextlib.redirect_stdout(noise), _quiet_logging():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                embedder, (example_input(spec, input_dtype),), str(path), dynamo=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), opset_version=opset,
                external_data=params > INLINE_LIMIT_BYTES, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; name the step, keep one line
            raise ExportFailed(f"ONNX export of {spec.name} failed: {type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    written = {o.version for o in onnx.load(str(path), load_external_data=False).opset_import
               if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise ExportFailed(f"the exporter wrote opset {sorted(written)} instead of {opset}; "
                           f"use --opset {OPSET_DEFAULT}")


@contextlib.contextmanager
def _quiet_logging():
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_int8(source: Path, path: Path) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights of MatMul/Gemm, activations quantised per
    batch at run time. On ViT-B/32 ~1.5x ONNX Runtime fp32 on a CPU with Recall@1 unchanged
    (benchmarks/onnx_runtime.py); the export's self-check bounds what it costs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8)
    except Exception as exc:  # the quantiser raises many types; keep one line
        raise ExportFailed(f"int8 quantisation of {source.name} failed: {type(exc).__name__}: {exc}") from exc
