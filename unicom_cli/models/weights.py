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


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Streaming SHA-256 of every byte of a file (never the whole file in memory).

    Reuse comes from the ``<file>.sha256`` record (:func:`file_digest`), not from this function.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    """The ``<file>.sha256`` next to a cached file."""
    return path.with_name(path.name + ".sha256")


_STAT_LINE = re.compile(r"^# size=(\d+) mtime_ns=(\d+)$", re.MULTILINE)


def read_sidecar(path: Path) -> str | None:
    """The digest recorded next to ``path``, or None."""
    try:
        lines = [line for line in sidecar(path).read_text().splitlines() if not line.startswith("#")]
    except OSError:
        return None
    first = lines[0].split() if lines else []
    return first[0].lower() if first and SHA256_HEX.match(first[0].lower()) else None


def sidecar_is_fresh(path: Path) -> bool:
    """True when the record describes the file as it is now, so its digest can be trusted.

    The sidecar notes the file's size and modification time when it was hashed; both must be
    unchanged, and the file must have last changed strictly before the sidecar was written: a
    write in the same clock tick as the hashed one would keep the time (git's "racy clean" case),
    so such a record is re-checked by hashing until it is rewritten.
    """
    try:
        text = sidecar(path).read_text()
        written = sidecar(path).stat().st_mtime_ns
        now = path.stat()
    except OSError:
        return False
    match = _STAT_LINE.search(text)
    return (match is not None and (int(match[1]), int(match[2])) == (now.st_size, now.st_mtime_ns)
            and now.st_mtime_ns < written)


def trusted_digest(path: Path) -> str | None:
    """The recorded digest of ``path`` if the record is fresh (no bytes read), else None.

    Loading trusts it instead of re-hashing gigabytes in every process; ``unicom download
    --verify`` always hashes the whole file.
    """
    return read_sidecar(path) if sidecar_is_fresh(path) else None


def file_digest(path: Path) -> str:
    """SHA-256 of ``path``: the fresh record next to it when there is one, else a full hash."""
    return trusted_digest(path) or sha256_file(path)


def write_sidecar(path: Path, digest: str) -> None:
    """Record ``digest`` and the file's size and mtime next to ``path`` (atomically).

    The first line is ``sha256sum`` format (``sha256sum -c`` skips the ``#`` line). Best
    effort: a read-only cache simply keeps no record.
    """
    if trusted_digest(path) == digest:
        return  # already recorded: leave read-mostly caches untouched
    from unicom_cli.errors import DiskError
    from unicom_cli.utils.files import write_text_atomic

    try:
        stat = path.stat()
        write_text_atomic(sidecar(path), f"{digest}  {path.name}\n"
                                         f"# size={stat.st_size} mtime_ns={stat.st_mtime_ns}\n")
    except (OSError, DiskError):
        pass


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
            if "weights only" not in str(exc).lower():  # random bytes, another format
                raise WeightsError(f"{path}: not a PyTorch checkpoint ({str(exc).splitlines()[0][:100]}); "
                                   "the file is corrupt or of another format") from exc
            raise UnsafeCheckpoint(
                f"{path}: refused to load: the file contains pickled objects other than tensors "
                f"(it could run code). Only plain state dicts are accepted; re-save it with "
                f"torch.save(model.state_dict()) or as .safetensors") from exc
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
            raise WeightsError(f"{path}: cannot read checkpoint ({exc or type(exc).__name__}); the file may be "
                               f"truncated: delete it and download again") from exc
    if isinstance(state, dict):
        for key in _CONTAINER_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return clean_state_dict_keys(state)
