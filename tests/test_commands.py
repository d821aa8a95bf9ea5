"""The commands as a user meets them: console scripts, python -m diffmem, --version, defaults that do not depend on
the shell's folder, and a `make clean` that keeps what was measured (issue 15.6)."""
import importlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_is_installed_and_answers_version(name):
    module, function = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    script = Path(sys.executable).parent / name     # pip install -e . (make setup) put it beside the interpreter
    assert script.is_file(), f"{script} missing: run make setup (pip install -e .) after changing pyproject.toml"
    run = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("diffmem "), run.stdout + run.stderr


def test_python_m_diffmem_lists_the_commands():
    run = subprocess.run([sys.executable, "-m", "diffmem"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and all(name in run.stdout for name in SCRIPTS), run.stdout


def test_the_embedded_default_loads_from_any_folder(tmp_path):
    """python -m diffmem.data without --config, run outside the checkout, finds experiments/digits.yaml."""
    run = subprocess.run([sys.executable, "-m", "diffmem.data"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0 and "digits" in run.stdout, run.stdout + run.stderr


def test_default_output_folders_are_in_the_checkout_wherever_the_shell_is(tmp_path, monkeypatch):
    from diffmem.cli import default_folder
    monkeypatch.chdir(tmp_path)
    assert default_folder("results", "width").parent == ROOT / "results"
    assert default_folder("results", "study-digits", stamp=False) == ROOT / "results" / "study-digits"


def test_make_clean_removes_what_setup_made_and_keeps_what_was_measured(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    made = [".venv/bin/python", "diffmem.egg-info/PKG-INFO", ".pytest_cache/README.md", "diffmem/__pycache__/x.pyc"]
    measured = ["results/width-1/emm.csv", "runs/train-1/config.yaml", "bench/results/nn.json", "diffmem/train.py"]
    for name in made + measured:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    run = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert [n for n in made if (tmp_path / n).exists()] == []
    assert [n for n in measured if not (tmp_path / n).exists()] == []
