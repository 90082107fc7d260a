"""The offline code benchmark: pass@k against brute force, the sandbox's outcomes and
guards, the problem set's determinism and references, and the command on a tiny run."""

import itertools
import json
import os
import platform
import shutil

import pytest

from tests.conftest import cli_body
from tpu_lm.codebench import bench, metrics, sandbox
from tpu_lm.codebench import problems as problems_lib
from tpu_lm.errors import UserError

ADD_TEST = ">>> add(2, 3)\n5\n"
QUICK = sandbox.Limits(timeout_s=5, memory_mb=256)


def test_pass_at_k_is_the_brute_force_probability():
  for n in range(1, 8):
    for c in range(n + 1):
      samples = [True] * c + [False] * (n - c)
      for k in range(1, n + 1):
        draws = list(itertools.combinations(samples, k))
        assert metrics.pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws), abs=1e-12)
  assert metrics.pass_at_k(200, 0, 10) == 0.0 and metrics.pass_at_k(200, 200, 1) == 1.0
  assert 0 < metrics.pass_at_k(1000, 3, 100) < 1  # the binomials alone would overflow a float
  assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  assert metrics.mean_pass_at_k([(5, 0), (5, 5)], 1) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    metrics.pass_at_k(3, 1, 4)


@pytest.mark.parametrize("program, status, reason", [
    ("def add(a, b):\n    return a + b\n", "passed", "1 examples"),
    ("def add(a, b):\n    return a - b\n", "failed", "gave '-1', expected '5'"),
    ("def add(a, b)\n    return 1\n", "error", "SyntaxError"),
    ("import socket\ndef add(a, b):\n    socket.socket().connect(('127.0.0.1', 9))\n", "failed", "refuses socket."),
    ("import subprocess\ndef add(a, b):\n    subprocess.run(['true'])\n", "failed", "refuses subprocess.Popen"),
    ("def add(a, b):\n    open('/tmp/codebench_escape', 'w')\n", "failed", "outside its directory"),
    ("def add(a, b):\n    return len(bytearray(1 << 30))\n", "failed", "MemoryError"),  # over memory_mb=256
    ("import os\nos._exit(0)\n", "error", "without a result"),
    # Output goes to a file in its directory, capped (16 MiB): never into this process's memory.
    ("import os\nwhile True:\n    os.write(2, b'x' * 65536)\n", "error", "File too large"),
])
def test_sandbox_outcomes(program, status, reason):
  outcome = sandbox.run(program, ADD_TEST, limits=QUICK)
  assert outcome.status == status and reason in outcome.reason, outcome
  assert not os.path.exists("/tmp/codebench_escape")


def test_sandbox_times_out_an_endless_loop():
  outcome = sandbox.run("def add(a, b):\n    while True:\n        pass\n", ADD_TEST, limits=sandbox.Limits(timeout_s=1))
  assert outcome.status == "timeout"


def test_sandbox_runs_in_a_temporary_directory_it_removes(tmp_path):
  program = "import os\nopen('scratch.txt', 'w').write('x')\ndef where():\n    return os.getcwd()\n"
  test = f">>> where().startswith({str(tmp_path)!r})\nTrue\n>>> os.listdir('.')\n['scratch.txt']\n"
  assert sandbox.run(program, test, root=str(tmp_path), limits=QUICK).status == "passed"
  assert os.listdir(tmp_path) == []


def test_a_completion_ends_at_the_first_line_at_column_0():
  assert bench.body("    return 1\n\n    # more\nprint(2)\n    x\n") == "    return 1\n\n    # more\n"


SOURCE = '''import re
from .util import helper as h

LIMIT = 3


def _private(x):
    return h(x)


def clip(s):
    """Shortens s.

    >>> clip("abcdef")
    'abc'
    """
    return re.sub("", "", s)[:LIMIT]


def no_doctest(s):
    """No examples."""
    return s


def needs_a_global(s):
    """>>> needs_a_global(1)
    1
    """
    global LIMIT
    return s
'''


def test_problems_are_extracted_deterministically(tmp_path):
  first = problems_lib.candidates("pkg.mod", "pkg/mod.py", SOURCE)
  assert first == problems_lib.candidates("pkg.mod", "pkg/mod.py", SOURCE)
  [p] = first
  assert p.id == "pkg.mod.clip" and p.prompt.startswith("import re\n\n\nLIMIT = 3\n\n\ndef clip(s):\n")
  assert p.prompt.endswith('    """\n') and p.canonical == '    return re.sub("", "", s)[:LIMIT]\n'
  assert sandbox.run(p.program(p.canonical), p.test, limits=QUICK).status == "passed"
  # held out: a corpus holding the function (re-indented) drops it
  (tmp_path / "corpus.py").write_text("class X:\n" + "".join("  " + line + "\n" for line in
                                                               problems_lib.function_source(p).splitlines()))
  assert problems_lib.in_text(first, problems_lib.corpus_text(str(tmp_path))) == {p.id}
  path = str(tmp_path / "set.jsonl")
  problems_lib.write(first, path)
  assert problems_lib.read(path) == first and problems_lib.version(path).startswith("stdlib-doctests@")


def test_the_shipped_problem_set():
  shipped = problems_lib.read()
  ids = [p.id for p in shipped]
  assert 30 <= len(shipped) <= 150 and ids == sorted(set(ids))
  if platform.python_version() == shipped[0].python:  # what this Python's standard library gives, still
    import pathlib
    import sysconfig

    module = "statistics"
    rel = next(p.path for p in shipped if p.module == module)
    source = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / rel).read_text(encoding="utf-8")
    rebuilt = {p.id: p for p in problems_lib.candidates(module, rel, source)}
    assert all(rebuilt[p.id] == p for p in shipped if p.module == module)
  sample = shipped[::6]  # every reference passes its examples, every raising body fails them
  assert problems_lib.verified(sample) == sample


def _body(argv):
  cli_body("codebench", argv)


def test_the_command_on_a_tiny_run(trained_run, tmp_path, capsys):
  fits = problems_lib.Problem(id="tiny.inc", module="tiny", path="tiny.py", prompt='def inc(x):\n    """>>> inc(1)\n    2\n    """\n',
                              canonical="    return x + 1\n", test=">>> inc(1)\n2\n", python=platform.python_version())
  shipped = problems_lib.read()[:2]  # longer than the tiny model's 64-token context
  path = str(tmp_path / "problems.jsonl")
  problems_lib.write([fits, *shipped], path)
  out = str(tmp_path / "out")
  _body([f"--workdir={trained_run}", f"--problems={path}", "--samples=3", "--k=1,2", "--max_new_tokens=8",
         "--limit=3", "--max_batch=3", "--timeout=5", f"--out={out}"])
  results = json.load(open(os.path.join(out, "results.json")))
  assert results["config"]["python"] == platform.python_version() and results["config"]["k"] == [1, 2]
  assert results["problems"]["total"] == 3 and results["problems"]["evaluated"] == 1
  assert sorted(results["problems"]["skipped_ids"]) == sorted(p.id for p in shipped)
  [row] = results["per_problem"]
  assert row["id"] == "tiny.inc" and row["n"] == 3 and 0 <= row["c"] <= 3
  for k in (1, 2):
    assert row[f"pass@{k}"] == pytest.approx(metrics.pass_at_k(3, row["c"], k))
    assert results["pass_at_k"][f"pass@{k}"] == pytest.approx(row[f"pass@{k}"])
  assert row["pass@1"] == pytest.approx(row["c"] / 3)
  assert sum(results["outcomes"].values()) == 3
  assert len(open(os.path.join(out, "samples.jsonl")).readlines()) == 3
  assert "pass@2" in open(os.path.join(out, "results.md")).read()
  assert "| 1 of 3 | 2 | 3 |" in capsys.readouterr().out


def test_the_command_refuses_bad_input_and_writes_nothing(trained_run, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(UserError, match="--k=1,5 needs each k from 1 to --samples=2"):
    _body([f"--workdir={trained_run}", "--samples=2", "--k=1,5", f"--out={out}"])
  with pytest.raises(UserError, match="has no checkpoints/ directory"):
    _body([f"--workdir={tmp_path / 'nothing'}", f"--out={out}"])
  classifier = tmp_path / "classifier"  # the tiny run's directory, its saved config made a classifier's
  shutil.copytree(trained_run, classifier)
  for config_file in classifier.glob("checkpoints/*/config/*"):
    if config_file.is_file() and config_file.suffix in ("", ".json"):
      try:
        saved = json.loads(config_file.read_text())
      except ValueError:
        continue
      saved["task"]["kind"], saved["data"]["dataset"] = "classification", "stdlib_functions"
      config_file.write_text(json.dumps(saved))
  with pytest.raises(UserError, match="is a classification run"):
    _body([f"--workdir={classifier}", f"--out={out}"])
  assert not out.exists()
