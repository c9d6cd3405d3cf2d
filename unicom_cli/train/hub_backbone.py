"""Finetuning a hub model (models/families/hf.py, timm.py): what the loop refuses for it and how it is saved."""

from __future__ import annotations

import shutil
from pathlib import Path

from unicom_cli import distributed as D
from unicom_cli.errors import UsageError
from unicom_cli.models.registry import ModelSpec


def check(spec: ModelSpec, output_dim: int | None, init_from: str | None) -> None:
    """Refuse the options that only a UNICOM feature head has."""
    if spec.family != "unicom" and (output_dim or init_from):
        raise UsageError(f"--output-dim and --init-from change a UNICOM feature head; {spec.name} "
                         f"trains its own pooled output as it is")


def export(model, spec: ModelSpec, path: Path, head, head_path: Path) -> tuple[Path, Path]:
    """model.pt → model/, best.pt → best/: a folder every --model takes (transformers: a
    save_pretrained folder with its image processor; timm: timm's own hub layout); the classify
    head beside it as for UNICOM."""
    folder = path.with_suffix("")
    if D.is_main():
        if spec.family == "timm":
            from unicom_cli.models.families.timm import save_folder
        else:
            from unicom_cli.models.families.hf import save_pretrained as save_folder
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        save_folder(model, part)
        _replace(folder, part)
        if head is not None:
            head.export(head_path, spec)
    D.barrier()
    return folder, folder / "config.json"


def _replace(folder: Path, part: Path) -> None:
    """Move the finished ``part`` folder to ``folder``: never a half-written folder at the final path."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        part.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        part.rename(folder)
