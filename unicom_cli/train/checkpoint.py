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
from unicom_cli.utils.console import info, warn
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


class BadCheckpoint(InputError):
    """A checkpoint file that is missing, truncated, corrupt or holds pickled code."""


def _read(path: Path) -> dict:
    """``torch.load`` of one checkpoint file (tensors only) with every failure naming the file."""
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadCheckpoint(f"{path}: missing (an incomplete checkpoint folder)") from None
    except pickle.UnpicklingError as exc:
        raise BadCheckpoint(f"{path}: not a finetune checkpoint: it holds pickled objects, which "
                            f"are never loaded ({str(exc).splitlines()[0][:120]})") from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise BadCheckpoint(f"{path}: unreadable checkpoint (empty, truncated or corrupt: "
                            f"{detail})") from None


# Settings a resumed run must share with the checkpoint: they decide the step count, the batches
# and the shapes. The others (lr, eval, workers...) may change.
_RESUME_KEYS = ("arch", "dataset", "batch_size", "grad_accum", "epochs", "output_dim",
                "input_size", "num_feat", "seed")


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
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
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

    def read(self, path: Path) -> tuple[dict, dict]:
        """Both files of a checkpoint; BadCheckpoint (naming the file) if either is unusable."""
        trainer, mine = _read(path / "trainer.pt"), _read(path / f"rank-{D.rank()}.pt")
        for name, data, keys in (("trainer.pt", trainer, ("model", "optimizer", "scheduler", "position")),
                                 (f"rank-{D.rank()}.pt", mine, ("centres", "rng"))):
            if not isinstance(data, dict) or any(k not in data for k in keys):
                raise BadCheckpoint(f"{path / name}: not a finetune checkpoint (keys missing)")
        return trainer, mine

    def check_compatible(self, path: Path, trainer: dict, mine: dict) -> None:
        """Refuse, naming what changed, a checkpoint this run cannot continue."""
        if trainer.get("world_size") != D.world_size():
            raise UsageError(f"{path}: written by {trainer.get('world_size')} processes (class centres are "
                             f"sharded per process); resume with the same number of processes")
        theirs = mine["centres"].get("weight")
        if theirs is not None and tuple(theirs.shape) != tuple(self.pfc.weight.shape):
            raise UsageError(f"{path}: its class centres are {tuple(theirs.shape)} but this data set "
                             f"needs {tuple(self.pfc.weight.shape)} (classes x dims per process): it "
                             "was trained on another data set; start a new --output")
        try:
            recorded = json.loads(trainer.get("config", "{}"))
        except ValueError:
            recorded = {}
        now = jsonable(self.cfg)
        diffs = [f"--{k.replace('_', '-')} was {recorded[k]}, now {now[k]}" for k in _RESUME_KEYS
                 if k in recorded and recorded[k] != now.get(k)]
        if diffs:
            extend = (" A finished run cannot be extended (its OneCycle schedule has ended): "
                      f"start a new --output with --weights {self.cfg.output / 'model.pt'}"
                      if any(d.startswith("--epochs") for d in diffs) else "")
            raise UsageError(f"--resume {path}: other settings than the checkpoint's ("
                             f"{'; '.join(diffs)}); resume with the same ones, or start a new "
                             f"--output.{extend}")

    def load(self, path: Path, files: tuple[dict, dict] | None = None) -> None:
        """Restore everything ``save`` wrote (tensors only: weights_only loading)."""
        trainer, mine = files if files is not None else self.read(path)
        self.check_compatible(path, trainer, mine)
        self.raw_model.load_state_dict(trainer["model"])
        self.pfc.load_state_dict(mine["centres"])
        optim_state = trainer["optimizer"]
        index = _pfc_index(self.optimizer)
        optim_state["state"].pop(index, None)
        if mine["optimizer_centres"] is not None:
            optim_state["state"][index] = mine["optimizer_centres"]
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(trainer["scheduler"])
        if self.scaler.is_enabled() and trainer["scaler"]:
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


def resume(t: TrainState, cfg) -> Path | None:
    """Load the checkpoint ``--resume`` names. With ``auto``, a checkpoint whose files are bad
    (a kill during a copy, a full disk) is reported and the newest good one before it is used."""
    path = resume_path(cfg)
    if path is None:
        return None
    candidates = [path] if cfg.resume != "auto" else _checkpoints(cfg.output)[::-1]
    for n, candidate in enumerate(candidates):
        try:
            files = t.read(candidate)
        except BadCheckpoint as exc:
            if cfg.resume != "auto" or n == len(candidates) - 1:
                raise
            warn(f"{exc}; falling back to {candidates[n + 1].name}")
            continue
        t.load(candidate, files)
        return candidate
    return None  # pragma: no cover - the loop returns or raises
