"""The first hour's small frictions (issue 27): each test fails before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import one_error_line
from unicom_cli.cli.app import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def digits(tmp_path):
    """Two class folders of four small real digit images each (sklearn's 8x8 digits, enlarged)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    folder = tmp_path / "digits"
    for label in (0, 1):
        (folder / str(label)).mkdir(parents=True)
        rows = [i for i, t in enumerate(data.target) if t == label][:4]
        for n, i in enumerate(rows):
            pixels = (data.images[i] * 16).clip(0, 255).astype("uint8")
            Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(folder / str(label) / f"{n}.png")
    return folder


def test_embed_refusal_names_the_file_that_exists(digits, tmp_path, tiny_spec_file, capsys):
    """Only mine.json is there: the refusal names mine.json, not the absent mine.npy."""
    (tmp_path / "mine.json").write_text("{}")
    code = main(["embed", str(digits), "-o", str(tmp_path / "mine.npy"), "--model", str(tiny_spec_file),
                 "--random-init", "--workers", "0"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "mine.json already exists" in line and "mine.npy" not in line
    assert not (tmp_path / "mine.npy").exists()


# The options that say which network to build, in every command that builds one from a name or file.
MODEL_SOURCE = {"--weights", "--random-init", "--seed", "--mirror", "--cache-dir"}
MODEL_COMMANDS = ("embed", "index", "eval-retrieval", "eval-knn", "eval-linear", "finetune", "export")


def _option_names(command: str) -> set[str]:
    import typer

    from unicom_cli.cli.app import app

    params = typer.main.get_command(app).commands[command].params
    return {name for p in params for name in p.opts}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_builds_a_model_takes_the_same_model_options(command):
    assert MODEL_SOURCE <= _option_names(command), MODEL_SOURCE - _option_names(command)


def test_export_random_init_is_the_seeded_network(tmp_path, tiny_spec_file, capsys):
    """`export --random-init --seed 3` writes exactly the network that `create_model(seed=3)` builds."""
    from safetensors.torch import load_file

    from unicom_cli.models.factory import create_model

    out = tmp_path / "r.safetensors"
    assert main(["export", str(tiny_spec_file), "-o", str(out), "--random-init", "--seed", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    saved = load_file(str(out))
    want = create_model(str(tiny_spec_file), pretrained=False, seed=3, device="cpu", precision="fp32").model
    other = create_model(str(tiny_spec_file), pretrained=False, seed=4, device="cpu", precision="fp32").model
    for name, tensor in want.state_dict().items():
        assert (saved[name] == tensor).all(), name
    assert any((saved[n] != t).any() for n, t in other.state_dict().items() if t.is_floating_point())


# ------------------------------------------------------------------ the one picture module (items 6, 7, 8; #28 item 14)


@pytest.fixture
def digits_index(digits, tmp_path, tiny_spec_file, capsys):
    """An index over the two digit classes, a seeded random network (the same for every query)."""
    out = tmp_path / "digits.index"
    assert main(["index", str(digits), "-o", str(out), "--model", str(tiny_spec_file), "--random-init",
                 "--workers", "0"]) == 0
    capsys.readouterr()
    return out


def _csv_rows(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("suffix", [".html", ".png", ".jpg", ".webp", ".bmp"])
def test_search_and_eval_retrieval_take_the_same_picture_formats(suffix, digits, digits_index, tmp_path,
                                                                  tiny_spec_file):
    """One set of formats for every --vis: each command writes each of them."""
    from unicom_cli.pipelines.vis import FORMATS

    assert set(FORMATS) >= {".html", ".png", ".jpg", ".webp", ".bmp"}
    for command in (["search", str(digits_index), str(digits / "0" / "0.png"), "-k", "3"],
                    ["eval-retrieval", "--dataset", f"folder:{digits}", "--model", str(tiny_spec_file),
                     "--random-init", "--workers", "0"]):
        out = tmp_path / f"{command[0]}{suffix}"
        assert main([*command, "--vis", str(out)]) == 0, command
        if suffix == ".html":
            assert out.read_text(encoding="utf-8").startswith("<!doctype html>")
        else:
            with Image.open(out) as im:
                im.verify()
                assert im.format == Image.registered_extensions()[suffix]


def test_search_page_labels_rank_score_class_folder_and_legend_and_says_what_was_skipped(
        digits, digits_index, tmp_path, capsys):
    """Captions name the class folder (digits are 0/3.png, 1/3.png: the file name alone is
    ambiguous); a query that could not be read is named on the page, beside the count given."""
    import html as html_lib
    import re

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    page, csv_out = tmp_path / "r.html", tmp_path / "r.csv"
    assert main(["search", str(digits_index), str(digits / "1"), str(tmp_path / "broken.png"), "-k", "3",
                 "--vis", str(page), "-o", str(csv_out)]) == 0
    text = page.read_text(encoding="utf-8")
    rows = _csv_rows(csv_out)
    assert len(rows) == 4 * 3
    captions = [html_lib.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", text)]
    results = [c.split("<br>") for c in captions if c.startswith("#")]
    assert [(f"#{r['rank']} · {float(r['score']):.4f}", r["id"]) for r in rows] == [(c[0], c[1]) for c in results]
    assert all("/" in c[1] for c in results)  # class folder / file
    assert captions.count("query<br>1/0.png") == 1
    assert "query" in text and "result (class unknown)" in text  # the legend
    assert "5 queries given; 1 skipped" in text and "broken.png" in text
    assert "unicom search digits.index: 4 queries" in text


def test_eval_retrieval_picture_names_the_class_and_marks_hits(digits, tmp_path, tiny_spec_file):
    import html as html_lib
    import re

    page = tmp_path / "r.html"
    assert main(["eval-retrieval", "--dataset", f"folder:{digits}", "--model", str(tiny_spec_file),
                 "--random-init", "--workers", "0", "--vis", str(page), "--vis-queries", "8", "--vis-k", "3"]) == 0
    text = page.read_text(encoding="utf-8")
    figures = re.findall(r'<figure class="(\w+)"[^>]*>.*?<figcaption>(.*?)</figcaption>', text)
    assert len(figures) == 8 * 4
    for row in range(8):
        (qkind, query), *results = figures[4 * row:4 * row + 4]
        q_lines = html_lib.unescape(query).split("<br>")
        assert qkind == "query" and q_lines[2] == f"class {q_lines[1].split('/')[0]}"
        for rank, (kind, caption) in enumerate(results, start=1):
            head, name, cls = html_lib.unescape(caption).split("<br>")
            assert head.startswith(f"#{rank} · ") and cls == f"class {name.split('/')[0]}"
            assert kind == ("hit" if cls == q_lines[2] else "miss")
    for words in ("hit: same class", "miss: other class", "query"):
        assert words in text


def test_duplicates_vis_draws_the_groups(digits, digits_index, tmp_path, capsys):
    """`search --duplicates --vis` draws every group the -o file lists (it was ignored in silence)."""
    import html as html_lib
    import re
    import shutil

    shutil.copy(digits / "0" / "0.png", digits / "0" / "0-again.png")  # only there for the check below
    csv_out, page, png = tmp_path / "d.csv", tmp_path / "d.html", tmp_path / "d.png"
    assert main(["search", str(digits_index), "--duplicates", "--threshold", "0.9", "-o", str(csv_out),
                 "--vis", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    rows = _csv_rows(csv_out)
    assert rows, "the random network must find some group at 0.9 for this test to mean anything"
    text = page.read_text(encoding="utf-8")
    sections = re.findall(r"<h2>(.*?)</h2>(.*?)</section>", text)
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    assert [title for title, _ in sections] == [f"group {g}: {len(m)} images" for g, m in groups.items()]
    for (_, body), members in zip(sections, groups.values()):
        captions = [html_lib.unescape(c).split("<br>") for c in re.findall(r"<figcaption>(.*?)</figcaption>", body)]
        want = [(f"#{n} · {float(m['score']):.4f}", m["id"]) for n, m in enumerate(members, start=1)]
        assert [(c[0], c[1]) for c in captions] == want
    assert main(["search", str(digits_index), "--duplicates", "--threshold", "0.9", "--vis", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.height > 128 * len(groups)
    assert main(["search", str(digits_index), "--duplicates", "--vis", str(tmp_path / "d.gif")]) == 2
    assert "--vis" in one_error_line(capsys.readouterr().err)


@pytest.fixture
def hostile_index(digits, tmp_path, tiny_spec_file, capsys):
    """An index over a Latin-1 file name and two HTML-like ones (real digit images)."""
    import os

    folder = tmp_path / "odd"
    (folder / "c").mkdir(parents=True)
    sources = sorted((digits / "0").iterdir())
    for source, name in zip(sources, HOSTILE):
        (folder / "c" / name).write_bytes(source.read_bytes())
    with open(os.path.join(os.fsencode(folder / "c"), b"caf\xe9.png"), "wb") as handle:
        handle.write(sources[2].read_bytes())
    index = tmp_path / "odd.index"
    assert main(["index", str(folder), "-o", str(index), "--model", str(tiny_spec_file), "--random-init",
                 "--workers", "0"]) == 0
    capsys.readouterr()
    return index, folder


HOSTILE = ['<img src=x onerror=alert(1)>.png', '"quoted" & <b>.png']


def test_search_vis_escapes_hostile_and_non_utf8_names(hostile_index, tmp_path, capsys):
    """#28 item 14: a Latin-1 file name and HTML-like ones: a page (valid UTF-8, every name
    escaped, no markup injected) and a picture, exit 0, no traceback."""
    index, folder = hostile_index
    page, png = tmp_path / "odd.html", tmp_path / "odd.png"
    assert main(["search", str(index), str(folder), "-k", "3", "--vis", str(page)]) == 0
    assert main(["search", str(index), str(folder), "-k", "3", "--vis", str(png)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    text = page.read_bytes().decode("utf-8")  # valid UTF-8
    assert "<img src=x" not in text and "<b>" not in text and "onerror=alert(1)>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in text and "&quot;quoted&quot; &amp; &lt;b&gt;.png" in text
    assert "caf\\xe9.png" in text
    with Image.open(png) as im:
        im.verify()


@pytest.mark.slow
def test_hostile_page_runs_no_script_in_a_browser(hostile_index, tmp_path):
    """The page in a real browser: the names show as text and no injected handler runs."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from tests.serve.test_browser import CHROMIUM_ARGS

    index, folder = hostile_index
    page_file = tmp_path / "odd.html"
    assert main(["search", str(index), str(folder), "-k", "3", "--vis", str(page_file)]) == 0
    dialogs: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        captions = page.locator("figcaption").all_inner_texts()
        injected = page.locator("figcaption img, figcaption b, h2 img, h2 b").count()
        browser.close()
    assert dialogs == [] and injected == 0
    for name in HOSTILE + ["caf\\xe9.png"]:
        assert any(f"c/{name}" in caption for caption in captions), name


# ------------------------------------------------------------------ item 9: one default per concept


def _defaults(command: str) -> dict[str, object]:
    import typer

    from unicom_cli.cli.app import app

    return {p.name: p.default for p in typer.main.get_command(app).commands[command].params}


@pytest.mark.parametrize("command", ["embed", "index", "eval-retrieval", "eval-knn", "eval-linear", "finetune",
                                     "search", "serve"])
def test_device_is_auto_in_every_command(command):
    assert _defaults(command)["device"] == "auto"


def test_one_seed_and_one_result_count():
    """--random-init builds the same network in every command by default (finetune's seed was 1024);
    the page shows as many results as the API and the CLI give by default."""
    import re

    from unicom_cli.cli.app import app  # noqa: F401  (registers the commands)
    from unicom_cli.cli.options import MODEL_DEFAULTS
    from unicom_cli.pipelines.export import ExportConfig
    from unicom_cli.serve.app import ServeSettings
    from unicom_cli.train.loop import FinetuneConfig

    seed = MODEL_DEFAULTS["seed"]
    assert FinetuneConfig().seed == ExportConfig("x", "y.onnx").seed == seed
    assert _defaults("embed")["seed"] == _defaults("export")["seed"] == seed
    page = (Path(__file__).parents[2] / "unicom_cli" / "serve" / "static" / "index.html").read_text()
    selected = re.search(r"<option selected>(\d+)</option>", page)
    assert int(selected.group(1)) == ServeSettings().default_k == _defaults("search")["k"]


def test_a_default_that_differs_says_why():
    from tests.cli.test_first_hour import _help

    finetune = " ".join(_help("finetune").split())
    assert "default 0, as in every command" in finetune and "recipe" in finetune
    for command, default in (("embed", "default: off"), ("index", "default: on"), ("eval-linear", "default: on")):
        text = " ".join(_help(command).replace("│", " ").split())
        normalize = text[text.index("--normalize"):][:400]
        assert default in normalize and "raw output" in normalize and "cosine" in normalize, command


def test_knn_and_linear_tables_spell_their_headers_alike(capsys):
    from unicom_cli.cli import eval_knn, eval_linear

    eval_knn.print_results({"model": "m", "temperature": 0.07, "few_shot": None, "processes": 1,
                            "metrics": {"10": {"top1": 50.0, "top5": 90.0}},
                            "sizes": {"train": 2, "val": 2, "classes": 2}, "timings": {"total": 1.0}})
    eval_linear.print_results({"model": "m", "C_search": False, "C": 1.0, "normalize": True, "processes": 1,
                               "metrics": {"top1": 50.0, "top5": 90.0}, "outputs": [],
                               "sizes": {"train": 2, "val": 2, "classes": 2}, "timings": {"total": 1.0}})
    knn, linear = capsys.readouterr().out.split("linear probe")
    for header in ("top-1 (%)", "top-5 (%)"):
        assert header in knn and header in linear
    assert "top1" not in knn and "top5" not in knn


def test_serve_help_gives_the_precision_it_uses():
    """serve embeds queries in the index's precision (index.embedder): its --help says so."""
    from tests.cli.test_first_hour import _help

    text = " ".join(_help("serve").replace("│", " ").split())
    precision = text[text.index("--precision"):][:300]
    assert "recorded in the index" in precision and "fp32 on CPU" not in precision


def test_index_keeps_the_embeddings_of_a_folder_in_one_named_folder(digits, tmp_path, tiny_spec_file, capsys):
    """`index ./photos -o photos2.index` left four photos2.index.feats.* files, unsaid: now one
    folder, named in the summary and --help, that a rerun and --add use."""
    import json

    import numpy as np

    work = tmp_path / "work"
    work.mkdir()
    out = work / "photos2.index"
    assert main(["index", str(digits), "-o", str(out), "--model", str(tiny_spec_file), "--random-init",
                 "--workers", "0"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    features = work / "photos2.index.features"
    assert sorted(p.name for p in work.iterdir()) == ["photos2.index", "photos2.index.features"]
    assert sorted(p.name for p in features.iterdir()) == ["feats.failures.txt", "feats.ids.txt", "feats.json",
                                                          "feats.npy"]
    assert f"features {features}" in printed and "resumes" in printed
    assert len(np.load(features / "feats.npy")) == json.loads((out / "index.json").read_text())["count"] == 8
    assert main(["index", str(digits), "-o", str(out), "--model", str(tiny_spec_file), "--random-init",
                 "--workers", "0", "--overwrite"]) == 0  # a rebuild reuses the same folder
    assert sorted(p.name for p in work.iterdir()) == ["photos2.index", "photos2.index.features"]
    from tests.cli.test_first_hour import _help

    assert "<index>.features/" in _help("index")


def test_finetune_arch_is_shown_as_the_other_name_of_model(tmp_path, capsys):
    """`--arch` worked but was hidden: --help shows it on --model's line, and both spellings
    reach the same option (the same one-line refusal for a missing architecture file)."""
    from tests.cli.test_first_hour import _help

    line = next(row for row in _help("finetune").splitlines() if "--model" in row and "│" in row)
    assert "--arch" in line
    errors = []
    for name in ("--model", "--arch"):
        assert main(["finetune", name, str(tmp_path / "absent.json"), "--dataset", f"folder:{tmp_path}",
                     "--device", "cpu"]) == 2
        errors.append(one_error_line(capsys.readouterr().err))
    assert errors[0] == errors[1] and "absent.json" in errors[0]


# ------------------------------------------------------------------ item 15: 80 columns


def test_table_titles_stay_whole_at_80_columns(digits, tmp_path, tiny_spec_file):
    """The title of a results table was wrapped to the table's width, cutting the data set's path
    mid-word; it is now one line (copyable), whatever the table's width."""
    import os
    import subprocess
    import sys

    deep = tmp_path / "a-rather-long-folder-name" / "and-another-one-below-it"
    deep.parent.mkdir()
    digits.rename(deep)
    result = subprocess.run([sys.executable, "-m", "unicom_cli", "eval-retrieval", "--dataset", f"folder:{deep}",
                             "--model", str(tiny_spec_file), "--random-init", "-j", "0"], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "80"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"folder:{deep} · tiny" in result.stdout.splitlines()


def test_progress_bar_is_whole_at_80_columns(monkeypatch):
    import io
    import re
    import time

    from rich.console import Console

    from unicom_cli.utils import console

    monkeypatch.setenv("UNICOM_NO_PROGRESS", "0")
    out = io.StringIO()
    monkeypatch.setattr(console, "err_console", Console(file=out, width=80, force_terminal=True, color_system=None))
    with console.progress_bar(1_281_167, "folder:/data/imagenet/validation features") as bar:
        for n in (1_000, 640_000, 640_167):
            time.sleep(0.02)
            bar.advance(n)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    last = [line for line in text.replace("\r", "\n").splitlines() if "eta" in line][-1]
    assert len(last.strip()) <= 80 and "1281167/1281167 100%" in last and "images/s" in last
    assert last.rstrip().endswith("eta 0:00:00")
    assert last.count("…") == 1 and "folder:/" in last and "features" in last  # the label cut in its middle


def test_rate_leaves_out_the_start_up():
    """eval-linear said 0.5 images/s for 65 images in 15 s: the rate came from Rich's samples after
    the first, i.e. from the last 1 image. Now: the steps after the first (which carries the
    start-up) once they hold as many items as it, else everything over the whole time."""
    import time

    from unicom_cli.utils.console import Rate

    few = Rate()
    time.sleep(0.3)  # start-up inside the first step
    few.add(64)
    time.sleep(0.05)
    few.add(1)
    elapsed = time.monotonic() - few.start
    assert few.per_second() == pytest.approx(65 / elapsed, rel=0.2)  # not 1 / 0.05
    many = Rate()
    time.sleep(1.0)
    many.add(64)
    for _ in range(4):
        time.sleep(0.01)
        many.add(64)
    whole = many.count / (time.monotonic() - many.start)
    assert many.per_second() > 3 * whole  # the second of start-up is not in it


# ------------------------------------------------------------------ item 16: which split folder:DIR used


@pytest.mark.slow
@pytest.mark.parametrize("split", ["test", "val"])
def test_finetune_eval_line_names_the_split_of_folder_dataset(split, tmp_path, tiny_spec_file, tiny_checkpoint,
                                                               capsys):
    import json

    from unicom_cli.data.digits import write_digits_tree

    tree = write_digits_tree(tmp_path / "digits", size=32, limit_per_class=4)
    if split == "val":
        (tree.root / "test").rename(tree.root / "val")
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_spec_file), "--weights", str(tiny_checkpoint), "--dataset",
                 f"folder:{tree.root}", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--output",
                 str(out), "--workers", "0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"eval after epoch 1 on {tree.root / split} (20 images), %: recall@1" in err
    evals = [json.loads(line)["eval"] for line in (out / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert evals[-1]["split"] == str(tree.root / split) and evals[-1]["images"] == 20


def test_readme_sizes_are_whole_venvs():
    """The size table listed torch alone (0.75 / 5.2 GB) as what a route costs; a route costs its
    whole venv (measured 2.1 / 6.6 GiB), torch named as the part it is."""
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("| route |"):]
    table = table[:table.index("\n\n")]
    assert "| route | whole venv |" in table
    sizes = [float(v) for v in re.findall(r"\| ([0-9.]+) GiB \|", table)]
    assert sorted(sizes) == [2.1, 6.6]
