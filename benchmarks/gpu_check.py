"""What only a GPU can show, in one table: embed rates, GPU search parity, finetune steps, DALI, NCCL.

    python benchmarks/gpu_check.py                 # one CUDA GPU, no network (random weights); < 8 min on an H100
    python benchmarks/gpu_check.py --cpu-smoke     # every step on the CPU with a tiny model: checks the script

Rows, all measured in this run on one GPU:

* ``embed --gpus 1`` (one process on the GPU) with ViT-B/32 and ViT-L/14 (random weights) from a
  folder and from the same images as WebDataset tar shards, into ``-o feats/``: images/s, against
  the network alone (forward of ready uint8 batches) as the ceiling; fp16 rows and fp32 rows,
  with the smallest cosine between a row embedded in fp16 and in fp32;
* eval-retrieval's exact search (``eval.search.search``) on CUDA (torch, and faiss-gpu when
  installed) against the CPU (faiss) on the same vectors: neighbours must be identical;
* 20 ``finetune`` steps of ViT-B/32 on a folder data set: samples/s, and the loss must fall;
* the DALI RecordIO loader on the GPU, when DALI is installed: images/s;
* a 1-process NCCL group: an all-reduce gives the expected sum.

Prints "no CUDA device" and exits 2 where there is no GPU; exits 1 if any check fails, and
lists what it could not run (SKIP rows) with the reason.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_shards import TINY, make_images, write_inputs  # noqa: E402


@dataclass
class Row:
    check: str
    status: str  # ok | FAIL | SKIP
    result: str
    detail: str = ""


@dataclass
class Plan:
    """Sizes of the run: the real one on a GPU, a tiny one for --cpu-smoke."""

    device: str
    models: list[str]
    precisions: list[str]
    images: int
    shards: int
    batch: int
    finetune_model: str
    finetune_batch: int
    search_rows: int


def plan_for(smoke: bool, tmp: Path) -> Plan:
    if smoke:
        spec = tmp / "tiny.json"
        spec.write_text(json.dumps(TINY))
        return Plan("cpu", [str(spec)], ["fp32", "bf16"], 64, 4, 16, str(spec), 8, 2000)
    return Plan("cuda", ["ViT-B/32", "ViT-L/14"], ["fp16", "fp32"], 2048, 8, 128, "ViT-B/32", 64, 100_000)


def network_alone(model: str, precision: str, plan: Plan) -> float:
    """Images/s of the forward pass alone on ready uint8 batches (the ceiling of embed)."""
    import torch

    from unicom_cli.models.factory import create_model
    from unicom_cli.models.forward import PixelForward

    loaded = create_model(model, pretrained=False, device=plan.device, precision=precision)
    forward = PixelForward(loaded)
    size = loaded.spec.input_size
    pixels = torch.randint(0, 256, (plan.batch, 3, size, size), dtype=torch.uint8)
    if plan.device == "cuda":
        pixels = pixels.pin_memory()
    loaded.model.eval()
    with torch.inference_mode():
        for _ in range(3):
            forward(pixels)
        rounds = 10 if plan.device == "cuda" else 2
        start = time.perf_counter()
        for _ in range(rounds):
            forward(pixels)
        if plan.device == "cuda":
            torch.cuda.synchronize()
    return rounds * plan.batch / (time.perf_counter() - start)


def embed_rate(source: Path, out: Path, model: str, precision: str, plan: Plan) -> float:
    from unicom_cli.pipelines.embed import EmbedConfig, embed_images

    summary = embed_images(EmbedConfig(input=source, output=out, model=model, pretrained=False,
                                       batch_size=plan.batch, device=plan.device, precision=precision,
                                       progress=False, sharded=True, shard_size=plan.images // plan.shards))
    if summary.count != plan.images or summary.failures:
        raise RuntimeError(f"embedded {summary.count} of {plan.images} images, {len(summary.failures)} failures")
    return summary.images_per_s


def rows_of(folder: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = {}
    for shard in manifest["shards"]:
        ids = (folder / shard["ids"]).read_text().splitlines()
        rows.update(zip(ids, np.load(folder / shard["features"]).astype(np.float64)))
    return rows


def check_embed(plan: Plan, tmp: Path, folder: Path, tars: Path, rows: list[Row]) -> None:
    for model in plan.models:
        name = Path(model).stem if model.endswith(".json") else model
        for precision in plan.precisions:
            ceiling = network_alone(model, precision, plan)
            rates = {}
            for label, source in (("folder", folder), ("tar", tars)):
                rates[label] = embed_rate(source, tmp / f"e-{name.replace('/', '')}-{precision}-{label}", model,
                                          precision, plan)
            rows.append(Row(f"embed {name} {precision}", "ok",
                            f"folder {rates['folder']:,.0f} img/s, tar {rates['tar']:,.0f} img/s",
                            f"network alone {ceiling:,.0f} img/s (tar at {rates['tar'] / ceiling:.0%})"))
        low, high = (tmp / f"e-{name.replace('/', '')}-{p}-tar" for p in plan.precisions)
        a, b = rows_of(low), rows_of(high)
        cos = min(float(a[k] @ b[k] / (np.linalg.norm(a[k]) * np.linalg.norm(b[k]))) for k in a)
        status = "ok" if cos > 0.99 else "FAIL"
        rows.append(Row(f"embed {name} {plan.precisions[0]} vs {plan.precisions[1]}", status,
                        f"min cosine {cos:.5f}", "same images, same random weights"))


def check_search(plan: Plan, rows: list[Row]) -> None:
    from unicom_cli.eval.search import search

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 512)).astype(np.float32)
    x = centres[rng.integers(0, 200, plan.search_rows)] + 0.5 * rng.standard_normal((plan.search_rows, 512),
                                                                                      dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:1000]
    start = time.perf_counter()
    cpu = search(q, x, 10, exclude_self=True, backend="faiss", device="cpu", precision="fp32")
    cpu_s = time.perf_counter() - start
    import faiss

    backends = [("torch", "torch")] + ([("faiss-gpu", "faiss")] if hasattr(faiss, "StandardGpuResources") else [])
    for label, backend in backends:
        device = plan.device
        start = time.perf_counter()
        got = search(q, x, 10, exclude_self=True, backend=backend, device=device, precision="fp32")
        seconds = time.perf_counter() - start
        same = np.array_equal(got.indices, cpu.indices)
        rows.append(Row(f"search {label} on {device}", "ok" if same else "FAIL",
                        f"{'identical' if same else 'DIFFERENT'} neighbours vs CPU faiss",
                        f"1,000 x {len(x):,} x 512, top-10: {seconds:.2f} s vs CPU {cpu_s:.2f} s"))
    if len(backends) == 1:
        rows.append(Row("search faiss-gpu", "SKIP", "faiss has no GPU support here (faiss-cpu installed)"))


def check_finetune(plan: Plan, tmp: Path, rows: list[Row]) -> None:
    """20 steps on a folder data set of the generated photos (8 classes by photo and flip)."""
    from PIL import Image

    from unicom_cli.train.loop import FinetuneConfig, finetune

    data = tmp / "ft"
    images = make_images(plan.finetune_batch * 8)
    for i, jpeg in enumerate(images):
        folder = data / "train" / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(jpeg)
    Image.open(folder / f"{i:05d}.jpg").verify()
    summary = finetune(FinetuneConfig(arch=plan.finetune_model, dataset=f"folder:{data}", output=tmp / "ft-run",
                                      pretrained=False, epochs=100, max_steps=20, batch_size=plan.finetune_batch,
                                      lr=1e-4, device=plan.device, eval_every=0, log_every=1, augment=False))
    losses = [json.loads(line)["loss"] for line in (tmp / "ft-run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    falls = len(losses) >= 2 and np.mean(losses[-5:]) < np.mean(losses[:5])
    rows.append(Row(f"finetune {Path(plan.finetune_model).stem} 20 steps", "ok" if falls and summary.steps == 20
                    else "FAIL", f"{summary.images_per_s:,.0f} samples/s",
                    f"loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f} (first/last 5 steps), "
                    f"{summary.steps} steps"))


def check_dali(plan: Plan, tmp: Path, rows: list[Row]) -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        rows.append(Row("DALI RecordIO", "SKIP", "DALI is not installed (pip install -e '.[dali]')"))
        return
    import torch

    from unicom_cli.data.dali import RecordLoader
    from unicom_cli.data.recordio import RecordWriter
    from unicom_cli.models.registry import CLIP_MEAN, CLIP_STD

    rec = tmp / "train.rec"
    lines = []
    with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
        for i, jpeg in enumerate(make_images(plan.images)):
            writer.write(i, float(i % 8), jpeg)
            lines.append(f"{i}\t{i % 8}\t{i}.jpg\n")
    rec.with_suffix(".lst").write_text("".join(lines))  # what prepare-gldv2 writes beside the .rec
    loader = RecordLoader(rec, batch_size=plan.batch, input_size=224, mean=CLIP_MEAN, std=CLIP_STD,
                          device=torch.device(plan.device), shuffle_fill=256)
    start, seen = time.perf_counter(), 0
    for images, _ in loader.epoch(0, 0):
        seen += len(images)
    if plan.device == "cuda":
        torch.cuda.synchronize()
    rows.append(Row("DALI RecordIO loader", "ok", f"{seen / (time.perf_counter() - start):,.0f} img/s",
                    f"{seen:,} images, 224 px, on {plan.device}"))


def check_group(plan: Plan, rows: list[Row]) -> None:
    import torch
    import torch.distributed as dist

    backend = "nccl" if plan.device == "cuda" else "gloo"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        value = torch.full((4,), 3.0, device=plan.device)
        dist.all_reduce(value)
        ok = bool((value == 3.0).all())
    finally:
        dist.destroy_process_group()
    rows.append(Row(f"1-process {backend.upper()} group", "ok" if ok else "FAIL", "all-reduce correct" if ok
                    else f"all-reduce gave {value.tolist()}"))


def run_checks(plan: Plan, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    folder, tars = write_inputs(make_images(plan.images), tmp / "inputs", plan.shards)
    steps = [("embed", lambda: check_embed(plan, tmp, folder, tars, rows)),
             ("search", lambda: check_search(plan, rows)),
             ("finetune", lambda: check_finetune(plan, tmp, rows)),
             ("DALI", lambda: check_dali(plan, tmp, rows)),
             ("process group", lambda: check_group(plan, rows))]
    for name, step in steps:
        start = time.perf_counter()
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - a failed check is a row of the table, the others still run
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            rows.append(Row(name, "FAIL", "raised", detail[:300]))
        print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return rows


def print_table(rows: list[Row], title: str) -> None:
    print(title)
    width = max(len(r.check) for r in rows)
    for r in rows:
        print(f"{r.check:<{width}}  {r.status:<4}  {r.result}" + (f"  ({r.detail})" if r.detail else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run every step on the CPU with a tiny model")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (this script needs one GPU; --cpu-smoke runs its steps on the CPU)")
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_for(args.cpu_smoke, Path(tmp))
        rows = run_checks(plan, Path(tmp))
    where = "CPU smoke run (tiny model)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    print_table(rows, f"gpu_check on {where}: {time.perf_counter() - start:.0f} s, torch {torch.__version__}")
    skipped = [r.check for r in rows if r.status == "SKIP"]
    if skipped:
        print(f"could not run: {', '.join(skipped)}")
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
