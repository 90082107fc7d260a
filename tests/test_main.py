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
         "error: config file configs/no_such.py does not exist: pass --config=configs/<name>.py."),
    ],
    ids=["bad_value", "unknown_field", "wrong_type", "missing_file"],
)
def test_bad_input_is_one_line_and_exit_2(flags, message, tmp_path):
  result = _run("--config=configs/tiny.py", f"--workdir={tmp_path}/w", *flags)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [message]
  assert "Traceback" not in result.stdout + result.stderr
  assert not os.path.exists(f"{tmp_path}/w/checkpoints")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--config.mesh.data=3"], "error: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices but 1 are available"),
        (["--config.data.seq_len=256"], "error: config field data.seq_len is 256: it is longer than the model's positions"),
        (["--config.model.num_kv_heads=3"], "error: config field model.num_kv_heads is 3: it must divide model.num_heads (4)"),
        (["--config.data.dataset=no_such_dataset"], "error: data.dataset 'no_such_dataset' is neither one of"),
        (["--config.data.dataset=text_files", "--config.data.path={tmp}/empty"],
         "error: data.path '{tmp}/empty' matches no files"),
        (["--config.data.dataset=text_files", "--config.data.path=/nonexistent/dir"],
         "error: data.path '/nonexistent/dir' does not exist"),
        (["--workdir=/proc/not_writable"], "error: cannot write to workdir /proc/not_writable"),
    ],
    ids=["mesh", "seq_len", "kv_heads", "dataset", "empty_dir", "missing_dir", "workdir"],
)
def test_more_bad_input_is_one_line_and_exit_2(flags, fragment, tmp_path):
  os.makedirs(tmp_path / "empty")
  flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
  fragment = fragment.replace("{tmp}", str(tmp_path))
  result = _run("--config=configs/tiny.py", f"--workdir={tmp_path}/w", f"--config.data.data_dir={tmp_path}/tfds", *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  [line] = result.stderr.strip().splitlines()
  assert line.startswith(fragment), line
  assert not os.path.exists(f"{tmp_path}/w/checkpoints")
