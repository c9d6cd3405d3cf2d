"""Finetune checkpoints: atomic per-step folders (model, per-rank centre shards, optimiser, scaler,
scheduler, RNG states, loader position), resume, keep-last-K."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from unicom_cli import distributed as D
from unicom_cli.errors import InputError, UsageError
from unicom_cli.utils.console import info
from unicom_cli.utils.files import atomic_path


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` that leaves the old file or the new one at ``path``, never half of one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _checkpoints(output: Path) -> list[Path]:
    root = output / "checkpoints"
    done = [p for p in root.glob("step-*") if (p / "trainer.pt").is_file() and not p.name.endswith(".partial")]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _pfc_index(optimizer: torch.optim.Optimizer) -> int:
    return sum(len(g["params"]) for g in optimizer.param_groups) - 1


class TrainState:
    """The objects a step touches and what a checkpoint records about them."""

    def __init__(self, cfg, model, raw_model, spec, pfc, optimizer, scheduler, scaler, device):
        self.cfg, self.model, self.raw_model, self.spec, self.pfc = cfg, model, raw_model, spec, pfc
        self.optimizer, self.scheduler, self.scaler, self.device = optimizer, scheduler, scaler, device
        self.step = 0  # optimizer steps done
        self.epoch = 0  # current epoch
        self.step_in_epoch = 0  # optimizer steps done within it
        self.best: dict | None = None
        self.evals: list[dict] = []

    def save(self, keep: int) -> Path:
        """Write a checkpoint atomically: a ``.partial`` folder renamed once every rank is done."""
        root = self.cfg.output / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f"step-{self.step:08d}.partial"
        if D.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        D.barrier()
        optim_state = self.optimizer.state_dict()
        pfc_state = optim_state["state"].get(_pfc_index(self.optimizer))
        atomic_save({"centres": self.pfc.state_dict(), "optimizer_centres": pfc_state,
                      "rng": _rng_state(self.device)}, tmp / f"rank-{D.rank()}.pt")
        if D.is_main():
            atomic_save({
                "model": self.raw_model.state_dict(), "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "position": {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch},
                "world_size": D.world_size(), "best": json.dumps(self.best), "evals": json.dumps(self.evals),
                "spec": json.dumps(asdict(self.spec)), "config": json.dumps(jsonable(self.cfg)),
            }, tmp / "trainer.pt")
        D.barrier()
        if D.is_main():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in _checkpoints(self.cfg.output)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        return final

    def load(self, path: Path) -> None:
        """Restore everything ``save`` wrote (tensors only: weights_only loading)."""
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        if trainer["world_size"] != D.world_size():
            raise UsageError(f"{path}: written by {trainer['world_size']} processes (class centres are "
                             f"sharded per process); resume with the same number of processes")
        mine = torch.load(path / f"rank-{D.rank()}.pt", map_location="cpu", weights_only=True)
        self.raw_model.load_state_dict(trainer["model"])
        self.pfc.load_state_dict(mine["centres"])
        optim_state = trainer["optimizer"]
        index = _pfc_index(self.optimizer)
        optim_state["state"].pop(index, None)
        if mine["optimizer_centres"] is not None:
            optim_state["state"][index] = mine["optimizer_centres"]
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(trainer["scheduler"])
        if self.scaler and trainer["scaler"]:
            self.scaler.load_state_dict(trainer["scaler"])
        pos = trainer["position"]
        self.step, self.epoch, self.step_in_epoch = pos["step"], pos["epoch"], pos["step_in_epoch"]
        self.best, self.evals = json.loads(trainer["best"]), json.loads(trainer["evals"])
        _set_rng_state(mine["rng"], self.device)


def jsonable(cfg) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def resume_path(cfg) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = _checkpoints(cfg.output)
        if not found:
            info(f"--resume auto: no checkpoint under {cfg.output / 'checkpoints'}; starting fresh")
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not (path / "trainer.pt").is_file():
        raise InputError(f"--resume {path}: not a checkpoint folder (no trainer.pt); "
                         f"use a folder under <output>/checkpoints or --resume auto")
    return path
