"""The classification head and losses for `finetune --task classify`: a linear head on the embedding,
cross-entropy with label smoothing, timm's Mixup/CutMix, layer-wise learning-rate decay, top-1/top-5."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unicom_cli import distributed as D
from unicom_cli.errors import UsageError


class ClassifyHead(nn.Module):
    """``Linear(embedding → classes)`` on the backbone's (un-normalised) embedding, and its loss.

    It takes the place of Partial FC in the finetune loop: ``forward(embeddings, targets, step)``
    returns the loss, with ``targets`` class indices or, after ``mix``, soft targets. The head is
    replicated on every rank and kept outside DDP, so ``sync_grads`` averages its gradients.
    """

    def __init__(self, dim: int, classes: list[str], *, label_smoothing: float = 0.0,
                 mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.classes = list(classes)
        self.fc = nn.Linear(dim, len(classes))
        # Its own generator: every rank (seeded differently by the loop) starts from the same head.
        nn.init.trunc_normal_(self.fc.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.fc.bias)
        self.label_smoothing = label_smoothing
        self.mixer = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            # timm draws λ and the box from numpy's global RNG, which the loop seeds per rank
            # and checkpoints: a resumed run mixes exactly as the uninterrupted one.
            self.mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=len(classes))

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix a training batch: (mixed images, soft targets); unchanged without them."""
        if self.mixer is None:
            return images, labels
        return self.mixer(images, labels)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.fc(embeddings.float())

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, step: int | None = None) -> torch.Tensor:
        logits = self.logits(embeddings)
        if targets.ndim == 2:  # soft targets (Mixup/CutMix already smoothed them)
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def sync_grads(self) -> None:
        """Average the head's gradients over ranks (what DDP does for the backbone)."""
        if D.world_size() == 1:
            return
        import torch.distributed as dist

        for p in self.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= D.world_size()

    def export(self, path: Path, spec) -> None:
        """The head file `unicom embed --head` reads (the eval-linear format; raw embeddings)."""
        from unicom_cli.eval.linear import LinearHead

        LinearHead(self.fc.weight.detach().float().cpu().numpy(), self.fc.bias.detach().float().cpu().numpy(),
                   self.classes, normalize=False, meta={"source": "finetune", "model": spec.name}).save(path)


def check_classify(cfg) -> None:
    """Refuse settings the classification task cannot train with, before any work."""
    if cfg.dataset == "gldv2":
        raise UsageError("--task classify needs an image dataset: --dataset folder:PATH with PATH/train "
                         "and PATH/val (ImageFolder trees), e.g. ImageNet")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UsageError(f"--batch-size {cfg.batch_size}: Mixup/CutMix pair each image with another; "
                         f"use an even batch size or --mixup 0 --cutmix 0")
    if not 0 <= cfg.label_smoothing < 1:
        raise UsageError(f"--label-smoothing {cfg.label_smoothing}: must be in [0, 1)")


# transformers vision models (families/hf.py, under ``net.``): their embedding layers.
_HUB_EMBEDDINGS = re.compile(
    r"(?:^|\.)(?:embeddings|pre_layrnorm|class_pos_emb|patch_embed|pos_embed|cls_token)(?:\.|$)")


def layer_id(name: str, depth: int) -> int:
    """0 for the patch embedding and position embedding, i+1 for block i, depth+1 for the rest
    (final norm, the UNICOM feature head; a hub model's post-LayerNorm and pooling head)."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "norm_pre")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match is None and name.startswith("net."):  # a hub model: ….layers.i. / ….layer.i. / blocks.i.
        if _HUB_EMBEDDINGS.search(name):
            return 0
        match = re.search(r"\.(?:layers|layer|blocks)\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups(model: nn.Module, head: ClassifyHead, lr: float, weight_decay: float,
                 layer_decay: float) -> list[dict]:
    """The backbone's groups (``backbone_groups``), then the head's parameters last (the
    checkpoint relies on it)."""
    return backbone_groups(model, lr, weight_decay, layer_decay) + [
        {"params": [head.fc.weight, head.fc.bias], "lr": lr, "weight_decay": weight_decay}]


def backbone_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: lr × layer_decay^(top-layer) per layer; no weight decay on biases, norms
    and the position embedding."""
    layers, top = _layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layers.get(name, top)
        decay = p.ndim > 1 and name != "pos_embed"
        group = groups.setdefault((layer, decay), {
            "params": [], "lr": lr * layer_decay ** (top - layer),
            "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _layers(model: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name → layer, top layer). A timm model: timm's own grouping, the one its
    ``param_groups_layer_decay`` uses (the model's group_matcher; the final norm shares the last
    block's layer); other models: ``layer_id`` (top: depth + 1)."""
    net = getattr(model, "net", None)
    if getattr(getattr(model, "spec", None), "family", None) == "timm" and net is not None:
        from timm.models import group_parameters
        from timm.optim._param_groups import auto_group_layers

        found = (group_parameters(net, net.group_matcher(coarse=False), reverse=True)
                 if hasattr(net, "group_matcher") else auto_group_layers(net))
        layers = {f"net.{name}": layer for name, layer in found.items()}
        return layers, max(layers.values(), default=0)
    depth = len(model.blocks)
    return {name: layer_id(name, depth) for name, _ in model.named_parameters()}, depth + 1


@torch.no_grad()
def evaluate_classify(cfg, model: nn.Module, head: ClassifyHead, spec, device: torch.device) -> dict | None:
    """``{"metric": "top1", "top1": …, "top5": …}`` (percentages, like the retrieval metrics) on
    PATH/val (or PATH/test), every rank.

    The val images go through eval-knn's feature extraction (sharded over ranks, gathered);
    val classes the head does not know always miss.
    """
    from unicom_cli.data.images import scan_class_folders
    from unicom_cli.models.factory import LoadedModel
    from unicom_cli.models.transforms import eval_transform
    from unicom_cli.pipelines.features import ModelOptions, model_features
    from unicom_cli.utils.console import info, warn

    root = Path(cfg.dataset[len("folder:"):])
    split = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if split is None:
        info(f"no {root}/val or {root}/test folder: skipping evaluation")
        return None
    paths, names = scan_class_folders(split)
    index = {c: i for i, c in enumerate(head.classes)}
    labels = np.array([index.get(n, -1) for n in names], dtype=np.int64)
    loaded = LoadedModel(model, eval_transform(spec), spec, None, None)
    feats = model_features(paths, split, ModelOptions(batch_size=max(cfg.batch_size, 32), workers=cfg.workers),
                           loaded, description="eval features")
    if feats.failures:
        warn(f"{len(feats.failures)} val images skipped (first: {feats.failures[0][0]})")
    x = torch.from_numpy(feats.features[feats.ok]).to(device)
    y = torch.from_numpy(labels[feats.ok]).to(device)
    logits = head.logits(x)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == y[:, None]
    n = max(len(y), 1)
    return {"metric": "top1", "top1": 100.0 * float(hit[:, :1].any(1).sum()) / n,
            "top5": 100.0 * float(hit.any(1).sum()) / n, "images": len(y), "split": str(split)}
