"""The experiments' shape: a run.py in every folder, runnable as a module or by its path,
importable without running, and results files newest first with date, machine, speed
factor and command in every entry. Nothing here runs an experiment."""

import importlib
import os
import re
import subprocess
import sys

import pytest

from experiments import record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "experiments")
NAMES = sorted(n for n in os.listdir(HERE) if os.path.isdir(os.path.join(HERE, n)) and n not in ("__pycache__", "runs"))
RESULTS = [n for n in NAMES if os.path.exists(os.path.join(HERE, n, "results.md"))]


def test_every_folder_is_an_experiment_with_results():
  assert "interpret" in NAMES and "sweep" in NAMES
  for name in NAMES:
    assert os.path.isfile(os.path.join(HERE, name, "run.py")), name
    assert os.path.isfile(os.path.join(HERE, name, "__init__.py")), name
  assert RESULTS == NAMES


def test_no_script_edits_sys_path():
  for folder, _, files in os.walk(HERE):
    for f in files:
      if f.endswith(".py"):
        text = open(os.path.join(folder, f)).read()
        edits = re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\[|=|\+=)|\"PYTHONPATH\": ROOT", text)
        assert not edits, os.path.join(folder, f)


@pytest.mark.parametrize("name", NAMES)
def test_run_py_imports_without_running_and_reruns_as_its_module(name):
  text = open(os.path.join(HERE, name, "run.py")).read()
  assert f'os.execv(sys.executable, [sys.executable, "-m", "experiments.{name}.run", *sys.argv[1:]])' in text
  module = importlib.import_module(f"experiments.{name}.run")  # pytest's argv: main() would fail on it
  assert callable(module.main)


def test_the_script_and_the_module_are_the_same_command():
  by_path = subprocess.run([sys.executable, "experiments/sweep/run.py", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
  as_module = subprocess.run([sys.executable, "-m", "experiments.sweep.run", "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
  assert by_path.returncode == as_module.returncode == 0, by_path.stderr + as_module.stderr
  assert by_path.stdout == as_module.stdout and "--trials" in by_path.stdout


@pytest.mark.parametrize("name", RESULTS)
def test_results_newest_first_with_date_machine_factor_and_command(name):
  text = open(os.path.join(HERE, name, "results.md")).read()
  assert text.startswith("# ")
  entries = text.split("\n### ")[1:]
  assert entries, name
  dates = []
  for entry in entries:
    title = entry.splitlines()[0]
    m = re.match(r"(\d{4}-\d\d-\d\d), ([^,]+), (speed factor [\d.]+|speed factor not recorded)", title)
    assert m, title
    dates.append(m[1])
    assert "\nCommand: " in entry, title
  assert dates == sorted(dates, reverse=True), name


def test_publish_puts_the_newest_entry_on_top(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", [os.path.join(HERE, "demo", "run.py"), "--steps=3"])
  path = str(tmp_path / "results.md")
  record.publish(path, "Demo", ["| a |", "|---|", "| 1 |"], "speed factor 0.5", about="first", quiet=True)
  record.publish(path, "Demo", ["| a |", "|---|", "| 2 |"], "speed factor 0.6", about="second", quiet=True)
  text = open(path).read()
  assert text.startswith("# Demo\n\n### ")
  assert text.index("speed factor 0.6: second") < text.index("speed factor 0.5: first")
  assert text.count("Command: `python -m experiments.demo.run --steps=3`.") == 2
  record.publish(path, "Demo", ["| a |", "|---|", "| 3 |"], "speed factor 0.6", about="second", replace_latest=True,
                 quiet=True)
  text = open(path).read()
  assert "| 2 |" not in text and text.index("| 3 |") < text.index("| 1 |") and text.count("\n### ") == 2
