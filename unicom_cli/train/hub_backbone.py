"""Finetuning a hub model (models/families/hf.py): what the loop refuses for it and how it is saved."""

from __future__ import annotations

from pathlib import Path

from unicom_cli import distributed as D
from unicom_cli.errors import UsageError
from unicom_cli.models.registry import ModelSpec


def check(spec: ModelSpec, output_dim: int | None, init_from: str | None) -> None:
    """Refuse the options that only a UNICOM feature head has, and the timm family."""
    if spec.family == "timm":
        raise UsageError(f"{spec.name}: finetune takes UNICOM and transformers (hf:, MLCD) models")
    if spec.family != "unicom" and (output_dim or init_from):
        raise UsageError(f"--output-dim and --init-from change a UNICOM feature head; {spec.name} "
                         f"trains its own pooled output as it is")


def export(model, spec: ModelSpec, path: Path, head, head_path: Path) -> tuple[Path, Path]:
    """model.pt → model/, best.pt → best/: a save_pretrained folder (with its image processor)
    that every --model takes; the classify head beside it as for UNICOM."""
    from unicom_cli.models.families.hf import save_pretrained

    folder = path.with_suffix("")
    if D.is_main():
        save_pretrained(model, folder)
        if head is not None:
            head.export(head_path, spec)
    D.barrier()
    return folder, folder / "config.json"
