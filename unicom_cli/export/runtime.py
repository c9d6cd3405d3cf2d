"""ONNX Runtime: sessions over exported graphs, and the forward step of ``embed --runtime onnx``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unicom_cli.errors import InputError, UsageError
from unicom_cli.export.metadata import read_onnx_metadata, sidecar_path

if TYPE_CHECKING:
    import torch

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION = ("none", "basic", "extended", "all")


def import_onnxruntime():
    """The onnxruntime module, or a usage error saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("ONNX Runtime is not installed: pip install 'unicom-cli[onnx]' "
                         "(or pip install onnxruntime)") from None
    return onnxruntime


def resolve_provider(device: str) -> str:
    """``auto``/``cpu``/``cuda`` → the execution provider; CUDA needs onnxruntime-gpu."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    kind = device.split(":")[0]
    if kind == "auto":
        kind = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if kind not in PROVIDERS:
        raise UsageError(f"--device {device}: ONNX Runtime runs on cpu or cuda")
    if PROVIDERS[kind] not in available:
        raise UsageError(f"--device {device}: this ONNX Runtime has no {PROVIDERS[kind]} "
                         "(pip install onnxruntime-gpu); use --device cpu")
    return PROVIDERS[kind]


def create_session(path: Path, *, device: str = "cpu", optimization: str = "all",
                   threads: int | None = None):
    """An InferenceSession; a file ONNX Runtime cannot load is bad input, named in one line."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: warnings would interleave with progress bars
    try:
        return ort.InferenceSession(str(path), options, providers=[resolve_provider(device)])
    except UsageError:
        raise
    except Exception as exc:  # onnxruntime's pybind errors (Fail, InvalidGraph, …)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: ONNX Runtime cannot load it ({first})") from exc


class OnnxModel:
    """An exported graph and its sidecar JSON, run by ONNX Runtime.

    Called like ``embed``'s PyTorch forward step: a uint8 NCHW batch (resized and cropped)
    in, fp32 embeddings out. A float32-input graph gets the pixels normalised here with the
    mean/std its JSON records.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None) -> None:
        import torch

        from unicom_cli.models.weights import sha256_file

        self.path = Path(path)
        self.weights_path = self.path  # what embed records as the weights it used
        self.spec, self.meta = read_onnx_metadata(self.path)
        self.sha256 = sha256_file(self.path)
        if self.meta["sha256"] != self.sha256:
            raise InputError(f"{self.path}: its SHA-256 differs from the one in "
                             f"{sidecar_path(self.path).name}: the two files come from "
                             "different exports; export the model again")
        self._check_external_data(sha256_file)
        graph = self.meta["onnx"]
        self.uint8_input = graph["input_dtype"] == "uint8"
        self.normalized = bool(graph["normalized"])
        self.num_feat = graph.get("num_feat")
        self.output_dim = int(graph["output_dim"])
        self.precision = str(self.meta.get("precision", "fp32"))
        self.provider = resolve_provider(device)
        # As many threads as PyTorch would use (OMP_NUM_THREADS, torch.set_num_threads).
        self.session = create_session(self.path, device=device,
                                      threads=threads or torch.get_num_threads())
        self.input_name = self.session.get_inputs()[0].name
        self._check_graph()
        self.device = torch.device("cuda" if self.provider == PROVIDERS["cuda"] else "cpu")
        self.mean = np.asarray(self.spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(self.spec.std, dtype=np.float32).reshape(1, 3, 1, 1)

    def _check_external_data(self, sha256_file) -> None:
        """``<file>.onnx.data`` (the weights of graphs past 2 GiB) against its recorded digest."""
        data, recorded = self.path.with_name(self.path.name + ".data"), self.meta.get("data_sha256")
        if not data.exists() and recorded is None:
            return
        side = sidecar_path(self.path).name
        if recorded is None:
            raise InputError(f"{data}: {side} records no SHA-256 of it, so damage cannot be told "
                             "apart; export the model again")
        if not data.is_file():
            raise InputError(f"{data}: missing; {side} says the graph's weights are there; copy it "
                             "beside the .onnx or export the model again")
        if sha256_file(data) != recorded:
            raise InputError(f"{data}: its SHA-256 differs from the one in {side} (damaged, or from "
                             "another export); export the model again")

    def _check_graph(self) -> None:
        """The sidecar against the graph's own interface: input type and size, output width."""
        side = sidecar_path(self.path)
        given, made = self.session.get_inputs()[0], self.session.get_outputs()[0]
        dtype = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}.get(given.type, given.type)
        if dtype != self.meta["onnx"]["input_dtype"]:
            raise InputError(f"{side}: records {self.meta['onnx']['input_dtype']} input, but {self.path.name} "
                             f"takes {dtype}: the two files come from different exports; export the model again")
        size = self.spec.input_size
        if len(given.shape) != 4 or any(isinstance(d, int) and d != want
                                        for d, want in zip(given.shape[1:], (3, size, size))):
            shape = " x ".join(str(d) for d in given.shape[2:])
            raise InputError(f"{side}: records input_size {size}, but {self.path.name} takes {shape} "
                             "pixels: the two files come from different exports; export the model again")
        width = made.shape[-1] if len(made.shape) == 2 else None
        if len(made.shape) != 2 or (isinstance(width, int) and width != self.output_dim):
            raise InputError(f"{side}: records output_dim {self.output_dim}, but {self.path.name} gives "
                             f"{made.shape[-1]} dimensions: the two files come from different exports; "
                             "export the model again")

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, 3, S, S) → float32 (B, output_dim)."""
        x = pixels
        if not self.uint8_input:
            x = (pixels.astype(np.float32) / np.float32(255) - self.mean) / self.std
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)

    def __call__(self, pixels: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.run(pixels.cpu().numpy()))
