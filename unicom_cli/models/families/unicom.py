"""The UNICOM family: today's ViT + feature head (models/vit.py), its published weights and grid resampling."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from unicom_cli.errors import CheckpointMismatch, InputError, UsageError, WeightsError
from unicom_cli.models.families.base import Built
from unicom_cli.models.registry import ModelSpec, available_models, get_spec

if TYPE_CHECKING:
    import torch

    from unicom_cli.models.vit import UnicomViT


def resample_grid(state: dict, new_grid: int) -> dict:
    """Move ``pos_embed`` and ``feature.0.weight`` to a ``new_grid``×``new_grid`` patch grid.

    Linear interpolation over the two grid axes with corners aligned, which is what
    ``scipy.ndimage.zoom(order=1)`` (the reference) computes. Returns a new dict.
    """
    import torch
    import torch.nn.functional as F

    pos = state["pos_embed"]
    old_patches, width = pos.shape[1], pos.shape[2]
    old_grid = math.isqrt(old_patches)
    if old_grid * old_grid != old_patches:
        raise WeightsError(f"pos_embed has {old_patches} tokens, not a square grid")
    if old_grid == new_grid:
        return dict(state)

    def zoom(t: torch.Tensor) -> torch.Tensor:  # (C, g, g) -> (C, new, new), fp32 math
        out = F.interpolate(t.float()[None], size=(new_grid, new_grid), mode="bilinear",
                            align_corners=True)[0]
        return out.to(t.dtype)

    new_state = dict(state)
    grid_pos = pos[0].reshape(old_grid, old_grid, width).permute(2, 0, 1)
    new_state["pos_embed"] = zoom(grid_pos).permute(1, 2, 0).reshape(1, new_grid * new_grid, width)
    head = state.get("feature.0.weight")  # (width_out, patches * width_in)
    if head is None:  # not a UNICOM checkpoint: the strict load names what is missing
        return new_state
    if head.ndim != 2 or head.shape[1] != old_patches * width:
        raise WeightsError(f"feature.0.weight has shape {tuple(head.shape)}, expected "
                           f"(*, {old_patches * width}) for {old_grid}×{old_grid} patches of width {width}")
    rows = []  # a few output rows at a time: ViT-L/14 at 512 px has a 5 GB head in fp32
    for chunk in head.split(64):
        n = chunk.shape[0]
        grid_head = chunk.reshape(n, old_grid, old_grid, width).permute(0, 3, 1, 2)
        resized = zoom(grid_head.reshape(n * width, old_grid, old_grid))
        resized = resized.reshape(n, width, new_grid, new_grid).permute(0, 2, 3, 1)
        rows.append(resized.reshape(n, new_grid * new_grid * width))
    new_state["feature.0.weight"] = torch.cat(rows)
    return new_state


def describe_checkpoint(state: dict) -> str | None:
    """What architecture a UNICOM state dict's shapes describe, e.g. ``ViT-B/16`` or
    ``width 64, patch 8, 2 blocks, 32 px, 64-d embedding``; None when the keys are not UNICOM's."""
    try:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        embedding = state["feature.2.weight"].shape[0]
    except (KeyError, ValueError, AttributeError):
        return None
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    size = math.isqrt(tokens) * patch
    for name in available_models("unicom"):
        spec = get_spec(name)
        if (spec.width, spec.patch_size, spec.depth, spec.embedding_size) == (width, patch, depth, embedding):
            return name if spec.input_size == size else f"{name} at {size} px"
    return f"width {width}, patch {patch}, {depth} blocks, {size} px, {embedding}-d embedding"


def load_weights_into(model: "UnicomViT", state: dict, source: str) -> None:
    """Strict load, resampling the grid if the checkpoint was made at another input size.

    fp16 tensors are cast to the module's dtype. A mismatch says which architecture the file
    looks like and names at most a few keys.
    """
    patch = state.get("patch_embed.proj.weight")
    same_patches = patch is not None and tuple(patch.shape) == tuple(model.patch_embed.proj.weight.shape)
    loadable = state
    if same_patches and "pos_embed" in state and state["pos_embed"].shape[1] != model.spec.num_patches:
        # Resample fp16 checkpoints in fp32: the module keeps the precision.
        grid_keys = [k for k in ("pos_embed", "feature.0.weight") if k in state]
        loadable = resample_grid({**state, **{k: state[k].float() for k in grid_keys}}, model.spec.grid)
    try:
        model.load_state_dict(loadable, strict=True)
    except RuntimeError as exc:
        raise CheckpointMismatch(_mismatch(model, state, source)) from exc


def _mismatch(model: "UnicomViT", state: dict, source: str) -> str:
    """A short message for a checkpoint of another architecture (torch's lists every key)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    looks = describe_checkpoint(state)
    looks = f"it looks like {looks}" if looks else "its keys are not those of a UNICOM ViT"
    details = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            details.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    return (f"{source}: does not match architecture {model.spec.name}; {looks}. Pick the --model "
            f"that this checkpoint was trained with ({'; '.join(details)})")


def resolve_weights(spec: ModelSpec, weights: str | Path | None = None, *, pretrained: bool = True,
                    cache: str | Path | None = None,
                    mirror: str | None = None) -> tuple[Path | None, str | None]:
    """(weights file, its SHA-256 when already known), downloading published weights first;
    (None, None) for a random init.

    Runs before the network is built so that a missing file or an offline machine fails in
    a fraction of a second. A JSON architecture has no weights of its own: without ``weights``
    it is refused unless a random initialisation is asked for (``pretrained=False``).
    """
    if weights is not None:
        if not pretrained:
            raise UsageError("--random-init and --weights exclude each other: pick one")
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"{path}: weights file not found; check the path or run `unicom download`")
        return path, None
    if not pretrained:
        return None, None
    if spec.source == "registry":
        from unicom_cli.models.download import fetch

        fetched = fetch(spec, cache=cache, mirror=mirror)  # verified, or trusted from its fresh record
        return fetched.path, fetched.sha256
    raise UsageError(f"{spec.source}: an architecture file has no weights; pass --weights FILE "
                     f"(e.g. a finetune run's model.pt), or --random-init [--seed N] to use a "
                     f"randomly initialised network on purpose")


def load(spec: ModelSpec, weights: str | Path | None = None, *, pretrained: bool = True, seed: int = 0,
         drop_path_rate: float = 0.0, cache: str | Path | None = None, mirror: str | None = None) -> Built:
    """The UNICOM network for ``spec``: published weights (downloaded and verified on first use),
    a state-dict file, or a seeded random init. On the CPU, in fp32."""
    path, digest = resolve_weights(spec, weights, pretrained=pretrained, cache=cache, mirror=mirror)

    import torch

    from unicom_cli.models.vit import build_model
    from unicom_cli.models.weights import file_digest, load_state_dict
    from unicom_cli.utils.console import info

    if path is None:
        info(f"{spec.name}: random initialisation with seed {seed} (no trained weights)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(spec, drop_path_rate=drop_path_rate)
        return Built(model, spec, None, None)
    state = load_state_dict(path)
    model = build_model(spec, drop_path_rate=drop_path_rate)
    load_weights_into(model, state, str(path))
    return Built(model, spec, path, digest or file_digest(path))
