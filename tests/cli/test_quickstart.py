"""The README's quick start is what CI runs, and a broken torch/torchvision pair is one line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _quickstart_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / ".ci" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.quickstart_commands((ROOT / "README.md").read_text())


def test_readme_quick_start_is_two_commands_that_work_as_typed():
    setup, tests = _quickstart_commands()
    # One command sets up a fresh machine and runs the demo; it relies on no index but the
    # default one (a machine that reaches only the package registries has no other).
    assert setup.startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert 'pip install -e ".[test]"' in setup and setup.endswith("unicom demo")
    assert "--index-url" not in setup and "--extra-index-url" not in setup
    # The other runs the tests, also from a new shell.
    assert tests == ". .venv/bin/activate && python -m pytest -q"


def test_ci_runs_exactly_the_readme_commands():
    run = (ROOT / ".ci" / "run").read_text()
    printed = subprocess.run([sys.executable, str(ROOT / ".ci" / "quickstart.py")], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert printed == _quickstart_commands()
    assert "python3 .ci/quickstart.py" in run
    assert 'eval "${QUICKSTART[0]}"' in run and 'eval "${QUICKSTART[1]}"' in run
    assert run.index('eval "${QUICKSTART[0]}"') < run.index("ruff check") < run.index('eval "${QUICKSTART[1]}"')
    assert "pytest" not in run.replace("# the whole test suite", "")  # no second, different test command


def test_torchvision_that_does_not_match_torch_is_one_line(tmp_path, tiny_spec_file):
    """What pip leaves when it mixes two indexes: torchvision's import dies on a missing operator."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(photos / "red.png")
    env = {"PYTHONPATH": f"{fake.parent}:{ROOT}", "UNICOM_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin",
           "UNICOM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "unicom_cli", "embed", str(photos), "-o",
                             str(tmp_path / "f.npy"), "--model", str(tiny_spec_file), "--random-init"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "torchvision" in lines[0] and "torchvision::nms does not exist" in lines[0]
    assert "pip install --force-reinstall torch torchvision" in lines[0]
    assert not (tmp_path / "f.npy").exists()
