"""Faults, with real processes and real signals: SIGKILL, SIGTERM, NaN, damaged checkpoints."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config, tiny_flags
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training.setup import Setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough to interrupt; every step logged; no mid-run eval or samples.
LONG = ["--config.num_train_steps=14", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
        "--config.eval_every_steps=100", "--config.sample.num_prompts=0", "--config.optim.warmup_steps=2"]


def _cmd(corpus_dir, data_dir, workdir, *extra):
  return [sys.executable, "-m", "tpu_lm.main", *tiny_flags(corpus_dir, data_dir, workdir), *LONG, *extra]


def _env():
  return {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}


def _run(cmd):
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _records(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _start_and_signal(cmd, workdir, sig, at_step, times=1):
  """Starts a run, waits until it has logged `at_step`, sends `sig` (`times` times)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(f"{workdir}/metrics.jsonl") and max(_losses(workdir), default=0) >= at_step:
      break
    time.sleep(0.05)
  for _ in range(times):
    proc.send_signal(sig)
    time.sleep(0.02)
  out, err = proc.communicate(timeout=240)
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def reference(corpus_dir, data_dir, tmp_path_factory):
  """The same run, never interrupted."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  result = _run(_cmd(corpus_dir, data_dir, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_logs_bitwise_equal_losses(corpus_dir, data_dir, tmp_path, reference):
  workdir = str(tmp_path / "run")
  cmd = _cmd(corpus_dir, data_dir, workdir)
  for at_step in (4, 10):  # once between checkpoints, once later; each rerun resumes
    rc, _, _ = _start_and_signal(cmd, workdir, signal.SIGKILL, at_step)
    assert rc == -signal.SIGKILL
  final = _run(cmd)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "resuming from the checkpoint" in final.stdout
  steps = [r["step"] for r in _records(workdir) if "loss" in r]
  assert steps == sorted(set(steps)), "steps logged twice: records past the checkpoint were not dropped"
  assert _losses(workdir) == _losses(reference)  # every step, bitwise
  assert _records(workdir)[-1] == _records(reference)[-1]  # the final eval


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_and_exits_0(corpus_dir, data_dir, tmp_path, reference):
  workdir = str(tmp_path / "run")
  cmd = _cmd(corpus_dir, data_dir, workdir)
  # A second SIGTERM during the save changes nothing.
  rc, out, err = _start_and_signal(cmd, workdir, signal.SIGTERM, at_step=4, times=2)
  assert rc == 0, err[-3000:]
  assert "stopped by SIGTERM at step" in out
  stopped = int(out.split("stopped by SIGTERM at step ")[1].split(":")[0])
  assert max(_losses(workdir)) == stopped  # no step lost: the last one logged is the one saved
  assert str(stopped) in os.listdir(f"{workdir}/checkpoints")
  resumed = _run(cmd)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from the checkpoint at step {stopped}" in resumed.stdout
  assert _losses(workdir) == _losses(reference)


def test_a_nonfinite_step_changes_nothing_but_the_step():
  config = tiny_config()
  setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(3, 200, (8, 32)).astype(np.int32) for k in ("inputs", "targets")}
  batch |= {"segment_ids": np.ones((8, 32), np.int32), "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))}
  with setup.context():
    state = setup.init(jax.random.key(0))
    state, m = setup.train_step(state, setup.device_batch(batch))  # a good step first: Adam moments are set
    assert int(m["nonfinite_steps"]) == 0
    emb = state.params["embed"]["embedding"]
    poisoned = state.replace(params={**state.params, "embed": {"embedding": emb.at[5, 0].set(np.nan)}})
    before = jax.device_get(poisoned)
    after, m = setup.train_step(poisoned, setup.device_batch(batch))
  after = jax.device_get(after)
  assert np.isnan(float(m["step_loss"])) and int(m["nonfinite_steps"]) == 1 and int(after.nonfinite_streak) == 1
  assert int(after.step) == int(before.step) + 1
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state), (before.params, before.opt_state))


@pytest.mark.slow
def test_divergence_stops_with_one_line_and_keeps_a_finite_checkpoint(corpus_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # An absurd learning rate: the first update leaves huge weights, and every later
  # step's loss overflows to NaN.
  result = _run(_cmd(corpus_dir, data_dir, workdir, "--config.optim.learning_rate=1e30",
                     "--config.optim.grad_clip_norm=0", "--config.max_consecutive_nonfinite=3"))
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("error: training diverged: the last 3 steps") and "Lower optim.learning_rate" in line
  assert "SKIPPED" in result.stdout
  assert os.listdir(f"{workdir}/checkpoints") == ["3"]


@pytest.fixture(scope="module")
def trained_to_6(corpus_dir, data_dir, tmp_path_factory):
  """A run with checkpoints at steps 3 and 6, trained once; tests damage copies."""
  workdir = str(tmp_path_factory.mktemp("six") / "run")
  result = _run(_cmd(corpus_dir, data_dir, workdir, "--config.num_train_steps=6"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _train_to_6(trained_to_6, workdir):
  shutil.copytree(trained_to_6, workdir)


@pytest.mark.slow
def test_a_half_written_checkpoint_is_never_restored(corpus_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  keep_one = "--config.keep_checkpoints=1"  # the only good checkpoint must survive too
  result = _run(_cmd(corpus_dir, data_dir, workdir, "--config.num_train_steps=6", keep_one))
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(f"{workdir}/checkpoints") == ["6"]
  # What a kill during the save of step 9 leaves: Orbax's temporary directory,
  # incomplete. It must be ignored, and the run resume from step 6.
  partial = f"{workdir}/checkpoints/9.orbax-checkpoint-tmp-1790000000"
  shutil.copytree(f"{workdir}/checkpoints/6", partial)
  for root, _, files in os.walk(partial):
    for name in files:
      os.truncate(os.path.join(root, name), 0)
  result = _run(_cmd(corpus_dir, data_dir, workdir, "--config.num_train_steps=8", keep_one))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from the checkpoint at step 6" in result.stdout
  assert [d for d in os.listdir(f"{workdir}/checkpoints") if "tmp" not in d] == ["8"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_checkpoint_is_one_line_and_nothing_is_deleted(corpus_dir, data_dir, tmp_path, damage, trained_to_6):
  workdir = str(tmp_path / "run")
  _train_to_6(trained_to_6, workdir)
  state_dir = f"{workdir}/checkpoints/6/state"
  victims = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
             if os.path.getsize(os.path.join(root, f)) > 100]
  for path in victims:
    if damage == "truncate":
      os.truncate(path, os.path.getsize(path) // 2)
    else:
      os.remove(path)
  listing = sorted(os.path.relpath(os.path.join(r, f), workdir) for r, _, fs in os.walk(workdir) for f in fs)
  result = _run(_cmd(corpus_dir, data_dir, workdir, "--config.num_train_steps=8"))
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("error: the checkpoint at step 6 in ") and "could not be read" in line, line
  assert "Traceback" not in result.stderr
  after = sorted(os.path.relpath(os.path.join(r, f), workdir) for r, _, fs in os.walk(workdir) for f in fs)
  assert set(listing) <= set(after)


@pytest.mark.slow
def test_a_checkpoint_of_another_shape_names_the_parameter(corpus_dir, data_dir, tmp_path, trained_to_6):
  workdir = str(tmp_path / "run")
  _train_to_6(trained_to_6, workdir)
  result = _run(_cmd(corpus_dir, data_dir, workdir, "--config.num_train_steps=8", "--config.model.mlp_dim=96"))
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert "params/layers_0/mlp/down/kernel" in line and "(64, 32)" in line and "(96, 32)" in line, line
  assert os.listdir(f"{workdir}/checkpoints") == ["3", "6"] or sorted(os.listdir(f"{workdir}/checkpoints")) == ["3", "6"]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_process_and_resume_on_one(corpus_dir, data_dir, tmp_path):
  """Two processes (2 devices each), each with its own data_dir (no shared disk: each
  builds the dataset and trains the SentencePiece tokenizer itself), log the losses
  and gradient norms of one process with 4 devices; their checkpoint then resumes on
  a single process (the data position holds every row's stream, whichever process
  served it) and goes on exactly as the one process did."""
  steps = ["--config.log_every_steps=1", "--config.checkpoint_every_steps=2", "--config.optim.schedule=constant",
           "--config.data.tokenizer=sentencepiece", "--config.data.vocab_size=300"]

  def env(devices):
    return {**_env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}

  one_dir = str(tmp_path / "one")
  one = subprocess.run(_cmd(corpus_dir, data_dir, one_dir, *steps, "--config.num_train_steps=6"), cwd=ROOT,
                       env=env(4), capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  two_dir = str(tmp_path / "two")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _cmd(corpus_dir, str(tmp_path / f"host{i}_data"), two_dir, *steps, "--config.num_train_steps=4",
           f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "on 4 cpu device(s)" in outs[0][0]
  assert list(_losses(two_dir)) == [1, 2, 3, 4]
  assert sorted(os.listdir(f"{two_dir}/checkpoints")) == ["2", "4"]
  resumed = subprocess.run(_cmd(corpus_dir, data_dir, two_dir, *steps, "--config.num_train_steps=6"), cwd=ROOT,
                           env=env(4), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from the checkpoint at step 4" in resumed.stdout
  records = {k: [r for r in _records(d) if "loss" in r] for k, d in (("one", one_dir), ("two", two_dir))}
  assert [r["step"] for r in records["two"]] == [1, 2, 3, 4, 5, 6]
  for field in ("loss", "grad_norm"):
    np.testing.assert_allclose([r[field] for r in records["two"]], [r[field] for r in records["one"]], rtol=1e-5,
                               err_msg=field)


def test_nothing_read_back_is_pickled(trained_run):
  """Checkpoints, tokenizer, data state and metrics are JSON, protobuf, NumPy or TensorStore."""
  pickle_magic = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
  files = [os.path.join(r, f) for r, _, fs in os.walk(trained_run) for f in fs]
  assert any("checkpoints" in f for f in files) and any(f.endswith("tokenizer.json") for f in files)
  for path in files:
    with open(path, "rb") as f:
      assert not f.read(2) in pickle_magic, f"{path} is a pickle"
  for root, _, names in os.walk(os.path.join(ROOT, "tpu_lm")):
    for name in (n for n in names if n.endswith(".py")):
      source = open(os.path.join(root, name)).read()
      if os.path.join(root, name) == os.path.join(ROOT, "tpu_lm", "codebench", "runner.py"):
        source = source.replace("exec(compile(", "")  # the sandbox's child runs a candidate program: its one purpose
      for banned in (r"import pickle", r"cloudpickle", r"allow_pickle=True", r"(?<![\w.])eval\(", r"(?<![\w.])exec\("):
        assert not re.search(banned, source), f"{name} uses {banned}"


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(corpus_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "two")
  address = f"127.0.0.1:{_free_port()}"
  env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      _cmd(corpus_dir, data_dir, workdir, "--config.num_train_steps=400", f"--coordinator_address={address}",
           "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(f"{workdir}/metrics.jsonl") and max(_losses(workdir), default=0) >= 3:
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # the scheduler reclaims the second host only
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  stopped = int(outs[0][0].split(" at step ")[1].split(":")[0])
  assert "stopped by preemption" in outs[0][0]
  assert max(_losses(workdir)) == stopped < 400
  assert str(stopped) in os.listdir(f"{workdir}/checkpoints")


@pytest.mark.slow
def test_sigterm_before_training_starts_exits_0_with_nothing_to_save(corpus_dir, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_cmd(corpus_dir, data_dir, workdir), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # The first line comes while the dataset is being built (or, if it already is,
  # once the data is ready): either way before the first step.
  first = proc.stdout.readline()
  assert first.startswith(("Downloading and preparing", "data:")), first + proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by SIGTERM before training started: nothing to save" in out
  assert not os.path.exists(f"{workdir}/metrics.jsonl") or not _losses(workdir)
  again = _run(_cmd(corpus_dir, data_dir, workdir, "--config.num_train_steps=2"))  # nothing was left broken
  assert again.returncode == 0, again.stderr[-3000:]


def _snapshot(directory) -> dict:
  """Every file under `directory` with its bytes."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.mark.parametrize("overrides, fragment", [
    # Another tokenizer whose vocabulary pads to the same embedding rows as the bytes one (384):
    # the parameter shapes agree, so nothing else would notice.
    ({"data.tokenizer": "sentencepiece", "data.vocab_size": 300}, "tokenizer"),
    # Another tokenizer and other shapes (the README's base config into a tiny run).
    ({"data.tokenizer": "sentencepiece", "data.vocab_size": 512}, "tokenizer"),
    ({"data.seq_len": 16}, "data.seq_len"),
    ({"model.mlp_dim": 96}, "params/layers_0/mlp/down/kernel"),
])
def test_resuming_another_run_is_refused_before_anything_in_it_is_written(trained_run, tmp_path, overrides, fragment):
  from tpu_lm.errors import UserError
  from tpu_lm.training import loop

  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  before = _snapshot(workdir)
  config = run_config(trained_run)
  with config.unlocked():
    config.num_train_steps += 2
    for dotted, value in overrides.items():
      section, leaf = dotted.split(".")
      config[section][leaf] = value
  with pytest.raises(UserError, match=re.escape(fragment)) as e:
    loop.train_and_evaluate(config, workdir)
  assert "\n" not in str(e.value) and "new --workdir" in str(e.value)
  assert _snapshot(workdir) == before


def run_config(workdir):
  """The config a run directory was trained with."""
  from tpu_lm.inference import run_dir

  return run_dir.read_config(workdir, run_dir.resolve_step(workdir))
