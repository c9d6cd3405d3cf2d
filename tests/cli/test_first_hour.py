"""The first hour of a new user: no silent random model, --mirror where the advice says so,
errors before work, one name and meaning per option, output folders, units, help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unicom_cli.cli.app import main

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("models", "download", "embed", "eval-retrieval", "eval-knn", "eval-linear",
            "prepare-gldv2", "finetune", "demo", "export", "index", "search", "serve")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from unicom_cli.data.digits import write_digits_tree

    return write_digits_tree(tmp_path_factory.mktemp("digits") / "tree", size=32, limit_per_class=8)


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------ 1. no silent random network

@pytest.mark.parametrize("command", ["embed", "eval-retrieval", "eval-knn"])
def test_json_architecture_without_weights_is_refused(command, digits, tiny_spec_file, tmp_path, capsys):
    args = {"embed": ["embed", str(digits.test), "-o", str(tmp_path / "f.npy")],
            "eval-retrieval": ["eval-retrieval", "--dataset", f"folder:{digits.test}"],
            "eval-knn": ["eval-knn", "--train-dataset", str(digits.knn_train),
                         "--val-dataset", str(digits.knn_val), "--nb-knn", "1"]}[command]
    assert main([*args, "--model", str(tiny_spec_file), "--device", "cpu", "-j", "0"]) == 2
    err = _err(capsys)
    assert "tiny.json" in err and "--weights FILE" in err and "--random-init" in err
    assert not (tmp_path / "f.npy").exists()


def test_random_init_is_seeded_said_and_recorded(digits, tiny_spec_file, tmp_path, capsys):
    def run(name: str, seed: int) -> np.ndarray:
        out = tmp_path / f"{name}.npy"
        assert main(["embed", str(digits.test), "-o", str(out), "--model", str(tiny_spec_file),
                     "--random-init", "--seed", str(seed), "-j", "0", "--device", "cpu"]) == 0
        assert f"random initialisation with seed {seed}" in _err(capsys)
        assert json.loads(out.with_suffix(".json").read_text())["random_init_seed"] == seed
        return np.load(out)

    a, b, c = run("a", 3), run("b", 3), run("c", 4)
    assert np.array_equal(a, b)  # two runs agree: a resumed run cannot mix two networks
    assert np.abs(a - c).max() > 1e-3
    out = tmp_path / "r.json"
    assert main(["eval-retrieval", "--dataset", f"folder:{digits.test}", "--model", str(tiny_spec_file),
                 "--random-init", "--seed", "3", "-j", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["random_init_seed"] == 3


def test_demo_asks_for_its_random_start_explicitly(tmp_path):
    from unicom_cli.pipelines.demo import DemoConfig, plan

    steps = plan(DemoConfig(output=tmp_path), tmp_path / "digits", tmp_path / "demo-vit.json")
    for step in steps:
        if "--model" in step.argv:
            assert "--weights" in step.argv or "--random-init" in step.argv, step.argv


@pytest.mark.slow
def test_example_script_refuses_then_accepts_random_init(digits, tiny_spec_file, tmp_path):
    script = ROOT / "examples" / "embed_and_search.py"
    base = [sys.executable, str(script), str(digits.test), "--model", str(tiny_spec_file),
            "--output", str(tmp_path / "ex.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--random-init" in refused.stderr
    assert "Traceback" not in refused.stderr
    ok = subprocess.run([*base, "--random-init", "--seed", "1"], capture_output=True, text=True,
                        env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "->" in ok.stdout


# ------------------------------------------------------------------ 2, 3. --mirror and fail fast

@pytest.mark.parametrize("command", ["embed", "eval-retrieval", "eval-knn", "eval-linear", "finetune",
                                     "export"])
def test_every_downloading_command_takes_mirror_and_fails_before_building(command, digits, tmp_path,
                                                                        capsys, monkeypatch):
    import unicom_cli.models.vit as vit

    def built(*args, **kwargs):
        raise AssertionError("the network was built before the weights were found")

    monkeypatch.setattr(vit, "build_model", built)
    mirror = tmp_path / "offline-mirror"
    args = {"embed": ["embed", str(digits.test), "-o", str(tmp_path / "f.npy")],
            "eval-retrieval": ["eval-retrieval", "--dataset", f"folder:{digits.test}"],
            "eval-knn": ["eval-knn", "--train-dataset", str(digits.knn_train),
                         "--val-dataset", str(digits.knn_val), "--nb-knn", "1"],
            "eval-linear": ["eval-linear", "--train-dataset", str(digits.knn_train),
                            "--val-dataset", str(digits.knn_val)],
            "finetune": ["finetune", "--dataset", f"folder:{digits.root}", "--output", str(tmp_path / "run")],
            "export": ["export", "-o", str(tmp_path / "m.onnx")],
            }[command]
    model = ["ViT-B/32"] if command == "export" else ["--model", "ViT-B/32"]
    code = main([*args, *model, "--mirror", str(mirror), "--cache-dir", str(tmp_path / "c")])
    err = _err(capsys)
    assert code == 1, err
    assert str(mirror) in err and "UNICOM_HOME" in err


def test_offline_failure_comes_before_torch_is_even_imported(digits, tmp_path):
    probe = (
        "import sys\n"
        "from unicom_cli.cli.app import main\n"
        f"code = main(['embed', {str(digits.test)!r}, '-o', {str(tmp_path / 'f.npy')!r}, '--mirror', "
        f"{str(tmp_path / 'offline')!r}, '--cache-dir', {str(tmp_path / 'c')!r}])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["1", "False"], result.stdout + result.stderr
    assert "UNICOM_HOME" in result.stderr


# ------------------------------------------------------------------ 4. short checkpoint messages

def test_wrong_checkpoint_is_a_short_line(digits, tiny_checkpoint, tmp_path, capsys):
    arch = tmp_path / "wide.json"
    arch.write_text(json.dumps({"input_size": 32, "patch_size": 8, "width": 64, "depth": 2,
                                "heads": 2, "embedding_size": 16}))
    assert main(["embed", str(digits.test), "-o", str(tmp_path / "f.npy"), "--model", str(arch),
                 "--weights", str(tiny_checkpoint), "-j", "0"]) == 2  # bad input (CheckpointMismatch)
    err = _err(capsys)
    assert "looks like width 32, patch 8, 2 blocks" in err and len(err) < 700


# ------------------------------------------------------------------ 5. models: a wrong file is not cached

def test_models_shows_a_garbage_file_as_corrupt(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "FP16-ViT-B-32.pt").write_bytes(os.urandom(5000))
    assert main(["models", "--format", "json", "--cache-dir", str(cache)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["ViT-B/32"]["corrupt"] is True and rows["ViT-B/16"]["corrupt"] is False
    assert main(["models", "--cache-dir", str(cache)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("ViT-B/32 "))
    assert "corrupt" in line and "yes" not in line


# ------------------------------------------------------------------ 6. a status line before torch

@pytest.mark.slow
@pytest.mark.parametrize("argv", [["embed", "nowhere/", "-o", "f.npy"],
                                  ["eval-retrieval", "--dataset", "folder:nowhere/"],
                                  ["eval-knn", "--train-dataset", "a", "--val-dataset", "b"],
                                  ["eval-linear", "--train-dataset", "a", "--val-dataset", "b"],
                                  ["export", "ViT-B/32", "-o", "m.onnx"],
                                  ["finetune", "--dataset", "folder:nowhere/"]])
def test_status_line_comes_before_torch_is_imported(argv, tmp_path):
    probe = (
        "import sys\n"
        "import unicom_cli.utils.console as c\n"
        "seen = []\n"
        "real = c.status\n"
        "def status(message):\n"
        "    seen.append(('torch' in sys.modules, message))\n"
        "    real(message)\n"
        "c.status = status\n"
        "from unicom_cli.cli.app import main\n"
        f"main({argv!r})\n"
        "print(seen)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = result.stdout.strip().splitlines()[-1]
    assert seen.startswith("[(False, 'loading "), result.stdout + result.stderr
    assert result.stderr.splitlines()[0].startswith("loading ")


# ------------------------------------------------------------------ 8, 9. errors before work

def test_knn_default_k_list_shrinks_to_the_train_set_and_typed_k_fails_before_work(digits, capsys,
                                                                                 monkeypatch, tmp_path):
    import unicom_cli.pipelines.features as features

    def no_model(*args, **kwargs):
        raise AssertionError("features were extracted before the k values were checked")

    monkeypatch.setattr(features, "load_model", no_model)
    n_train = sum(1 for _ in digits.knn_train.rglob("*.png"))
    assert n_train < 100
    code = main(["eval-knn", "--train-dataset", str(digits.knn_train), "--val-dataset",
                 str(digits.knn_val), "--nb-knn", "10,100", "--random-init", "--model", "x.json"])
    assert code == 2
    assert f"--nb-knn 100: more neighbours than the {n_train} train images" in _err(capsys)
    monkeypatch.undo()
    out = tmp_path / "k.json"
    arch = tmp_path / "a.json"
    arch.write_text(json.dumps({"input_size": 32, "patch_size": 8, "width": 32, "depth": 1,
                                "heads": 2, "embedding_size": 16}))
    assert main(["eval-knn", "--train-dataset", str(digits.knn_train), "--val-dataset",
                 str(digits.knn_val), "--model", str(arch), "--random-init", "-j", "0",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "k = 100, 200 left out of the default --nb-knn" in " ".join(captured.err.split())
    assert list(json.loads(out.read_text())["metrics"]) == ["10", "20"]
    assert f"wrote {out}" in captured.out


def test_folder_with_train_and_test_is_read_from_test(digits, tmp_path, capsys):
    from unicom_cli.data.benchmarks import load_folder
    from unicom_cli.errors import DatasetLayout

    bench = load_folder(digits.root)
    assert bench.root == digits.root / "test"
    assert len(np.unique(bench.test.labels)) == 5  # digits 5-9, not {train, test}
    assert "evaluating" in _err(capsys)
    only_train = tmp_path / "only"
    (only_train / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(only_train / "train" / "a" / "0.png")
    with pytest.raises(DatasetLayout, match="split folders train instead of class folders"):
        load_folder(only_train)


# ------------------------------------------------------------------ 10. one name, one meaning

def _help(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "unicom_cli", *args, "--help"], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_fixed_value_options_are_choices_listed_in_help_and_checked(capsys):
    assert "fp32|fp16|bf16" in _help("embed") and "float32|float16" in _help("embed")
    assert "auto|faiss|torch" in _help("eval-knn") and "public|private" in _help("eval-retrieval")
    assert "adamw|sgd" in _help("finetune") and "table|json" in _help("models")
    assert main(["embed", "x", "--precision", "fp8"]) == 2
    assert "'fp8' is not one of" in _err(capsys)
    assert main(["eval-knn", "--train-dataset", "a", "--val-dataset", "b", "--backend", "annoy"]) == 2
    assert main(["embed", "x", "--device", "gpu"]) == 2
    assert "cuda:N" in _err(capsys)


def test_one_spelling_per_concept_and_old_ones_hidden(tmp_path):
    finetune, prepare, models = _help("finetune"), _help("prepare-gldv2"), _help("models")
    assert "--model,--arch" in finetune  # the design card's spelling, shown as the other name (issue 27 item 17)
    assert "--data-root" in finetune and "--data " not in finetune
    assert "--output" in prepare and "--out " not in prepare
    assert "--json" not in models
    for text in (finetune, _help("demo"), _help("embed")):
        assert "per process" in text and "(global)" not in text


def test_old_spellings_still_work(tmp_path, capsys):
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "ViT-B/32"
    assert main(["prepare-gldv2", "--verify", "--out", str(tmp_path / "none")]) != 0
    assert str(tmp_path / "none") in _err(capsys)


# ------------------------------------------------------------------ 11, 13. folders, wrote lines, context

def test_missing_output_folders_are_created_and_every_file_is_announced(digits, tiny_spec_file,
                                                                        tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "f.npy"
    assert main(["embed", str(digits.test), "-o", str(out), "--model", str(tiny_spec_file),
                 "--weights", str(tiny_checkpoint), "-j", "0"]) == 0
    printed = capsys.readouterr().out
    for suffix in (".npy", ".ids.txt", ".json"):
        assert str(out.with_suffix(suffix)) in printed
    js, vis = tmp_path / "a" / "r.json", tmp_path / "b" / "v.jpg"
    assert main(["eval-retrieval", "--dataset", f"folder:{digits.test}", "--embeddings", str(out),
                 "--json", str(js), "--vis", str(vis)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {js}" in printed and f"wrote {vis}" in printed


def test_context_lines_do_not_wrap_to_the_table_width(digits, tiny_spec_file, tiny_checkpoint, tmp_path):
    out = tmp_path / "f.npy"
    assert main(["embed", str(digits.test), "-o", str(out), "--model", str(tiny_spec_file),
                 "--weights", str(tiny_checkpoint), "-j", "0"]) == 0
    result = subprocess.run([sys.executable, "-m", "unicom_cli", "eval-retrieval", "--dataset",
                             f"folder:{digits.test}", "--embeddings", str(out)], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "100"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "40 images, 5 classes; 0 skipped" in result.stdout.splitlines()


# ------------------------------------------------------------------ 16. the --vis picture

def test_vis_has_legend_labels_gaps_and_its_own_size(digits, tiny_spec_file, tiny_checkpoint, tmp_path):
    from unicom_cli.pipelines.vis import GAP, LINE, TILE, grid_size, header_height, row_height

    out = tmp_path / "f.npy"
    assert main(["embed", str(digits.test), "-o", str(out), "--model", str(tiny_spec_file),
                 "--weights", str(tiny_checkpoint), "-j", "0"]) == 0
    vis = tmp_path / "v.png"
    assert main(["eval-retrieval", "--dataset", f"folder:{digits.test}", "--embeddings", str(out),
                 "--vis", str(vis), "--vis-queries", "2", "--vis-k", "3"]) == 0
    with Image.open(vis) as im:
        assert im.size == grid_size(2, 4, notes=1, labels=True)
        px = np.asarray(im.convert("RGB")).astype(int)
    top = header_height(1)
    for row in range(2):
        tiles = px[top + row * row_height(True) + LINE + 2:][:TILE]
        for col in range(4):  # the gap left of every cell is white over the tiles' height
            x = col * (TILE + GAP)
            assert (tiles[:, x:x + GAP] == 255).all()
        y = top + (row + 1) * row_height(True) - GAP  # a white gap under each row's text band
        assert (px[y:y + GAP] == 255).all()
    text_band = px[top + LINE + 2 + TILE + 2:top + row_height(True) - GAP, GAP + TILE + GAP:GAP + 2 * TILE + GAP]
    assert (text_band.sum(axis=2) < 200).sum() > 30  # rank, score and name written under a result
    legend = px[:top]
    assert ((legend[..., 2] > 180) & (legend[..., 0] < 80)).sum() > 50  # the blue query swatch


# ------------------------------------------------------------------ 17. help

@pytest.mark.parametrize("command", ("", *COMMANDS))  # "": the top-level `unicom --help`
def test_every_help_ends_with_examples_and_no_noise(command):
    text = _help(*filter(None, [command]))
    lines = text.rstrip().splitlines()
    heading = max(n for n, line in enumerate(lines) if line.strip() == "Examples")
    examples = [line.strip() for line in lines[heading + 1:] if line.strip()]
    assert 2 <= len(examples) <= 4, text[-600:]  # the examples close the help
    assert sum(f"unicom {command}" in line for line in examples) >= 2, examples
    for noise in ("SPEC", "<bool>", "{input}", "{csv}", "{names}"):
        assert noise not in text


# ------------------------------------------------------------------ 7. a quick start for a CPU laptop

def test_quick_start_installs_no_dali_and_ci_still_does():
    import tomllib

    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quickstart"):readme.index("## Installing on a GPU machine")]
    installs = [line for line in quick.splitlines() if "pip install" in line]
    assert installs and not any("dali" in line for line in installs)
    assert any("--index-url https://download.pytorch.org/whl/cpu" in line for line in installs)
    assert "GB" in quick  # what each route costs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any("dali" in dep for dep in extras["test"]) and "dali" in extras
    assert '".[test,dali]"' in (ROOT / ".ci" / "run").read_text()


# ------------------------------------------------------------------ 14. what --procs guarantees

def test_embed_records_the_threads_each_process_used(digits, tiny_spec_file, tiny_checkpoint, tmp_path):
    out = tmp_path / "f.npy"
    assert main(["embed", str(digits.test), "-o", str(out), "--model", str(tiny_spec_file),
                 "--weights", str(tiny_checkpoint), "-j", "0"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["threads_per_process"] == 1
    readme = (ROOT / "README.md").read_text()
    assert "byte-identical to a 1-process run" not in readme  # the claim is now stated precisely
    assert "threads_per_process" in readme
