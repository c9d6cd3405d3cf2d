"""`unicom eval-knn` end to end on real digits with raw-pixel features, 1 and 2 (gloo) processes."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from unicom_cli.cli.app import app


@pytest.fixture(scope="module")
def digits_knn(tmp_path_factory):
    """knn/train and knn/val digit trees with raw-pixel feature files (ids relative to each tree)."""
    from sklearn.datasets import load_digits

    from unicom_cli.data.digits import write_digits_tree

    root = tmp_path_factory.mktemp("digits_knn")
    tree = write_digits_tree(root / "tree", size=16, limit_per_class=80)
    data = load_digits().data.astype(np.float32)
    out = {}
    for name, folder in (("train", tree.knn_train), ("val", tree.knn_val)):
        ids = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        feats = np.stack([data[int(i.split("/")[1][:4])] for i in ids])
        np.save(root / f"{name}.npy", feats)
        (root / f"{name}.ids.txt").write_text("\n".join(ids) + "\n")
        out[name] = (folder, root / f"{name}.npy", feats, np.array([int(i.split("/")[0]) for i in ids]))
    return out


def independent_top1(train, tl, val, vl, k, t=0.07):
    a = train.astype(np.float64) / np.linalg.norm(train, axis=1, keepdims=True)
    b = val.astype(np.float64) / np.linalg.norm(val, axis=1, keepdims=True)
    s = b @ a.T
    correct = 0
    for i in range(len(b)):
        nn = np.lexsort((np.arange(len(a)), -s[i]))[:k]
        w = np.exp(s[i, nn] / t)
        votes = np.bincount(tl[nn], weights=w, minlength=10)
        correct += votes.argmax() == vl[i]
    return 100 * correct / len(b)


def run(args, tmp_path, name="k.json"):
    res = CliRunner().invoke(app, ["eval-knn", *args, "--json", str(tmp_path / name)])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / name).read_text()), res.output


def test_digits_knn_top1_equals_numpy(digits_knn, tmp_path):
    (tf, tn, tx, tl), (vf, vn, vx, vl) = digits_knn["train"], digits_knn["val"]
    r, out = run(["--train-dataset", str(tf), "--val-dataset", str(vf), "--train-embeddings", str(tn),
                  "--val-embeddings", str(vn), "--nb-knn", "1,10", "--nb-knn", "20", "--per-class"], tmp_path)
    for k in (1, 10, 20):
        assert r["metrics"][str(k)]["top1"] == pytest.approx(independent_top1(tx, tl, vx, vl, k), abs=1e-9)
    assert r["metrics"]["20"]["top5"] >= r["metrics"]["20"]["top1"] > 80
    assert "top1_per_class" in r["metrics"]["10"] and r["sizes"] == {"train": 200, "val": 200, "classes": 5}
    assert "top-1 (%)" in out and "top-1 per class (%)" in out


def test_few_shot_mean_and_std(digits_knn, tmp_path):
    (tf, tn, *_), (vf, vn, *_) = digits_knn["train"], digits_knn["val"]
    r, _ = run(["--train-dataset", str(tf), "--val-dataset", str(vf), "--train-embeddings", str(tn),
                "--val-embeddings", str(vn), "--nb-knn", "1,5", "--n-per-class", "5", "--n-tries", "3"], tmp_path)
    assert r["few_shot"] == {"n_per_class": 5, "n_tries": 3}
    assert "top1_std" in r["metrics"]["5"] and 20 < r["metrics"]["5"]["top1"] < 100
    from unicom_cli.cli.app import main

    assert main(["eval-knn", "--train-dataset", str(tf), "--val-dataset", str(vf), "--train-embeddings",
                 str(tn), "--val-embeddings", str(vn), "--nb-knn", "500"]) == 2  # more than 200 train images


def _worker(rank, world, port, fn, cfg, out):
    """One gloo rank running ``fn(cfg)`` (a pipeline's run_* function); rank 0 writes the result."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = fn(cfg)
        if rank == 0:
            out.write_text(json.dumps(res))
        else:
            assert res is None
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_metrics(digits_knn, tmp_path):
    import torch.multiprocessing as mp

    from unicom_cli.pipelines.knn import KnnConfig, run_knn
    from unicom_cli.pipelines.retrieval import RetrievalConfig, run_retrieval

    (tf, tn, *_), (vf, vn, *_) = digits_knn["train"], digits_knn["val"]
    knn = KnnConfig(tf, vf, nb_knn=[1, 10, 20], train_embeddings=tn, val_embeddings=vn, per_class=True)
    ret = RetrievalConfig(query=vf, gallery=tf)
    # The query-vs-gallery run reads one file for both sides: merge the two into one.
    both = tmp_path / "both.npy"
    np.save(both, np.concatenate([np.load(vn), np.load(tn)]))
    vids = [f"{vf.name}/{line}" for line in (vn.with_suffix(".ids.txt")).read_text().split()]
    tids = [f"{tf.name}/{line}" for line in (tn.with_suffix(".ids.txt")).read_text().split()]
    (tmp_path / "both.ids.txt").write_text("\n".join(vids + tids) + "\n")
    ret.embeddings = both
    # All-vs-all: one process uses the symmetric search, two processes search query blocks.
    ava = RetrievalConfig(dataset=f"folder:{tf}", embeddings=tn, recall_at=[1, 4])
    for kind, fn, cfg in (("knn", run_knn, knn), ("retrieval", run_retrieval, ret),
                          ("retrieval", run_retrieval, ava)):
        single = fn(cfg)
        out = tmp_path / f"{kind}.json"
        try:
            mp.spawn(_worker, args=(2, _free_port(), fn, cfg, out), nprocs=2, join=True)
        except mp.ProcessRaisedException as exc:  # the free port was taken meanwhile: once more
            if "address already in use" not in str(exc).lower() and "EADDRINUSE" not in str(exc):
                raise
            mp.spawn(_worker, args=(2, _free_port(), fn, cfg, out), nprocs=2, join=True)
        double = json.loads(out.read_text())
        assert double["processes"] == 2 and single["processes"] == 1
        assert double["metrics"] == json.loads(json.dumps(single["metrics"]))
