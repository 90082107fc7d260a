"""The documentation stays true: the site builds strictly (no broken link, anchor or
include), the README stays short, nothing points outside the repository, and the
README's quickstart runs as written (on the tests' small corpus)."""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# The quickstart's training run, shrunk further than TINY: what is tested is that each
# command runs and the next one reads what it wrote.
QUICK = {"num_train_steps": 2, "log_every_steps": 1, "eval_every_steps": 2, "checkpoint_every_steps": 2,
         "sample.num_prompts": 0}


def _repository_files() -> list[str]:
  """The repository's files: git's view (tracked and not ignored), or, outside a git
  checkout (an unpacked archive), every file but the usual build and environment folders."""
  try:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]
  except (OSError, subprocess.CalledProcessError):
    skip = {".git", ".venv", "__pycache__", "workdirs", "site", ".pytest_cache", ".hypothesis"}
    files = []
    for directory, dirs, names in os.walk(ROOT):
      dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
      files += [os.path.relpath(os.path.join(directory, n), ROOT) for n in names]
    return files


def quickstart_commands() -> str:
  """The README's quickstart: the code block between its snippet markers (the docs site
  includes the same lines)."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  section = re.search(r"\[start:quickstart\].*?\n```bash\n(.*?)\n```\n.*?\[end:quickstart\]", text, re.S)
  assert section, "README.md has no quickstart block between its --8<-- [start/end:quickstart] markers"
  return section.group(1)


def test_the_docs_site_builds_strictly(tmp_path):
  from mkdocs.commands.build import build
  from mkdocs.config import load_config

  config = load_config(config_file=os.path.join(ROOT, "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
  build(config)  # raises mkdocs.exceptions.Abort on the first warning in strict mode
  site = tmp_path / "site"
  reference = (site / "config-reference" / "index.html").read_text()
  assert "data.shuffle_block_docs" in reference and "consecutive batches do not walk" in reference
  assert "token_logprobs" in (site / "api" / "index.html").read_text()
  assert "training diverged" in (site / "troubleshooting" / "index.html").read_text()
  assert "--8&lt;--" not in (site / "benchmarks" / "index.html").read_text()  # every include resolved
  assert (site / "experiments" / "decode" / "decode.png").is_file()


def test_the_readme_is_short_and_starts_with_the_quickstart():
  with open(README, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the detail into docs/"
  first_screen = "\n".join(lines[:50])
  assert "## Quickstart" in first_screen and "python -m tpu_lm.main --config=configs/tiny.py" in first_screen


def test_the_benchmarks_page_includes_every_experiments_results():
  with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
    page = f.read()
  results = sorted(p for p in _repository_files() if re.fullmatch(r"experiments/[^/]+/results\.md", p))
  assert results
  included = {name for names in re.findall(r'^--8<-- "([^"]+)"$', page, re.M) for name in names.split("|")}
  missing = [p for p in results if p not in included]
  assert not missing, f"docs/benchmarks.md does not include {missing}"


def test_every_docs_page_is_one_click_from_the_readme():
  with open(README, encoding="utf-8") as f:
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", f.read()))
  pages = {p for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md")} - {"changelog.md"}
  assert pages <= linked | {"index.md"}, f"pages the README does not link: {sorted(pages - linked)}"


def test_nothing_points_outside_the_repository():
  outside = "../" + "shared"
  found = []
  for path in _repository_files():
    try:
      with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          if outside in line:
            found.append(f"{path}:{number}: {line.strip()[:100]}")
    except UnicodeDecodeError:
      continue  # a binary file
  assert not found, "paths outside the repository:\n" + "\n".join(found)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def runnable(commands: str, workdirs: str, corpus_dir: str, data_dir: str, port: int) -> str:
  """The quickstart as a bash script for the test machine: this interpreter, run
  directories under `workdirs`, a free port, and the training run shrunk to the tests'
  corpus and shapes (tests/conftest.py's TINY, as tiny_flags does), two steps, no samples."""
  overrides = {**TINY, **QUICK, "data.path": corpus_dir, "data.data_dir": data_dir}
  shrink = " ".join(shlex.quote(f"--config.{k}={v}") for k, v in overrides.items())
  lines = []
  for line in commands.splitlines():
    line = re.sub(r"^python ", shlex.quote(sys.executable) + " ", line)
    line = line.replace("workdirs/", workdirs.rstrip("/") + "/").replace("8765", str(port))
    if "-m tpu_lm.main " in line:
      line += " " + shrink
    lines.append(line)
  # A background server never outlives the script, whatever fails.
  return "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(lines) + "\n"


@pytest.mark.slow
def test_the_quickstart_runs_as_written(corpus_dir, data_dir, tmp_path):
  commands = quickstart_commands()
  for verb in ("tpu_lm.main", "tpu_lm.generate", "tpu_lm.serve", "openai", "tpu_lm.convert --to_hf"):
    assert verb in commands
  script = runnable(commands, str(tmp_path / "workdirs"), corpus_dir, data_dir, _free_port())
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
  process = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    output, _ = process.communicate(timeout=240)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    pytest.fail("the quickstart took over 240 s:\n" + output[-3000:])
  assert process.returncode == 0, output[-3000:]
  assert "done: step 2" in output  # trained
  assert re.search(r"\[\d+ tokens, ", output)  # generated
  assert "serving " in output  # served (and the client's completion printed after it)
  assert "GPT2LMHeadModel" in output  # exported
  assert (tmp_path / "workdirs" / "tiny_hf" / "config.json").is_file()
