"""The finetune options checked before any work: values that would crash deep inside training,
or train silently to nothing (a logit scale of 0 gives a constant loss)."""

from __future__ import annotations

import math

from unicom_cli.errors import UsageError


def validate_config(cfg) -> None:
    """Values that would crash deep inside training, or train silently to nothing: refused first."""
    if cfg.optimizer not in ("adamw", "sgd"):
        raise UsageError(f"--optimizer {cfg.optimizer}: choose adamw or sgd")
    if cfg.grad_accum < 1:
        raise UsageError("--grad-accum must be at least 1")
    if cfg.task not in ("retrieval", "classify"):
        raise UsageError(f"--task {cfg.task}: choose retrieval or classify")
    if cfg.task == "classify":
        from unicom_cli.train.heads import check_classify

        check_classify(cfg)
    for flag, value in {"--lr": cfg.lr, "--lr-pfc-weight": cfg.lr_pfc_weight}.items():
        if not math.isfinite(value) or value < 0:  # 0 is allowed: a run that only measures
            raise UsageError(f"{flag} {value}: must be a finite number, 0 or more")
    if not (math.isfinite(cfg.sample_rate) and 0 < cfg.sample_rate <= 1):
        raise UsageError(f"--sample-rate {cfg.sample_rate}: must be in (0, 1] (the share of "
                         "negative class centres used per step)")
    if not (math.isfinite(cfg.s) and cfg.s > 0):  # s * cos = 0: every class equally likely, forever
        raise UsageError(f"-s/--scale {cfg.s}: the logit scale must be a finite number above 0 "
                         "(range (0, inf); the recipes use 32)")
    _check_rates(cfg)
    if cfg.num_feat is not None and cfg.num_feat < 1:
        raise UsageError(f"--num-feat {cfg.num_feat}: must be at least 1")
    if cfg.output.exists() and not cfg.output.is_dir():
        raise UsageError(f"--output {cfg.output}: is a file; give the run folder")


def _check_rates(cfg) -> None:
    if not (math.isfinite(cfg.drop_path) and 0 <= cfg.drop_path < 1):
        raise UsageError(f"--drop-path {cfg.drop_path}: must be in [0, 1)")
    if not 0 < cfg.layer_decay <= 1:  # both tasks: Partial FC too
        raise UsageError(f"--layer-decay {cfg.layer_decay}: must be in (0, 1]")
