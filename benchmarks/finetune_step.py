"""Training images/s of `finetune()` (logging, metrics, checkpoint each epoch) vs a bare loop.

Both use the same model, data loader, Partial FC loss, AdamW and OneCycle; the bare loop has no
logging, no NaN tracking, no checkpoints. Target: ratio ≥ 0.95. Runs on CPU by default.
Each side is timed as a whole call (build, train, and for finetune() its checkpoints and
export), in wall-clock and in process CPU seconds: on a shared machine the CPU-time ratio is
the stable one.

    python benchmarks/finetune_step.py [--width 128] [--depth 4] [--epochs 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("UNICOM_NO_PROGRESS", "1")

import torch  # noqa: E402

from unicom_cli.data.digits import write_digits_tree  # noqa: E402
from unicom_cli.train.loaders import make_loader  # noqa: E402
from unicom_cli.train.loop import FinetuneConfig, _train_spec, build_model, finetune  # noqa: E402
from unicom_cli.train.partial_fc import PartialFC  # noqa: E402


def bare(cfg: FinetuneConfig) -> int:
    """The same work with nothing around it; returns the number of images trained on."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    loader = make_loader(cfg, _train_spec(cfg), device)
    model, spec = build_model(cfg, device)
    pfc = PartialFC(spec.embedding_size, loader.num_classes, s=cfg.s, m2=cfg.m2, seed=cfg.seed)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": cfg.lr},
                             {"params": [pfc.weight], "lr": cfg.lr * cfg.lr_pfc_weight}], weight_decay=0)
    total = loader.steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr, cfg.lr * cfg.lr_pfc_weight],
                                                total_steps=total, pct_start=0.1)
    images, step = 0, 0
    for epoch in range(cfg.epochs):
        for x, y in loader.epoch(epoch, 0):
            loss = pfc(model(x), y, step=step)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            images += x.shape[0]
            step += 1
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = write_digits_tree(tmp / "digits", size=32)
        arch = tmp / "arch.json"
        arch.write_text(json.dumps({"input_size": 32, "patch_size": 8, "width": args.width,
                                    "depth": args.depth, "heads": 4, "embedding_size": 64}))
        ours, base = [], []
        for r in range(args.repeats):
            cfg = FinetuneConfig(arch=str(arch), dataset=f"folder:{tree.root}", output=tmp / f"run{r}",
                                 epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, device="cpu",
                                 augment=False, eval_every=0, workers=0, log_every=1)
            base.append(timed(bare, cfg))
            ours.append(timed(lambda c: finetune(c).steps * c.batch_size, cfg))
    for i, unit in ((0, "wall"), (1, "cpu")):
        b, o = max(r[i] for r in base), max(r[i] for r in ours)
        runs = lambda rs, i=i: ", ".join(f"{r[i]:.1f}" for r in rs)  # noqa: E731
        print(f"[{unit:4}] bare loop {b:7.1f} images/s (runs {runs(base)}); finetune() {o:7.1f} "
              f"(runs {runs(ours)}); ratio {o / b:.3f}")
    print("target: ratio >= 0.95 (finetune() logs every step and checkpoints each epoch)")


def timed(fn, cfg) -> tuple[float, float]:
    """(images per wall second, images per process-CPU second) of one whole call."""
    wall, cpu = time.perf_counter(), time.process_time()
    images = fn(cfg)
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


if __name__ == "__main__":
    main()
