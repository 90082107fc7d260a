"""The real command, in a subprocess: training, resume, and bad input."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import tiny_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
  return subprocess.run(
      [sys.executable, "-m", "tpu_lm.main", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )


@pytest.mark.slow
def test_trains_then_resumes_from_its_checkpoint(corpus_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # A constant schedule (after warmup) does not depend on num_train_steps, so a run
  # extended from 6 to 8 steps must match one that ran 8 steps straight.
  constant = "--config.optim.schedule=constant"
  first = _run(*tiny_flags(corpus_dir, data_dir, workdir), constant)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "starting from scratch" in first.stdout
  assert "bits/byte" in first.stdout and "zlib -9" in first.stdout
  assert "--- sample ---" in first.stdout
  records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == [2, 4, 6]
  assert {"loss", "ppl", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
  assert [r["step"] for r in records if "eval_bpb" in r] == [3, 6]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["3", "6"]

  second = _run(*tiny_flags(corpus_dir, data_dir, workdir), "--config.num_train_steps=8", constant)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from the checkpoint at step 6" in second.stdout
  resumed = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  assert [r["step"] for r in resumed if "loss" in r] == [2, 4, 6, 8]

  # The resumed run logs exactly what a run that never stopped logs: same data
  # position, same optimizer state, same final eval.
  straight_dir = str(tmp_path / "straight")
  straight = _run(*tiny_flags(corpus_dir, data_dir, straight_dir), "--config.num_train_steps=8", constant)
  assert straight.returncode == 0, straight.stderr[-3000:]
  expected = [json.loads(line) for line in open(f"{straight_dir}/metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in resumed if "loss" in r] == [
      (r["step"], r["loss"]) for r in expected if "loss" in r]
  assert resumed[-1] == expected[-1]  # the final eval record


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.model.num_heads=3"],
         "error: config field model.num_heads is 3: it must divide model.d_model (64), or set model.head_dim."),
        (["--config.model.nmu_layers=3"],
         "error: unknown config field 'nmu_layers' in --config.model.nmu_layers"
         ' (Did you mean "num_layers" instead of "nmu_layers"?): check the name against the config file.'
         ),
        (["--config.model.num_layers=two"],
         "error: flag --config.model.num_layers=two: invalid literal for int() with base 10: 'two'."),
        (["--config=configs/no_such.py"],
         f"error: config file configs/no_such.py does not exist (relative paths start at {ROOT}): pass"
         " --config=configs/<name>.py from the repository root, or the config file's full path."),
        (["--num_train_steps=5"],
         "error: unknown flag --num_train_steps: config fields are set as --config.num_train_steps=VALUE."),
        (["--learning_rate=0.1"],
         "error: unknown flag --learning_rate: config fields are set as --config.optim.learning_rate=VALUE."),
        (["--config={tmp}/syntax.py"],
         "error: config file {tmp}/syntax.py failed to load at line 4 (SyntaxError: invalid syntax): fix it and rerun."),
        (["--config={tmp}/raises.py"],
         "error: config file {tmp}/raises.py failed to load at line 3 (KeyError: 'no_such_key'): fix it and rerun."),
    ],
    ids=["bad_value", "unknown_field", "wrong_type", "missing_file", "bare_field", "bare_leaf", "config_syntax_error",
         "config_raises"],
)
def test_bad_input_is_one_line_and_exit_2(flags, message, tmp_path):
  (tmp_path / "syntax.py").write_text("import ml_collections\ndef get_config():\n  c = ml_collections.ConfigDict()\n  c.x = 1 +\n")
  (tmp_path / "raises.py").write_text("import ml_collections\ndef get_config():\n  return {}['no_such_key']\n")
  flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
  message = message.replace("{tmp}", str(tmp_path))
  result = _run("--config=configs/tiny.py", f"--workdir={tmp_path}/w", *flags)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [message]
  assert "Traceback" not in result.stdout + result.stderr
  assert not os.path.exists(f"{tmp_path}/w/checkpoints")


def test_a_config_file_loads_from_any_working_directory(tmp_path):
  """configs/tiny.py imports configs.base: that worked only from the repository root."""
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  result = subprocess.run([sys.executable, "-m", "tpu_lm.main", f"--config={ROOT}/configs/tiny.py",
                           f"--workdir={tmp_path}/w", "--config.model.num_heads=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: config field model.num_heads is 3: it must divide model.d_model (64), or set model.head_dim."]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"mesh.data": 3}, "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices but 8 are available"),
        ({"data.seq_len": 256}, "config field data.seq_len is 256: it is longer than the model's positions"),
        ({"model.num_kv_heads": 3}, "config field model.num_kv_heads is 3: it must divide model.num_heads (4)"),
        ({"data.dataset": "no_such_dataset"}, "data.dataset 'no_such_dataset' is neither one of"),
        ({"data.path": "{tmp}/empty"}, "data.path '{tmp}/empty' matches no files"),
        ({"data.path": "/nonexistent/dir"}, "data.path '/nonexistent/dir' does not exist"),
        ({"workdir": "/proc/not_writable"}, "cannot write to workdir /proc/not_writable"),
    ],
    ids=["mesh", "seq_len", "kv_heads", "dataset", "empty_dir", "missing_dir", "workdir"],
)
def test_more_bad_input_is_one_sentence_before_any_work(overrides, fragment, tmp_path, corpus_dir):
  """In-process: the same UserError the command prints as one line (tested above)."""
  from tests.conftest import tiny_config
  from tpu_lm.errors import UserError
  from tpu_lm.training import loop

  os.makedirs(tmp_path / "empty")
  config = tiny_config(corpus_dir, str(tmp_path / "tfds"))
  workdir = str(tmp_path / "w")
  for key, value in overrides.items():
    value = value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value
    if key == "workdir":
      workdir = value
      continue
    section, leaf = key.split(".")
    config[section][leaf] = value
  with pytest.raises(UserError) as e:
    loop.train_and_evaluate(config, workdir)
  assert str(e.value).startswith(fragment.replace("{tmp}", str(tmp_path))), str(e.value)
  assert "\n" not in str(e.value)
  assert not os.path.exists(f"{tmp_path}/w/checkpoints")


def test_the_console_script_runs_each_verb_with_its_flags(tmp_path):
  """tpu-lm VERB (pyproject's [project.scripts]): the same commands, the same one-line errors."""
  import shutil

  script = shutil.which("tpu-lm", path=os.path.dirname(sys.executable))
  if script is None:
    pytest.skip("tpu-lm is not installed in this environment (pip install -e . puts it beside python)")
  env = {**os.environ, "XLA_FLAGS": ""}
  out = subprocess.run([script, "train", "--config=configs/tiny.py", f"--workdir={tmp_path}/w",
                        "--config.model.num_heads=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      "error: config field model.num_heads is 3: it must divide model.d_model (64), or set model.head_dim."]
  out = subprocess.run([script, "serve", "--workdir=/nonexistent", "--max_batch=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.strip() == "error: --max_batch=0 is invalid: it must be at least 1."
  out = subprocess.run([script, "fly"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stderr.startswith("error: unknown command 'fly': use one of train, generate,")
