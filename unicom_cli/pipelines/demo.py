"""The offline demo: real digits → zero-shot eval → finetune → eval again → embed → visualise
→ index the embedded digits → search them.

Every step runs as the exact `unicom …` command a user would type (a subprocess of this
Python), so the demo doubles as a tour of the CLI and exercises the multi-process path too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from unicom_cli.errors import InputError, UnicomError, UsageError

# A small UNICOM ViT that trains in minutes on two CPU cores.
DEMO_ARCH = {"name": "demo-vit", "input_size": 32, "patch_size": 8, "width": 64, "depth": 2,
             "heads": 4, "embedding_size": 64}


@dataclass
class DemoConfig:
    """What the demo writes and how long it trains."""

    output: Path = Path("unicom-demo")
    procs: int | None = None  # run every step on N CPU processes (gloo)
    epochs: int = 3  # measured: Recall@1 on 5-9 peaks near epoch 3, then the model overfits 0-4
    batch_size: int = 64  # finetuning images per batch, per process
    limit_per_class: int | None = None  # fewer digits, for a quick test
    seed: int = 0


@dataclass
class DemoStep:
    """One command of the demo and what it took."""

    title: str
    argv: list[str]
    seconds: float = 0.0


@dataclass
class DemoResult:
    output: Path
    before: dict = field(default_factory=dict)  # metric name → value, freshly initialised model
    after: dict = field(default_factory=dict)  # same metrics after finetuning
    steps: list[DemoStep] = field(default_factory=list)
    visualisation: Path | None = None
    written: list[Path] = field(default_factory=list)  # the demo's main outputs, for `wrote` lines


def _launch(cfg: DemoConfig) -> list[str]:
    return ["--procs", str(cfg.procs)] if cfg.procs and cfg.procs > 1 else []


def _write_inputs(cfg: DemoConfig) -> tuple[Path, Path]:
    """Digits tree and architecture JSON (eval and finetune start from the same seeded init)."""
    from unicom_cli.data.digits import write_digits_tree

    tree = write_digits_tree(cfg.output / "digits", size=32, shift=3, noise=0.6, seed=cfg.seed,
                             limit_per_class=cfg.limit_per_class)
    arch = cfg.output / "demo-vit.json"
    arch.write_text(json.dumps(DEMO_ARCH, indent=2))
    return tree.root, arch


def search_queries(digits: Path) -> list[Path]:
    """The first test image of each unseen class: queries that are themselves in the index
    (none before the digits are written, so that a plan can be made and read on its own)."""
    test = digits / "test"
    if not test.is_dir():
        return []
    return [min(folder.glob("*.png")) for folder in sorted(test.iterdir())
            if folder.is_dir() and any(folder.glob("*.png"))]


def plan(cfg: DemoConfig, digits: Path, arch: Path) -> list[DemoStep]:
    """The commands, in order; the paths are relative to the demo folder's parent when possible."""
    out, launch = cfg.output, _launch(cfg)
    run, model = out / "finetune", out / "finetune" / "model.pt"
    features, index = out / "features" / "test.npy", out / "digits.index"

    # Before finetuning: the network finetune starts from, a random init asked for explicitly.
    fresh = ["--random-init", "--seed", str(cfg.seed)]

    def evaluate(tag: str, weights: list[str]) -> list[DemoStep]:
        return [
            DemoStep(f"zero-shot retrieval on unseen digits 5-9 ({tag})",
                     ["eval-retrieval", "--model", str(arch), *weights,
                      "--dataset", f"folder:{digits / 'test'}", "--recall-at", "1,2,4,8",
                      "--json", str(out / f"retrieval-{tag}.json"), "--overwrite", *launch]),
            DemoStep(f"kNN classification of digits 5-9 ({tag})",
                     ["eval-knn", "--model", str(arch), *weights,
                      "--train-dataset", str(digits / "knn" / "train"),
                      "--val-dataset", str(digits / "knn" / "val"), "--nb-knn", "10,20",
                      "--json", str(out / f"knn-{tag}.json"), "--overwrite", *launch]),
        ]

    return [
        *evaluate("before", fresh),
        DemoStep("finetune on digits 0-4 (Partial FC + ArcFace)",
                 ["finetune", "--model", str(arch), *fresh,
                  "--dataset", f"folder:{digits}", "--epochs", str(cfg.epochs),
                  "--batch-size", str(cfg.batch_size), "--lr", "1e-3", "--lr-pfc-weight", "10",
                  "--m2", "0.3", "--no-augment", "--drop-path", "0", "--eval-every", str(cfg.epochs),
                  "--device", "cpu", "--output", str(run), *launch]),
        *evaluate("after", ["--weights", str(model)]),
        DemoStep("embed the test digits with the finetuned model",
                 ["embed", str(digits / "test"), "-o", str(features),
                  "--model", str(arch), "--weights", str(model), "--normalize", "--overwrite",
                  *launch]),
        DemoStep("retrieval from the saved features, with a picture of the results",
                 ["eval-retrieval", "--embeddings", str(features),
                  "--dataset", f"folder:{digits / 'test'}", "--vis", str(out / "retrieval.jpg"), "--overwrite"]),
        DemoStep("index the embedded test digits for search",
                 ["index", str(features), "-o", str(index), "--overwrite"]),
        DemoStep("search the index with one digit of each class",
                 ["search", str(index), *map(str, search_queries(digits)), "-k", "5",
                  "-o", str(out / "search.csv"), "--vis", str(out / "search.html"), "--overwrite"]),
    ]


def _metrics(out: Path, tag: str) -> dict:
    values = {}
    retrieval = json.loads((out / f"retrieval-{tag}.json").read_text())["metrics"]
    for key in ("recall@1", "recall@2", "recall@4", "recall@8"):
        if key in retrieval:
            values[key.replace("recall", "Recall")] = retrieval[key]
    knn = json.loads((out / f"knn-{tag}.json").read_text())["metrics"]
    for k, entry in knn.items():
        values[f"kNN k={k} top-1"] = entry["top1"]
    return values


def run_demo(cfg: DemoConfig, announce: Callable[[DemoStep, int, int], None]) -> DemoResult:
    """Run every step; ``announce`` shows each command before it runs. Stops at the first failure."""
    if cfg.output.exists() and not cfg.output.is_dir():
        raise UsageError(f"-o {cfg.output}: is a file; give a folder for the demo's outputs")
    try:
        (cfg.output / "features").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{cfg.output}: cannot create the output folder ({exc.strerror}); "
                         "choose another -o") from exc
    digits, arch = _write_inputs(cfg)
    result = DemoResult(cfg.output)
    result.steps = plan(cfg, digits, arch)
    for number, step in enumerate(result.steps, 1):
        announce(step, number, len(result.steps))
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "unicom_cli", *step.argv])
        step.seconds = time.perf_counter() - start
        if code != 0:
            raise UnicomError(f"demo step {number} failed (exit {code}): unicom {' '.join(step.argv)}")
    result.before = _metrics(cfg.output, "before")
    result.after = _metrics(cfg.output, "after")
    result.visualisation = cfg.output / "retrieval.jpg"
    result.written = [result.visualisation, cfg.output / "digits.index",
                      cfg.output / "search.csv", cfg.output / "search.html"]
    return result
