"""Load on `unicom serve`: N concurrent clients, micro-batching on against off, in one run.

    python benchmarks/serve_load.py                      # tiny model, N = 1, 8, 32, 10 s each
    python benchmarks/serve_load.py --models tiny ViT-B/32 --seconds 20
    python benchmarks/serve_load.py --clients 1 4 --device cuda

For each model, two real servers are started as subprocesses on loopback, ``--max-batch 32``
(micro-batching on) and ``--max-batch 1`` (off); at each N they are measured one after the other:
N asyncio clients POST images (multipart) for a fixed time. Reported: requests/s, p50/p99
latency, errors (anything but 200), the server's RSS after a warm-up and at the end (it must not
grow with the number of requests), and the throughput ratio batching on / off at each N.
ViT-B/32 runs with random weights saved to a file (no download here): the cost of a forward
pass does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "input_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2,
        "embedding_size": 16}
WARMUP_REQUESTS = 20


def make_images(folder: Path, n: int) -> list[bytes]:
    """``n`` photo crops (scikit-image samples, 256 px JPEGs) on disk; returns a few as query bytes."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(0)
    queries = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = Image.fromarray(photo[top:top + side, left:left + side]).resize((256, 256))
        img.save(folder / f"{i:05d}.jpg", quality=90)
        if i < 16:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            queries.append(buf.getvalue())
    return queries


def model_args(name: str, work: Path) -> list[str]:
    """CLI model options: the tiny JSON model or ViT-B/32, each with weights saved to a file."""
    import torch

    sys.path.insert(0, str(ROOT))
    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    if name == "tiny":
        spec_file = work / "tiny.json"
        spec_file.write_text(json.dumps(TINY))
        model = str(spec_file)
    else:
        model = "ViT-B/32"
    weights = work / f"{name.replace('/', '-')}.pt"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(build_model(get_spec(model)).state_dict(), weights)
    return ["--model", model, "--weights", str(weights)]


def build_index(images: Path, out: Path, models: list[str], device: str) -> None:
    """`unicom embed` the images, then a flat index over them (the service's cost is the query
    embedding; search over a few hundred rows is negligible)."""
    if out.exists():
        return
    from unicom_cli.index import build_index as build

    feats = out.with_name(out.stem + "-feats.npy")
    subprocess.run([sys.executable, "-m", "unicom_cli", "embed", str(images), "-o", str(feats),
                    "--device", device, "--overwrite", *models], check=True, env=_env(),
                   stdout=subprocess.DEVNULL)
    build(feats, out, index="flat", progress=False)


def _env() -> dict:
    env = dict(os.environ, UNICOM_NO_PROGRESS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def start_server(index: Path, weights: str, device: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    """`unicom serve` on a free loopback port; returns the process and its base URL."""
    cmd = [sys.executable, "-m", "unicom_cli", "serve", str(index), "--port", "0", "--device", device,
           "--max-batch", str(max_batch), "--queue-size", "256", "--weights", weights]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env())
    printed = []
    for line in proc.stderr:
        printed.append(line)
        match = re.search(r"serving (http://\S+?)/", line)
        if match:
            # Keep draining the access log so the server never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, match.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()}):\n{''.join(printed[-5:])}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, queries: list[bytes], clients: int, seconds: float, k: int) -> dict:
    """``clients`` loops posting queries until ``seconds`` pass; latencies of the 200s, errors."""
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            i = n
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    r = await _post(http, queries[i % len(queries)], k)
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
                i += clients

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "errors": errors}


def run_model(name: str, work: Path, images: Path, queries: list[bytes], args) -> list[dict]:
    """Both servers (batching on and off) run side by side and are measured alternately at each
    N, so that a change in the machine's load hits both settings alike."""
    models = model_args(name, work)
    index = work / f"{name.replace('/', '-')}.index"
    build_index(images, index, models, args.device)
    servers = {"on": start_server(index, models[-1], args.device, 32),
               "off": start_server(index, models[-1], args.device, 1)}
    rows = []
    try:
        rss_start = {}
        for setting, (proc, url) in servers.items():
            asyncio.run(_warm(url, queries, args.k, max(args.clients)))
            rss_start[setting] = rss_mb(proc.pid)
        for clients in args.clients * args.rounds:
            for setting, (proc, url) in servers.items():
                result = asyncio.run(load(url, queries, clients, args.seconds, args.k))
                rows.append({"model": name, "batching": setting, "clients": clients, **result,
                             "rss_start_mb": rss_start[setting], "rss_end_mb": rss_mb(proc.pid)})
                _print_row(rows[-1])
    finally:
        for setting, (proc, _) in servers.items():
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            if code != 0:
                print(f"  server ({setting}) exit code {code} after SIGTERM (expected 0)")
    return rows


async def _warm(url: str, queries: list[bytes], k: int, clients: int) -> None:
    """Requests one at a time, then ``clients`` at once: the largest batch has been through
    the model (and its memory allocated) before the starting RSS is read."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for i in range(WARMUP_REQUESTS):
            await _post(http, queries[i % len(queries)], k)
        await asyncio.gather(*(_post(http, queries[i % len(queries)], k) for i in range(clients)))


async def _post(http, query: bytes, k: int):
    return await http.post(f"/search?k={k}", files={"image": ("q.jpg", query, "image/jpeg")})


def _print_row(r: dict) -> None:
    print(f"{r['model']:>9} batching {r['batching']:>3}  N={r['clients']:>3}  {r['rps']:8.1f} req/s  "
          f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  "
          f"RSS {r['rss_start_mb']:.0f} -> {r['rss_end_mb']:.0f} MB  ({r['requests']} requests)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="per (model, setting, N)")
    parser.add_argument("--images", type=int, default=500, help="indexed images")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep over N (RSS over time)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "ViT-B/32"],
                        help="ViT-B/32 runs with random weights")
    parser.add_argument("--work", type=Path, default=None, help="keep images and indexes here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="serve_load_"))
    images = work / "images"
    queries = make_images(images, args.images) if not images.exists() else _queries(images)
    rows = []
    for name in args.models:
        rows += run_model(name, work, images, queries, args)
    print("\nthroughput, micro-batching on / off (same run):")
    for name in dict.fromkeys(r["model"] for r in rows):
        for clients in args.clients:
            on = _mean_rps(rows, name, "on", clients)
            off = _mean_rps(rows, name, "off", clients)
            print(f"  {name:>9} N={clients:>3}: {on / off:.2f}x ({on:.1f} vs {off:.1f} req/s)")
    errors = sum(r["errors"] for r in rows)
    print(f"errors in total: {errors}")


def _mean_rps(rows: list[dict], name: str, setting: str, clients: int) -> float:
    found = [r["rps"] for r in rows if (r["model"], r["batching"], r["clients"]) == (name, setting, clients)]
    return sum(found) / len(found)


def _queries(images: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(images.glob("*.jpg"))[:16]]


if __name__ == "__main__":
    main()
