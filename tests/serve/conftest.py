"""A small collection, its `unicom embed` features and `unicom index` folder, and a real
`unicom serve` process on loopback over them (one per test module: the model loads once)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, write_tiny_checkpoint

TOKEN = "s3cret-token"
MAX_UPLOAD = 1_000_000  # bytes: small, so the 413 tests send little


@dataclass
class Collection:
    images: Path  # the indexed folder
    feats: np.ndarray  # `unicom embed` rows, un-normalised, in ids order
    ids: list[str]
    index: Path
    spec: Path
    weights: Path | None  # None: the index's model is randomly initialised (--random-init)


def _photos(folder: Path) -> None:
    """~30 real photos: scikit-image samples, their crops and mirror images, odd names, a sub-folder."""
    from PIL import Image
    from skimage import data

    folder.mkdir()
    (folder / "more").mkdir()
    photos = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
              "rocket": data.rocket(), "hubble": data.hubble_deep_field(), "retina": data.retina(),
              "ihc": data.immunohistochemistry(), "camera": data.camera(), "coins": data.coins(),
              "moon": data.moon(), "page": data.page()}
    for name, arr in photos.items():
        img = Image.fromarray(arr).convert("RGB")
        img.reduce(2).save(folder / f"{name}.jpg", quality=90)
        w, h = img.size
        img.crop((w // 4, h // 4, w, h)).reduce(2).save(folder / "more" / f"{name} crop.jpg", quality=90)
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).reduce(3).save(folder / "more" / f"{name}-mirror.png")
    rgba = Image.fromarray(photos["coffee"]).convert("RGBA").reduce(4)
    rgba.putalpha(128)
    rgba.save(folder / "more" / "coffee #1 (alpha) é.png")


def _tiny_weights(folder: Path) -> tuple[Path, Path]:
    """The tiny architecture file and a checkpoint in the published format."""
    spec = folder / "tiny.json"
    spec.write_text(json.dumps(TINY))
    return spec, write_tiny_checkpoint(spec, folder / "FP16-tiny.pt")


@pytest.fixture(scope="package")
def collection(tmp_path_factory) -> Collection:
    """Photos → `unicom embed` → a flat index (exact search, so results can be checked)."""
    import torch

    from unicom_cli.cli.app import main
    from unicom_cli.index import build_index

    root = tmp_path_factory.mktemp("serve")
    _photos(root / "photos")
    spec, weights = _tiny_weights(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["embed", str(root / "photos"), "-o", str(root / "feats.npy"), "--model", str(spec),
                     "--weights", str(weights), "--workers", "0", "--device", "cpu"]) == 0
        build_index(root / "feats.npy", root / "photos.index", index="flat", progress=False)
    finally:
        torch.set_num_threads(threads)
    ids = (root / "feats.ids.txt").read_text().splitlines()
    return Collection(root / "photos", np.load(root / "feats.npy"), ids, root / "photos.index", spec, weights)


# Ids of the hostile collection that lead out of it: two written into the embed output's id list
# before the index was built (as a shared or tampered index folder holds them), one a symlink
# inside the folder to a photo outside it.
OUTSIDE_IDS = ("/etc/passwd", "../../../../etc/hostname", "escape.jpg")
LATIN1_NAME = b"caf\xe9 cr\xe8me.jpg"  # not UTF-8: what `embed` accepts on Linux
HTML_NAME = '<img src=x onerror="window.pwned=1">&amp;.png'


@pytest.fixture(scope="package")
def hostile(tmp_path_factory) -> Collection:
    """A randomly initialised model's index over names a client must see intact and files it
    must never get: a Latin-1 name, an HTML-like name, symlinks in and out of the folder, and
    ids naming system files."""

    from PIL import Image
    from skimage import data

    from unicom_cli.cli.app import main
    from unicom_cli.data.ids import IDS_TEXT, read_ids, write_ids
    from unicom_cli.index import build_index

    root = tmp_path_factory.mktemp("hostile")
    photos, outside = root / "photos", root / "outside"
    (photos / "sub").mkdir(parents=True)
    outside.mkdir()
    samples = {"astronaut.jpg": data.astronaut(), "rocket.jpg": data.rocket(), "coffee.jpg": data.coffee(),
               "sub/coins.jpg": data.coins(), HTML_NAME: data.chelsea(), "stand-in-1.jpg": data.moon(),
               "stand-in-2.jpg": data.page(), os.fsdecode(LATIN1_NAME): data.camera()}
    for name, arr in samples.items():
        Image.fromarray(arr).convert("RGB").reduce(4).save(photos / name)
    Image.fromarray(data.hubble_deep_field()).reduce(4).save(outside / "secret.jpg")
    os.symlink("../outside/secret.jpg", photos / "escape.jpg")
    os.symlink("sub/coins.jpg", photos / "inside-link.jpg")
    spec, _ = _tiny_weights(root)
    assert main(["embed", str(photos), "-o", str(root / "feats.npy"), "--model", str(spec), "--random-init",
                 "--seed", "3", "--workers", "0", "--device", "cpu", "--precision", "fp32"]) == 0
    ids = read_ids(root / "feats.ids.txt")
    ids[ids.index("stand-in-1.jpg")], ids[ids.index("stand-in-2.jpg")] = OUTSIDE_IDS[:2]
    with open(root / "feats.ids.txt", "w", **IDS_TEXT) as handle:
        write_ids(handle, ids)
    build_index(root / "feats.npy", root / "hostile.index", index="flat", progress=False)
    return Collection(photos, np.load(root / "feats.npy"), ids, root / "hostile.index", spec, None)


@pytest.fixture(scope="module")
def hostile_server(hostile):
    srv = start_server(hostile)
    yield srv
    srv.stop()


@dataclass
class Server:
    """A running `unicom serve`: its process, base URL and everything it printed."""

    proc: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(collection: Collection, *extra: str, wait: bool = True, token_env: str | None = None) -> Server:
    """`python -m unicom_cli serve` on a free loopback port (``--port 0``); the URL is read
    from the line it prints once it listens. ``token_env``: UNICOM_TOKEN for the process."""
    weights = ["--weights", str(collection.weights)] if collection.weights else []
    cmd = [sys.executable, "-m", "unicom_cli", "serve", str(collection.index), "--port", "0",
           "--device", "cpu", *weights, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", UNICOM_NO_PROGRESS="1", COLUMNS="200")
    env.pop("UNICOM_TOKEN", None)
    if token_env:
        env["UNICOM_TOKEN"] = token_env
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    server = Server(proc, "")
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            server.lines.append(line.rstrip("\n"))
            match = re.search(r"serving (http://\S+?)/", line)
            if match:
                server.url = match.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if wait:
        ready.wait(timeout=180)
        if not server.url:
            server.stop(signal.SIGKILL)
            raise AssertionError("unicom serve did not start:\n" + "\n".join(server.lines))
        # The line is printed just before uvicorn starts serving: wait for /healthz.
        _wait_healthy(server)
    return server


def _wait_healthy(server: Server, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(server.url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(collection):
    """The service with a token and a 1 MB upload limit."""
    srv = start_server(collection, "--token", TOKEN, "--max-upload", str(MAX_UPLOAD), "--max-k", "20")
    yield srv
    srv.stop()


@pytest.fixture
def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}
