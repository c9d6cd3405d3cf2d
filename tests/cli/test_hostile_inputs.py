"""Issue 19, the property: every command fed hostile inputs exits 1 or 2 with one message line,
no traceback, and nothing at its final output path.

Each case is real: real corrupt/empty/huge/oddly named files, a real busy port, a real pickled
object, values typers cannot reject (NaN, 0, a folder where a file is expected). Click's own
usage errors (a value outside an option's declared range) are its standard box and exit 2; they
are accepted as the one message, and the cases here mostly get past them on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.cli.hostile_index_cases import INDEX_FILE_CASES
from tests.conftest import TINY, one_error_line
from unicom_cli.cli.app import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases point at: a tiny model, photos, digits trees with features, junk."""
    import torch
    from sklearn.datasets import load_digits

    from unicom_cli.data.digits import write_digits_tree
    from unicom_cli.models.registry import get_spec
    from unicom_cli.models.vit import build_model

    root = tmp_path_factory.mktemp("hostile")
    w = SimpleNamespace(root=root)
    w.spec = root / "tiny.json"
    w.spec.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    w.ckpt = root / "tiny.pt"
    torch.save(build_model(get_spec(w.spec)).state_dict(), w.ckpt)
    w.photos = root / "photos"
    w.photos.mkdir()
    for i, d in enumerate(load_digits().images[:6]):
        Image.fromarray((d * 15).astype(np.uint8), mode="L").resize((40, 40)).save(w.photos / f"{i}.png")
    w.empty = root / "empty"
    w.empty.mkdir()
    w.tree = write_digits_tree(root / "digits", size=16, limit_per_class=8)
    ids = sorted(p.relative_to(w.tree.test).as_posix() for p in w.tree.test.rglob("*.png"))
    w.ids = ids
    data = load_digits().data.astype(np.float32)
    w.feats = np.stack([data[int(i.split("/")[1][:4])] for i in ids])
    w.one = root / "one" / "a"
    w.one.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(w.one / "x.png")
    w.unreadable = root / "unreadable"
    for c in ("a", "b"):
        (w.unreadable / c).mkdir(parents=True)
        for i in range(4):
            (w.unreadable / c / f"{i}.png").write_bytes(b"not an image at all")
    w.a_file = root / "a_file.txt"
    w.a_file.write_text("x")
    return w


def _npy(w, tmp: Path, feats=None, ids=None, raw: bytes | None = None, name: str = "f") -> Path:
    path = tmp / f"{name}.npy"
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.save(path, w.feats if feats is None else feats)
    (tmp / f"{name}.ids.txt").write_text("\n".join(w.ids if ids is None else ids) + "\n")
    return path


def _nan(w):
    f = w.feats.copy()
    f[[1, 4]] = np.nan
    return f


def _model(w) -> list[str]:
    return ["--model", str(w.spec), "--weights", str(w.ckpt), "--workers", "0", "--batch-size", "8"]


def _embed(w, t, *extra, src=None, model=None):
    return (["embed", str(src or w.photos), "-o", str(t / "o.npy"), *(model or _model(w)), *extra],
            [t / "o.npy", t / "o.ids.txt", t / "o.json"])


def _json_model(t: Path, body) -> list[str]:
    path = t / "m.json"
    path.write_text(json.dumps(body))
    return ["--model", str(path), "--workers", "0"]


def _weights(w, t: Path, data: bytes | None = None, obj=None) -> list[str]:
    path = t / "w.pt"
    if obj is not None:
        import torch

        torch.save(obj, path)
    else:
        path.write_bytes(data or b"")
    return ["--model", str(w.spec), "--weights", str(path), "--workers", "0"]


def _nan_weights(w, t: Path) -> Path:
    import torch

    state = torch.load(w.ckpt, weights_only=True)
    path = t / "nan.pt"
    torch.save({k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                for k, v in state.items()}, path)
    return path


def _retrieval(w, t, *extra, npy=None):
    args = ["eval-retrieval", "--dataset", f"folder:{w.tree.test}", "--json", str(t / "r.json")]
    args += ["--embeddings", str(npy)] if npy is not None else _model(w)
    return [*args, *extra], [t / "r.json"]


def _knn(w, t, *extra, train=None, val=None):
    args = ["eval-knn", "--train-dataset", str(train or w.tree.test), "--val-dataset",
            str(val or w.tree.test), "--json", str(t / "k.json")]
    return [*args, *_model(w), *extra], [t / "k.json"]


def _linear(w, t, *extra, train=None, val=None):
    return (["eval-linear", "--train-dataset", str(train or w.tree.test), "--val-dataset",
             str(val or w.tree.test), *_model(w), "--json", str(t / "l.json"), *extra],
            [t / "l.json"])


def _export(w, t, name: str, *extra):
    return (["export", str(w.spec), "-o", str(t / name), "--weights", str(w.ckpt), *extra],
            [t / name])


def _finetune(w, t, *extra, data=None):
    return (["finetune", "--arch", str(w.spec), "--weights", str(w.ckpt), "--dataset",
             f"folder:{data or w.tree.root}", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
             "--workers", "0", "--eval-every", "0", "--output", str(t / "run"), *extra],
            [t / "run" / "model.pt"])


def _gldv2(t, csv_bytes: bytes, *extra):
    (t / "train").mkdir(exist_ok=True)
    (t / "train_clean.csv").write_bytes(csv_bytes)
    return (["prepare-gldv2", str(t / "train_clean.csv"), "-o", str(t / "out"), "-j", "0", *extra],
            [t / "out" / "train.rec", t / "out" / "labels.csv"])


def _busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


CASES = {
    # ---- embed
    "embed: missing input": lambda w, t: _embed(w, t, src=t / "nowhere"),
    "embed: empty folder": lambda w, t: _embed(w, t, src=w.empty),
    "embed: every image unreadable": lambda w, t: _embed(w, t, src=w.unreadable),
    "embed: path list not UTF-8": lambda w, t: (
        (t / "l.txt").write_bytes(b"caf\xe9.png\n"), _embed(w, t, src=t / "l.txt"))[1],
    "embed: path list empty": lambda w, t: ((t / "l.txt").write_text("# only a comment\n"),
                                            _embed(w, t, src=t / "l.txt"))[1],
    "embed: output folder is a file": lambda w, t: ((t / "f").write_bytes(b"x"), (
        ["embed", str(w.photos), "-o", str(t / "f" / "o.npy"), *_model(w)], [t / "f" / "o.npy"]))[1],
    "embed: output read-only": lambda w, t: (
        ["embed", str(w.photos), "-o", "/proc/o.npy", *_model(w)], [Path("/proc/o.npy")]),
    "embed: --dtype int8": lambda w, t: _embed(w, t, "--dtype", "int8"),
    "embed: --num-feat beyond dims": lambda w, t: _embed(w, t, "--num-feat", "999"),
    "embed: model JSON a list": lambda w, t: _embed(w, t, model=_json_model(t, [1, 2, 3])),
    "embed: model JSON a number": lambda w, t: _embed(w, t, model=_json_model(t, 7)),
    "embed: model JSON string sizes": lambda w, t: _embed(w, t, model=_json_model(t, {**TINY, "width": "32"})),
    "embed: model JSON bool size": lambda w, t: _embed(w, t, model=_json_model(t, {**TINY, "depth": True})),
    "embed: model JSON absurd width": lambda w, t: _embed(w, t, model=_json_model(t, {**TINY, "width": 10**9})),
    "embed: model JSON absurd depth": lambda w, t: _embed(w, t, model=_json_model(t, {**TINY, "depth": 10**6})),
    "embed: model JSON not JSON": lambda w, t: ((t / "m.json").write_text("{width: 3"),
                                                _embed(w, t, model=["--model", str(t / "m.json")]))[1],
    "embed: weights 0 bytes": lambda w, t: _embed(w, t, model=_weights(w, t, b"")),
    "embed: weights random bytes": lambda w, t: _embed(w, t, model=_weights(w, t, os.urandom(4096))),
    "embed: weights truncated": lambda w, t: _embed(w, t, model=_weights(w, t, w.ckpt.read_bytes()[:2000])),
    "embed: weights pickled object": lambda w, t: _embed(w, t, model=_weights(w, t, obj={"x": Path("/")})),
    "embed: weights a list": lambda w, t: _embed(w, t, model=_weights(w, t, obj=[1, 2])),
    "embed: weights missing": lambda w, t: _embed(w, t, model=["--model", str(w.spec), "--weights", str(t / "no.pt")]),
    "embed: weights for another model": lambda w, t: _embed(
        w, t, model=[*_json_model(t, {**TINY, "width": 64, "heads": 4}), "--weights", str(w.ckpt)]),
    "embed: unknown model": lambda w, t: _embed(w, t, model=["--model", "ViT-Q/99"]),
    "embed: busy --master-port": lambda w, t: _embed(w, t, "--procs", "2", "--master-port",
                                                     str(w.port.getsockname()[1])),
    # ---- eval-retrieval
    "retrieval: embeddings 0 bytes": lambda w, t: _retrieval(w, t, npy=_npy(w, t, raw=b"")),
    "retrieval: embeddings truncated": lambda w, t: _retrieval(
        w, t, npy=_npy(w, t, raw=(_npy(w, t).read_bytes()[:300]))),
    "retrieval: embeddings random bytes": lambda w, t: _retrieval(w, t, npy=_npy(w, t, raw=os.urandom(999))),
    "retrieval: embeddings of strings": lambda w, t: _retrieval(
        w, t, npy=_npy(w, t, feats=np.array([["a", "b"]] * len(w.ids)))),
    "retrieval: embeddings object array": lambda w, t: _retrieval(
        w, t, npy=(np.save(t / "f.npy", np.array([{"a": 1}] * len(w.ids)), allow_pickle=True),
                   (t / "f.ids.txt").write_text("\n".join(w.ids) + "\n"), t / "f.npy")[2]),
    "retrieval: embeddings two NaN rows": lambda w, t: _retrieval(w, t, npy=_npy(w, t, feats=_nan(w))),
    "retrieval: embeddings all NaN": lambda w, t: _retrieval(
        w, t, npy=_npy(w, t, feats=np.full_like(w.feats, np.nan))),
    "retrieval: embeddings with Inf": lambda w, t: _retrieval(
        w, t, npy=_npy(w, t, feats=np.where(np.arange(len(w.feats))[:, None] == 3, np.inf, w.feats))),
    "retrieval: embeddings 1-D": lambda w, t: _retrieval(w, t, npy=_npy(w, t, feats=w.feats[:, 0])),
    "retrieval: ids count mismatch": lambda w, t: _retrieval(w, t, npy=_npy(w, t, ids=w.ids[:-3])),
    "retrieval: ids match nothing": lambda w, t: _retrieval(
        w, t, npy=_npy(w, t, ids=[f"x/{i}.png" for i in range(len(w.ids))])),
    "retrieval: --num-feat beyond features": lambda w, t: _retrieval(w, t, "--num-feat", "100", npy=_npy(w, t)),
    "retrieval: --json is a folder": lambda w, t: (
        ["eval-retrieval", "--dataset", f"folder:{w.tree.test}", "--embeddings", str(_npy(w, t)),
         "--json", str(t)], [t / ".tmp"]),
    "retrieval: --vis unknown type": lambda w, t: _retrieval(w, t, "--vis", str(t / "v.xyz"), npy=_npy(w, t)),
    "retrieval: --recall-at 0": lambda w, t: _retrieval(w, t, "--recall-at", "0", npy=_npy(w, t)),
    "retrieval: --recall-at words": lambda w, t: _retrieval(w, t, "--recall-at", "one", npy=_npy(w, t)),
    "retrieval: one-image data set": lambda w, t: (
        ["eval-retrieval", "--dataset", f"folder:{w.one.parent}", *_model(w), "--json", str(t / "r.json")],
        [t / "r.json"]),
    "retrieval: every image unreadable": lambda w, t: (
        ["eval-retrieval", "--dataset", f"folder:{w.unreadable}", *_model(w), "--json", str(t / "r.json")],
        [t / "r.json"]),
    "retrieval: unknown data set": lambda w, t: (
        ["eval-retrieval", "--dataset", "nope", "--json", str(t / "r.json")], [t / "r.json"]),
    "retrieval: NaN weights": lambda w, t: _retrieval(w, t, "--weights", str(_nan_weights(w, t))),
    # ---- eval-knn
    "knn: --temperature nan": lambda w, t: _knn(w, t, "--temperature", "nan"),
    "knn: --temperature 0": lambda w, t: _knn(w, t, "--temperature", "0"),
    "knn: --temperature -1": lambda w, t: _knn(w, t, "--temperature", "-1"),
    "knn: --nb-knn 0": lambda w, t: _knn(w, t, "--nb-knn", "0"),
    "knn: --nb-knn beyond train set": lambda w, t: _knn(w, t, "--nb-knn", "100000"),
    "knn: every val image unreadable": lambda w, t: _knn(w, t, val=w.unreadable),
    "knn: missing train folder": lambda w, t: _knn(w, t, train=t / "nowhere"),
    "knn: --json is a folder": lambda w, t: (
        ["eval-knn", "--train-dataset", str(w.tree.test), "--val-dataset", str(w.tree.test),
         "--json", str(t), *_model(w)], []),
    "knn: NaN train embeddings": lambda w, t: (
        ["eval-knn", "--train-dataset", str(w.tree.test), "--val-dataset", str(w.tree.test),
         "--train-embeddings", str(_npy(w, t, feats=_nan(w))), "--val-embeddings",
         str(_npy(w, t, name="v")), "--nb-knn", "5", "--json", str(t / "k.json")], [t / "k.json"]),
    # ---- prepare-gldv2
    "gldv2: CSV not UTF-8": lambda w, t: _gldv2(t, b"landmark_id,images\ncaf\xe9,abcdef012345\n"),
    "gldv2: CSV empty": lambda w, t: _gldv2(t, b""),
    "gldv2: CSV wrong header": lambda w, t: _gldv2(t, b"id,files\n1,abcdef012345\n"),
    "gldv2: CSV binary junk": lambda w, t: _gldv2(t, os.urandom(2000)),
    "gldv2: CSV bad image id": lambda w, t: _gldv2(t, b"landmark_id,images\n1,../../etc/passwd\n"),
    "gldv2: nothing on disk": lambda w, t: _gldv2(t, b"landmark_id,images\n1,abcdef012345\n"),
    "gldv2: -o names a file": lambda w, t: (
        ["prepare-gldv2", _gldv2(t, b"landmark_id,images\n1,abcdef012345\n")[0][1], "-o",
         str(w.a_file), "-j", "0"], []),
    "gldv2: --verify of a non-output": lambda w, t: (["prepare-gldv2", "--verify", str(w.empty)], []),
    # ---- finetune
    "finetune: --lr nan": lambda w, t: _finetune(w, t, "--lr", "nan"),
    "finetune: --lr -1": lambda w, t: _finetune(w, t, "--lr", "-1"),
    "finetune: --sample-rate 0": lambda w, t: _finetune(w, t, "--sample-rate", "0"),
    "finetune: --sample-rate 2": lambda w, t: _finetune(w, t, "--sample-rate", "2"),
    "finetune: --num-feat 0": lambda w, t: _finetune(w, t, "--num-feat", "0"),
    "finetune: --num-feat beyond dims": lambda w, t: _finetune(w, t, "--num-feat", "999"),
    "finetune: --drop-path 2": lambda w, t: _finetune(w, t, "--drop-path", "2"),
    "finetune: --output names a file": lambda w, t: (_finetune(w, t, "--output", str(w.a_file))[0], []),
    "finetune: one-class training set": lambda w, t: _finetune(w, t, data=w.one.parent),
    "finetune: no readable image": lambda w, t: _finetune(w, t, data=w.unreadable),
    "finetune: --resume not a checkpoint": lambda w, t: _finetune(w, t, "--resume", str(w.empty)),
    "finetune: weights random bytes": lambda w, t: _finetune(
        w, t, "--weights", _weights(w, t, os.urandom(512))[3]),
    # ---- eval-linear
    "linear: --C nan": lambda w, t: _linear(w, t, "--C", "nan"),
    "linear: --C -1": lambda w, t: _linear(w, t, "--C", "-1"),
    "linear: --holdout 0": lambda w, t: _linear(w, t, "--holdout", "0"),
    "linear: --holdout 1.5": lambda w, t: _linear(w, t, "--holdout", "1.5"),
    "linear: NaN train embeddings": lambda w, t: _linear(
        w, t, "--train-embeddings", str(_npy(w, t, feats=_nan(w))), "--val-embeddings",
        str(_npy(w, t, name="v"))),
    "linear: 0-byte embeddings": lambda w, t: _linear(
        w, t, "--train-embeddings", str(_npy(w, t, raw=b"")), "--val-embeddings", str(_npy(w, t, raw=b""))),
    "linear: --json is a folder": lambda w, t: (_linear(w, t)[0][:-2] + ["--json", str(t)], []),
    "linear: --save-classifier is a folder": lambda w, t: _linear(w, t, "--save-classifier", str(t)),
    "linear: every val image unreadable": lambda w, t: _linear(w, t, val=w.unreadable),
    "linear: one-class training set": lambda w, t: _linear(w, t, train=w.one.parent),
    # ---- export
    "export: unknown output type": lambda w, t: _export(w, t, "m.xyz"),
    "export: output folder is a file": lambda w, t: ((t / "f").write_bytes(b"x"), _export(w, t, "f/m.onnx"))[1],
    "export: output is a folder": lambda w, t: (_export(w, t, "m.onnx")[0][:3] + [str(t)] +
                                                _export(w, t, "m.onnx")[0][4:], []),
    "export: weights random bytes": lambda w, t: _export(w, t, "m.onnx", "--weights",
                                                         _weights(w, t, os.urandom(700))[3]),
    "export: model JSON absurd": lambda w, t: (
        ["export", _json_model(t, {**TINY, "depth": 10**6})[1], "-o", str(t / "m.onnx")], [t / "m.onnx"]),
    "export: --precision fp8": lambda w, t: _export(w, t, "m.onnx", "--precision", "fp8"),
    "export: --num-feat beyond dims": lambda w, t: _export(w, t, "m.onnx", "--num-feat", "999"),
    # ---- index, search, serve
    "index: 0-byte features": lambda w, t: (["index", str(_npy(w, t, raw=b"")), "-o", str(t / "i")], [t / "i"]),
    "index: NaN features": lambda w, t: (["index", str(_npy(w, t, feats=_nan(w))), "-o", str(t / "i")], [t / "i"]),
    "index: string features": lambda w, t: (
        ["index", str(_npy(w, t, feats=np.array([["a", "b"]] * len(w.ids)))), "-o", str(t / "i")], [t / "i"]),
    "index: --max-memory words": lambda w, t: (
        ["index", str(_npy(w, t)), "-o", str(t / "i"), "--max-memory", "lots"], [t / "i"]),
    "index: unknown --index kind": lambda w, t: (
        ["index", str(_npy(w, t)), "-o", str(t / "i"), "--index", "Nonsense42"], [t / "i"]),
    "index: output is a file": lambda w, t: (["index", str(_npy(w, t)), "-o", str(w.a_file)], []),
    "search: not an index": lambda w, t: (["search", str(w.empty), str(_npy(w, t)), "-o", str(t / "r.csv")],
                                          [t / "r.csv"]),
    "search: index is a file": lambda w, t: (["search", str(w.a_file), str(_npy(w, t)), "-o", str(t / "r.csv")],
                                             [t / "r.csv"]),
    "serve: not an index": lambda w, t: (["serve", str(w.empty), "--port", "0"], []),
    "serve: --max-upload words": lambda w, t: (["serve", str(w.empty), "--max-upload", "huge"], []),
    # ---- demo, models
    "demo: --output names a file": lambda w, t: (["demo", "-o", str(w.a_file), "--epochs", "1"], []),
    "demo: --output read-only": lambda w, t: (["demo", "-o", "/proc/unicom-demo", "--epochs", "1"],
                                              [Path("/proc/unicom-demo")]),
    "models: unexpected argument": lambda w, t: (["models", "extra"], []),
    # ---- download
    "download: unknown model": lambda w, t: (["download", "ViT-Q/99", "--cache-dir", str(t / "c")], []),
    "download: bad --sha256": lambda w, t: (["download", "ViT-B/32", "--sha256", "xyz",
                                              "--cache-dir", str(t / "c")], []),
    "download: unreachable mirror": lambda w, t: (
        ["download", "ViT-B/32", "--mirror", "http://127.0.0.1:9/", "--cache-dir", str(t / "c")],
        [t / "c" / "FP16-ViT-B-32.pt"]),
}
CASES.update(INDEX_FILE_CASES)  # issue 28: index folders, the lists we read, search outputs, full disk


@pytest.fixture(scope="module")
def busy_port():
    sock = _busy_port()
    yield sock
    sock.close()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_message_and_no_output(name, world, busy_port, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setenv("UNICOM_DOWNLOAD_RETRIES", "0")
    monkeypatch.setenv("UNICOM_DOWNLOAD_BACKOFF", "0")
    world.port = busy_port
    argv, outputs = CASES[name](world, tmp_path)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err
    assert code in (1, 2), f"{name}: exit {code}\n{err}\n{captured.out}"
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    if "error:" in err:  # our message: exactly one line, the last one
        one_error_line(err)
    else:  # click's usage error for an option it validates itself
        assert code == 2 and ("Invalid value" in err or "Usage:" in err), f"{name}:\n{err}"
    for path in outputs:
        assert not Path(path).exists(), f"{name}: {path} was written"
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"{name}: temp files left: {leftovers}"


def test_the_suite_is_large():
    """The closing note quotes this count."""
    assert len(CASES) >= 100


# ==================================================================================================
# Issue 28, second pass: the ONNX route, eval-linear, eval-retrieval, finetune, prepare-gldv2 and
# download. Each case also names words its one message must hold (the file, the range, the fix).
# Kept apart from CASES so that the two passes merge without conflicts.


def _cars(w, t: Path, flags: list[int], bomb_bytes: int = 0) -> list[str]:
    """A Cars196 folder (cars_annos.mat + car_ims/) of the world's photos; ``bomb_bytes`` appends a
    compressed variable that inflates to that many bytes (a zlib bomb: ~1000:1 on zeros)."""
    import struct
    import zlib

    from scipy.io import savemat

    root = t / "cars196"
    (root / "car_ims").mkdir(parents=True)
    dtype = [("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    rows = []
    for i, flag in enumerate(flags):
        rel = f"car_ims/{i:06d}.jpg"
        Image.open(w.photos / f"{i % 6}.png").convert("RGB").save(root / rel)
        rows.append((rel, 1 + i % 2, flag))
    mat = root / "cars_annos.mat"
    savemat(mat, {"annotations": np.array(rows, dtype=dtype).reshape(1, -1)})
    if bomb_bytes:
        n = bomb_bytes // 8
        body = (struct.pack("<4I", 6, 8, 6, 0) + struct.pack("<2I2i", 5, 8, n, 1)
                + struct.pack("<2I", 1, 4) + b"junk\0\0\0\0" + struct.pack("<2I", 9, 8 * n))
        packer = zlib.compressobj(9)
        packed = packer.compress(struct.pack("<2I", 14, len(body) + 8 * n) + body)
        zeros = bytes(1 << 24)
        for _ in range(n * 8 // len(zeros)):
            packed += packer.compress(zeros)
        packed += packer.flush()
        with open(mat, "ab") as fh:
            fh.write(struct.pack("<2I", 15, len(packed)) + packed)
    return ["--dataset", "cars", "--data-root", str(t)]


def _one_class_tree(w, t: Path) -> Path:
    first = sorted(p for p in w.tree.test.iterdir() if p.is_dir())[0]
    (t / "one_class").mkdir()
    shutil.copytree(first, t / "one_class" / first.name)
    return t / "one_class"


def _singletons(w, t: Path) -> Path:
    """An ImageFolder tree of 6 classes with one image each."""
    for i in range(6):
        (t / "single" / f"c{i}").mkdir(parents=True)
        shutil.copy(w.photos / f"{i}.png", t / "single" / f"c{i}" / "x.png")
    return t / "single"


@pytest.fixture(scope="module")
def onnx_export(world, tmp_path_factory) -> Path:
    """The world's tiny model exported to ONNX (uint8 input) by the CLI, with its model.json."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export", str(world.spec), "--weights", str(world.ckpt), "-o", str(out)]) == 0
    return out


def _onnx_embed(w, t: Path, edit=None, flip_at: float | None = None) -> tuple[list[str], list[Path]]:
    """``embed --runtime onnx`` of a copy of the export whose model.json ``edit`` changed (in
    place) and whose .onnx has one bit flipped at ``flip_at`` (a share of its length)."""
    graph = t / "g.onnx"
    data = bytearray(w.onnx.read_bytes())
    if flip_at is not None:
        data[int(len(data) * flip_at)] ^= 0x40
    graph.write_bytes(bytes(data))
    meta = json.loads(w.onnx.with_suffix(".json").read_text())
    if edit is not None:
        edit(meta)
    (t / "g.json").write_text(json.dumps(meta))
    return _embed(w, t, model=["--model", str(graph), "--workers", "0", "--batch-size", "8"])


def _linear_npy(w, t: Path, train, val, *extra) -> tuple[list[str], list[Path]]:
    return _linear(w, t, "--train-embeddings", str(_npy(w, t, feats=train, name="tr")),
                   "--val-embeddings", str(_npy(w, t, feats=val, name="va")), *extra)


SECOND_PASS_CASES = {
    "finetune: -s 0": (lambda w, t: _finetune(w, t, "-s", "0"), "scale 0.0: the logit scale must be"),
    "finetune: --scale nan": (lambda w, t: _finetune(w, t, "--scale", "nan"), "scale nan"),
    # ---- embed --runtime onnx
    "onnx: bit flip, no digest recorded": (
        lambda w, t: _onnx_embed(w, t, lambda m: m.pop("sha256"), flip_at=0.6), "g.json records no SHA-256"),
    "onnx: digest null": (lambda w, t: _onnx_embed(w, t, lambda m: m.update(sha256=None)), "no SHA-256"),
    "onnx: no input_dtype": (lambda w, t: _onnx_embed(w, t, lambda m: m["onnx"].pop("input_dtype")),
                             "g.json: 'onnx.input_dtype'"),
    "onnx: 'onnx' a string": (lambda w, t: _onnx_embed(w, t, lambda m: m.update(onnx="graph")),
                              "g.json: 'onnx' must be an object"),
    "onnx: preprocessing a string": (lambda w, t: _onnx_embed(w, t, lambda m: m.update(preprocessing="clip")),
                                     "g.json: 'preprocessing' must be an object"),
    "onnx: 2 mean values": (lambda w, t: _onnx_embed(w, t, lambda m: m["preprocessing"].update(mean=[0.5, 0.5])),
                            "'preprocessing.mean' must be 3 finite numbers"),
    "onnx: std of 0": (lambda w, t: _onnx_embed(w, t, lambda m: m["preprocessing"].update(std=[0.2, 0, 0.2])),
                       "'preprocessing.std'"),
    "onnx: input size disagrees with the graph": (
        lambda w, t: _onnx_embed(w, t, lambda m: m.update(input_size=48)), "takes 32 x 32 pixels"),
    "onnx: float input recorded on a uint8 graph": (
        lambda w, t: _onnx_embed(w, t, lambda m: m["onnx"].update(input_dtype="float32")), "takes uint8"),
    "onnx: wrong output dimension": (
        lambda w, t: _onnx_embed(w, t, lambda m: m["onnx"].update(output_dim=99)), "gives 16 dimensions"),
    "onnx: num_feat a string": (
        lambda w, t: _onnx_embed(w, t, lambda m: m["onnx"].update(num_feat="all")), "'onnx.num_feat'"),
    # ---- eval-retrieval
    "retrieval: every class a singleton": (
        lambda w, t: (["eval-retrieval", "--dataset", f"folder:{_singletons(w, t)}", *_model(w), "--json",
                       str(t / "r.json")], [t / "r.json"]), "no query has a match"),
    "retrieval: query classes absent from the gallery": (
        lambda w, t: (["eval-retrieval", "--query", str(_singletons(w, t)), "--gallery", str(w.tree.test),
                       *_model(w), "--json", str(t / "r.json")], [t / "r.json"]), "no query has a match"),
    # ---- eval-linear
    "linear: cars, every test flag 0": (
        lambda w, t: (["eval-linear", *_cars(w, t, [0] * 6), *_model(w), "--json", str(t / "l.json")],
                      [t / "l.json"]), "cars_annos.mat: no image has test flag 1"),
    "linear: cars, every test flag 1": (
        lambda w, t: (["eval-linear", *_cars(w, t, [1] * 6), *_model(w), "--json", str(t / "l.json")],
                      [t / "l.json"]), "cars_annos.mat: no image has test flag 0"),
    "linear: cars_annos.mat zlib bomb": (
        lambda w, t: (["eval-linear", *_cars(w, t, [0, 1] * 3, bomb_bytes=512 << 20), *_model(w),
                       "--json", str(t / "l.json")], [t / "l.json"]), "inflates to more than"),
    "linear: one class of many images": (
        lambda w, t: _linear(w, t, train=_one_class_tree(w, t)), "needs at least 2"),
    "linear: val dimension differs": (
        lambda w, t: _linear_npy(w, t, w.feats, w.feats[:, :32]), "va.npy: rows of 32 dimensions"),
    "linear: --C 1e-300": (lambda w, t: _linear(w, t, "--C", "1e-300"), "--C 1e-300"),
    "linear: --C 1e300": (lambda w, t: _linear(w, t, "--C", "1e300"), "--C 1e+300"),
    "linear: raw features of 1e30": (
        lambda w, t: _linear_npy(w, t, w.feats * 1e30, w.feats * 1e30, "--no-normalize", "--C", "1"),
        "drop --no-normalize"),
}


@pytest.mark.parametrize("name", list(SECOND_PASS_CASES))
def test_second_pass_hostile_input(name, world, tmp_path, capsys, monkeypatch, request):
    if name.startswith("onnx:"):
        world.onnx = request.getfixturevalue("onnx_export")
    monkeypatch.setenv("UNICOM_DOWNLOAD_RETRIES", "0")
    monkeypatch.setenv("UNICOM_DOWNLOAD_BACKOFF", "0")
    case, expected = SECOND_PASS_CASES[name]
    argv, outputs = case(world, tmp_path)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code in (1, 2), f"{name}: exit {code}\n{captured.err}\n{captured.out}"
    assert "Traceback" not in captured.out
    line = one_error_line(captured.err)
    assert expected in line, f"{name}: {line}"
    for path in outputs:
        assert not Path(path).exists(), f"{name}: {path} was written"
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"{name}: temp files left: {leftovers}"


def test_linear_probe_on_features_of_1e30_equals_the_unscaled_probe(world, tmp_path, capsys):
    """Item 21: L2-normalising rows of 1e30 overflowed (their squares) to zero rows: top-1 33 %
    on data the unscaled features classify well. Normalised, the scale must not matter."""
    top1 = []
    for scale in (1.0, 1e30):
        t = tmp_path / str(scale)
        t.mkdir()
        argv, _ = _linear_npy(world, t, world.feats * np.float32(scale), world.feats * np.float32(scale),
                              "--C", "10")
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
        top1.append(json.loads((t / "l.json").read_text())["metrics"]["top1"])
    assert top1[0] > 90 and top1[1] == top1[0]


def test_onnx_external_weights_are_verified_too(world, tmp_path, capsys, monkeypatch):
    """Item 17 for graphs past protobuf's 2 GiB, whose weights live in <file>.onnx.data: its
    digest is recorded and checked as the .onnx's is (a flipped bit there embedded with exit 0).
    The tiny model is written that way by lowering the size at which weights move out."""
    from unicom_cli.export import graph

    monkeypatch.setattr(graph, "INLINE_LIMIT_BYTES", 0)
    out = tmp_path / "ext.onnx"
    assert main(["export", str(world.spec), "--weights", str(world.ckpt), "-o", str(out)]) == 0
    data = tmp_path / "ext.onnx.data"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["data_sha256"] == __import__("hashlib").sha256(data.read_bytes()).hexdigest()
    capsys.readouterr()
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    data.write_bytes(bytes(blob))
    code = main(["embed", str(world.photos), "-o", str(tmp_path / "e.npy"), "--model", str(out),
                 "--workers", "0"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "ext.onnx.data: its SHA-256 differs" in line, line
    assert not (tmp_path / "e.npy").exists()
