"""`unicom finetune`: Partial FC + margin-loss training from a published recipe, any flag overriding."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer

from unicom_cli.cli.options import (
    CacheDirOpt, DeviceOpt, MirrorOpt, PrecisionOpt, RandomInitOpt, WeightsOpt, alias,
    launch_options, prefer,
)

if TYPE_CHECKING:
    from unicom_cli.distributed.launch import LaunchConfig

EXAMPLES = [
    "unicom finetune --model ViT-L/14",
    "unicom finetune --recipe sop-vit-b32 --data-root data --gpus 8",
    "unicom finetune --model arch.json --random-init --dataset folder:mydata/ --device cpu --epochs 3",
]

_T = "Training"
_L = "Loss (Partial FC)"
_C = "Checkpoints and evaluation"
_K = "Classification (--task classify)"


def _opt(*names: str, help: str, panel: str = _T, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


@launch_options
def finetune(
    model: Annotated[Optional[str], _opt("--model", "-m", "--arch", help="Model name or JSON architecture file (default ViT-L/14); --arch is the design card's name for it.")] = None,
    dataset: Annotated[Optional[str], _opt("--dataset", help="gldv2 (default), sop, cub, cars, inshop, inat or folder:PATH (PATH/train; evaluated on PATH/test, else PATH/val; classify: PATH/val, else PATH/test).")] = None,
    data_root: Annotated[Optional[Path], _opt("--data-root", help="Data root holding the benchmark folders (default ./data); for gldv2 also the prepare-gldv2 output itself (default ./data/GLDv2).")] = None,
    recipe: Annotated[Optional[str], _opt("--recipe", help="Published recipe: sop-vit-b32, sop-vit-b16, sop-vit-l14, inshop-vit-b16, inshop-vit-l14, inat-vit-b16, inat-vit-l14, gldv2-vit-l14, gldv2-vit-b16; classification: imagenet-vit-b32-384, imagenet-vit-b16-384, imagenet-vit-l14-518.")] = None,
    task: Annotated[Optional[str], _opt("--task", help="retrieval (Partial FC + margin loss, default) or classify (linear head + cross-entropy; top-1/top-5 on PATH/val).")] = None,
    output: Annotated[Path, _opt("--output", "-o", help="Run folder: checkpoints, metrics.jsonl, model.pt, arch.json.")] = Path("runs/finetune"),
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    mirror: MirrorOpt = None,
    cache_dir: CacheDirOpt = None,
    epochs: Annotated[Optional[int], _opt("--epochs", min=1, help="Epochs.")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "-b", min=1, help="Images per batch, per process.")] = None,
    lr: Annotated[Optional[float], _opt("--lr", help="Peak learning rate of the backbone (OneCycle, 10% warm-up).")] = None,
    lr_pfc_weight: Annotated[Optional[float], _opt("--lr-pfc-weight", help="Class centres' lr = lr × this.")] = None,
    optimizer: Annotated[Optional[Literal["adamw", "sgd"]], _opt("--optimizer", help="Optimizer (default adamw).", show_default=False)] = None,
    precision: PrecisionOpt = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", min=1, help="Micro-batches per optimizer step.")] = None,
    drop_path: Annotated[Optional[float], _opt("--drop-path", help="Stochastic depth rate (default 0.1).")] = None,
    grad_checkpointing: Annotated[bool, _opt("--grad-checkpointing", help="Recompute block activations in the backward pass (less memory).")] = False,
    compile: Annotated[bool, _opt("--compile", help="torch.compile the model.")] = False,
    input_size: Annotated[Optional[int], _opt("--input-size", help="Train at this resolution (pos_embed and head resampled).")] = None,
    output_dim: Annotated[Optional[int], _opt("--output-dim", help="Embedding size; another than the checkpoint's gets a fresh last layer.")] = None,
    no_augment: Annotated[bool, _opt("--no-augment", help="Plain CLIP transform instead of the RandAugment recipe (image datasets).")] = False,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", help="Weight decay (default 0; classify: not on biases, norms, pos_embed).")] = None,
    layer_decay: Annotated[Optional[float], _opt("--layer-decay", help="Layer-wise lr decay: block i of N trains at lr × decay^(N-i) (default 1: off).", panel=_K)] = None,
    label_smoothing: Annotated[Optional[float], _opt("--label-smoothing", help="Label smoothing of the cross-entropy (default 0).", panel=_K)] = None,
    mixup: Annotated[Optional[float], _opt("--mixup", help="Mixup alpha (timm; default 0: off).", panel=_K)] = None,
    cutmix: Annotated[Optional[float], _opt("--cutmix", help="CutMix alpha (timm; default 0: off).", panel=_K)] = None,
    m1: Annotated[Optional[float], _opt("--m1", help="Multiplicative angular margin.", panel=_L)] = None,
    m2: Annotated[Optional[float], _opt("--m2", help="Additive angular margin (ArcFace).", panel=_L)] = None,
    m3: Annotated[Optional[float], _opt("--m3", help="Additive cosine margin (CosFace).", panel=_L)] = None,
    s: Annotated[Optional[float], _opt("-s", "--scale", help="Logit scale.", panel=_L)] = None,
    sample_rate: Annotated[Optional[float], _opt("--sample-rate", help="Share of negative class centres used per step.", panel=_L)] = None,
    margin_filter: Annotated[Optional[float], _opt("--margin-filter", min=0.0, max=1.0, help="Zero negative cosines above this (inter-class filtering; 0, the default, is off).", panel=_L)] = None,
    num_feat: Annotated[Optional[int], _opt("--num-feat", help="Random embedding dimensions used per step.", panel=_L)] = None,
    save_every: Annotated[Optional[int], _opt("--save-every", min=0, help="Checkpoint every N steps (and at each epoch end).", panel=_C)] = None,
    keep: Annotated[Optional[int], _opt("--keep", min=1, help="Checkpoints kept (default 3).", panel=_C)] = None,
    eval_every: Annotated[Optional[int], _opt("--eval-every", min=0, help="Evaluate on the test split every N epochs (0: never).", panel=_C)] = None,
    resume: Annotated[Optional[str], _opt("--resume", help="Checkpoint folder, or 'auto' for the latest in --output.", panel=_C)] = None,
    seed: Annotated[Optional[int], _opt("--seed", help="Seed of the training and of --random-init (default 0, as in every command; a published recipe uses its own, 1024, as the reference runs did).")] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", min=1, help="Stop after N steps (schedule unchanged): smoke tests.")] = None,
    device: DeviceOpt = "auto",
    workers: Annotated[Optional[int], _opt("--workers", "-j", min=0, help="Data-loading processes per process, for training and evaluation (default: training 0 on CPU, its share of the cores up to 8 on CUDA, 4 DALI threads for gldv2; evaluation as eval-retrieval).")] = None,
    *,
    launch: LaunchConfig,
    data: Annotated[Optional[Path], alias("--data")] = None,
) -> None:
    """Finetune a UNICOM model with Partial FC and a margin loss (ArcFace/CosFace).

    `unicom finetune --model ViT-L/14` alone runs the published GLDv2 recipe on ./data/GLDv2
    (made by `unicom prepare-gldv2`). Evaluation metrics are percentages (0-100).
    """
    from unicom_cli.utils.console import status

    arch, data = model, prefer(data_root, data)
    status(f"loading {arch or recipe or 'ViT-L/14'} …")
    from unicom_cli.distributed.launch import run_command
    from unicom_cli.train.loop import FinetuneConfig, finetune as run_finetune
    from unicom_cli.train.recipes import recipe_for
    from unicom_cli.utils.console import info, print_context

    name, values, recipe_gpus = recipe_for(recipe, arch, dataset)
    flags = dict(arch=arch, dataset=dataset, data=data, weights=weights, epochs=epochs,
                 batch_size=batch_size, lr=lr, lr_pfc_weight=lr_pfc_weight, optimizer=optimizer,
                 precision=precision, grad_accum=grad_accum, drop_path=drop_path,
                 input_size=input_size, output_dim=output_dim, m1=m1, m2=m2, m3=m3, s=s,
                 sample_rate=sample_rate, margin_filter=margin_filter, num_feat=num_feat, save_every=save_every, keep=keep,
                 eval_every=eval_every, resume=resume, seed=seed, max_steps=max_steps,
                 workers=workers, mirror=mirror, cache_dir=cache_dir, pretrained=False if random_init else None,
                 task=task, weight_decay=weight_decay, layer_decay=layer_decay,
                 label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix)
    recipe_arch = values.get("arch")
    values.update({k: v for k, v in flags.items() if v is not None})
    if arch and recipe_arch and arch != recipe_arch:
        values["init_from"] = None  # another model than the recipe's: start from its own weights
    if weights is not None:
        values["init_from"] = None
    cfg = FinetuneConfig(output=output, device=device, grad_checkpointing=grad_checkpointing,
                         compile=compile, augment=not no_augment, **values)
    if name:
        info(f"recipe {name} (published on {recipe_gpus} GPU{'s' if recipe_gpus > 1 else ''} × "
             f"batch {values.get('batch_size')}); flags given override it")
    summary = run_command(launch, run_finetune, cfg)
    if summary is None:
        return
    best = summary.best
    print_context([
        f"finetuned {summary.steps} steps in {summary.seconds:.0f} s "
        f"({summary.images_per_s:.1f} images/s), last loss {summary.final_loss:.4f}"
        + (f", best {best['metric']} {best[best['metric']]:.2f} %" if best else ""),
        f"wrote {summary.model_path}",
        *([] if summary.model_path.is_dir() else [f"wrote {summary.arch_path}"]),  # a hub model: one folder
        f"wrote {summary.output / 'metrics.jsonl'}",
        *([f"wrote {summary.head_path}"] if summary.head_path else []),
        (f"use: unicom embed --model {summary.model_path}" if summary.model_path.is_dir() else
         f"use: unicom embed --model {summary.arch_path} --weights {summary.model_path}")
        + (f" --head {summary.head_path}" if summary.head_path else "") + " …",
    ])
