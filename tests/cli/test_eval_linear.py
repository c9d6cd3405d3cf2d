"""`unicom eval-linear` end to end on the real digits: sklearn agreement, model vs --embeddings route,
the head through `unicom embed --head`, 2 gloo processes, hostile input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.cli.test_eval_knn import _free_port, _worker, digits_knn  # noqa: F401  (the fixture)
from unicom_cli.cli.app import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(args, tmp_path, capsys, name="l.json"):
    code = main(["eval-linear", *args, "--json", str(tmp_path / name)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads((tmp_path / name).read_text()), out.out


def test_embeddings_route_matches_sklearn_and_saves_the_head(digits_knn, tmp_path, capsys):  # noqa: F811
    """Raw pixels, the original example's C and no normalisation: sklearn's top-1 within 0.2."""
    from sklearn.linear_model import LogisticRegression

    from unicom_cli.eval.linear import LinearHead

    (tf, tn, tx, tl), (vf, vn, vx, vl) = digits_knn["train"], digits_knn["val"]
    head_path = tmp_path / "head.safetensors"
    r, out = _run(["--train-dataset", str(tf), "--val-dataset", str(vf), "--train-embeddings", str(tn),
                   "--val-embeddings", str(vn), "--C", "0.601", "--no-normalize",
                   "--save-classifier", str(head_path)], tmp_path, capsys)
    sk = LogisticRegression(C=0.601, max_iter=1000).fit(tx, tl)
    sk_top1 = 100 * (sk.predict(vx) == vl).mean()
    assert abs(r["metrics"]["top1"] - sk_top1) <= 0.2
    assert r["C"] == 0.601 and r["C_search"] is None and r["normalize"] is False
    assert r["metrics"]["top5"] >= r["metrics"]["top1"] > 90
    assert r["sizes"] == {"train": 200, "val": 200, "classes": 5}
    assert f"wrote {head_path}" in " ".join(out.split()) and "top-1" in out
    head = LinearHead.load(head_path)
    assert head.classes == ["5", "6", "7", "8", "9"] and head.meta["C"] == 0.601
    pred, _ = head.predict(vx)
    assert 100 * (np.array(head.classes)[pred].astype(int) == vl).mean() == pytest.approx(r["metrics"]["top1"])


def test_model_route_equals_embeddings_route_and_embed_head(digits_knn, tmp_path, capsys,  # noqa: F811
                                                            tiny_spec_file, tiny_checkpoint):
    """Features extracted by the command equal `unicom embed`'s; `embed --head` predicts with the head."""
    from unicom_cli.eval.linear import LinearHead

    (tf, *_), (vf, *_) = digits_knn["train"], digits_knn["val"]
    model = ["-m", str(tiny_spec_file), "--weights", str(tiny_checkpoint), "--workers", "0", "--device", "cpu"]
    for name, folder in (("tr", tf), ("va", vf)):
        assert main(["embed", str(folder), "-o", str(tmp_path / f"{name}.npy"), *model]) == 0
    capsys.readouterr()
    head = tmp_path / "h.safetensors"
    a, _ = _run(["--train-dataset", str(tf), "--val-dataset", str(vf), "--C", "10", *model,
                 "--save-classifier", str(head)], tmp_path, capsys, "a.json")
    b, _ = _run(["--train-dataset", str(tf), "--val-dataset", str(vf), "--C", "10",
                 "--train-embeddings", str(tmp_path / "tr.npy"), "--val-embeddings", str(tmp_path / "va.npy")],
                tmp_path, capsys, "b.json")
    assert a["model"] == "tiny" and b["model"] is None
    assert a["metrics"]["top1"] == pytest.approx(b["metrics"]["top1"], abs=0.51)  # ≤ 1 of 200 images
    assert a["metrics"]["top1"] > 20  # above chance (5 classes) even for a random tiny network

    assert main(["embed", str(vf), "-o", str(tmp_path / "p.npy"), *model, "--head", str(head)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    pred_csv = tmp_path / "p.predictions.csv"
    assert printed.count("wrote ") == 5  # .npy, .ids.txt, .json, .failures.txt and the predictions
    rows = list(csv.DictReader(pred_csv.open()))
    ids = (tmp_path / "p.ids.txt").read_text().split()
    assert [r["id"] for r in rows] == ids and len(ids) == 200
    k, p = LinearHead.load(head).predict(np.load(tmp_path / "p.npy"))
    assert [r["class"] for r in rows] == [LinearHead.load(head).classes[i] for i in k]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], p, atol=1e-6)
    hits = np.mean([r["class"] == r["id"].split("/")[0] for r in rows]) * 100
    assert hits == pytest.approx(a["metrics"]["top1"], abs=0.51)


def test_cub_by_its_classification_split_matches_sklearn(digits_knn, tmp_path, capsys):  # noqa: F811
    """``--dataset cub``: images.txt + train_test_split.txt pick the rows; sklearn on the same rows agrees."""
    from sklearn.linear_model import LogisticRegression

    (tf, _, tx, tl), (vf, _, vx, vl) = digits_knn["train"], digits_knn["val"]
    cub = tmp_path / "data" / "CUB_200_2011"
    lines, split, ids, feats = [], [], [], []
    for is_train, (folder, x) in ((1, (tf, tx)), (0, (vf, vx))):
        rel = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        for r, row in zip(rel, x):
            digit, name = r.split("/")
            path = f"{int(digit) + 1:03d}.Digit_{digit}/{'t' if is_train else 'v'}{name}"
            (cub / "images" / path).parent.mkdir(parents=True, exist_ok=True)
            (cub / "images" / path).symlink_to(folder / r)
            lines.append(path)
            split.append(is_train)
            ids.append(path)
            feats.append(row)
    order = np.random.default_rng(0).permutation(len(lines))  # train and test rows interleaved
    (cub / "images.txt").write_text("".join(f"{n + 1} {lines[i]}\n" for n, i in enumerate(order)))
    (cub / "train_test_split.txt").write_text("".join(f"{n + 1} {split[i]}\n" for n, i in enumerate(order)))
    np.save(tmp_path / "all.npy", np.stack(feats))
    (tmp_path / "all.ids.txt").write_text("\n".join(ids) + "\n")  # as `unicom embed CUB_200_2011/images` writes
    r, _ = _run(["--dataset", "cub", "--data-root", str(tmp_path / "data"), "--train-embeddings",
                 str(tmp_path / "all.npy"), "--val-embeddings", str(tmp_path / "all.npy"), "--C", "0.601",
                 "--no-normalize"], tmp_path, capsys)
    sk = LogisticRegression(C=0.601, max_iter=1000).fit(tx, tl)
    assert r["sizes"] == {"train": len(tx), "val": len(vx), "classes": 5} and r["dataset"] == "cub"
    assert abs(r["metrics"]["top1"] - 100 * (sk.predict(vx) == vl).mean()) <= 0.2


@pytest.mark.slow
def test_two_gloo_processes_equal_one(digits_knn, tmp_path):  # noqa: F811
    """Sharded rows, all-reduced loss and gradient: the same C search path and the same accuracy."""
    import torch.multiprocessing as mp

    from unicom_cli.pipelines.linear import LinearConfig, run_linear

    (tf, tn, *_), (vf, vn, *_) = digits_knn["train"], digits_knn["val"]
    cfg = LinearConfig(tf, vf, train_embeddings=tn, val_embeddings=vn, holdout=0.25)
    single = run_linear(cfg)
    out = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, _free_port(), run_linear, cfg, out), nprocs=2, join=True)
    double = json.loads(out.read_text())
    assert double["processes"] == 2 and single["processes"] == 1
    assert double["sizes"] == single["sizes"]
    tried1 = [t["C"] for t in single["C_search"]["tried"]]
    tried2 = [t["C"] for t in double["C_search"]["tried"]]
    assert tried2 == pytest.approx(tried1) and double["C"] == pytest.approx(single["C"])
    for a, b in zip(single["C_search"]["tried"], double["C_search"]["tried"]):
        assert a["top1"] == pytest.approx(b["top1"], abs=2.1)  # ≤ 1 of the ~50 held-out images
    assert double["metrics"]["top1"] == pytest.approx(single["metrics"]["top1"], abs=0.51)


@pytest.mark.parametrize("case", ["negative_C", "benchmark_name", "benchmark_missing",
                                  "benchmark_and_trees", "one_embeddings", "nan_features", "head_is_folder",
                                  "corrupt_head", "head_wrong_dim"])
def test_hostile_input_one_line_exit_2(case, digits_knn, tmp_path, capsys,  # noqa: F811
                                       tiny_spec_file, tiny_checkpoint):
    (tf, tn, tx, _), (vf, vn, *_) = digits_knn["train"], digits_knn["val"]
    base = ["eval-linear", "--train-dataset", str(tf), "--val-dataset", str(vf),
            "--train-embeddings", str(tn), "--val-embeddings", str(vn)]
    if case == "negative_C":
        args, expected = base + ["--C", "-1"], "--C -1"
    elif case == "benchmark_name":
        args = ["eval-linear", "--dataset", "sop", "--data-root", str(tmp_path)]
        expected = "split train and test by class"
    elif case == "benchmark_missing":
        args, expected = ["eval-linear", "--dataset", "cub", "--data-root", str(tmp_path)], "images.txt: not found"
    elif case == "benchmark_and_trees":
        args, expected = base[:3] + ["--dataset", "cars"], "not both"
    elif case == "one_embeddings":
        args, expected = base[:-2], "give both --train-embeddings and --val-embeddings"
    elif case == "nan_features":
        bad = tmp_path / "bad.npy"
        x = tx.copy()
        x[3, 5] = np.nan
        np.save(bad, x)
        (tmp_path / "bad.ids.txt").write_text(tn.with_suffix(".ids.txt").read_text())
        args = base[:5] + ["--train-embeddings", str(bad)] + base[7:] + ["--C", "1"]
        expected = "bad.npy: 1 of 200 feature rows are not finite"
    elif case == "head_is_folder":
        args, expected = base + ["--C", "1", "--save-classifier", str(tmp_path)], "is a folder"
    else:
        head = tmp_path / "h.safetensors"
        if case == "corrupt_head":
            head.write_bytes(b"not a safetensors file")
            expected = "h.safetensors: not a classifier head"
        else:
            from unicom_cli.eval.linear import LinearHead

            LinearHead(np.zeros((2, 7), np.float32), np.zeros(2, np.float32), ["a", "b"], True).save(head)
            expected = "the head takes 7-dim features"
        args = ["embed", str(vf), "-o", str(tmp_path / "e.npy"), "-m", str(tiny_spec_file),
                "--weights", str(tiny_checkpoint), "--workers", "0", "--head", str(head)]
    code = main(args)
    err = capsys.readouterr().err
    assert code == (1 if case == "nan_features" else 2), err  # non-finite features: a failure
    assert expected in " ".join(err.split()) and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one message (maybe wrapped by the terminal width)
    assert not list(tmp_path.glob("e.*")) and not (tmp_path / "h2.safetensors").exists()
