"""The finetune loop: DDP, AMP, accumulation, OneCycle, Partial FC, checkpoint/resume, periodic eval.

One process:        python -m unicom_cli finetune --dataset folder:DIR --model ViT-B/32 --device cpu
Several CPU procs:  python -m unicom_cli finetune ... --procs 2
8 GPUs, 2 nodes:    torchrun --nnodes 2 --nproc-per-node 8 ... -m unicom_cli finetune ...
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unicom_cli import distributed as D
from unicom_cli.errors import InputError, TrainingDiverged, UsageError
from unicom_cli.train import hub_backbone
from unicom_cli.train.checkpoint import TrainState, atomic_save, jsonable, resume
from unicom_cli.train.checks import validate_config
from unicom_cli.train.loaders import make_loader
from unicom_cli.train.partial_fc import PartialFC
from unicom_cli.utils.console import info, progress_bar
from unicom_cli.utils.files import disk_errors, output_lock, write_json_atomic


@dataclass
class FinetuneConfig:
    """Everything a finetune run needs; the CLI fills it from a recipe plus flags."""

    arch: str = "ViT-L/14"  # model name or JSON architecture file
    dataset: str = "gldv2"  # gldv2 | sop | cub | cars | inshop | inat | folder:PATH
    data: Path | None = None  # data root holding the benchmark folders (default ./data); for gldv2
    #                           also the prepare-gldv2 output itself (default ./data/GLDv2)
    output: Path = Path("runs/finetune")
    weights: Path | None = None  # state dict to start from instead of the published weights
    init_from: str | None = None  # registered model whose weights initialise `arch` (336px → 512)
    pretrained: bool = True  # False: start from a random init (seeded by `seed`)
    mirror: str | None = None  # where to download published weights from
    cache_dir: Path | None = None  # weights cache (default $UNICOM_HOME or ~/.cache/unicom)
    input_size: int | None = None  # train at another resolution (grid resampled)
    output_dim: int | None = None  # embedding size; ≠ checkpoint's → fresh last layer
    epochs: int = 16
    batch_size: int = 16  # per process
    lr: float = 1e-4
    lr_pfc_weight: float = 3.0  # centres' lr = lr × this
    optimizer: str = "adamw"  # adamw | sgd
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    s: float = 32.0
    sample_rate: float = 1.0
    margin_filter: float = 0.0  # zero negative cosines above this (reference --margin_loss_filter; 0: off)
    num_feat: int | None = None  # train on a random subset of this many dimensions per step
    precision: str | None = None  # fp32 | fp16 | bf16 (default fp16 on CUDA, fp32 on CPU)
    grad_accum: int = 1
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    compile: bool = False
    augment: bool = True  # timm RandAugment recipe (image datasets); False: CLIP transform
    save_every: int = 0  # optimizer steps between checkpoints (0: once per epoch only)
    keep: int = 3  # checkpoints kept
    eval_every: int = 1  # epochs between evaluations (0: never)
    resume: str | None = None  # checkpoint folder or "auto"
    seed: int = 0  # as every command; the published recipes set 1024 (SPEC §3)
    device: str = "auto"
    workers: int | None = None
    log_every: int = 10  # optimizer steps between metrics.jsonl lines
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is unchanged)
    shuffle_fill: int = 16384  # DALI reader shuffling buffer
    # --task classify (train/heads.py): a linear head + cross-entropy instead of Partial FC
    task: str = "retrieval"  # retrieval | classify
    weight_decay: float = 0.0  # AdamW/SGD weight decay (classify: not on biases, norms, pos_embed)
    layer_decay: float = 1.0  # block i's lr = lr × layer_decay^(depth - i) (1: off)
    label_smoothing: float = 0.0  # classify
    mixup: float = 0.0  # classify: Mixup alpha (timm; 0: off)
    cutmix: float = 0.0  # classify: CutMix alpha (timm; 0: off)


@dataclass
class FinetuneSummary:
    """What a finished run produced."""

    output: Path
    model_path: Path  # plain UNICOM state dict (load with --weights, architecture in arch.json)
    arch_path: Path
    steps: int
    epochs_done: float
    final_loss: float
    images_per_s: float
    seconds: float
    best: dict | None = None
    evals: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    head_path: Path | None = None  # classify: the head for `unicom embed --head`


# ----------------------------------------------------------------------------------- model


def build_model(cfg: FinetuneConfig, device: torch.device):
    """The network at the training resolution, initialised per SPEC §3; returns (model, spec)."""
    from unicom_cli.models.factory import create_model
    from unicom_cli.models.families import resolve_spec

    target = resolve_spec(cfg.arch, cache=cfg.cache_dir, mirror=cfg.mirror)
    hub_backbone.check(target, cfg.output_dim, cfg.init_from)
    # An architecture file without weights trains from scratch: a seeded init (announced).
    scratch = not cfg.pretrained or (cfg.weights is None and cfg.init_from is None
                                     and target.family == "unicom" and target.source != "registry")
    loaded = create_model(cfg.init_from or cfg.arch, weights=cfg.weights, pretrained=not scratch,
                          seed=cfg.seed, device="cpu", drop_path_rate=cfg.drop_path,
                          input_size=cfg.input_size or target.input_size, mirror=cfg.mirror,
                          cache=cfg.cache_dir)
    model, spec = loaded.model, loaded.spec
    if cfg.output_dim and cfg.output_dim != spec.embedding_size:
        info(f"output dim {cfg.output_dim} ≠ {spec.embedding_size}: fresh feature.2/feature.3")
        model.feature[2] = nn.Linear(spec.width, cfg.output_dim, bias=False)
        nn.init.trunc_normal_(model.feature[2].weight, std=0.02)
        model.feature[3] = nn.BatchNorm1d(cfg.output_dim, eps=2e-5)
        spec = replace(spec, embedding_size=cfg.output_dim)
    spec = replace(spec, name=f"{target.name}-finetuned", source="finetune", url=None,
                   gdrive_id=None, sha256=None, filename=None)
    model.spec = spec
    return model.to(device).train(), spec


# ------------------------------------------------------------------------------------ data


def _train_spec(cfg: FinetuneConfig):
    from unicom_cli.models.families import resolve_spec

    spec = resolve_spec(cfg.init_from or cfg.arch, cache=cfg.cache_dir, mirror=cfg.mirror)
    return replace(spec, input_size=cfg.input_size) if cfg.input_size else spec


# -------------------------------------------------------------------------------- evaluate


def evaluate(cfg: FinetuneConfig, model: nn.Module, spec, device: torch.device, head=None) -> dict | None:
    """Recall@1 (mAP@100 for GLDv2) of ``model`` on the data set's test split (top-1/top-5 of
    ``head`` for --task classify), or None."""
    from unicom_cli.train import datasets

    was_training = model.training
    model.eval()
    try:
        if cfg.task == "classify":
            from unicom_cli.train.heads import evaluate_classify

            return evaluate_classify(cfg, model, head, spec, device)
        return datasets.evaluate(cfg.dataset, cfg.data, model, spec, device,
                                          batch_size=max(cfg.batch_size, 32), workers=cfg.workers)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------ loop


def _setup(cfg: FinetuneConfig):
    device = torch.device(D.device_for(cfg.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from unicom_cli.models.factory import autocast_dtype, resolve_device

    resolve_device(str(device))
    torch.manual_seed(cfg.seed + D.rank())
    np.random.seed((cfg.seed + D.rank()) % 2**32)
    random.seed(cfg.seed + D.rank())
    return device, autocast_dtype(cfg.precision, device)


def _warmup_share(total_steps: int) -> float:
    """10 % warm-up; OneCycle divides by (warm-up steps - 1), so very short runs (<= 10 steps,
    smoke tests) get a longer share instead of a ZeroDivisionError; < 3 steps cannot work."""
    if total_steps < 3:
        raise UsageError(f"{total_steps} optimizer step(s) in all: the OneCycle schedule needs at "
                         "least 3; add --epochs or lower --batch-size/--grad-accum")
    return 0.1 if total_steps > 10 else min(0.5, 1.5 / total_steps)


def finetune(cfg: FinetuneConfig) -> FinetuneSummary:
    """Train ``cfg.arch`` with Partial FC on ``cfg.dataset``; returns the summary (every rank).

    A second run on the same ``--output`` is refused at once (the lock dies with its process).
    """
    cfg.output = Path(cfg.output)
    validate_config(cfg)
    if D.is_main():  # the lock lives beside the run folder, which is made only when training starts
        with disk_errors(cfg.output.parent):
            cfg.output.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(cfg.output), disk_errors(cfg.output):
        return _finetune(cfg)


def _finetune(cfg: FinetuneConfig) -> FinetuneSummary:  # noqa: C901 (the step loop; head, DDP and optimizer are split out)
    device, amp_dtype = _setup(cfg)
    loader = make_loader(cfg, _train_spec(cfg), device)  # before the (maybe downloaded) weights
    if loader.num_classes < 2:
        raise InputError(f"the training set has {loader.num_classes} class: a margin loss needs at "
                         "least 2 (its loss is 0 from the first step)")
    model, spec = build_model(cfg, device)
    if cfg.num_feat is not None and cfg.num_feat > spec.embedding_size:
        raise UsageError(f"--num-feat {cfg.num_feat}: the embeddings have only "
                         f"{spec.embedding_size} dimensions")
    pfc = _make_head(cfg, spec, loader, device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model, raw_model = _distribute(model, device)
    raw_model.autocast_dtype = amp_dtype
    forward = torch.compile(model) if cfg.compile else model
    optimizer, groups = _make_optimizer(cfg, raw_model, pfc)
    steps_per_epoch = loader.steps_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise InputError(f"one epoch has {loader.steps_per_epoch} batches, fewer than --grad-accum "
                         f"{cfg.grad_accum}; lower --grad-accum or --batch-size")
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=total_steps,
        pct_start=_warmup_share(total_steps))
    # fp16 needs loss scaling; disabled, the scaler passes the loss and the step straight through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    t = TrainState(cfg, model, raw_model, spec, pfc, optimizer, scheduler, scaler, device)

    resumed = resume(t, cfg)
    if resumed:
        info(f"resumed from {resumed} at step {t.step} (epoch {t.epoch + 1}, step {t.step_in_epoch})")
    if D.is_main():
        cfg.output.mkdir(parents=True, exist_ok=True)
        # model_spec: the network trained (a hub model's source commit and embedding definition)
        (cfg.output / "config.json").write_text(json.dumps({**jsonable(cfg), "model_spec": spec.to_json()}, indent=2))
    stop_at = min(total_steps, cfg.max_steps or total_steps)
    global_batch = cfg.batch_size * D.world_size() * cfg.grad_accum
    info(f"finetune {spec.name} on {cfg.dataset}: {loader.num_classes} classes, {total_steps} steps "
         f"({cfg.epochs} epochs × {steps_per_epoch}), global batch {global_batch}, device {device}")

    metrics_path = cfg.output / "metrics.jsonl"
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no sync per step
    bad_streak = torch.zeros((), dtype=torch.long, device=device)
    tolerance = 10 if scaler.is_enabled() else 0  # fp16: let the scaler skip a few overflowing steps
    last_loss, logged_steps, started = float("nan"), t.step, time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    images_done = 0

    def check_finite() -> None:
        streak = int(bad_streak.item())
        if streak > tolerance:
            raise TrainingDiverged(f"loss became NaN/inf at step {t.step - streak + 1} (epoch "
                                   f"{t.epoch + 1}); lower --lr, use --precision bf16/fp32, or "
                                   f"resume from an earlier checkpoint with --resume")

    with progress_bar((stop_at - t.step) * global_batch, "finetune", unit="images") as bar:
        while t.step < stop_at:
            batches = loader.epoch(t.epoch, t.step_in_epoch * cfg.grad_accum)
            for micro, (images, labels) in enumerate(batches):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if cfg.task == "classify":
                    images, labels = pfc.mix(images, labels)
                last_micro = (micro + 1) % cfg.grad_accum == 0
                sync = last_micro or not isinstance(model, nn.parallel.DistributedDataParallel)
                ctx = model.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    embeddings = forward(images)
                    loss = pfc(embeddings, labels, step=t.step * cfg.grad_accum + micro % cfg.grad_accum)
                    scaled = loss / cfg.grad_accum
                    scaler.scale(scaled).backward()
                detached = loss.detach()
                bad_streak = torch.where(torch.isfinite(detached), 0, bad_streak + 1)
                loss_sum += torch.nan_to_num(detached) / cfg.grad_accum
                if not last_micro:
                    continue
                if cfg.task == "classify":
                    pfc.sync_grads()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                t.step += 1
                t.step_in_epoch += 1
                window_images += global_batch
                images_done += global_batch
                bar.advance(global_batch)
                if t.step % cfg.log_every == 0 or t.step == stop_at:
                    check_finite()
                    now = time.perf_counter()
                    last_loss = loss_sum.item() / (t.step - logged_steps)
                    rate = window_images / max(now - window_start, 1e-9)
                    lr = scheduler.get_last_lr()[0]
                    bar.update(description=f"step {t.step}/{stop_at} loss {last_loss:.4f} lr {lr:.2e}")
                    if D.is_main():
                        with open(metrics_path, "a") as fh:
                            fh.write(json.dumps({"step": t.step, "epoch": t.epoch + t.step_in_epoch / steps_per_epoch,
                                                 "loss": last_loss, "lr": lr, "images_per_s": rate,
                                                 "time": now - started}) + "\n")
                    loss_sum.zero_()
                    logged_steps, window_start, window_images = t.step, now, 0
                if cfg.save_every and t.step % cfg.save_every == 0 and t.step_in_epoch < steps_per_epoch:
                    check_finite()
                    t.save(cfg.keep)
                if t.step >= stop_at or t.step_in_epoch >= steps_per_epoch:
                    break
            if t.step_in_epoch >= steps_per_epoch:  # epoch finished
                t.epoch, t.step_in_epoch = t.epoch + 1, 0
                if cfg.eval_every and (t.epoch % cfg.eval_every == 0 or t.step >= total_steps):
                    _evaluate_and_keep_best(t, cfg)
                check_finite()
                t.save(cfg.keep)
    check_finite()
    seconds = time.perf_counter() - started
    model_path, arch_path = _export(t, cfg.output / "model.pt")
    return FinetuneSummary(cfg.output, model_path, arch_path, t.step, t.epoch + t.step_in_epoch / steps_per_epoch,
                           last_loss, images_done / max(seconds, 1e-9), seconds, t.best, t.evals,
                           str(resumed) if resumed else None,
                           _head_path(cfg.output / "model.pt") if cfg.task == "classify" else None)


def _make_head(cfg: FinetuneConfig, spec, loader, device: torch.device) -> nn.Module:
    """Partial FC with its margin loss, or (``--task classify``) the classification head, which
    takes its place: the same loss call and the same checkpoint slot."""
    if cfg.task == "classify":
        from unicom_cli.train.heads import ClassifyHead

        return ClassifyHead(spec.embedding_size, loader.classes, label_smoothing=cfg.label_smoothing,
                            mixup=cfg.mixup, cutmix=cfg.cutmix, seed=cfg.seed).to(device)
    return PartialFC(spec.embedding_size, loader.num_classes, s=cfg.s, m1=cfg.m1, m2=cfg.m2,
                     m3=cfg.m3, sample_rate=cfg.sample_rate, num_feat=cfg.num_feat, seed=cfg.seed,
                     margin_filter=cfg.margin_filter).to(device)


def _distribute(model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(the module to call, the bare model): DDP-wrapped (SyncBatchNorm on CUDA) in a process group."""
    if D.world_size() == 1:
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None), model


def _make_optimizer(cfg: FinetuneConfig, raw_model: nn.Module, head: nn.Module):
    """(optimizer, its parameter groups): the class centres (last) at lr × --lr-pfc-weight, the
    backbone with --layer-decay when set; or the classify recipe's groups."""
    from unicom_cli.train.heads import backbone_groups, param_groups

    if cfg.task == "classify":
        groups = param_groups(raw_model, head, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    else:
        groups = (backbone_groups(raw_model, cfg.lr, cfg.weight_decay, cfg.layer_decay) if cfg.layer_decay < 1
                  else [{"params": [p for p in raw_model.parameters() if p.requires_grad], "lr": cfg.lr}])
        groups.append({"params": [head.weight], "lr": cfg.lr * cfg.lr_pfc_weight})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay), groups
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay), groups


def _evaluate_and_keep_best(t: TrainState, cfg: FinetuneConfig) -> None:
    result = evaluate(cfg, t.raw_model, t.spec, t.device, head=t.pfc)
    if result is None:
        return
    result = {"epoch": t.epoch, "step": t.step, **result}
    t.evals.append(result)
    if D.is_main():
        with open(cfg.output / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"eval": result}) + "\n")
        info(f"eval after epoch {t.epoch} on {result['split']} ({result['images']:,} images), %: "
             + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)))
    key = result["metric"]
    if t.best is None or result[key] > t.best[key]:
        t.best = result
        _export(t, cfg.output / "best.pt")


def _export(t: TrainState, path: Path) -> tuple[Path, Path]:
    """The model as a plain UNICOM state dict (published keys) plus its architecture JSON; a hub
    model as a save_pretrained folder (model.pt → model/, best.pt → best/) that --model takes."""
    if t.spec.family != "unicom":
        return hub_backbone.export(t.raw_model, t.spec, path, t.pfc if t.cfg.task == "classify" else None,
                                   _head_path(path))
    arch = path.parent / "arch.json"
    if D.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in t.raw_model.state_dict().items()}
        atomic_save(state, path)
        spec = t.spec
        write_json_atomic(arch, spec.to_json())
        if t.cfg.task == "classify":
            t.pfc.export(_head_path(path), spec)
    D.barrier()
    return path, arch


def _head_path(model_path: Path) -> Path:
    """model.pt → head.safetensors, best.pt → best-head.safetensors."""
    stem = model_path.stem
    return model_path.with_name("head.safetensors" if stem == "model" else f"{stem}-head.safetensors")
