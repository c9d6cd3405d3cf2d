"""The published finetuning recipes (SPEC §3) as plain data: FinetuneConfig field overrides."""

from __future__ import annotations

from unicom_cli.errors import UsageError

_RETRIEVAL = {"s": 32.0, "m1": 1.0, "m3": 0.0, "sample_rate": 1.0, "seed": 1024, "lr_pfc_weight": 10.0,
              "input_size": None, "init_from": None}
_CLASSIFY = {"task": "classify", "dataset": "folder:data/imagenet", "optimizer": "adamw", "weight_decay": 0.05,
             "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "output_dim": None, "num_feat": None,
             "init_from": None, "seed": 1024}

# name: (overrides, GPUs of the published run; the batch size is per GPU)
RECIPES: dict[str, tuple[dict, int]] = {
    "sop-vit-b32": ({**_RETRIEVAL, "arch": "ViT-B/32", "dataset": "sop", "batch_size": 64, "epochs": 64,
                     "lr": 1e-5, "m2": 0.25, "output_dim": 512, "num_feat": 512}, 1),
    "sop-vit-b16": ({**_RETRIEVAL, "arch": "ViT-B/16", "dataset": "sop", "batch_size": 64, "epochs": 64,
                     "lr": 1e-5, "m2": 0.25, "output_dim": 768, "num_feat": 512}, 1),
    "sop-vit-l14": ({**_RETRIEVAL, "arch": "ViT-L/14", "dataset": "sop", "batch_size": 16, "epochs": 64,
                     "lr": 1e-5, "m2": 0.3, "output_dim": 768, "num_feat": 512}, 4),
    "inshop-vit-b16": ({**_RETRIEVAL, "arch": "ViT-B/16", "dataset": "inshop", "batch_size": 16,
                        "epochs": 128, "lr": 1e-5, "m2": 0.25}, 4),
    "inshop-vit-l14": ({**_RETRIEVAL, "arch": "ViT-L/14", "dataset": "inshop", "batch_size": 16,
                        "epochs": 128, "lr": 1e-5, "m2": 0.25}, 4),
    "inat-vit-b16": ({**_RETRIEVAL, "arch": "ViT-B/16", "dataset": "inat", "batch_size": 128,
                      "epochs": 128, "lr": 4e-5, "m2": 0.35}, 8),
    "inat-vit-l14": ({**_RETRIEVAL, "arch": "ViT-L/14", "dataset": "inat", "batch_size": 64,
                      "epochs": 64, "lr": 1e-5, "m2": 0.35}, 8),
    # GLDv2-clean: ViT-L/14 from the 336 px checkpoint resampled to 512 px (SPEC §3).
    "gldv2-vit-l14": ({"arch": "ViT-L/14", "init_from": "ViT-L/14@336px", "dataset": "gldv2",
                       "input_size": 512, "batch_size": 16, "epochs": 16, "lr": 1e-4,
                       "lr_pfc_weight": 3.0, "m1": 1.0, "m2": 0.5, "m3": 0.0, "s": 32.0,
                       "sample_rate": 0.5, "output_dim": 768, "num_feat": None, "seed": 1024}, 8),
    # Same recipe for ViT-B/16 (the published UNICOM-ViT-B/16@512px), from its own 224 px file.
    "gldv2-vit-b16": ({"arch": "ViT-B/16", "init_from": None, "dataset": "gldv2", "input_size": 512,
                       "batch_size": 16, "epochs": 16, "lr": 1e-4, "lr_pfc_weight": 3.0, "m1": 1.0,
                       "m2": 0.5, "m3": 0.0, "s": 32.0, "sample_rate": 0.5, "output_dim": 768,
                       "num_feat": None, "seed": 1024}, 8),
    # ImageNet-1k classification at higher resolution (the UNICOM README's 83.6 / 85.9 / 88.3 top-1).
    # The paper and README give no hyperparameters: these are OURS, the usual full-finetuning recipe
    # for CLIP-initialised ViTs (AdamW, layer-wise lr decay, label smoothing, Mixup 0.8 / CutMix
    # 1.0, cosine schedule with warm-up), global batch 1,024 on 8 GPUs. Untested at this scale.
    "imagenet-vit-b32-384": ({**_CLASSIFY, "arch": "ViT-B/32", "input_size": 384, "batch_size": 128,
                              "grad_accum": 1, "epochs": 50, "lr": 3e-4, "layer_decay": 0.6,
                              "drop_path": 0.1}, 8),
    "imagenet-vit-b16-384": ({**_CLASSIFY, "arch": "ViT-B/16", "input_size": 384, "batch_size": 64,
                              "grad_accum": 2, "epochs": 50, "lr": 3e-4, "layer_decay": 0.6,
                              "drop_path": 0.1}, 8),
    "imagenet-vit-l14-518": ({**_CLASSIFY, "arch": "ViT-L/14", "input_size": 518, "batch_size": 16,
                              "grad_accum": 8, "epochs": 30, "lr": 1.5e-4, "layer_decay": 0.65,
                              "drop_path": 0.2}, 8),
}

_SLUG = {"ViT-B/32": "vit-b32", "ViT-B/16": "vit-b16", "ViT-L/14": "vit-l14"}


def recipe_for(name: str | None, arch: str | None, dataset: str | None) -> tuple[str | None, dict, int]:
    """The recipe named, else the published one for (dataset, arch) if any: (name, overrides, GPUs).

    With neither a recipe nor a dataset, the GLDv2 recipe for ``arch`` (default ViT-L/14) applies,
    as the reference script's defaults do.
    """
    if name:
        if name not in RECIPES:
            raise UsageError(f"--recipe {name}: unknown; choose one of {', '.join(RECIPES)}")
        overrides, gpus = RECIPES[name]
        return name, dict(overrides), gpus
    guess = f"{dataset or 'gldv2'}-{_SLUG.get(arch or 'ViT-L/14', '')}"
    if guess in RECIPES:
        overrides, gpus = RECIPES[guess]
        return guess, dict(overrides), gpus
    return None, {}, 1
