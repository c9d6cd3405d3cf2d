"""Weights on disk: cache directory, SHA-256 and its record (<file>.sha256), safe loading, key clean-up.

Download, resume and verification live in ``models.download``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from unicom_cli.errors import InputError, UnsafeCheckpoint, WeightsError

if TYPE_CHECKING:
    import torch

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_PREFIXES = ("module.", "_orig_mod.")
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")


def cache_dir(override: str | Path | None = None) -> Path:
    """``override`` if given, else ``$UNICOM_HOME``, else ``~/.cache/unicom``."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("UNICOM_HOME"):
        return Path(os.environ["UNICOM_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unicom"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Streaming SHA-256 of a file (never reads the whole file into memory).

    Remembered per (path, size, mtime) within the process, so that verifying a download and
    recording the digest of the loaded weights hash a multi-GB file once.
    """
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def sidecar(path: Path) -> Path:
    """The ``<file>.sha256`` next to a cached file."""
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: Path) -> str | None:
    """The digest recorded next to ``path``, or None."""
    try:
        first = sidecar(path).read_text().split()
    except OSError:
        return None
    return first[0].lower() if first and SHA256_HEX.match(first[0].lower()) else None


def sidecar_is_fresh(path: Path) -> bool:
    """True when the recorded digest was written after the file last changed."""
    try:
        return sidecar(path).stat().st_mtime_ns >= path.stat().st_mtime_ns
    except OSError:
        return False


def write_sidecar(path: Path, digest: str) -> None:
    """Record ``digest`` next to ``path`` (atomically), in ``sha256sum`` format.

    Best effort: a read-only cache simply keeps no record.
    """
    if read_sidecar(path) == digest and sidecar_is_fresh(path):
        return  # already recorded: leave read-mostly caches untouched
    tmp = sidecar(path).with_suffix(".sha256.tmp")
    try:
        tmp.write_text(f"{digest}  {path.name}\n")
        os.replace(tmp, sidecar(path))
    except OSError:
        tmp.unlink(missing_ok=True)


def clean_state_dict_keys(state: dict) -> dict:
    """Strip any ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes, in any order."""
    cleaned = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        cleaned[key] = value
    return cleaned


_KNOWN_FORMATS = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                  (b"RIFF", "a RIFF (WebP/WAV) file"), (b"%PDF", "a PDF document"),
                  (b"\x93NUMPY", "a NumPy .npy array"), (b"\x1f\x8b", "a gzip archive"))


def _check_checkpoint_bytes(path: Path) -> None:
    """Refuse a file that is neither a zip (torch.save) nor a legacy pickle before unpickling it,
    so that an image passed as --weights is called what it is."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return
    kind = next((name for magic, name in _KNOWN_FORMATS if head.startswith(magic)), None)
    what = f"it is {kind}" if kind else ("it is empty" if not head else "unknown format")
    raise WeightsError(f"{path}: not a model checkpoint ({what}); --weights takes a state dict "
                       f"saved by torch.save (.pt/.pth) or a .safetensors file")


def load_state_dict(path: str | Path) -> dict[str, "torch.Tensor"]:
    """Load a state dict from ``.pt``/``.pth`` (weights only, never code) or ``.safetensors``.

    Accepts a bare state dict or one nested under ``model``/``state_dict`` (our finetune
    checkpoints); returns tensors with cleaned keys in their stored dtype.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found; check the path or run `unicom download`")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several unrelated types
            raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from exc
    else:
        _check_checkpoint_bytes(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpoint(
                f"{path}: refused to load: the file contains pickled objects other than tensors "
                f"(it could run code). Only plain state dicts are accepted; re-save it with "
                f"torch.save(model.state_dict()) or as .safetensors") from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise WeightsError(f"{path}: cannot read checkpoint ({exc}); the file may be "
                               f"truncated: delete it and download again") from exc
    if isinstance(state, dict):
        for key in _CONTAINER_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return clean_state_dict_keys(state)
